"""Exercise: the flash-attention forward, a Triton kernel with online softmax.

Oracle: ``reference/attention.py`` (``attention``; the recurrence is ``online_softmax_attention``). Mask:
``causal`` -> key ``j <= i``; ``window = w`` -> ``i - w < j`` as well (w keys including the query itself);
not causal -> the symmetric band ``|i - j| < w`` (every key without a window). Returns ``out`` and the
natural-log ``lse``. Grade: ``python notebooks/exercises/grade.py attention_fwd``.
"""

import math

import torch
import triton
import triton.language as tl


@triton.jit
def attention_fwd_kernel(
    q_ptr,  # [BH, T, D] fp32 queries, contiguous (batch and heads flattened)
    k_ptr,  # [BH, T, D] keys
    v_ptr,  # [BH, T, D] values
    o_ptr,  # [BH, T, D] out
    lse_ptr,  # [BH, T] out, natural log
    T,
    D,
    W,  # the window; T when there is none
    scale,  # 1 / sqrt(D)
    IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per loop iteration
    BLOCK_D: tl.constexpr,  # next_pow2(D), >= 16
):
    """Program (m, bh) owns query rows [m * BLOCK_M, (m + 1) * BLOCK_M) of head bh. Walk over key blocks with
    a running max m_i, denominator l_i and accumulator acc; rescale both by exp(m_i - m_new) when the max
    grows. Rows >= T and head-dim columns >= D are padding: load them as 0, never store them."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh * T * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(
        q_ptr + base + offs_m[:, None] * D + offs_d[None, :],
        mask=(offs_m < T)[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, T, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < T)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + base + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + base + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BM, BN]
        i, j = offs_m[:, None], cols[None, :]
        if IS_CAUSAL:
            ok = j <= i
        else:
            ok = (j - i) < W
        ok = ok & ((i - j) < W) & (j < T)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no allowed key yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    rows_ok = offs_m < T
    tl.store(
        o_ptr + base + offs_m[:, None] * D + offs_d[None, :],
        acc / l_safe[:, None],
        mask=rows_ok[:, None] & d_ok[None, :],
    )
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
    grid = (triton.cdiv(T, BLOCK), B * H)
    attention_fwd_kernel[grid](
        q, k, v, out, lse, T, D, W, 1.0 / math.sqrt(D),
        IS_CAUSAL=causal, BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_D=max(16, triton.next_power_of_2(D)),
    )  # fmt: skip
    return out.reshape(B, H, T, D), lse.reshape(B, H, T)
