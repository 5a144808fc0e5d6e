"""Retrieval step 1, naive: one program per query row scores every candidate, then k passes of repeated max.

Program (i, bh) loads q_i [D] and *every* candidate of its head ([next_pow2(N), D]), computes the N scores
with an elementwise product and a sum (no ``tl.dot``), sets the non-candidates (``n B > i - window``) to -inf,
and extracts the top-k by TOP_K passes over the whole row: the max, the lowest index holding it (the tie
rule), then that entry set to -inf. A pass that finds only -inf writes -1.

What it costs: every row reads all N candidates (no reuse between rows: the scores are matrix-vector
products), the row tile grows with T (registers run out), and each of the k passes is a full reduction over N.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fast.ladder.select_common import nothing_to_select, prepare_select


@triton.jit
def ladder_select_v1_naive_kernel(
    q_ptr,  # [B, H, T, D] contiguous
    c_ptr,  # [B, H, N, D] fp32 contiguous candidates
    idx_ptr,  # [B, H, T, TOP_K] int64 out
    T,
    N,
    D,
    W,
    BS,
    scale,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next_pow2(N): the whole row
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)  # the query row
    bh = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + (bh * T + i) * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)  # [BD]
    c = tl.load(
        c_ptr + bh * N * D + offs_n[:, None] * D + offs_d[None, :],
        mask=(offs_n < N)[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BN, BD]
    s = tl.sum(q[None, :] * c, 1) * scale  # [BN]
    s = tl.where((offs_n < N) & (offs_n * BS <= i - W), s, float("-inf"))
    out = idx_ptr + (bh * T + i) * TOP_K
    for r in range(0, TOP_K):  # k passes of repeated max
        best = tl.max(s, 0)
        best_n = tl.min(tl.where(s == best, offs_n, BLOCK_N), 0)  # ties: the lower index
        tl.store(out + r, tl.where(best > float("-inf"), best_n, -1).to(tl.int64))
        s = tl.where(offs_n == best_n, float("-inf"), s)


def select_v1(q, k, *, window, top_k, block_size=1, scale=None):  # -> idx [B, H, T, top_k] int64
    a = prepare_select(q, k, window, top_k, block_size, scale)
    if nothing_to_select(a):
        return a.idx
    ladder_select_v1_naive_kernel[(a.T, a.B * a.H)](
        a.q,
        a.cand,
        a.idx,
        a.T,
        a.N,
        a.D,
        a.W,
        a.BS,
        a.scale,
        TOP_K=a.top_k,
        BLOCK_N=triton.next_power_of_2(a.N),
        BLOCK_D=a.block_d,
    )
    return a.idx
