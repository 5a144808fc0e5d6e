"""Find the bug: the flash-attention backward for dK and dV, one program per key block (written out for
fp32 in one file). One line is wrong. ``python notebooks/exercises/grade.py bug_dkdv_scale`` shows which
checks fail; read the failures first (which output? by how much?), then the kernel.

With ``S = scale Q K^T`` (masked), ``P = exp(S - lse)``, ``delta_i = dO_i . O_i``::

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dK = scale * dS^T Q
"""

import math

import torch
import triton
import triton.language as tl


@triton.jit
def dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, T, D, W, scale,
                IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh * T * D
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)  # this program's keys
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    cols_ok = offs_n < T
    tile = base + offs_n[:, None] * D + offs_d[None, :]
    k = tl.load(k_ptr + tile, mask=cols_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]
    v = tl.load(v_ptr + tile, mask=cols_ok[:, None] & d_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # the query blocks that can see these keys: the band [start_n - W + 1, end_n + W - 1), causal from start_n
    if IS_CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
    else:
        lo = (tl.maximum(start_n - W + 1, 0) // BLOCK_M) * BLOCK_M
    hi = tl.minimum(tl.minimum(start_n + BLOCK_N, T) + W - 1, T)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        rows_ok = rows < T
        q_tile = base + rows[:, None] * D + offs_d[None, :]
        q = tl.load(q_ptr + q_tile, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
        do = tl.load(do_ptr + q_tile, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_ptr + bh * T + rows, mask=rows_ok, other=0.0)
        delta = tl.load(delta_ptr + bh * T + rows, mask=rows_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BM, BN]
        i, j = rows[:, None], offs_n[None, :]
        if IS_CAUSAL:
            ok = j <= i
        else:
            ok = (j - i) < W
        ok = ok & ((i - j) < W) & (j < T) & (i < T)
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # [BM, BN]
        dv += tl.dot(tl.trans(p), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
    tl.store(dk_ptr + tile, dk, mask=cols_ok[:, None] & d_ok[None, :])
    tl.store(dv_ptr + tile, dv, mask=cols_ok[:, None] & d_ok[None, :])


def attention_dkdv(q, k, v, o, do, lse, *, causal=True, window=None):  # [B, H, T, D] x5, [B, H, T] -> dk, dv
    B, H, T, D = q.shape
    flat = [x.reshape(B * H, T, D).contiguous() for x in (q, k, v, o, do)]
    delta = (flat[3] * flat[4]).sum(-1)  # [BH, T]
    dk = torch.empty(B * H, T, D, dtype=torch.float32)
    dv = torch.empty(B * H, T, D, dtype=torch.float32)
    W = T if window is None else min(window, T)
    BLOCK = 16
    dkdv_kernel[(triton.cdiv(T, BLOCK), B * H)](
        flat[0], flat[1], flat[2], flat[4], lse.reshape(B * H, T).contiguous(), delta, dk, dv, T, D, W,
        1.0 / math.sqrt(D), IS_CAUSAL=causal, BLOCK_M=BLOCK, BLOCK_N=BLOCK,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
    )  # fmt: skip
    return dk.reshape(B, H, T, D), dv.reshape(B, H, T, D)
