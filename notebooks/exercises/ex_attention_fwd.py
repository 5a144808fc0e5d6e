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
    # YOUR CODE
    # 1. offsets: rows offs_m of this program, key columns offs_n, head dim offs_d (< D)
    # 2. load the q tile [BLOCK_M, BLOCK_D] (masked rows and columns read 0)
    # 3. m_i = -inf, l_i = 0, acc = 0; for each key block: s = q @ k^T * scale,
    #    mask (causal / window / keys >= T) to -inf, m_new = max(m_i, rowmax(s)),
    #    alpha = exp(m_i - m_new), p = exp(s - m_new), l_i = alpha l_i + rowsum(p),
    #    acc = alpha acc + p @ v (mind rows with no allowed key yet: -inf - -inf)
    # 4. store acc / l_i and lse = m_i + log(l_i) for the rows < T
    # tl.dot(a, b, input_precision="ieee"): exact fp32 products
    raise NotImplementedError("attention_fwd_kernel: write the body (notebooks/exercises/README.md)")


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
