"""Step 5, edge/interior split: the mask only where it can be false.

The key range of step 4 is cut into three block ranges (``fast.attention.key_block_split``): a masked edge
``[a, b)`` (the window's left end), an interior ``[b, c)`` where every (query, key) pair of the tile is
allowed, and a masked edge ``[c, d)`` (the diagonal, or the band's right end). The same loop body is
instantiated twice, ``EDGE`` being a constexpr: the interior copy has no mask, no ``where``, no bounds
check on the key rows (interior keys are all < T) and no guard against an all-masked row. Long causal rows
spend almost all their blocks in the interior.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fast.ladder.common import allowed, dot, load_rows, prepare


@triton.jit
def _v5_blocks(
    acc,
    l_i,
    m_i,
    q,
    k_ptrs,
    v_ptrs,
    offs_m,
    offs_n,
    d_ok,
    lo,
    hi,
    T,
    D,
    W,
    scale,
    EDGE: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    LOWP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_ptrs + start_n * D, cols, T, d_ok, EDGE, LOWP)
        s = dot(q, tl.trans(k), LOWP) * scale
        if EDGE:
            s = tl.where(
                allowed(offs_m[:, None], cols[None, :], T, W, IS_CAUSAL, HAS_WINDOW), s, float("-inf")
            )
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every pair allowed: m_new is finite, no guard
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = m_new
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(v_ptrs + start_n * D, cols, T, d_ok, EDGE, LOWP)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, LOWP)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def ladder_v5_split_kernel(
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
    # edge [a, bb), interior [bb, c), edge [c, d)
    a = (tl.maximum(start_m - W + 1, 0) // BLOCK_N) * BLOCK_N
    end_m = tl.minimum(start_m + BLOCK_M, T)
    if IS_CAUSAL:
        d = end_m
        c = (tl.minimum(start_m + 1, T) // BLOCK_N) * BLOCK_N  # the last key block wholly <= start_m
    else:
        d = tl.minimum(end_m + W - 1, T)
        c = (tl.minimum(start_m + W, T) // BLOCK_N) * BLOCK_N  # keys j < start_m + W: inside the band
    bb = ((tl.maximum(end_m - W, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N  # keys j >= end_m - W: in the window
    c = tl.maximum(tl.minimum(c, d), a)
    bb = tl.minimum(tl.maximum(bb, a), c)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _v5_blocks(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n, d_ok, a, bb, T, D, W, scale,
        True, IS_CAUSAL, HAS_WINDOW, LOWP, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _v5_blocks(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n, d_ok, bb, c, T, D, W, scale,
        False, IS_CAUSAL, HAS_WINDOW, LOWP, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _v5_blocks(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n, d_ok, c, d, T, D, W, scale,
        True, IS_CAUSAL, HAS_WINDOW, LOWP, BLOCK_N,
    )  # fmt: skip
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    rows_ok = offs_m < T
    tl.store(
        o_ptr + head + offs_m[:, None] * D + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=rows_ok[:, None] & d_ok[None, :],
    )
    tl.store(lse_ptr + bh.to(tl.int64) * T + offs_m, m_i + tl.log(l_safe), mask=rows_ok)


def attention_v5(q, k, v, causal=True, window=None, *, block=None):  # -> out [B, H, T, D], lse [B, H, T]
    a = prepare(q, k, v, causal, window, block)
    ladder_v5_split_kernel[(triton.cdiv(a.T, a.block_m), a.B * a.H)](
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
