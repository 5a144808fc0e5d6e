"""Step 2, blocked: tiles of BLOCK_M queries against tiles of BLOCK_N keys, softmax in two passes.

A program owns BLOCK_M query rows and walks over every key block twice: pass 1 finds each row's max score,
pass 2 recomputes the scores and sums ``p = exp(s - m)`` and ``p @ V`` with that final max, so nothing ever
needs rescaling. Tiles make the products ``tl.dot`` calls (tensor cores) and each K/V tile now serves
BLOCK_M rows; the working set no longer grows with T.

What it costs: Q K^T is computed twice (pass 1 throws its scores away), every key block is visited even
where the mask removes all of it, and every block pays for the mask. Step 3 removes the second pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fast.ladder.common import allowed, dot, load_rows, prepare


@triton.jit
def ladder_v2_blocked_kernel(
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
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] query rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = load_rows(q_ptr + head + offs_m[:, None] * D + offs_d[None, :], offs_m, T, d_ok, True, LOWP)
    k_ptrs = k_ptr + head + offs_n[:, None] * D + offs_d[None, :]  # key block 0
    v_ptrs = v_ptr + head + offs_n[:, None] * D + offs_d[None, :]
    # pass 1: the row max
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for start_n in range(0, T, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_ptrs + start_n * D, cols, T, d_ok, True, LOWP)
        s = dot(q, tl.trans(k), LOWP) * scale  # [BM, BN]
        s = tl.where(allowed(offs_m[:, None], cols[None, :], T, W, IS_CAUSAL, HAS_WINDOW), s, float("-inf"))
        m_i = tl.maximum(m_i, tl.max(s, 1))
    # a padded row (offs_m >= T, not stored) may have no allowed key: keep exp() away from -inf - -inf
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    # pass 2: the sums, with the final max
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, T, BLOCK_N):
        cols = start_n + offs_n
        k = load_rows(k_ptrs + start_n * D, cols, T, d_ok, True, LOWP)
        s = dot(q, tl.trans(k), LOWP) * scale
        s = tl.where(allowed(offs_m[:, None], cols[None, :], T, W, IS_CAUSAL, HAS_WINDOW), s, float("-inf"))
        p = tl.exp(s - m_i[:, None])  # 0 where masked
        l_i += tl.sum(p, 1)
        v = load_rows(v_ptrs + start_n * D, cols, T, d_ok, True, LOWP)
        acc += dot(p.to(v.dtype), v, LOWP)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # padded rows only
    out = acc / l_safe[:, None]
    rows_ok = offs_m < T
    tl.store(
        o_ptr + head + offs_m[:, None] * D + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=rows_ok[:, None] & d_ok[None, :],
    )
    tl.store(lse_ptr + bh.to(tl.int64) * T + offs_m, m_i + tl.log(l_safe), mask=rows_ok)


def attention_v2(q, k, v, causal=True, window=None, *, block=None):  # -> out [B, H, T, D], lse [B, H, T]
    a = prepare(q, k, v, causal, window, block)
    ladder_v2_blocked_kernel[(triton.cdiv(a.T, a.block_m), a.B * a.H)](
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
