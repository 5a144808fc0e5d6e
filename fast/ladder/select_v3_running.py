"""Retrieval step 3, running: step 2 plus the two ideas of ``fast/match_triton.py``'s ``match_select_kernel``.

* Loop bound: the tile's last query row ``i_last`` may retrieve candidates ``n`` with ``n B <= i_last - w``
  only, so the loop stops at ``n_hi = max(i_last - w + B, 0) // B``: the candidate tiles no row of the query
  tile can see are never loaded (about half of them at long T).
* Early exit: a tile is merged only while one of its scores beats its row's worst list entry (a ``while``
  over the tile). Once the list is full of good scores most tiles cost one test, not TOP_K passes.

The merge itself (strict ``>``, evict the highest index among equal worsts) and the sorted write are step 2's.
This is the production kernel's loop without grouped-query heads, strides and a query offset (decode).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fast.ladder.select_common import kp, nothing_to_select, prepare_select, write_sorted
from fast.ladder.select_v2_tiled import select_tiles


@triton.jit
def ladder_select_v3_running_kernel(
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
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < D
    q = tl.load(
        q_ptr + (bh * T + offs_m[:, None]) * D + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    slot = tl.arange(0, KP)
    top_v = tl.where(slot < TOP_K, float("-inf"), float("inf"))[None, :] + tl.zeros([BLOCK_M, KP], tl.float32)
    top_i = (-1 - slot)[None, :].to(tl.int64) + tl.zeros([BLOCK_M, KP], tl.int64)
    i_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, T) - 1
    n_hi = tl.minimum(tl.maximum(i_last - W + BS, 0) // BS, N)  # candidates of the tile's last row
    for start_n in range(0, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_hi
        c = tl.load(
            c_ptr + bh * N * D + offs_n[:, None] * D + offs_d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(c), input_precision="ieee") * scale
        ok = row_ok[:, None] & n_ok[None, :] & (offs_n[None, :] * BS <= offs_m[:, None] - W)
        s = tl.where(ok, s, float("-inf"))
        worst = tl.min(top_v, axis=1)
        go = tl.max(tl.max(tl.where(s > worst[:, None], 1, 0), axis=1), axis=0)
        while go > 0:  # only while some score of the tile beats its row's worst entry
            best = tl.max(s, axis=1)
            best_n = tl.min(tl.where(s == best[:, None], offs_n[None, :], 2147483647), axis=1).to(tl.int64)
            is_worst = top_v == worst[:, None]
            evict_i = tl.max(tl.where(is_worst, top_i, -KP - 2), axis=1)
            hit = (best > worst)[:, None] & is_worst & (top_i == evict_i[:, None])
            top_v = tl.where(hit, best[:, None], top_v)
            top_i = tl.where(hit, best_n[:, None], top_i)
            s = tl.where(offs_n[None, :] == best_n[:, None], float("-inf"), s)
            worst = tl.min(top_v, axis=1)
            go = tl.max(tl.max(tl.where(s > worst[:, None], 1, 0), axis=1), axis=0)
    top_v = tl.where(slot[None, :] < TOP_K, top_v, float("-inf"))
    write_sorted(top_v, top_i, idx_ptr + (bh * T + offs_m) * TOP_K, row_ok, TOP_K)


def select_v3(q, k, *, window, top_k, block_size=1, scale=None):  # -> idx [B, H, T, top_k] int64
    a = prepare_select(q, k, window, top_k, block_size, scale)
    if nothing_to_select(a):
        return a.idx
    BM, BN = select_tiles()
    ladder_select_v3_running_kernel[(triton.cdiv(a.T, BM), a.B * a.H)](
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
        KP=kp(a.top_k),
        BLOCK_M=BM,
        BLOCK_N=BN,
        BLOCK_D=a.block_d,
    )
    return a.idx
