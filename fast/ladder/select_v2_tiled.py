"""Retrieval step 2, tiled: query tiles x candidate tiles (``tl.dot``), a running top-k list in registers.

Program (query tile, bh) streams the candidates in tiles of BLOCK_N. Each tile's scores come from one
``tl.dot`` (fp32 "ieee": TF32 rounding would move near-ties), and the tile is merged into the running list
[BLOCK_M, KP] by TOP_K insertion passes: the tile's best remaining score (lowest index among equals) replaces
the list's worst entry (the highest index among equal worsts) if it is *strictly* higher; equal scores
already in the list came from earlier tiles or earlier passes, so they have lower indices and stay. At most
TOP_K entries of a tile can enter the list, hence TOP_K passes. The list is written sorted at the end.

Empty slots hold -inf with distinct negative indices (so exactly one is the eviction target); padding slots
past TOP_K hold +inf (never evicted, never written).

What it leaves: every candidate tile is visited, even those no row of the tile may retrieve (n B > i - w),
and every tile pays all TOP_K passes, although past the first few tiles almost no score beats the list.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fast.ladder.select_common import kp, nothing_to_select, prepare_select, write_sorted
from fast.utils import is_interpreting


@triton.jit
def ladder_select_v2_tiled_kernel(
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
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows
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
    for start_n in range(0, N, BLOCK_N):  # every candidate tile
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        c = tl.load(
            c_ptr + bh * N * D + offs_n[:, None] * D + offs_d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(c), input_precision="ieee") * scale  # [BM, BN]
        ok = row_ok[:, None] & n_ok[None, :] & (offs_n[None, :] * BS <= offs_m[:, None] - W)
        s = tl.where(ok, s, float("-inf"))
        for _r in range(0, TOP_K):  # merge: TOP_K insertion passes
            worst = tl.min(top_v, axis=1)
            best = tl.max(s, axis=1)
            best_n = tl.min(tl.where(s == best[:, None], offs_n[None, :], 2147483647), axis=1).to(tl.int64)
            is_worst = top_v == worst[:, None]
            evict_i = tl.max(tl.where(is_worst, top_i, -KP - 2), axis=1)  # highest index among the worst
            hit = (best > worst)[:, None] & is_worst & (top_i == evict_i[:, None])
            top_v = tl.where(hit, best[:, None], top_v)
            top_i = tl.where(hit, best_n[:, None], top_i)
            s = tl.where(offs_n[None, :] == best_n[:, None], float("-inf"), s)
    top_v = tl.where(slot[None, :] < TOP_K, top_v, float("-inf"))
    write_sorted(top_v, top_i, idx_ptr + (bh * T + offs_m) * TOP_K, row_ok, TOP_K)


def select_tiles():
    """Small tiles in the interpreter (speed), 32 x 32 compiled (fp32 dots: the production kernel's tile)."""
    return (16, 16) if is_interpreting() else (32, 32)


def select_v2(q, k, *, window, top_k, block_size=1, scale=None):  # -> idx [B, H, T, top_k] int64
    a = prepare_select(q, k, window, top_k, block_size, scale)
    if nothing_to_select(a):
        return a.idx
    BM, BN = select_tiles()
    ladder_select_v2_tiled_kernel[(triton.cdiv(a.T, BM), a.B * a.H)](
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
