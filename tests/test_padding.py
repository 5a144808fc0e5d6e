"""Padding and edges, as properties.

* Padding invariance: whatever the keys and values at padded positions hold, and however much padding a row
  has (a multiple of the block size or not), every valid output and every gradient at valid positions is
  unchanged -- for MATCH's padded path (token and block retrieval, joint and gated) and for the attention
  of a KV cache / padded batch (``fast.attention.attention_kv``).
* Sizes around every boundary of the fused kernels: T = w - 1, w, w + 1 (the first length at which a
  retrieval candidate exists), one block and one block + 1, against the NumPy oracle.
"""

import pytest
import torch
from test_attention import _run as attention_run
from test_match_triton import check_all as match_check

from fast.attention import attention_kv
from fast.match import match_attention_kv
from fast.testing import assert_close


def _padded_inputs(B, Hq, Hkv, T, D, pads, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64)
    do = torch.randn(B, Hq, T, D, generator=g, dtype=torch.float64)
    valid = torch.ones(B, T, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False  # left padding, as in batched generation
    return q, k, v, do, valid


def _garbage(x, valid, seed):  # x with every padded key position overwritten by large random values
    g = torch.Generator().manual_seed(seed)
    junk = 50 * torch.randn(x.shape, generator=g, dtype=x.dtype)
    return torch.where(valid[:, None, :, None], x, junk)


def _run(fn, q, k, v, do, valid):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, valid)
    (out * do).sum().backward()
    return out, q.grad, k.grad, v.grad


def _check_invariant(fn, q, k, v, do, valid):
    do = torch.where(valid[:, None, :, None], do, 0.0)  # a padded query's output is read by nothing
    a = _run(fn, q, k, v, do, valid)
    b = _run(fn, q, _garbage(k, valid, 1), _garbage(v, valid, 2), do, valid)
    rows = valid[:, None, :, None]  # valid query rows / key positions
    for name, x, y in zip(("out", "dq", "dk", "dv"), a, b, strict=True):
        assert_close(torch.where(rows, x, 0.0), torch.where(rows, y, 0.0), name=name)
    # and no valid query read a padded key (a padded query sees only itself): their gradients are zero
    for name, g in (("dk", a[2]), ("dv", a[3])):
        assert torch.all(torch.where(rows, 0.0, g) == 0), name


@pytest.mark.parametrize("block_size", [1, 3, 4])
@pytest.mark.parametrize("mode", ["joint", "gated"])
@pytest.mark.parametrize("pads", [(0, 5), (7, 1), (2, 11)])  # not multiples of the block size
def test_match_is_invariant_to_padded_keys(block_size, mode, pads):
    B, Hq, Hkv, T, D = 2, 4, 2, 23, 8
    q, k, v, do, valid = _padded_inputs(B, Hq, Hkv, T, D, pads, seed=sum(pads) + block_size)
    gate = torch.linspace(-1.0, 1.0, T, dtype=torch.float64).expand(B, Hq, T) if mode == "gated" else None

    def fn(q, k, v, valid):
        return match_attention_kv(
            q, k, v, window=4, top_k=2, block_size=block_size, mode=mode, gate_logit=gate, key_valid=valid
        )

    _check_invariant(fn, q, k, v, do, valid)


@pytest.mark.parametrize("window", [None, 3, 8])
@pytest.mark.parametrize("pads", [(0, 5), (9, 2)])
def test_attention_is_invariant_to_padded_keys(window, pads):
    q, k, v, do, valid = _padded_inputs(2, 4, 2, 19, 8, pads, seed=3)

    def fn(q, k, v, valid):
        return attention_kv(q, k, v, window=window, key_valid=valid)

    _check_invariant(fn, q, k, v, do, valid)


def test_a_cached_query_is_invariant_to_padded_keys():
    # decoding: one query (the last position) against a padded cache
    q, k, v, do, valid = _padded_inputs(2, 2, 2, 17, 8, (6, 0), seed=5)
    q, do = q[:, :, -1:], do[:, :, -1:]

    def fn(q, k, v, valid):
        return match_attention_kv(q, k, v, window=3, top_k=2, block_size=2, key_valid=valid)

    a = _run(fn, q, k, v, do, valid)
    b = _run(fn, q, _garbage(k, valid, 1), _garbage(v, valid, 2), do, valid)
    for name, x, y in zip(("out", "dq"), a[:2], b[:2], strict=True):
        assert_close(x, y, name=name)


# ------------------------------------------------------------------------------------------------------
# sizes around every boundary of the fused kernels (interpreter tiles: 64 for attention)

W = 9
ATTENTION_SIZES = [1, W - 1, W, W + 1, 63, 64, 65]


@pytest.mark.parametrize("T", ATTENTION_SIZES)
@pytest.mark.parametrize("window", [None, W])
def test_attention_kernel_at_boundary_sizes(T, window):
    attention_run("triton", 1, 1, 2, T, 16, True, window, torch.float32, seed=T)


@pytest.mark.parametrize(
    "T,window,block_size",
    [
        (W - 1, W, 1),  # shorter than the window: nothing to retrieve
        (W, W, 1),
        (W + 1, W, 1),  # the first length with a candidate (key 0 for the last query)
        (W + 2, W, 1),
        (W + 3, W, 4),  # one key short of the first whole block out of the window
        (W + 4, W, 4),  # the first whole block out of the window
        (W + 5, W, 4),  # one block + 1
        (16, 16, 16),  # one block (the block-major path), nothing out of the window
        (32, 16, 16),  # the first length with a candidate block
        (33, 16, 16),  # one block + 1
    ],
)
def test_match_kernels_at_boundary_sizes(T, window, block_size):
    match_check(1, 2, 1, T, 16, window, 2, block_size, "joint", torch.float32, seed=T)
    match_check(1, 2, 1, T, 16, window, 3, block_size, "gated", torch.float32, seed=T + 1)
