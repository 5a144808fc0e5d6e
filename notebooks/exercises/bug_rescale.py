"""Find the bug: a one-pass attention forward in log2 units (``fast/ladder/v6_log2.py`` without the split,
written out for fp32 in one file). One line is wrong. ``python notebooks/exercises/grade.py bug_rescale``
shows which checks fail; read the failures first (which outputs? which masks?), then the kernel.
"""

import math

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln(2)


@triton.jit
def log2_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, T, D, W, scale, IS_CAUSAL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh * T * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rows_ok = offs_m < T
    tile = base + offs_m[:, None] * D + offs_d[None, :]
    q = tl.load(q_ptr + tile, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    qk_scale = scale * LOG2E  # exp(x * scale) = exp2(x * qk_scale)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of s * qk_scale (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, T, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < T)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + base + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + base + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # raw scores: the scale goes into the exponent
        i, j = offs_m[:, None], cols[None, :]
        if IS_CAUSAL:
            ok = j <= i
        else:
            ok = (j - i) < W
        ok = ok & ((i - j) < W) & (j < T)
        s = tl.where(ok, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(o_ptr + tile, acc / l_safe[:, None], mask=rows_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh * T + offs_m, (m_i + tl.math.log2(l_safe)) * LN2, mask=rows_ok)


def attention(
    q, k, v, *, causal=True, window=None
):  # [B, H, T, D] fp32 x3 -> out [B, H, T, D], lse [B, H, T]
    B, H, T, D = q.shape
    q, k, v = (x.reshape(B * H, T, D).contiguous() for x in (q, k, v))
    out = torch.empty(B * H, T, D, dtype=torch.float32)
    lse = torch.empty(B * H, T, dtype=torch.float32)
    W = T if window is None else min(window, T)
    BLOCK = 16
    log2_fwd_kernel[(triton.cdiv(T, BLOCK), B * H)](
        q, k, v, out, lse, T, D, W, 1.0 / math.sqrt(D),
        IS_CAUSAL=causal, BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_D=max(16, triton.next_power_of_2(D)),
    )  # fmt: skip
    return out.reshape(B, H, T, D), lse.reshape(B, H, T)
