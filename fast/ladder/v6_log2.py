"""Step 6, log2 units: ``exp2`` with the scale folded in, one FFMA per score.

``exp(x * scale) = exp2(x * scale * log2(e))``: with ``qk_scale = scale * log2(e)`` the running max ``m`` is
kept in log2 units (the max of ``s * qk_scale``) and every exponent is ``exp2(fma(s, qk_scale, -m))``: one
fused multiply-add and one MUFU.EX2 per score, where step 5 spends a multiply (the scale), a subtract and an
``exp`` (itself a multiply by log2(e) and an EX2). ``lse`` is converted back at the end:
``(m + log2 l) ln 2``. The fused product is exact, so the near-cancelling difference stays exact even for
scores of order 1e4 (``fast.utils.fuse_fma_in_interpreter`` makes the interpreter round ``tl.fma`` once, as
the GPU does). This is the loop of ``fast.attention`` (which adds GQA, strides, autotuned tiles, the
backward).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fast.ladder.common import allowed, dot, load_rows, prepare
from fast.utils import LN2, LOG2E, fuse_fma_in_interpreter

fuse_fma_in_interpreter()  # tl.fma below rounds once under TRITON_INTERPRET=1, as on a GPU


@triton.jit
def _v6_blocks(
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
    qk_scale,
    EDGE: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    LOWP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_ptrs + start_n * D, cols, T, d_ok, EDGE, LOWP)
        s = dot(q, tl.trans(k), LOWP)  # [BM, BN] raw scores, the scale is folded into the exponent
        if EDGE:
            ok = allowed(offs_m[:, None], cols[None, :], T, W, IS_CAUSAL, HAS_WINDOW)
            s_max = tl.max(tl.where(ok, s, float("-inf")), 1)
            # qk_scale > 0: max(s * qk_scale) = max(s) * qk_scale, one multiply per row, not per score
            m_new = tl.maximum(m_i, s_max * qk_scale)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(tl.where(ok, tl.fma(s, qk_scale, -m_safe[:, None]), float("-inf")))
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_safe = m_new
            p = tl.math.exp2(tl.fma(s, qk_scale, -m_new[:, None]))
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(v_ptrs + start_n * D, cols, T, d_ok, EDGE, LOWP)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, LOWP)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def ladder_v6_log2_kernel(
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
    qk_scale = scale * LOG2E  # exp(x * scale) = exp2(x * qk_scale)
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
    acc, l_i, m_i = _v6_blocks(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n, d_ok, a, bb, T, D, W, qk_scale,
        True, IS_CAUSAL, HAS_WINDOW, LOWP, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _v6_blocks(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n, d_ok, bb, c, T, D, W, qk_scale,
        False, IS_CAUSAL, HAS_WINDOW, LOWP, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _v6_blocks(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_m, offs_n, d_ok, c, d, T, D, W, qk_scale,
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
    lse = (m_i + tl.math.log2(l_safe)) * LN2  # log2 units back to the natural log
    tl.store(lse_ptr + bh.to(tl.int64) * T + offs_m, lse, mask=rows_ok)


def attention_v6(q, k, v, causal=True, window=None, *, block=None):  # -> out [B, H, T, D], lse [B, H, T]
    a = prepare(q, k, v, causal, window, block)
    ladder_v6_log2_kernel[(triton.cdiv(a.T, a.block_m), a.B * a.H)](
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
