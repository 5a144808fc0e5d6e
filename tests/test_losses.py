"""``fast.losses.mgsr_token_span_loss``: the weighted sum of the two terms equals the oracle's, and every
trainable piece (student logits, bounds sub-network) gets its gradient, on both backends."""
import numpy as np
import pytest
import torch

import reference.dac_kl as RD
import reference.span as RS
from fast.dac_kl import DACKL
from fast.losses import mgsr_token_span_loss
from fast.span import spans_to_tensor
from fast.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_combined_loss_matches_oracle(backend):
    rng = np.random.default_rng(0)
    B, T, V = 2, 5, 37
    t, s = rng.normal(size=(B, T, V)) * 2, rng.normal(size=(B, T, V)) * 2
    mask = np.array([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]], dtype=bool)
    spans = [[(1, 4)], [(2, 4)]]
    dac = DACKL(fixed_bounds=(0.9, 0.3), backend=backend)
    S = torch.tensor(s, dtype=torch.float32, device=DEVICE, requires_grad=True)
    T_ = torch.tensor(t, dtype=torch.float32, device=DEVICE)
    loss, parts = mgsr_token_span_loss(T_, S, dac=dac, spans=spans_to_tensor(spans, DEVICE),
                                       mask=torch.tensor(mask, device=DEVICE), w_dac=0.7, w_span=2.0)
    loss.backward()
    tf, sf, m = t.reshape(-1, V), s.reshape(-1, V), mask.reshape(-1)
    n = int(m.sum())
    r_dac = RD.dac_kl(tf[m], sf[m], np.full(n, 0.9), np.full(n, 0.3)).mean()
    P = sum(len(RS.pairs(x)) for x in spans)
    r_span = sum(len(RS.pairs(spans[b])) / P * RS.span_loss(t[b], s[b], spans[b]) for b in range(B))
    assert_close(parts["dac"], r_dac, dtype=torch.float32, name="dac")
    assert_close(parts["span"], r_span, dtype=torch.float32, name="span")
    assert_close(loss, 0.7 * r_dac + 2.0 * r_span, dtype=torch.float32, name="total")
    g = np.zeros_like(sf)
    g[m] = 0.7 * RD.dac_kl_grad(tf[m], sf[m], np.full(n, 0.9), np.full(n, 0.3), g=np.full(n, 1.0 / n))[0]
    g = g.reshape(B, T, V)
    for b in range(B):
        g[b] += 2.0 * len(RS.pairs(spans[b])) / P * RS.span_loss_grad(t[b], s[b], spans[b])
    assert_close(S.grad, g, dtype=torch.float32, name="d student")


def test_subnetwork_gets_gradients_and_no_spans_is_zero():
    torch.manual_seed(0)
    dac = DACKL(k=8, hidden=16, backend="torch")
    t, s = torch.randn(2, 4, 30), torch.randn(2, 4, 30, requires_grad=True)
    loss, parts = mgsr_token_span_loss(t, s, dac=dac, spans=None)
    assert parts["span"].item() == 0.0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in dac.parameters())
    assert dac.mlp[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"mask must be \[B, T\]"):
        mgsr_token_span_loss(t, s, dac=dac, mask=torch.ones(2, 3, dtype=torch.bool))
