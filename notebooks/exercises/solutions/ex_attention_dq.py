"""Exercise: the flash-attention backward for dQ, a Triton kernel.

Oracle: ``reference/attention.py`` (``attention_grad``, the dq it returns). With ``S = scale Q K^T`` masked,
the forward's ``lse`` and ``delta_i = sum_d dO_id O_id``::

    P_ij  = exp(S_ij - lse_i)          (0 where masked)
    dP_ij = dO_i . v_j
    dS_ij = P_ij (dP_ij - delta_i)
    dQ_i  = scale * sum_j dS_ij k_j

Grade: ``python notebooks/exercises/grade.py attention_dq``.
"""

import math

import torch
import triton
import triton.language as tl


@triton.jit
def attention_dq_kernel(
    q_ptr,  # [BH, T, D] fp32, contiguous
    k_ptr,  # [BH, T, D]
    v_ptr,  # [BH, T, D]
    do_ptr,  # [BH, T, D] the output's cotangent dO
    lse_ptr,  # [BH, T] the forward's log-sum-exp, natural log
    delta_ptr,  # [BH, T] rowsum(dO * O)
    dq_ptr,  # [BH, T, D] out
    T,
    D,
    W,  # the window; T when there is none
    scale,
    IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (m, bh) owns query rows [m * BLOCK_M, (m + 1) * BLOCK_M): recompute P block by block from lse
    (no running max needed: lse is final), accumulate dS @ K, store scale * dQ."""
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
    do = tl.load(do_ptr + tile, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(lse_ptr + bh * T + offs_m, mask=rows_ok, other=0.0)
    delta = tl.load(delta_ptr + bh * T + offs_m, mask=rows_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, T, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < T)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + base + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + base + cols[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        i, j = offs_m[:, None], cols[None, :]
        if IS_CAUSAL:
            ok = j <= i
        else:
            ok = (j - i) < W
        ok = ok & ((i - j) < W) & (j < T) & (i < T)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, k, input_precision="ieee")
    tl.store(dq_ptr + tile, dq * scale, mask=rows_ok[:, None] & d_ok[None, :])


def attention_dq(q, k, v, o, do, lse, *, causal=True, window=None):  # [B, H, T, D] x5, [B, H, T] -> dq
    B, H, T, D = q.shape
    flat = [x.reshape(B * H, T, D).contiguous() for x in (q, k, v, o, do)]
    delta = (flat[3] * flat[4]).sum(-1)  # [BH, T]
    dq = torch.empty(B * H, T, D, dtype=torch.float32)
    W = T if window is None else min(window, T)
    BLOCK = 16
    attention_dq_kernel[(triton.cdiv(T, BLOCK), B * H)](
        flat[0], flat[1], flat[2], flat[4], lse.reshape(B * H, T).contiguous(), delta, dq, T, D, W,
        1.0 / math.sqrt(D), IS_CAUSAL=causal, BLOCK_M=BLOCK, BLOCK_N=BLOCK,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )  # fmt: skip
    return dq.reshape(B, H, T, D)
