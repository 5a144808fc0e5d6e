"""The torch backend of ``fast.divergences`` processes rows in chunks and screens each chunk with one
cheap reduction; these tests force one row per chunk so that every chunk boundary, the padded
arithmetic of a chunk, a masked chunk holding NaN and the error path are exercised against the oracle
(``tests/test_divergences_fast.py`` covers the rest at the default chunk size)."""

import numpy as np
import pytest
import torch
from test_divergences_fast import CASES, IDS, _check, _make

from fast import divergences as F

ONE_ROW_PER_CHUNK = 1  # ``block_v`` of the torch backend: elements per row chunk, so one row per chunk


def _mixed_rows(rng, n=7, v=37):  # padded rows, clean rows, masked rows holding NaN / a -inf mismatch
    t, s = _make(rng, (n,), v)
    t[2, [3, 30]] = s[2, [3, 30]] = -np.inf  # a kept padded row between clean chunks
    t[6, :5] = s[6, :5] = -np.inf
    t[4, 1] = np.nan  # masked: never looked at
    s[5, 0] = -np.inf  # masked: a mismatch
    keep = np.array([True, True, True, True, False, False, True])
    return t, s, keep


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_chunked_rows_match_reference(name, params):
    rng = np.random.default_rng(30)
    t, s, keep = _mixed_rows(rng)
    _check(
        name,
        "torch",
        t,
        s,
        tau=1.5,
        params=params,
        keep=keep,
        reduction="none",
        go_seed=1,
        block_v=ONE_ROW_PER_CHUNK,
    )
    _check(
        name,
        "torch",
        t,
        s,
        tau=1.0,
        params=params,
        keep=keep,
        reduction="mean",
        go_seed=2,
        block_v=ONE_ROW_PER_CHUNK,
    )


@pytest.mark.parametrize("chunked", [False, True])
def test_bad_rows_are_counted_across_chunks(chunked):
    chunk = ONE_ROW_PER_CHUNK if chunked else None
    t, s = torch.randn(6, 9), torch.randn(6, 9)
    s[3, 1] = float("nan")
    t[5, 2] = float("-inf")  # a mismatch in a later chunk
    t[0, 4] = s[0, 4] = float("-inf")  # shared padding: fine
    with pytest.raises(ValueError, match=r"in 2 unmasked row\(s\), first row 3 \(flattened\): NaN or \+inf"):
        F.divergence("forward_kl", t, s, backend="torch", block_v=chunk)
    keep = torch.tensor([1, 1, 1, 0, 1, 0], dtype=torch.bool)
    assert torch.isfinite(F.divergence("forward_kl", t, s, mask=keep, backend="torch", block_v=chunk))


@pytest.mark.parametrize("name", ["forward_kl", "js_divergence", "skew_reverse_kl", "tv_distance"])
def test_forward_only_equals_forward_of_training_call(name):
    rng = np.random.default_rng(31)
    t64, s64 = _make(rng, (5,), 300, n_pad=4)
    t = torch.tensor(t64, dtype=torch.float32)
    s = torch.tensor(s64, dtype=torch.float32, requires_grad=True)
    trained = F.divergence(name, t, s, reduction="none", backend="torch")
    with torch.no_grad():
        plain = F.divergence(name, t, s, reduction="none", backend="torch")
    assert torch.equal(trained.detach(), plain)
    assert torch.equal(F.divergence(name, t, s.detach(), reduction="none", backend="torch"), plain)


def test_backward_twice_with_retain_graph():
    t, s = torch.randn(4, 33), torch.randn(4, 33, requires_grad=True)
    loss = F.divergence("js_divergence", t, s, backend="torch")
    (g1,) = torch.autograd.grad(loss, s, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, s)
    assert torch.equal(g1, g2)
