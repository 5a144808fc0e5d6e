"""Step 4, block skipping: visit only the key blocks the mask can reach.

Query block ``[start_m, end_m)`` sees keys in ``[lo, hi)``: causal, no key after its last row
(``hi = end_m``); with a window, no key before ``start_m - w + 1`` (``lo``, rounded down to a key-block
boundary); without ``causal`` the band reaches ``end_m + w - 1``. Same bounds as
``fast.attention.key_block_range``. Under a causal mask this halves the work; under a window of ``w`` the cost
per row becomes O(w) instead of O(T).

What is left: the blocks strictly inside the band still compute and apply the mask, although it is all true
there. Step 5 splits the loop.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fast.ladder.common import allowed, dot, load_rows, prepare


@triton.jit
def ladder_v4_skip_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    T,
    D,
    W,
    scale,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    head = bh.to(tl.int64) * T * D
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = load_rows(q_ptr + head + offs_m[:, None] * D + offs_d[None, :], offs_m, T, d_ok, True, LOWP)
    k_ptrs = k_ptr + head + offs_n[:, None] * D + offs_d[None, :]
    v_ptrs = v_ptr + head + offs_n[:, None] * D + offs_d[None, :]
    # the key range this query block can see (W = T without a window, so lo = 0 then)
    lo = (tl.maximum(start_m - W + 1, 0) // BLOCK_N) * BLOCK_N
    end_m = tl.minimum(start_m + BLOCK_M, T)
    if IS_CAUSAL:
        hi = end_m
    else:
        hi = tl.minimum(end_m + W - 1, T)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_ptrs + start_n * D, cols, T, d_ok, True, LOWP)
        s = dot(q, tl.trans(k), LOWP) * scale
        s = tl.where(allowed(offs_m[:, None], cols[None, :], T, W, IS_CAUSAL, HAS_WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(v_ptrs + start_n * D, cols, T, d_ok, True, LOWP)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, LOWP)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    rows_ok = offs_m < T
    tl.store(
        o_ptr + head + offs_m[:, None] * D + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=rows_ok[:, None] & d_ok[None, :],
    )
    tl.store(lse_ptr + bh.to(tl.int64) * T + offs_m, m_i + tl.log(l_safe), mask=rows_ok)


def attention_v4(q, k, v, causal=True, window=None, *, block=None):  # -> out [B, H, T, D], lse [B, H, T]
    a = prepare(q, k, v, causal, window, block)
    ladder_v4_skip_kernel[(triton.cdiv(a.T, a.block_m), a.B * a.H)](
        a.q,
        a.k,
        a.v,
        a.out,
        a.lse,
        a.T,
        a.D,
        a.W,
        a.scale,
        IS_CAUSAL=a.causal,
        HAS_WINDOW=a.has_window,
        LOWP=a.lowp,
        BLOCK_M=a.block_m,
        BLOCK_N=a.block_n,
        BLOCK_D=a.block_d,
    )
    return a.out, a.lse
