"""The building blocks the NumPy oracles share (reference/nn.py, the mask and GQA of reference/attention.py):
written once, used everywhere, and their documented edge cases."""

import warnings

import numpy as np
import pytest

import reference.attention as A
import reference.dac_kl as dac
import reference.divergences as div
import reference.gpt as gpt
import reference.nn as nn
import reference.span as span
from fast.testing import assert_close, central_difference


def test_one_copy_of_each_building_block():
    assert div.log_softmax is nn.log_softmax and dac.log_softmax is nn.log_softmax
    assert span.log_softmax is nn.log_softmax
    assert dac.gelu is nn.gelu and gpt.gelu is nn.gelu and dac.sigmoid is nn.sigmoid
    assert gpt.attention is A.attention  # the GPT oracle's attention is the attention oracle
    assert not hasattr(gpt, "causal_mask") and not hasattr(gpt, "softmax")


def test_log_softmax_definition_padding_and_empty_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 7)) * 3
    x[0] = [1e4, -1e4, 0, 1e4, 3, 2, 1]  # huge logits: max-subtracted, no overflow
    x[1, 5:] = -np.inf  # padded entries
    x[3] = -np.inf  # nothing to normalise
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        out = nn.log_softmax(x)
    fin = x[:3]
    want = fin - (
        np.max(fin, -1, keepdims=True)
        + np.log(np.sum(np.exp(fin - np.max(fin, -1, keepdims=True)), -1, keepdims=True))
    )
    assert_close(out[:3], want, name="log_softmax")  # -inf where padded, compared exactly by the helper
    assert np.all(np.isneginf(out[1, 5:])) and np.isfinite(out[1, :5]).all()
    assert_close(np.exp(out[:3]).sum(-1), np.ones(3), name="sums to 1")
    # convention: an all -inf row stays -inf everywhere (probabilities 0), never NaN
    assert np.all(np.isneginf(out[3]))


def test_gelu_grad_matches_finite_differences():
    x = np.linspace(-6, 6, 41)
    fd = np.diagonal(central_difference(nn.gelu, x, eps=1e-6))  # elementwise: the Jacobian's diagonal
    assert_close(nn.gelu_grad(x), fd, dtype="float32", name="gelu'")
    assert_close(nn.sigmoid(np.array([-800.0, 0.0, 800.0])), [0.0, 0.5, 1.0], name="sigmoid ends")


@pytest.mark.parametrize("causal,window", [(True, None), (True, 3), (False, 2)])
def test_gqa_equals_repeated_kv_heads(causal, window):
    """q [B, H_q, T, D] with k, v [B, H_kv, T, D]: query head h reads kv head h // G; dk, dv sum the group."""
    rng = np.random.default_rng(1)
    B, Hkv, G, T, D = 2, 2, 3, 5, 4
    q, do = rng.normal(size=(2, B, Hkv * G, T, D))
    k, v = rng.normal(size=(2, B, Hkv, T, D))
    dlse = rng.normal(size=(B, Hkv * G, T))
    kr, vr = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    out, lse = A.attention(q, k, v, causal=causal, window=window)
    out_r, lse_r = A.attention(q, kr, vr, causal=causal, window=window)
    assert np.array_equal(out, out_r) and np.array_equal(lse, lse_r)
    dq, dk, dv = A.attention_grad(q, k, v, do, causal=causal, window=window, dlse=dlse)
    dq_r, dk_r, dv_r = A.attention_grad(q, kr, vr, do, causal=causal, window=window, dlse=dlse)
    assert dk.shape == k.shape and dv.shape == v.shape and dq.shape == q.shape
    assert_close(dq, dq_r, name="dq")
    assert_close(dk, dk_r.reshape(B, Hkv, G, T, D).sum(2), name="dk")
    assert_close(dv, dv_r.reshape(B, Hkv, G, T, D).sum(2), name="dv")
    # and by finite differences on the kv heads themselves
    f = lambda k_, v_: float(
        np.sum(do * A.attention(q, k_, v_, causal=causal, window=window)[0])
        + np.sum(dlse * A.attention(q, k_, v_, causal=causal, window=window)[1])
    )
    fd_k = central_difference(lambda k_: f(k_, v), k, eps=1e-6)
    assert_close(dk, fd_k, dtype="float32", name="dk by finite differences")


def test_old_equal_shape_calls_and_bad_gqa_shapes():
    rng = np.random.default_rng(2)
    q, k, v = rng.normal(size=(3, 6, 4))  # one head, no head axis: the old call
    out, lse = A.attention(q, k, v, window=2)
    want, want_lse = A.attention_by_definition(q, k, v, window=2)
    assert_close(out, want, name="out")
    assert_close(lse, want_lse, name="lse")
    x = lambda *shape: rng.normal(size=shape)
    with pytest.raises(ValueError, match="multiple of H_kv"):
        A.attention(x(1, 3, 6, 4), x(1, 2, 6, 4), x(1, 2, 6, 4))
    with pytest.raises(ValueError, match="multiple of H_kv"):  # different T
        A.attention(x(1, 2, 6, 4), x(1, 1, 5, 4), x(1, 1, 5, 4))
    with pytest.raises(ValueError, match="multiple of H_kv"):  # k and v differ
        A.attention_grad(x(1, 2, 6, 4), x(1, 1, 6, 4), x(1, 2, 6, 4), x(1, 2, 6, 4))
