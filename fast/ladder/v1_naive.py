"""Step 1, naive: one program per query row; the row's whole score vector at once.

Program (i, bh) loads q_i [D] and *every* key and value of its head ([next_pow2(T), D] tiles), computes the T
scores with an elementwise product and a sum (no ``tl.dot``: one row is a matrix-vector product), masks them,
and takes a textbook softmax: max, exp, sum, then ``out = sum_j p_j v_j / l``.

What it costs: every program reads all of K and V (T times the data, no reuse between rows), and the tile
grows with T, so registers run out (spills) long before T reaches a real context length. Step 2 fixes both.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fast.ladder.common import allowed, prepare


@triton.jit
def ladder_v1_naive_kernel(
    q_ptr,  # [B, H, T, D] contiguous, like every pointer below
    k_ptr,
    v_ptr,
    o_ptr,  # [B, H, T, D] out
    lse_ptr,  # [B, H, T] fp32 out, natural log
    T,
    D,
    W,
    scale,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    BLOCK_T: tl.constexpr,  # next_pow2(T): the whole row
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)  # the query row
    bh = tl.program_id(1)  # batch * H + head
    head = bh.to(tl.int64) * T * D
    offs_j = tl.arange(0, BLOCK_T)  # every key
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + head + i * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)  # [BD]
    tile = head + offs_j[:, None] * D + offs_d[None, :]
    tile_ok = (offs_j < T)[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)  # [BT, BD]
    s = tl.sum(q[None, :] * k, 1) * scale  # [BT] the scores of row i
    s = tl.where(allowed(i, offs_j, T, W, IS_CAUSAL, HAS_WINDOW), s, float("-inf"))
    m = tl.max(s, 0)  # finite: the diagonal is always allowed
    p = tl.exp(s - m)  # 0 where masked
    l = tl.sum(p, 0)
    v = tl.load(v_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)  # [BT, BD]
    out = tl.sum(p[:, None] * v, 0) / l  # [BD]
    tl.store(o_ptr + head + i * D + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_ok)
    tl.store(lse_ptr + bh.to(tl.int64) * T + i, m + tl.log(l))


def attention_v1(q, k, v, causal=True, window=None):  # [B, H, T, D] x3 -> out [B, H, T, D], lse [B, H, T]
    a = prepare(q, k, v, causal, window)
    ladder_v1_naive_kernel[(a.T, a.B * a.H)](
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
        BLOCK_T=triton.next_power_of_2(a.T),
        BLOCK_D=a.block_d,
    )
    return a.out, a.lse
