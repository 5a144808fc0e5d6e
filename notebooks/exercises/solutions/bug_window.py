"""Find the bug: a sliding-window attention forward with the edge/interior split (``fast/ladder/v5_split.py``
written out for fp32 in one file). One line is wrong. ``python notebooks/exercises/grade.py bug_window``
shows which checks fail; read the failures first, then the kernel.
"""

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _allowed(qi, kj, T, W, IS_CAUSAL: tl.constexpr):
    if IS_CAUSAL:
        ok = kj <= qi
    else:
        ok = (kj - qi) < W
    ok = ok & ((qi - kj) < W)  # FIX: window=w means i - w < j (w keys including i); "<=" let in w + 1 keys
    return ok & (kj < T)


@triton.jit
def _blocks(acc, l_i, m_i, q, k_ptr, v_ptr, base, offs_m, offs_n, offs_d, d_ok, lo, hi, T, D, W, scale,
            EDGE: tl.constexpr, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < T)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + base + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + base + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        if EDGE:  # blocks the mask cuts through
            s = tl.where(_allowed(offs_m[:, None], cols[None, :], T, W, IS_CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def window_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, T, D, W, scale, IS_CAUSAL: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh * T * D
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows_ok = offs_m < T
    tile = base + offs_m[:, None] * D + offs_d[None, :]
    q = tl.load(q_ptr + tile, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    # key blocks: edge [a, bb), interior [bb, c) (every pair allowed), edge [c, d)
    a = (tl.maximum(start_m - W + 1, 0) // BLOCK_N) * BLOCK_N
    end_m = tl.minimum(start_m + BLOCK_M, T)
    if IS_CAUSAL:
        d = end_m
        c = (tl.minimum(start_m + 1, T) // BLOCK_N) * BLOCK_N
    else:
        d = tl.minimum(end_m + W - 1, T)
        c = (tl.minimum(start_m + W, T) // BLOCK_N) * BLOCK_N
    bb = ((tl.maximum(end_m - W, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    c = tl.maximum(tl.minimum(c, d), a)
    bb = tl.minimum(tl.maximum(bb, a), c)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _blocks(acc, l_i, m_i, q, k_ptr, v_ptr, base, offs_m, offs_n, offs_d, d_ok,
                            a, bb, T, D, W, scale, True, IS_CAUSAL, BLOCK_N)  # fmt: skip
    acc, l_i, m_i = _blocks(acc, l_i, m_i, q, k_ptr, v_ptr, base, offs_m, offs_n, offs_d, d_ok,
                            bb, c, T, D, W, scale, False, IS_CAUSAL, BLOCK_N)  # fmt: skip
    acc, l_i, m_i = _blocks(acc, l_i, m_i, q, k_ptr, v_ptr, base, offs_m, offs_n, offs_d, d_ok,
                            c, d, T, D, W, scale, True, IS_CAUSAL, BLOCK_N)  # fmt: skip
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(o_ptr + tile, acc / l_safe[:, None], mask=rows_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh * T + offs_m, m_i + tl.log(l_safe), mask=rows_ok)


def attention(
    q, k, v, *, causal=True, window=None
):  # [B, H, T, D] fp32 x3 -> out [B, H, T, D], lse [B, H, T]
    B, H, T, D = q.shape
    q, k, v = (x.reshape(B * H, T, D).contiguous() for x in (q, k, v))
    out = torch.empty(B * H, T, D, dtype=torch.float32)
    lse = torch.empty(B * H, T, dtype=torch.float32)
    W = T if window is None else min(window, T)
    BLOCK = 16
    window_fwd_kernel[(triton.cdiv(T, BLOCK), B * H)](
        q, k, v, out, lse, T, D, W, 1.0 / math.sqrt(D),
        IS_CAUSAL=causal, BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_D=max(16, triton.next_power_of_2(D)),
    )  # fmt: skip
    return out.reshape(B, H, T, D), lse.reshape(B, H, T)
