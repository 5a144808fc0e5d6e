"""MATCH (arXiv 2606.29844) Triton kernels: sliding-window attention plus top-k retrieval of out-of-window
keys.

Called by ``fast/match.py`` (which validates the inputs); the oracle is ``reference/match.py``. Entry points::

    retrieve_triton(q, k, *, window, top_k, block_size, scale)               -> idx [B, H_kv, T, top_k]
    match_attention_triton(q, k, v, *, window, top_k, block_size, mode, gate_logit, scale)
                                                                             -> out [B, H_q, T, D]
    match_decode_triton(q, k_cache, v_cache, *, ..., summaries)              -> out [B, H_q, 1, D]

Shapes ``q [B, H_q, T, D]``, ``k, v [B, H_kv, T, D]``; fp16/bf16/fp32, D <= 128. Window ``w``: query i sees
keys ``i - w < j <= i``; retrieval candidates are ``j <= i - w`` (tokens, ``block_size == 1``) or the blocks
``[bB, (b + 1)B)`` with ``bB <= i - w`` scored by their mean key (``block_size = B <= w``, so a candidate
block lies wholly in the past and is always a full block).

Kernels and design choices
--------------------------
1. ``match_summary_kernel``: mean key of every full block, fp32 ``[B, H_kv, T // B, D]``.
2. ``match_select_kernel``: one program per (query tile, batch, kv head). The group's query heads are summed
   first (``sum_g q_g . kbar = (sum_g q_g) . kbar``, so this is the GQA rule "scores summed over the group"
   up to fp32 rounding; the scores are fp32 "ieee" dots for every input dtype), then the candidate
   summaries (keys for ``block_size == 1``) are streamed in chunks of ``BLOCK_N`` and a running top-k
   is kept in registers (``[BLOCK_M, KP]`` values + indices); no [T, T/B] score matrix is ever stored.
   Exact tie rule (lower index wins), by construction:
     * chunks arrive in increasing index order, and inside a chunk the candidates are extracted in
       (score descending, index ascending) order, so every candidate offered to the list has a larger index
       than every equal-scored entry already in it; it is therefore inserted only if its score is
       *strictly* larger than the list's worst entry;
     * the entry evicted is the worst one: the lowest score, and among equal lowest scores the highest
       index (empty slots hold -inf and count as worst);
     * the extraction of a chunk stops as soon as no row has a chunk score above its worst entry (a
       ``while`` over the tile), so after the first chunks most chunks cost one comparison;
     * the final list is written in (score descending, index ascending) order, -1 where a slot stayed empty.
   "Equal" means equal computed fp32 scores: identical keys score identically when every element of the
   dot reduces over D in the same order (the compiled FMA dot; the interpreter's BLAS matmul may round a
   tile-edge row differently, so the tests pin ties with grid-valued inputs whose scores are exact).
   **Tensor-core band** (``SELECT_TENSOR_CORES``, off by default): the exact pass above computes every
   score as an fp32 CUDA-core dot. Instead, every score is first taken from an fp16 tensor-core ``tl.dot``
   of unit vectors, rescaled in fp32: ``s~ = (q^ . c^) |q| |c| scale`` with ``q^ = q / |q|`` (the summed
   group query) and ``c^ = c / |c|``, so no element over- or underflows fp16 whatever the inputs' size.
   Its distance to the fp32 score is at most ``err = err_rel |scale| |q| |c|`` with ``err_rel = 2^-10 +
   (D + 8) 2^-20`` (``select_error``): fp16 rounds each element to ``u = 2^-11`` relative (``2 u + u^2``
   for a product, summed by Cauchy-Schwarz to ``|q^| |c^| = 1``), plus fp16's subnormal spacing and the
   fp32 accumulation, normalisation and reference-dot rounding, each ``O(D 2^-24)``. A test shows the
   bound is needed: on keys that are one vector plus small noise, no bound or a tenth of it loses members
   of the exact top-k. Three passes over the tile's candidates:
     1. ``tau`` = each row's ``top_k``-th largest lower bound ``s~ - err`` (a running top-k of values);
        ``tau`` is at most the row's ``top_k``-th fp32 score;
     2. the **band**: every candidate with ``s~ + err >= tau``, listed per row in index order (at most
        ``KG = next_pow2(top_k + SELECT_GUARD)`` slots). A candidate outside it has an fp32 score below
        ``tau``, so it is not in the exact top-k and cannot tie with its last entry;
     3. the band's fp32 scores (a sum over D of fp32 products per (row, candidate)) go through the running
        top-k above, in index order, so the tie rule holds unchanged.
   A row whose band overflows ``KG`` (many candidates within ``err`` of the cut: exact ties, repeated keys)
   sends its whole program to the exact pass (``fallbacks`` of ``_select`` reports which programs did).
   The result is the exact pass's up to the order of the fp32 additions inside a score (the band sums over
   D, the exact pass uses ``tl.dot``): on identical candidates both are exactly tied; on generic data they
   agree (tested, including near-ties below fp16's resolution, inputs from 1e-20 to 1e4 and a negative
   scale). Cost: two tensor-core products and a value-only running top-k per tile instead of one fp32
   CUDA-core product, plus ``KG`` gathered rows per query row. Why off by default: at B1 H16 T32K D64,
   8 blocks of 64, the cost model (``benchmarks/match_cost.py --select band|exact``) finds the exact pass
   bound by streaming the candidates (1.2 GB at 0.36 ms against 0.26 ms of fp32 FLOPs) and prices the
   band above it (two streams plus the gathered re-scoring), counting every re-read as HBM traffic; the
   candidates of one (batch, kv head) are 128 KB, so on a GPU they are re-read from L2 and both passes may
   be bound by arithmetic instead. ``benchmarks/match.py`` times both on CUDA (``select`` rows).
   ``top_k <= 32`` (``MAX_TOP_K``): larger values raise ``ValueError`` (use ``backend="torch"``).
   Token retrieval (``block_size == 1``) uses the same kernel with the keys as "summaries": its scoring
   is O(T^2 D), as for any exact token top-k; block retrieval scores O(T (T / B) D).
3. The retrieved part has two paths, chosen in one place (``_block_major``, the same choice for the
   forward and dq): **block-major** for ``block_size >= BLOCK_MAJOR_MIN_BLOCK`` (16), **gathered per
   query row** below it (tokens included), where a tensor-core tile over a block of fewer than 16 keys
   would be mostly padding. (Tests set the module constant to force either path at the same shapes.)
   ``match_fwd_kernel``: one program per (query tile, batch, query head). The window part calls
   ``fast/attention.py``'s forward loop ``_fwd_loop`` (edge, interior and edge key blocks of the tile's
   window, ``causal_window_split``; tensor-core ``tl.dot``, log2 units with one FMA per score) at the
   rows' positions, so training and decode (a query offset) share the one copy of the loop; a negative
   scale arrives as ``(-q, -scale)``. Gathered path: the same kernel then walks each row's retrieved keys
   (the flattened list of slot ``e // B``, offset ``e % B``: key ``idx * B + e % B``) in chunks of
   ``BLOCK_R``; each chunk is a gathered ``[BLOCK_M, BLOCK_R, BLOCK_D]`` tile multiplied elementwise (no
   ``tl.dot``, so small blocks need no padding), every query row loading its own K B keys and values.
   Keys beyond ``i - w`` (a selected block's in-window tail) and sentinel slots (-1) are masked.
   The gathered tiles take the window loop's online-softmax step (``_masked_step``, ``_rescale`` of
   ``fast/attention.py``). ``joint``: one online softmax over window then retrieved keys; ``gated``: two
   online softmaxes, mixed by ``sigmoid(gate_logit)`` in the epilogue (``o = o_W`` where nothing is
   retrieved). fp32 accumulation, fully masked rows guarded (no NaN). The window loop runs at MATCH's own
   tiles (``_tiles``): the one program also walks the retrieved keys, so attention's autotuned tiles do
   not apply.
   Block-major path (MoBA-style, "per selected block, the queries that selected it"):
     * the window part is sliding-window attention: ``fast/attention.py``'s tuned forward kernel (one copy
       of the loop and its online softmax for both ops; ``-q, -scale`` for a negative scale) writes the
       window output in fp32 (o_W) and lse_W;
     * the **reverse index** (``reverse_index``: CSR lists built with one torch sort, for every (batch, kv
       head, block) the entries ``t * K + slot`` of the queries that selected it, ascending) is cut into
       **work items** of at most ``WORK_ITEM`` (256) entries (``work_items``): one program per item, so a
       block that most queries select (an attention sink) is spread over many programs. Both are built once
       per forward, on the device with static shapes (the empty slots sort to a segment after the last;
       the item count is bounded by ``ceil(entries / WORK_ITEM) + segments``, the surplus items empty):
       no host synchronisation, and the backward reuses them;
     * ``match_fwd_blocks_kernel``, one program per work item: the block's keys and values are loaded
       once, the listed query rows gathered in tiles of ``BLOCK_M``, and for each of the G query heads of
       the kv head ``S = Q K^T`` (and ``P V``) are tensor-core ``tl.dot`` (keys ``j > t - w`` and ``j >= T``
       masked, fully masked rows guarded). Two passes: (1) each (query head, query, slot)'s block lse ->
       ``lse_part [B, H_q, T, K]`` (natural log, -inf in the empty slots); then, in torch,
       ``lse_R = logsumexp_s lse_part`` and joint ``lse = logaddexp(lse_W, lse_R)``; (2) each block's
       contribution ``e^{S - L} V`` normalised by the row's final lse ``L`` (joint ``lse``; gated
       ``lse_R``) is atomically added to the fp32 output (joint: started as ``e^{lse_W - lse} o_W``; gated:
       o_R from 0, then ``o = g o_R + (1 - g) o_W`` where R is non-empty, ``o_W`` elsewhere). A block
       longer than the key tile ``BLOCK_N`` (64; 32 for fp32 on a GPU) is walked in ``NSUB`` chunks.
       The saved tensors (o, lse, lse_R, o_W, o_R) are those of the gathered path: the backward formulas
       are shared.
   Memory of the block-major path (forward + backward, beyond the inputs, outputs and gradients): fp32
   ``[B, H_q, T, D]`` for o_W (gated: also o_R) in the forward; in the backward fp32 accumulators for dq_W
   ``[b, H_q, T, D]`` and dk/dv ``[b, H_kv, T, D]``, for ``b`` batch elements at a time (as many as fit in
   ``BWD_ACC_BYTES``, 2 GiB: 12.9 GB for the whole batch at B8 H32 T32K D128); and O(B H T K) for the
   selection (int64), lse_part (fp32) and the reverse index (int32 entries, transient int64 sort keys):
   O(B H T (D + K)), nothing ``K D`` per query (tested: the peak grows by about 4 bytes per extra
   (query, slot) at D = 128). Expected cost (a model, not a measurement): K, V
   are read once per (work item, pass), amortised over the item's queries; each listed (query, slot) costs
   the gather of G query rows per pass and one atomic add of a D-vector; the scores are computed twice
   (lse pass, accumulate pass). [RECON] alternatives: per-slot partial outputs merged in a fixed order
   (deterministic, but ``B H_q T K D`` fp32: 1 GiB at B1 H16 T32K K8 D64); per query tile over the union
   of the tile's selected blocks with a mask (a cost that grows with the union).
4. backward. Each part (window W, retrieved R) is a partial attention with its own output cotangent
   ``dO_P``, log-sum-exp ``L_P`` and ``delta_P = rowsum(dO_P * O_P)``: joint uses ``dO, L, rowsum(dO * O)``
   for both; gated uses ``dO_W = c_W dO``, ``dO_R = c_R dO`` with ``c_R = g`` (0 where R is empty),
   ``c_W = 1 - c_R``, and ``d gate_logit = g (1 - g) rowsum(dO (O_R - O_W))`` (0 where R is empty). Then
     * ``match_bwd_dq_kernel``, per (query tile, query head): the window keys by ``fast/attention.py``'s
       dq loop ``_dq_loop`` (the forward's key blocks), then (gathered path) the row's retrieved keys with
       the forward's gathered tiles; writes dq once (negated back for a negative scale). Block-major
       path: the window part is ``fast/attention.py``'s dq kernel with the part's own lse, delta and dO
       (fp32 dq_W); the retrieved part's dq comes from ``match_bwd_dkdv_kernel`` below;
     * the window part of dk/dv is sliding-window attention's backward with the part's own ``dO_W``,
       ``L_W`` and ``delta_W``: ``fast/attention.py``'s dk/dv kernel (per key block and kv head, the G
       query heads summed in the program, masked edge blocks and unmasked interior ones, its tuned
       tiles), writing fp32 partial dk/dv;
     * ``match_bwd_dkdv_kernel``: the retrieved part of dk/dv through the forward's reverse index and work
       items, launched once per chunk of batch elements (the items of other elements return at once).
       One program per (work item, block chunk) gathers the listed queries in tiles of ``BLOCK_M``
       (tensor-core ``tl.dot`` against the chunk's keys), sums the G query heads and adds its dk/dv to the
       fp32 accumulators holding the window part with ``tl.atomic_add`` (an item is a slice of one block's
       list: several items may share a block). For ``block_size < 16`` the key tile is padded to 16 (masked
       columns). Block-major path (``DQ_ATOMIC``): it has P and dS of every listed (query head, query)
       against its chunk, so it also adds the chunk's dq share ``scale dS K_chunk`` to the fp32 dq_W
       accumulator atomically (a query selects a block at most once: no two rows of one program share an
       address). Atomic fp32 adds make the last bits of dq, dk, dv (and of the block-major output) depend
       on the order in which programs finish on a GPU; the interpreter runs programs in order.
5. decode: one query at position ``T - 1`` against the cache; the same select and forward kernels with a
   query offset (``q_start``; the window part is attention's loop at that position), cached block
   summaries used as given. Forward only (no autograd). It keeps
   the gathered path for every block size: one query row has nothing to amortise a block's loads over.

Kernels are launched with fixed tiles (one config, no autotuning): the GPU tile sizes are untuned.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from fast.attention import (
    _dq_loop,
    _fwd_loop,
    _masked_step,
    _rescale,
    _t_bucket,
    attention_bwd_dkdv_kernel,
    attention_bwd_dq_kernel,
    attention_fwd_kernel,
    causal_window_split,
)
from fast.utils import LN2, LOG2E, empty, is_interpreting

__all__ = [
    "retrieve_triton",
    "match_attention_triton",
    "match_decode_triton",
    "block_summaries_triton",
    "reverse_index",
    "work_items",
    "MAX_TOP_K",
    "BLOCK_MAJOR_MIN_BLOCK",
]

MAX_TOP_K = 32  # running top-k lives in registers: [BLOCK_M, next_pow2(top_k)] values + indices
BLOCK_MAJOR_MIN_BLOCK = 16  # block_size from which the retrieved part is block-major (see _block_major)
SELECT_TENSOR_CORES = False  # selection scores on tensor cores with an exact fp32 band (module docstring, 2.)
SELECT_GUARD = 8  # band slots beyond top_k (rounded up to a power of two) before the exact fallback
WORK_ITEM = 256  # listed (query, slot) entries per program of the block-major kernels (see work_items)
BWD_ACC_BYTES = 2 * 2**30  # the backward's fp32 dq/dk/dv accumulators: batch elements at a time (see _bwd)


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def match_summary_kernel(
    k_ptr,  # [B, Hkv, T, D] keys
    s_ptr,  # [B, Hkv, NB, D] fp32 block means (contiguous)
    skb,
    skh,
    skt,
    skd,
    Hkv,
    NB,
    D,
    BS,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (full block, batch, kv head): the mean of the block's BS keys."""
    blk = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for t0 in range(0, BS, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < BS
        pos = blk * BS + offs_t
        kk = tl.load(
            k_ptr + b * skb + hk * skh + pos[:, None] * skt + offs_d[None, :] * skd,
            mask=t_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(kk, axis=0)
    tl.store(s_ptr + (pid_bh * NB + blk) * D + offs_d, acc / BS, mask=d_ok)


@triton.jit
def _topk_insert(top_v, top_i, s, cand_i, KP: tl.constexpr):
    """Offer one chunk of scores ``s [BM, N]`` (candidate indices ``cand_i``, ``[1, N]`` or ``[BM, N]``, each
    larger than every index already in the list; -inf where not a candidate) to the running top-k
    ``(top_v, top_i) [BM, KP]`` (the tie proof is in the module docstring)."""
    worst = tl.min(top_v, axis=1)  # [BM]
    go = tl.max(tl.max(tl.where(s > worst[:, None], 1, 0), axis=1), axis=0)
    while go > 0:
        best = tl.max(s, axis=1)  # [BM] the chunk's best remaining candidate per row
        best_n = tl.min(tl.where(s == best[:, None], cand_i, 9223372036854775807), axis=1)
        ins = best > worst  # strict: the list's equal scores have lower indices
        is_worst = top_v == worst[:, None]
        evict_i = tl.max(tl.where(is_worst, top_i, -KP - 2), axis=1)  # highest index among the worst
        hit = ins[:, None] & is_worst & (top_i == evict_i[:, None])
        top_v = tl.where(hit, best[:, None], top_v)
        top_i = tl.where(hit, best_n[:, None], top_i)
        s = tl.where(cand_i == best_n[:, None], float("-inf"), s)
        worst = tl.min(top_v, axis=1)
        go = tl.max(tl.max(tl.where(s > worst[:, None], 1, 0), axis=1), axis=0)
    return top_v, top_i


@triton.jit
def _group_sum(q_base, q_mask, sqh, G, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The G query heads of a kv head summed in fp32: ``sum_g q_g . c = (sum_g q_g) . c``."""
    qsum = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for g in range(0, G):
        qsum += tl.load(q_base + g * sqh, mask=q_mask, other=0.0).to(tl.float32)
    return qsum


@triton.jit
def _cand_chunk(c_base, start_n, sct, scd, offs_d, d_ok, n_hi, row_ok, pos, W, BS, BLOCK_N: tl.constexpr):
    """One chunk of candidates: indices, fp32 vectors ``[BN, BD]`` and the ``[BM, BN]`` mask of the rows'
    candidates (``n * BS <= pos - W``: the token, or the whole block, lies before the row's window)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_hi
    cand = tl.load(
        c_base + offs_n[:, None] * sct + offs_d[None, :] * scd,
        mask=n_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    ok = row_ok[:, None] & n_ok[None, :] & (offs_n[None, :] * BS <= pos[:, None] - W)
    return offs_n, cand, ok


@triton.jit
def _approx_scores(qhat, cand, qn, scale, err_rel):
    """fp16 tensor-core scores of unit vectors, rescaled: ``(s, err)`` with ``|s - s_fp32| <= err`` for the
    fp32 score ``s_fp32`` of the exact pass (``err_rel`` from ``_select``)."""
    cn = tl.sqrt(tl.sum(cand * cand, axis=1))  # [BN]
    chat = (cand / tl.maximum(cn, 1e-30)[:, None]).to(tl.float16)
    mag = qn[:, None] * cn[None, :] * tl.abs(scale)
    s = tl.dot(qhat, tl.trans(chat)) * mag * tl.where(scale < 0, -1.0, 1.0)
    return s, mag * err_rel


@triton.jit
def match_select_kernel(
    q_ptr,  # [B, Hq, TQ, D] queries
    c_ptr,  # [B, Hkv, N, D] candidates: block summaries (fp32) or the keys themselves (block_size 1)
    idx_ptr,  # [B, Hkv, TQ, TOP_K] int64 selection (contiguous)
    fb_ptr,  # [B * Hkv * cdiv(TQ, BLOCK_M)] int32: 1 where the program ran the exact fp32 pass
    sqb,
    sqh,
    sqt,
    sqd,
    scb,
    sch,
    sct,
    scd,
    Hkv,
    G,
    TQ,
    q_start,
    D,
    W,
    BS,
    scale,
    err_rel,
    TOP_K: tl.constexpr,
    KP: tl.constexpr,
    KG: tl.constexpr,
    TC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Running top-k over streamed candidate chunks (see the module docstring for the tie proof and for the
    tensor-core band ``TC``)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows
    pos = q_start + offs_m  # query positions
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < TQ
    d_ok = offs_d < D
    q_base = q_ptr + b * sqb + hk * G * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd
    q_mask = row_ok[:, None] & d_ok[None, :]
    c_base = c_ptr + b * scb + hk * sch
    slot = tl.arange(0, KP)
    slot_real = slot < TOP_K
    # empty slots: -inf with distinct negative indices (so exactly one is the eviction target); padding
    # slots beyond TOP_K: +inf, never evicted, never written
    top_v = tl.where(slot_real[None, :], float("-inf"), float("inf")) + tl.zeros([BLOCK_M, KP], tl.float32)
    top_i = (-1 - slot)[None, :].to(tl.int64) + tl.zeros([BLOCK_M, KP], tl.int64)
    # candidates of the tile: indices n with n * BS <= pos_last - W
    pos_last = q_start + tl.minimum(pid_m * BLOCK_M + BLOCK_M, TQ) - 1
    n_hi = tl.maximum(pos_last - W + BS, 0) // BS
    exact = True
    if TC:  # (the summed query is loaded again where it is needed: fewer live registers in the passes)
        qsum = _group_sum(q_base, q_mask, sqh, G, BLOCK_M, BLOCK_D)
        qn = tl.sqrt(tl.sum(qsum * qsum, axis=1))  # [BM]
        qhat = (qsum / tl.maximum(qn, 1e-30)[:, None]).to(tl.float16)
        # pass 1: tau = the TOP_K-th largest lower bound s - err of each row (-inf below TOP_K candidates),
        # a lower bound on the row's TOP_K-th fp32 score
        lo_v = top_v
        lo_i = top_i
        for start_n in range(0, n_hi, BLOCK_N):
            offs_n, cand, ok = _cand_chunk(
                c_base, start_n, sct, scd, offs_d, d_ok, n_hi, row_ok, pos, W, BS, BLOCK_N
            )
            s, err = _approx_scores(qhat, cand, qn, scale, err_rel)
            lo_v, lo_i = _topk_insert(
                lo_v, lo_i, tl.where(ok, s - err, float("-inf")), offs_n[None, :].to(tl.int64), KP
            )
        tau = tl.min(lo_v, axis=1)
        # pass 2: the band, every candidate whose upper bound s + err reaches tau (it holds the exact top-k),
        # listed per row in index order; more than KG in some row (near-ties) -> the exact pass below
        kslot = tl.arange(0, KG)
        band = tl.full([BLOCK_M, KG], -1, tl.int64)
        cnt = tl.zeros([BLOCK_M], tl.int32)
        for start_n in range(0, n_hi, BLOCK_N):
            offs_n, cand, ok = _cand_chunk(
                c_base, start_n, sct, scd, offs_d, d_ok, n_hi, row_ok, pos, W, BS, BLOCK_N
            )
            s, err = _approx_scores(qhat, cand, qn, scale, err_rel)
            inb = ok & (s + err >= tau[:, None])
            go = tl.max(tl.max(tl.where(inb, 1, 0), axis=1), axis=0)
            while go > 0:
                first = tl.min(tl.where(inb, offs_n[None, :], 2147483647), axis=1)  # [BM]
                has = first < 2147483647
                band = tl.where(
                    has[:, None] & (kslot[None, :] == cnt[:, None]), first[:, None].to(tl.int64), band
                )
                cnt += has.to(tl.int32)
                inb = inb & (offs_n[None, :] != first[:, None])
                go = tl.max(tl.max(tl.where(inb, 1, 0), axis=1), axis=0)
        exact = tl.max(cnt, axis=0) > KG
        if not exact:
            # pass 3: fp32 scores of the band (each an fp32 sum over D), offered in index order
            qsum = _group_sum(q_base, q_mask, sqh, G, BLOCK_M, BLOCK_D)
            bs_ = tl.full([BLOCK_M, KG], float("-inf"), tl.float32)
            for j in range(0, KG):
                n_j = tl.sum(tl.where(kslot[None, :] == j, band, 0), axis=1)  # [BM]
                have = n_j >= 0
                c_j = tl.load(
                    c_base + n_j[:, None] * sct + offs_d[None, :] * scd,
                    mask=have[:, None] & d_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                s_j = tl.sum(qsum * c_j, axis=1) * scale
                bs_ = tl.where((kslot[None, :] == j) & have[:, None], s_j[:, None], bs_)
            top_v, top_i = _topk_insert(top_v, top_i, bs_, band, KP)
    if exact:
        qsum = _group_sum(q_base, q_mask, sqh, G, BLOCK_M, BLOCK_D)
        for start_n in range(0, n_hi, BLOCK_N):
            offs_n, cand, ok = _cand_chunk(
                c_base, start_n, sct, scd, offs_d, d_ok, n_hi, row_ok, pos, W, BS, BLOCK_N
            )
            # fp32 "ieee" for every input dtype: a discrete choice, TF32 / bf16 rounding would move near-ties
            s = tl.dot(qsum, tl.trans(cand), input_precision="ieee") * scale  # [BM, BN]
            top_v, top_i = _topk_insert(
                top_v, top_i, tl.where(ok, s, float("-inf")), offs_n[None, :].to(tl.int64), KP
            )
    tl.store(fb_ptr + pid_bh * tl.num_programs(0) + pid_m, exact.to(tl.int32))
    # write in (score desc, index asc) order; taken entries become -inf, so empties come last as -1
    top_v = tl.where(slot_real[None, :], top_v, float("-inf"))
    out_base = idx_ptr + (pid_bh * TQ + offs_m) * TOP_K
    for r in range(0, TOP_K):
        best = tl.max(top_v, axis=1)
        have = best > float("-inf")
        best_i = tl.min(
            tl.where((top_v == best[:, None]) & have[:, None], top_i, 9223372036854775807), axis=1
        )
        tl.store(out_base + r, tl.where(have, best_i, -1), mask=row_ok)
        top_v = tl.where(have[:, None] & (top_i == best_i[:, None]), float("-inf"), top_v)


@triton.jit
def match_fwd_kernel(
    q_ptr,  # [B, Hq, TQ, D] queries (positions q_start + row)
    k_ptr,  # [B, Hkv, TK, D] keys
    v_ptr,  # [B, Hkv, TK, D] values
    idx_ptr,  # [B, Hkv, TQ, TOP_K] int64 selection (contiguous), -1 = empty slot
    gate_ptr,  # [B, Hq, TQ] fp32 gate logits (contiguous; gated only)
    o_ptr,  # [B, Hq, TQ, D] output, input dtype
    lse_ptr,  # [B, Hq, TQ] fp32: joint lse (joint) or window lse (gated), natural log (contiguous)
    lse_r_ptr,  # [B, Hq, TQ] fp32 retrieved-part lse, -inf where empty (gated only)
    ow_ptr,  # [B, Hq, TQ, D] fp32 window output (gated only, contiguous)
    or_ptr,  # [B, Hq, TQ, D] fp32 retrieved output, 0 where empty (gated only, contiguous)
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sob,
    soh,
    sot,
    sod,
    Hq,
    G,
    TQ,
    TK,
    q_start,
    D,
    W,
    BS,
    qk_scale,  # scale * log2(e) >= 0 (the host flips q for a negative scale)
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,
    STORE_PARTS: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    pos = q_start + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < TQ
    d_ok = offs_d < D
    q = tl.load(
        q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)  # [BM, BD]
    if LOWP_DOT:
        q_dot = q.to(k_ptr.dtype.element_ty)
    else:
        q_dot = q
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # log2-domain running max
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # ---- window part: fast/attention.py's loop (edge, interior, edge key blocks of the tile's window)
    pos_first = q_start + start_m
    pos_end = q_start + tl.minimum(start_m + BLOCK_M, TQ)  # exclusive
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = k_ptr + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd
    v_ptrs = v_ptr + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd
    wa, wb, wc = causal_window_split(pos_first, pos_end, W, TK, BLOCK_N)
    acc, l_i, m_i = _fwd_loop(
        acc, l_i, m_i, q_dot, k_ptrs, v_ptrs, skt, svt, pos, offs_n, d_ok, wa, wb, TK, W, qk_scale,
        True, True, True, False, EVEN_D, LOWP_DOT, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_loop(
        acc, l_i, m_i, q_dot, k_ptrs, v_ptrs, skt, svt, pos, offs_n, d_ok, wb, wc, TK, W, qk_scale,
        False, True, True, False, EVEN_D, LOWP_DOT, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_loop(
        acc, l_i, m_i, q_dot, k_ptrs, v_ptrs, skt, svt, pos, offs_n, d_ok, wc, pos_end, TK, W, qk_scale,
        True, True, True, False, EVEN_D, LOWP_DOT, BLOCK_N,
    )  # fmt: skip
    # ---- retrieved part: per-row gathered keys, flattened (slot, offset) list of TOP_K * BS entries
    m_r = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_r = tl.zeros([BLOCK_M], tl.float32)
    acc_r = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_ret = TOP_K * BS
    r_hi = tl.where(pos_end - 1 >= W, n_ret, 0)  # no row of the tile has a candidate: skip
    idx_row = idx_ptr + (b * (Hq // G) + hk) * TQ * TOP_K + offs_m * TOP_K  # [BM]
    for e0 in range(0, r_hi, BLOCK_R):
        e = e0 + tl.arange(0, BLOCK_R)
        e_ok = e < n_ret
        slot = e // BS
        blk = tl.load(idx_row[:, None] + slot[None, :], mask=row_ok[:, None] & e_ok[None, :], other=-1)
        kpos = blk * BS + (e - slot * BS)[None, :]  # [BM, BR] int64
        ok = (blk >= 0) & (kpos <= pos[:, None] - W)
        ok3 = ok[:, :, None] & d_ok[None, None, :]
        kk = tl.load(
            k_ptr + b * skb + hk * skh + kpos[:, :, None] * skt + offs_d[None, None, :] * skd,
            mask=ok3,
            other=0.0,
        ).to(tl.float32)  # [BM, BR, BD]
        s = tl.sum(q[:, None, :] * kk, axis=2)  # [BM, BR] raw scores
        vv = tl.load(
            v_ptr + b * svb + hk * svh + kpos[:, :, None] * svt + offs_d[None, None, :] * svd,
            mask=ok3,
            other=0.0,
        ).to(tl.float32)  # [BM, BR, BD]
        # the window loop's online-softmax step (fast/attention.py), on gathered tiles
        if GATED:
            m_new, p = _masked_step(s, ok, m_r, qk_scale)
            alpha = _rescale(m_r, m_new)
            l_r = l_r * alpha + tl.sum(p, axis=1)
            acc_r = acc_r * alpha[:, None] + tl.sum(p[:, :, None] * vv, axis=1)
            m_r = m_new
        else:
            m_new, p = _masked_step(s, ok, m_i, qk_scale)
            alpha = _rescale(m_i, m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vv, axis=1)
            m_i = m_new
    # ---- epilogue (l_i > 0 for every real row: the window holds the query itself)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o_w = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    stat = pid_bh * TQ + offs_m
    qd_mask = row_ok[:, None] & d_ok[None, :]
    if GATED:
        has = l_r > 0.0
        lr_safe = tl.where(has, l_r, 1.0)
        o_r = acc_r / lr_safe[:, None]  # 0 where nothing was retrieved
        glog = tl.load(gate_ptr + stat, mask=row_ok, other=0.0)
        gate = 1.0 / (1.0 + tl.exp(-glog))
        out = tl.where(has[:, None], gate[:, None] * o_r + (1.0 - gate[:, None]) * o_w, o_w)
        lse_r = tl.where(has, (m_r + tl.log2(lr_safe)) * LN2, float("-inf"))
        tl.store(lse_r_ptr + stat, lse_r, mask=row_ok)
        if STORE_PARTS:
            part = stat[:, None] * D + offs_d[None, :]
            tl.store(ow_ptr + part, o_w, mask=qd_mask)
            tl.store(or_ptr + part, o_r, mask=qd_mask)
    else:
        out = o_w
    tl.store(
        o_ptr + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
        out.to(o_ptr.dtype.element_ty),
        mask=qd_mask,
    )
    tl.store(lse_ptr + stat, lse, mask=row_ok)


@triton.jit
def match_bwd_dq_kernel(
    q_ptr,  # [B, Hq, T, D]
    k_ptr,  # [B, Hkv, T, D]
    v_ptr,  # [B, Hkv, T, D]
    dow_ptr,  # [B, Hq, T, D] window-part cotangent dO_W (contiguous)
    dor_ptr,  # [B, Hq, T, D] retrieved-part cotangent dO_R (contiguous; gated only)
    stat_ptr,  # [4, B, Hq, T] fp32 (contiguous): lse_W, delta_W, lse_R, delta_R (lse: natural log)
    idx_ptr,  # [B, Hkv, T, TOP_K] int64
    dq_ptr,  # [B, Hq, T, D] dq output, input dtype (contiguous)
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    B,
    Hq,
    G,
    T,
    D,
    W,
    BS,
    scale,  # >= 0 (the host flips q for a negative scale and negates dq)
    TOP_K: tl.constexpr,
    GATED: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dq = scale * sum_j dS_ij k_j: window keys by fast/attention.py's dq loop (tensor-core ``tl.dot``, the
    forward's key blocks), then the row's retrieved keys (gathered tiles, as in the forward).
    dS = P (dO_P . v - delta_P) per part P."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < D
    qd_mask = row_ok[:, None] & d_ok[None, :]
    stat = pid_bh * T + offs_m
    n_stat = B * Hq * T
    q = tl.load(
        q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=qd_mask, other=0.0
    ).to(tl.float32)
    do = tl.load(dow_ptr + stat[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0).to(tl.float32)
    lse2 = tl.load(stat_ptr + stat, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(stat_ptr + n_stat + stat, mask=row_ok, other=0.0)
    qk_scale = scale * LOG2E
    if LOWP_DOT:
        q_dot = q.to(q_ptr.dtype.element_ty)
        do_dot = do.to(q_ptr.dtype.element_ty)
    else:
        q_dot = q
        do_dot = do
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # ---- window keys: fast/attention.py's dq loop (edge, interior, edge key blocks of the tile's window)
    hi = tl.minimum(start_m + BLOCK_M, T)
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = k_ptr + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd
    v_ptrs = v_ptr + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd
    wa, wb, wc = causal_window_split(start_m, hi, W, T, BLOCK_N)
    dq = _dq_loop(
        dq, q_dot, do_dot, lse2, delta, k_ptrs, v_ptrs, skt, svt, offs_m, offs_n, d_ok, wa, wb, T, W,
        qk_scale, True, True, True, False, EVEN_D, LOWP_DOT, BLOCK_N,
    )  # fmt: skip
    dq = _dq_loop(
        dq, q_dot, do_dot, lse2, delta, k_ptrs, v_ptrs, skt, svt, offs_m, offs_n, d_ok, wb, wc, T, W,
        qk_scale, False, True, True, False, EVEN_D, LOWP_DOT, BLOCK_N,
    )  # fmt: skip
    dq = _dq_loop(
        dq, q_dot, do_dot, lse2, delta, k_ptrs, v_ptrs, skt, svt, offs_m, offs_n, d_ok, wc, hi, T, W,
        qk_scale, True, True, True, False, EVEN_D, LOWP_DOT, BLOCK_N,
    )  # fmt: skip
    # ---- retrieved keys
    if GATED:
        do = tl.load(dor_ptr + stat[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0).to(tl.float32)
        lse2 = tl.load(stat_ptr + 2 * n_stat + stat, mask=row_ok, other=0.0) * LOG2E
        lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)  # empty R: every p below is masked to 0 anyway
        delta = tl.load(stat_ptr + 3 * n_stat + stat, mask=row_ok, other=0.0)
    n_ret = TOP_K * BS
    r_hi = tl.where(hi - 1 >= W, n_ret, 0)
    idx_row = idx_ptr + (b * (Hq // G) + hk) * T * TOP_K + offs_m * TOP_K
    for e0 in range(0, r_hi, BLOCK_R):
        e = e0 + tl.arange(0, BLOCK_R)
        e_ok = e < n_ret
        slot = e // BS
        blk = tl.load(idx_row[:, None] + slot[None, :], mask=row_ok[:, None] & e_ok[None, :], other=-1)
        kpos = blk * BS + (e - slot * BS)[None, :]
        ok = (blk >= 0) & (kpos <= offs_m[:, None] - W)
        ok3 = ok[:, :, None] & d_ok[None, None, :]
        kk = tl.load(
            k_ptr + b * skb + hk * skh + kpos[:, :, None] * skt + offs_d[None, None, :] * skd,
            mask=ok3,
            other=0.0,
        ).to(tl.float32)
        vv = tl.load(
            v_ptr + b * svb + hk * svh + kpos[:, :, None] * svt + offs_d[None, None, :] * svd,
            mask=ok3,
            other=0.0,
        ).to(tl.float32)
        s = tl.sum(q[:, None, :] * kk, axis=2)  # raw scores, as in the window loop
        p = tl.math.exp2(tl.where(ok, tl.fma(s, qk_scale, -lse2[:, None]), float("-inf")))  # [BM, BR]
        dp = tl.sum(do[:, None, :] * vv, axis=2)
        ds = p * (dp - delta[:, None])
        dq += tl.sum(ds[:, :, None] * kk, axis=1)
    tl.store(
        dq_ptr + stat[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=qd_mask
    )


@triton.jit
def match_bwd_dkdv_kernel(
    q_ptr,  # [B, Hq, T, D]
    k_ptr,  # [B, Hkv, T, D]
    v_ptr,  # [B, Hkv, T, D]
    do_ptr,  # [B, Hq, T, D] dO_R (contiguous)
    lse_ptr,  # [B, Hq, T] fp32 natural-log lse of the retrieved part (contiguous)
    delta_ptr,  # [B, Hq, T] fp32 rowsum(dO_R * O_R) (contiguous)
    list_ptr,  # [n_entries] int32/int64 entries t * TOP_K + slot, by (batch, kv head, block), ascending
    item_ptr,  # [3, NI] int64 work items: segment (b * Hkv + kv head) * NB + block, first and end list offset
    dkw_ptr,  # [B1 - B0, Hkv, T, D] fp32 dk accumulator (contiguous): the window part (times scale), added to
    dvw_ptr,  # [B1 - B0, Hkv, T, D] fp32 dv accumulator (contiguous): the window part, added to
    dq_ptr,  # [B1 - B0, Hq, T, D] fp32 dq accumulator, times scale (DQ_ATOMIC only, contiguous): added to
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    Hq,
    Hkv,
    G,
    T,
    D,
    W,
    BS,
    NB,
    NI,
    NSUB,
    TOP_K,
    scale,
    B0,
    B1,  # the batch elements [B0, B1) this launch accumulates (the accumulators hold B1 - B0 of them)
    LOWP_DOT: tl.constexpr,
    DQ_ATOMIC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (work item, chunk of its block): the item's listed queries, gathered BLOCK_M at a
    time for each of the G query heads of the group, against the chunk's keys. The chunk's dk/dv (the G
    heads summed) are atomically added to the fp32 accumulators that hold the window part. ``DQ_ATOMIC``
    (block-major path): also the chunk's share of dq for every listed (query head, query),
    ``scale * dS @ K_chunk``, atomically added to the fp32 dq accumulator (a query selects a block at most
    once, so no two rows of one program share an address)."""
    pid = tl.program_id(0).to(tl.int64)
    it = pid // NSUB
    sub = pid % NSUB
    seg = tl.load(item_ptr + it)
    lst_lo = tl.load(item_ptr + NI + it)
    lst_hi = tl.load(item_ptr + 2 * NI + it)
    pid_bh = seg // NB
    b = pid_bh // Hkv
    if (lst_lo < lst_hi) & (b >= B0) & (b < B1):
        blk = seg % NB
        hk = pid_bh % Hkv
        offs_in = sub * BLOCK_N + tl.arange(0, BLOCK_N)  # offsets inside the block
        kpos = blk * BS + offs_in
        col_ok = (offs_in < BS) & (kpos < T)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        kv_mask = col_ok[:, None] & d_ok[None, :]
        kk = tl.load(
            k_ptr + b * skb + hk * skh + kpos[:, None] * skt + offs_d[None, :] * skd, mask=kv_mask, other=0.0
        ).to(tl.float32)  # [BN, BD]
        vv = tl.load(
            v_ptr + b * svb + hk * svh + kpos[:, None] * svt + offs_d[None, :] * svd, mask=kv_mask, other=0.0
        ).to(tl.float32)
        if LOWP_DOT:
            k_dot = kk.to(k_ptr.dtype.element_ty)
            v_dot = vv.to(v_ptr.dtype.element_ty)
        else:
            k_dot = kk
            v_dot = vv
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        qk_scale = scale * LOG2E
        for g in range(0, G):
            h = hk * G + g
            stat_base = (b * Hq + h) * T
            for t0 in range(lst_lo, lst_hi, BLOCK_M):
                offs_t = t0 + tl.arange(0, BLOCK_M)
                t_ok = offs_t < lst_hi
                ent = tl.load(list_ptr + offs_t, mask=t_ok, other=0).to(tl.int64)  # [BM] t * TOP_K + slot
                qi = ent // TOP_K  # query positions
                qd_mask = t_ok[:, None] & d_ok[None, :]
                qq = tl.load(
                    q_ptr + b * sqb + h * sqh + qi[:, None] * sqt + offs_d[None, :] * sqd,
                    mask=qd_mask,
                    other=0.0,
                ).to(tl.float32)  # [BM, BD]
                do = tl.load(
                    do_ptr + (stat_base + qi)[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0
                ).to(tl.float32)
                lse2 = tl.load(lse_ptr + stat_base + qi, mask=t_ok, other=0.0) * LOG2E
                delta = tl.load(delta_ptr + stat_base + qi, mask=t_ok, other=0.0)
                if LOWP_DOT:
                    s = tl.dot(qq.to(k_ptr.dtype.element_ty), tl.trans(k_dot))
                    dp = tl.dot(do.to(v_ptr.dtype.element_ty), tl.trans(v_dot))
                else:
                    s = tl.dot(qq, tl.trans(k_dot), input_precision="ieee")  # [BM, BN]
                    dp = tl.dot(do, tl.trans(v_dot), input_precision="ieee")
                ok = t_ok[:, None] & col_ok[None, :] & (kpos[None, :] <= qi[:, None] - W)
                p = tl.exp2(tl.where(ok, s * qk_scale - lse2[:, None], float("-inf")))
                ds = p * (dp - delta[:, None])
                if LOWP_DOT:
                    dv += tl.dot(tl.trans(p.to(v_ptr.dtype.element_ty)), do.to(v_ptr.dtype.element_ty))
                    dk += tl.dot(tl.trans(ds.to(k_ptr.dtype.element_ty)), qq.to(k_ptr.dtype.element_ty))
                else:
                    dv += tl.dot(tl.trans(p), do, input_precision="ieee")
                    dk += tl.dot(tl.trans(ds), qq, input_precision="ieee")
                if DQ_ATOMIC:
                    if LOWP_DOT:
                        dqt = tl.dot(ds.to(k_ptr.dtype.element_ty), k_dot)
                    else:
                        dqt = tl.dot(ds, k_dot, input_precision="ieee")  # [BM, BD]
                    acc_row = ((b - B0) * Hq + h) * T + qi
                    tl.atomic_add(dq_ptr + acc_row[:, None] * D + offs_d[None, :], dqt * scale, mask=qd_mask)
        out_off = (((b - B0) * Hkv + hk) * T + kpos)[:, None] * D + offs_d[None, :]
        tl.atomic_add(dkw_ptr + out_off, dk * scale, mask=kv_mask)
        tl.atomic_add(dvw_ptr + out_off, dv, mask=kv_mask)


@triton.jit
def match_fwd_blocks_kernel(
    q_ptr,  # [B, Hq, T, D] queries
    k_ptr,  # [B, Hkv, T, D] keys
    v_ptr,  # [B, Hkv, T, D] values
    list_ptr,  # [n_entries] int32/int64 entries t * TOP_K + slot, by (batch, kv head, block), ascending
    item_ptr,  # [3, NI] int64 work items: segment (b * Hkv + kv head) * NB + block, first and end list offset
    lsep_ptr,  # [B, Hq, T, TOP_K] fp32 per-slot log-sum-exps, natural log (contiguous; written unless ACCUM)
    lset_ptr,  # [B, Hq, T] fp32 the lse the contributions are normalised by, natural log (ACCUM, contiguous)
    oacc_ptr,  # [B, Hq, T, D] fp32 output accumulator, atomically added to (ACCUM, contiguous)
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    Hq,
    Hkv,
    G,
    T,
    D,
    W,
    BS,
    NB,
    NI,
    TOP_K,
    qk_scale,  # scale * log2(e)
    NSUB: tl.constexpr,
    ACCUM: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Block-major retrieved part of the forward: one program per work item (at most ITEM consecutive
    entries of one selected block's list in the reverse index). The block's keys and values are loaded once
    (``NSUB == 1``; else its ``NSUB`` chunks of ``BLOCK_N`` keys are walked for every query tile); the listed
    queries come in tiles of ``BLOCK_M``, for each of the G query heads of the group. Two passes:
      * ``ACCUM = False``: the block's log-sum-exp for each listed (query head, query, slot) -> lse_part
        (natural log; -inf if no key is visible: never for a selected block, whose first key is a
        candidate, but guarded: no NaN);
      * ``ACCUM = True``: the block's contribution ``exp(S - L) V`` normalised by the row's final lse ``L``
        (given: the softmax the block joins), atomically added to the row's fp32 output accumulator.
    No per-slot output buffer: extra memory O(B H_q T (D + TOP_K)). Expected cost: the block's 2 BS D key /
    value elements loaded once per item and pass and amortised over its n listed queries; per listed query
    G gathered query rows per pass; tensor-core work 2 G n BS D flops (lse pass) + 4 G n BS D (accumulate)."""
    it = tl.program_id(0).to(tl.int64)
    seg = tl.load(item_ptr + it)
    lst_lo = tl.load(item_ptr + NI + it)
    lst_hi = tl.load(item_ptr + 2 * NI + it)
    if lst_lo < lst_hi:
        blk = seg % NB
        pid_bh = seg // NB
        b = pid_bh // Hkv
        hk = pid_bh % Hkv
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        kpos0 = blk * BS + offs_n  # the first chunk: the whole block when NSUB == 1
        col0 = (offs_n < BS) & (kpos0 < T)
        kv0 = col0[:, None] & d_ok[None, :]
        # kept in the input dtype for the tensor-core dots (half the registers of fp32), fp32 otherwise
        k0 = tl.load(
            k_ptr + b * skb + hk * skh + kpos0[:, None] * skt + offs_d[None, :] * skd, mask=kv0, other=0.0
        )  # [BN, BD]
        v0 = tl.load(  # the lse pass reads no values
            v_ptr + b * svb + hk * svh + kpos0[:, None] * svt + offs_d[None, :] * svd,
            mask=kv0 & ACCUM,
            other=0.0,
        )
        if not LOWP_DOT:
            k0 = k0.to(tl.float32)
            v0 = v0.to(tl.float32)
        for t0 in range(lst_lo, lst_hi, BLOCK_M):
            offs_t = t0 + tl.arange(0, BLOCK_M)
            t_ok = offs_t < lst_hi
            ent = tl.load(list_ptr + offs_t, mask=t_ok, other=0).to(tl.int64)  # [BM] t * TOP_K + slot
            qi = ent // TOP_K  # query positions
            qd_mask = t_ok[:, None] & d_ok[None, :]
            for g in range(0, G):
                h = hk * G + g
                stat = (b * Hq + h) * T + qi  # [BM] the (query head, query) of each row
                qq = tl.load(
                    q_ptr + b * sqb + h * sqh + qi[:, None] * sqt + offs_d[None, :] * sqd,
                    mask=qd_mask,
                    other=0.0,
                ).to(tl.float32)  # [BM, BD] gathered query rows
                if ACCUM:
                    lse_t = tl.load(lset_ptr + stat, mask=t_ok, other=0.0)
                    # a row with no visible retrieved key has L = -inf: its contributions are 0, not NaN
                    lse2 = tl.where(lse_t == float("-inf"), float("inf"), lse_t * LOG2E)
                    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
                else:
                    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # log2-domain running max
                    l_i = tl.zeros([BLOCK_M], tl.float32)
                for sb in range(0, NSUB):
                    if NSUB == 1:
                        kk = k0
                        vv = v0
                        kpos = kpos0
                        col_ok = col0
                    else:
                        offs_in = sb * BLOCK_N + offs_n
                        kpos = blk * BS + offs_in
                        col_ok = (offs_in < BS) & (kpos < T)
                        kv_mask = col_ok[:, None] & d_ok[None, :]
                        kk = tl.load(
                            k_ptr + b * skb + hk * skh + kpos[:, None] * skt + offs_d[None, :] * skd,
                            mask=kv_mask,
                            other=0.0,
                        )
                        vv = tl.load(
                            v_ptr + b * svb + hk * svh + kpos[:, None] * svt + offs_d[None, :] * svd,
                            mask=kv_mask & ACCUM,
                            other=0.0,
                        )
                        if not LOWP_DOT:
                            kk = kk.to(tl.float32)
                            vv = vv.to(tl.float32)
                    if LOWP_DOT:
                        s = tl.dot(qq.to(k_ptr.dtype.element_ty), tl.trans(kk))
                    else:
                        s = tl.dot(qq, tl.trans(kk), input_precision="ieee")  # [BM, BN]
                    s = s * qk_scale
                    # the block's candidate keys only (a selected block may reach into the window)
                    vis = t_ok[:, None] & col_ok[None, :] & (kpos[None, :] <= qi[:, None] - W)
                    s = tl.where(vis, s, float("-inf"))
                    if ACCUM:
                        p = tl.exp2(s - lse2[:, None])
                        if LOWP_DOT:
                            acc += tl.dot(p.to(v_ptr.dtype.element_ty), vv)
                        else:
                            acc += tl.dot(p, vv, input_precision="ieee")
                    else:
                        m_new = tl.maximum(m_i, tl.max(s, axis=1))
                        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
                        m_i = m_new
                if ACCUM:
                    tl.atomic_add(oacc_ptr + stat[:, None] * D + offs_d[None, :], acc, mask=qd_mask)
                else:
                    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
                    lse_p = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
                    tl.store(lsep_ptr + stat * TOP_K + ent % TOP_K, lse_p, mask=t_ok)


# ----------------------------------------------------------------------------------------------
# host side


def _block_d(D):  # head dim padded to a power of two >= 16 (every tl.dot dim >= 16)
    return max(16, triton.next_power_of_2(D))


def _lowp(q):
    # fp16/bf16 tensor-core dots when compiled (operands exact in their dtype; P rounded to it for P @ V, as
    # in every flash attention); fp32 "ieee" dots in the interpreter, where bf16 arithmetic is unreliable
    return q.dtype in (torch.float16, torch.bfloat16) and not is_interpreting()


def _kp(top_k):
    return max(2, triton.next_power_of_2(max(top_k, 1)))


def candidates(t_k: int, window: int, block_size: int) -> int:
    """The most retrieval candidates any query has against ``t_k`` keys: the last query (index ``t_k - 1``)
    may retrieve the blocks whose first key lies at or before ``t_k - 1 - window``."""
    last = t_k - 1 - window
    return 0 if last < 0 else last // block_size + 1


def _pad_idx(idx, top_k):  # [..., k] -> [..., top_k], -1 in the slots no query can fill
    if idx.shape[-1] == top_k:
        return idx
    return torch.nn.functional.pad(idx, (0, top_k - idx.shape[-1]), value=-1)


def _check_triton(q, top_k, requested=None):
    """Limits of these kernels (the API validates everything else). ``top_k`` is already clamped to the
    candidate count; ``requested`` is the caller's value, for the message."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"the Triton MATCH kernels take fp16/bf16/fp32 inputs, got {q.dtype} (use backend='torch')"
        )
    if q.shape[-1] > 128:
        raise ValueError(
            f"the Triton MATCH kernels support head dim D <= 128, got D={q.shape[-1]} (use backend='torch')"
        )
    if top_k > MAX_TOP_K:
        asked = (
            "" if requested in (None, top_k) else f" (top_k={requested} clamped to the {top_k} candidates)"
        )
        raise ValueError(
            f"the Triton MATCH kernels keep the running top-k in registers and support at most {MAX_TOP_K} "
            f"retrieved slots per query, got {top_k}{asked} (use backend='torch')"
        )


def _tiles(q):
    """(BLOCK_M, BLOCK_N, BLOCK_R, num_warps) of the forward / dq kernels. Interpreter: big tiles (cost ~
    number of programs x loop iterations); GPU: ``gpu_tiles``."""
    if is_interpreting():
        return 64, 64, 32, 4
    return gpu_tiles(_lowp(q), q.shape[-1])


def gpu_tiles(lowp: bool, D: int):
    """The GPU tiles of the forward / dq kernels. The gathered [BLOCK_M, BLOCK_R, BLOCK_D] key and value
    tiles of the retrieved part bound the register use: with BLOCK_R = 8 (4 at D = 128) they spilled
    0.4-4.3 KB per thread in every gathered variant (``fast.devtools.kernel_stats``, sm_90a); BLOCK_R = 2 with
    8
    warps does not, at BLOCK_M = 32 for D = 128. fp32 "ieee" dots run on CUDA cores, unrolled: a 16-row
    tile (as in fast/attention.py), at most 36 B spilled where 32 x 32 with 4 warps spilled up to 6 KB."""
    if not lowp:
        return 16, 32, 2, 8
    return (64, 64, 2, 8) if _block_d(D) <= 64 else (32, 64, 2, 8)


def block_summaries_triton(k, block_size):
    """Mean key of each full block: fp32 [B, H_kv, T // block_size, D] (partial last block left out:
    it is never a candidate)."""
    B, Hkv, T, D = k.shape
    NB = T // block_size
    summ = empty((B, Hkv, NB, D), dtype=torch.float32, device=k.device)
    if NB > 0:
        BLOCK_T = min(64, max(2, triton.next_power_of_2(block_size)))
        match_summary_kernel[(NB, B * Hkv)](
            k,
            summ,
            *k.stride(),
            Hkv,
            NB,
            D,
            block_size,
            BLOCK_T=BLOCK_T,
            BLOCK_D=_block_d(D),
        )
    return summ


@contextlib.contextmanager
def select_tensor_cores(on: bool):
    """``SELECT_TENSOR_CORES`` set to ``on`` inside the block and restored after it."""
    global SELECT_TENSOR_CORES
    old, SELECT_TENSOR_CORES = SELECT_TENSOR_CORES, on
    try:
        yield
    finally:
        SELECT_TENSOR_CORES = old


def select_error(D: int) -> float:
    """``err_rel`` of the tensor-core band at head dim ``D``: ``|fp16 unit-vector score - fp32 score| <=
    err_rel |scale| |q| |c|`` (the derivation is in the module docstring, 2.)."""
    return 2.0**-10 + (D + 8) * 2.0**-20


def _select(q, k, *, window, top_k, block_size, scale, q_start=0, summaries=None, fallbacks=None):
    """``fallbacks``: a list that receives the int32 tensor of per-program flags (1: the exact fp32 pass)."""
    B, Hq, TQ, D = q.shape
    Hkv = k.shape[1]
    idx = empty((B, Hkv, TQ, top_k), dtype=torch.int64, device=q.device)
    if top_k == 0:
        return idx
    if block_size == 1:
        cand = k
    else:
        cand = block_summaries_triton(k, block_size) if summaries is None else summaries
    BM, BN, warps = (64, 64, 4) if is_interpreting() else (32, 32, 4)  # fp32 dots: small GPU tile
    if SELECT_TENSOR_CORES and not is_interpreting() and D > 64:
        warps = 8  # the band's state at D = 128 spills at 4 warps (kernel_stats)
    err_rel = select_error(D)
    fb = torch.empty(B * Hkv * triton.cdiv(TQ, BM), dtype=torch.int32, device=q.device)
    match_select_kernel[(triton.cdiv(TQ, BM), B * Hkv)](
        q,
        cand,
        idx,
        fb,
        *q.stride(),
        *cand.stride(),
        Hkv,
        Hq // Hkv,
        TQ,
        q_start,
        D,
        window,
        block_size,
        float(scale),
        err_rel,
        TOP_K=top_k,
        KP=_kp(top_k),
        KG=triton.next_power_of_2(top_k + SELECT_GUARD),
        TC=SELECT_TENSOR_CORES,
        BLOCK_M=BM,
        BLOCK_N=BN,
        BLOCK_D=_block_d(D),
        num_warps=warps,
    )
    if fallbacks is not None:
        fallbacks.append(fb)
    return idx


def retrieve_triton(q, k, *, window, top_k, block_size, scale):
    """Top-k retrieval per (batch, kv head, query): idx [B, H_kv, T, top_k] int64 (tokens for block_size 1,
    else blocks), descending score, ties -> lower index, -1 in empty slots. GQA: one selection per kv head
    by the scores summed over its query heads. Not differentiable (integers). ``top_k`` beyond the candidate
    count selects only the candidates (the other slots are -1)."""
    k_eff = min(top_k, candidates(k.shape[2], window, block_size))
    _check_triton(q, k_eff, top_k)
    return _pad_idx(_select(q, k, window=window, top_k=k_eff, block_size=block_size, scale=scale), top_k)


def _fwd(q, k, v, idx, gate, *, window, block_size, gated, scale, q_start=0, store_parts=True, tiles=None):
    B, Hq, TQ, D = q.shape
    TK = k.shape[2]
    top_k = idx.shape[-1]
    dev = q.device
    o = empty((B, Hq, TQ, D), dtype=q.dtype, device=dev)
    lse = empty((B, Hq, TQ), dtype=torch.float32, device=dev)
    if gated:
        lse_r = empty((B, Hq, TQ), dtype=torch.float32, device=dev)
        if store_parts:
            o_w = empty((B, Hq, TQ, D), dtype=torch.float32, device=dev)
            o_r = empty((B, Hq, TQ, D), dtype=torch.float32, device=dev)
        else:
            o_w = o_r = lse_r  # unused pointers
        gate = gate.float().contiguous()
    else:
        lse_r = o_w = o_r = gate = lse  # unused pointers
    BM, BN, BR, warps = tiles or _tiles(q)
    BR = min(BR, max(2, triton.next_power_of_2(max(top_k * block_size, 1))))
    if top_k == 0:  # no retrieval: a valid pointer that is never read
        idx = torch.zeros(1, dtype=torch.int64, device=dev)
    qs, sc = _signed(q, scale)  # the window loop takes scale >= 0
    match_fwd_kernel[(triton.cdiv(TQ, BM), B * Hq)](
        qs,
        k,
        v,
        idx,
        gate,
        o,
        lse,
        lse_r,
        o_w,
        o_r,
        *qs.stride(),
        *k.stride(),
        *v.stride(),
        *o.stride(),
        Hq,
        Hq // k.shape[1],
        TQ,
        TK,
        q_start,
        D,
        window,
        block_size,
        sc * LOG2E.value,
        TOP_K=top_k,
        GATED=gated,
        STORE_PARTS=gated and store_parts,
        LOWP_DOT=_lowp(q),
        EVEN_D=D == _block_d(D),
        BLOCK_M=BM,
        BLOCK_N=BN,
        BLOCK_R=BR,
        BLOCK_D=_block_d(D),
        num_warps=warps,
    )
    return o, lse, lse_r, o_w, o_r


def reverse_index(idx, T, block_size):
    """CSR lists of the (query, slot) pairs that selected each (batch, kv head, block): ``(entries, starts)``.
    ``entries[starts[s]:starts[s + 1]]`` are the flat entries ``e = t * K + slot`` of idx [B, H_kv, T_q, K]
    (query position ``t = e // K``, slot ``e % K``) that hold block ``blk`` of segment
    ``s = (b * H_kv + h) * NB + blk``, ``NB = ceil(T / block_size)``, in ascending query order (a query
    selects a block at most once, so the order is strict: deterministic); int32 (int64 if T_q K >= 2^31),
    starts int64. The slot lets a block-major kernel write a per-(query, slot) result to a place of its
    own. One sort of every (query, slot) pair, the empty slots (-1) keyed to a segment after the last, so
    no shape depends on the data: built on the device without a host synchronisation (``entries`` has
    ``B H_kv T_q K`` elements; those past ``starts[-1]`` are the empty slots, never read)."""
    B, Hkv, TQ, K = idx.shape
    NB = triton.cdiv(T, block_size)
    n = TQ * K
    dev = idx.device
    n_seg = B * Hkv * NB
    seg = torch.arange(B * Hkv, device=dev, dtype=torch.int64).view(B, Hkv, 1, 1) * NB + idx
    seg = torch.where(idx >= 0, seg, n_seg)
    key = seg * n + torch.arange(n, device=dev, dtype=torch.int64).view(1, 1, TQ, K)
    key = torch.sort(key.reshape(-1)).values
    entries = (key % n).to(torch.int32 if n < 2**31 else torch.int64)
    bounds = torch.arange(n_seg + 1, device=dev, dtype=torch.int64)
    starts = torch.searchsorted(key // n, bounds)
    if entries.numel() == 0:  # a valid pointer for the kernel (never read: every list is empty)
        entries = torch.zeros(1, dtype=torch.int32, device=dev)
    return entries, starts


def work_items(starts, n_entries, item):
    """The block lists of the reverse index cut into work items of at most ``item`` entries: int64
    ``[3, NI]`` rows (segment, first list offset, end list offset), one kernel program per item, so a block
    that most queries select (an attention sink) is spread over many programs instead of running serially
    in one. ``NI = ceil(n_entries / item) + n_segments`` bounds the item count without reading it on the
    host (static shapes, no synchronisation); the items past the real ones are empty (first = end = 0)
    and their programs return at once."""
    n_seg = starts.numel() - 1
    dev = starts.device
    cnt = (starts[1:] - starts[:-1] + item - 1) // item  # items per segment
    cum = torch.cumsum(cnt, 0)
    NI = triton.cdiv(max(n_entries, 1), item) + n_seg
    i = torch.arange(NI, device=dev, dtype=torch.int64)
    seg = torch.searchsorted(cum, i, right=True).clamp_(max=n_seg - 1)
    lo = starts[seg] + (i - (cum[seg] - cnt[seg])) * item
    hi = torch.minimum(lo + item, starts[seg + 1])
    real = i < cum[-1]
    zero = torch.zeros_like(lo)
    return torch.stack([seg, torch.where(real, lo, zero), torch.where(real, hi, zero)]).contiguous()


def _reverse(idx, T, block_size):  # (entries, work items) of a selection: built once, saved for the backward
    entries, starts = reverse_index(idx, T, block_size)
    return entries, work_items(starts, idx.numel(), WORK_ITEM)


def _block_major(block_size, top_k):
    """The one path rule of the retrieved part (forward and dq): block-major (the block kernels through the
    reverse index, tensor-core tiles) for ``block_size >= BLOCK_MAJOR_MIN_BLOCK``, else per query row with
    gathered keys (a tensor-core tile over a block of fewer than 16 keys would be mostly padding). Tests
    set the module constant to force either path at the same shapes."""
    return top_k > 0 and block_size >= BLOCK_MAJOR_MIN_BLOCK


def _block_tiles(q, block_size):
    """(BLOCK_M, BLOCK_N, NSUB) of the block-major kernels: BLOCK_N keys of a block at a time (padded to 16,
    every tl.dot dim >= 16), NSUB = ceil(block_size / BLOCK_N) chunks; BLOCK_M listed queries at a time.
    fp32 "ieee" dots run on CUDA cores: smaller tiles. Chosen by static counts only (no spills, no
    serialized wgmma in ``python -m fast.devtools.kernel_stats --match``), not timed."""
    big = _lowp(q) or is_interpreting()
    bn = min(64 if big else 32, max(16, triton.next_power_of_2(block_size)))
    return (64 if big else 32), bn, triton.cdiv(block_size, bn)


def _signed(q, scale):  # fast/attention.py's kernels take scale >= 0: S = scale q.k = (-scale) (-q).k
    return (q, float(scale)) if scale >= 0 else (-q, -float(scale))


def _window_fwd(q, k, v, window, scale):
    """The window part of the training forward: ``fast/attention.py``'s tuned sliding-window forward kernel
    (the same loop, tiles and numerics as ``flash_attention``), writing o_W in fp32 and lse_W (natural
    log; the kernel's is in log2 units)."""
    B, Hq, T, D = q.shape
    W = min(window, T)
    qs, sc = _signed(q, scale)
    o_w = empty((B, Hq, T, D), dtype=torch.float32, device=q.device)
    lse2 = empty((B, Hq, T), dtype=torch.float32, device=q.device)
    attention_fwd_kernel[lambda meta: (B * Hq, triton.cdiv(T, meta["BLOCK_M"]))](
        qs,
        k,
        v,
        o_w,
        lse2,
        *qs.stride(),
        *k.stride(),
        *v.stride(),
        *o_w.stride(),
        Hq,
        Hq // k.shape[1],
        T,
        D,
        W,
        sc,
        _t_bucket(T, W),
        IS_CAUSAL=True,
        HAS_WINDOW=W < T,
        LOWP_DOT=_lowp(q),
        BLOCK_D=_block_d(D),
    )
    return o_w, lse2.mul_(LN2.value)


def _fwd_block_major(q, k, v, idx, gate, *, window, block_size, gated, scale, tiles=None, rev=None):
    """Training forward (T_q = T_k) with the block-major retrieved part; returns what ``_fwd`` returns.
    ``rev``: the selection's (entries, work items) (``_reverse``). 1. window part: sliding-window
    attention's forward kernel (``fast/attention.py``, ``_window_fwd``), its output in fp32 (o_W) and lse_W;
    2. ``match_fwd_blocks_kernel``
    (lse pass): per work item, the block lse of every listed (query head, query, slot) -> lse_part
    [B, H_q, T, K] (-inf in the empty slots); the retrieved part's lse and the joint lse follow from it;
    3. ``match_fwd_blocks_kernel`` (accumulate pass): each block's contribution, normalised by the final
    lse, atomically added to the fp32 output (joint: started as ``e^{lse_W - lse} o_W``; gated: o_R from 0).
    Extra memory O(B H_q T (D + K)): no per-slot outputs."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    top_k = idx.shape[-1]
    dev = q.device
    o_w, lse = _window_fwd(q, k, v, window, scale)
    entries, items = rev
    NB = triton.cdiv(T, block_size)
    NI = items.shape[1]
    BM_L, BN_L, NSUB = _block_tiles(q, block_size)
    G = Hq // Hkv
    lse_part = torch.full((B, Hq, T, top_k), float("-inf"), dtype=torch.float32, device=dev)

    def blocks(lse_part, lse_target, acc, accum):
        # 8 warps: with 4 the fp32 D = 128 tile spilled 1.9 KB per thread, with 8 at most 64 B
        # (kernel_stats --match)
        match_fwd_blocks_kernel[(NI,)](
            q,
            k,
            v,
            entries,
            items,
            lse_part,
            lse_target,
            acc,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            Hq,
            Hkv,
            G,
            T,
            D,
            window,
            block_size,
            NB,
            NI,
            top_k,
            float(scale) * LOG2E.value,
            NSUB=NSUB,
            ACCUM=accum,
            LOWP_DOT=_lowp(q),
            BLOCK_M=BM_L,
            BLOCK_N=BN_L,
            BLOCK_D=_block_d(D),
            num_warps=8,
        )

    blocks(lse_part, lse_part, lse_part, False)  # pass 1: every (query head, query, slot)'s block lse
    lse_r = torch.logsumexp(lse_part, -1)  # the retrieved part's lse, -inf where nothing is retrieved
    del lse_part
    if gated:  # o_R = sum over the slots of e^{S - lse_R} V; o = g o_R + (1 - g) o_W where R is non-empty
        o_r = torch.zeros((B, Hq, T, D), dtype=torch.float32, device=dev)
        blocks(lse_r, lse_r, o_r, True)
        g = torch.sigmoid(gate.float())[..., None]
        has = torch.isfinite(lse_r)[..., None]
        o = torch.where(has, g * o_r + (1.0 - g) * o_w, o_w).to(q.dtype)
        return o, lse, lse_r, o_w, o_r
    # joint: one softmax over both parts; o = e^{lse_W - lse} o_W + sum over the slots of e^{S - lse} V
    lse_j = torch.logaddexp(lse, lse_r)  # lse_W is finite: the window holds the query
    acc = o_w.mul_(torch.exp(lse - lse_j)[..., None])
    blocks(lse_j, lse_j, acc, True)
    return acc.to(q.dtype), lse_j, lse_j, lse_j, lse_j


def _bwd(
    q,
    k,
    v,
    o,
    lse,
    lse_r,
    o_w,
    o_r,
    gate,
    idx,
    do,
    *,
    window,
    block_size,
    gated,
    scale,
    block_major=False,
    tiles=None,
    rev=None,
):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    dev = q.device
    top_k = idx.shape[-1]
    dof = do.float()
    dgate = None
    if gated:  # dO_W = c_W dO, dO_R = c_R dO (c_R = g, 0 where R is empty; c_W = 1 - c_R)
        g = torch.sigmoid(gate.float())
        has = torch.isfinite(lse_r)
        c_r = torch.where(has, g, torch.zeros_like(g))
        do_w = dof * (1.0 - c_r)[..., None]
        do_r = dof * c_r[..., None]
        stats = torch.stack([lse, (do_w * o_w).sum(-1), lse_r, (do_r * o_r).sum(-1)])
        dgate = torch.where(has, g * (1.0 - g) * (dof * (o_r - o_w)).sum(-1), torch.zeros_like(g))
        do_w, do_r = do_w.to(q.dtype).contiguous(), do_r.to(q.dtype).contiguous()
    else:  # one softmax: both parts use dO, the joint lse and rowsum(dO * O)
        delta = (dof * o.float()).sum(-1)
        stats = torch.stack([lse, delta, lse, delta])
        do_w = do_r = do.contiguous()
    stats = stats.contiguous()  # [4, B, Hq, T] fp32
    lowp, BD = _lowp(q), _block_d(D)
    strides = (*q.stride(), *k.stride(), *v.stride())
    # dq: window and retrieved keys in one kernel (gathered path); block-major: the window keys by
    # fast/attention.py's dq kernel into fp32, to which the dk/dv kernel below adds the retrieved keys' share
    # atomically. The window part of every sliding-window loop below is sliding-window attention with the
    # part's own lse (log2 units there), delta and dO
    W = min(window, T)
    lse2_w = stats[0] * LOG2E.value
    qs, sc = _signed(q, scale)
    dk = empty((B, Hkv, T, D), dtype=k.dtype, device=dev)
    dv = empty((B, Hkv, T, D), dtype=v.dtype, device=dev)
    dq = empty((B, Hq, T, D), dtype=q.dtype, device=dev)
    if not block_major:
        BM, BN, BR, warps = tiles or _tiles(q)
        BR = min(BR, max(2, triton.next_power_of_2(max(top_k * block_size, 1))))
        no_idx = torch.zeros(1, dtype=torch.int64, device=dev)
        match_bwd_dq_kernel[(triton.cdiv(T, BM), B * Hq)](
            qs,
            k,
            v,
            do_w,
            do_r,
            stats,
            idx if top_k > 0 else no_idx,  # never read if empty
            dq,
            *qs.stride(),
            *k.stride(),
            *v.stride(),
            B,
            Hq,
            G,
            T,
            D,
            window,
            block_size,
            sc,
            TOP_K=top_k,
            GATED=gated,
            LOWP_DOT=lowp,
            EVEN_D=D == BD,
            BLOCK_M=BM,
            BLOCK_N=BN,
            BLOCK_R=BR,
            BLOCK_D=BD,
            num_warps=warps,
        )
        if scale < 0:  # the gradient w.r.t. -q
            dq.neg_()
    entries, items = rev if rev is not None else _reverse(idx, T, block_size)
    NB = triton.cdiv(T, block_size)
    NI = items.shape[1]
    _, BN_L, NSUB = _block_tiles(q, block_size)
    # 8 warps, one stage (kernel_stats --match): with 4 warps and 3 stages the block-major variant spilled
    # (480 B bf16, 1.7 KB fp32 at D = 128) and serialized its wgmma (C7515); the listed queries are
    # gathered rows, which the software pipeline does not prefetch well anyway. fp32: 16 listed queries at a
    # time (32 spilled 44 B at D = 64 and 100 B at D = 128 with the atomic dq tile)
    BM_L = 64 if is_interpreting() else (32 if lowp else 16)
    # the fp32 accumulators (dq_W when block-major, dk_W, dv_W) for as many batch elements at a time as fit
    # in BWD_ACC_BYTES: at B8 H32 T32K D128 they would be 12.9 GB for the whole batch
    per_b = ((Hq if block_major else 0) + 2 * Hkv) * T * D * 4
    chunk = max(1, min(B, BWD_ACC_BYTES // per_b))
    for b0 in range(0, B, chunk):
        b1 = min(B, b0 + chunk)
        nb, sl = b1 - b0, slice(b0, b1)
        q_c, k_c, v_c, do_c = qs[sl], k[sl], v[sl], do_w[sl]
        # the window part's arguments, shared by fast/attention.py's dq and dk/dv kernels
        part = (q_c, k_c, v_c, do_c, lse2_w[sl], stats[1][sl])
        strides_c = (*q_c.stride(), *k_c.stride(), *v_c.stride(), *do_c.stride())
        tail = (T, D, W, sc, _t_bucket(T, W))
        win = dict(IS_CAUSAL=True, HAS_WINDOW=W < T, LOWP_DOT=lowp, BLOCK_D=BD)
        if block_major:
            dq_w = empty((nb, Hq, T, D), dtype=torch.float32, device=dev)
            attention_bwd_dq_kernel[lambda meta, nb=nb: (triton.cdiv(T, meta["BLOCK_M"]), nb * Hq)](
                *part, dq_w, *strides_c, Hq, G, *tail, **win
            )
            if scale < 0:  # the gradient w.r.t. -q
                dq_w.neg_()
        # the window part of dk/dv: the tuned, split dk/dv kernel of fast/attention.py, fp32 into dk_w, dv_w
        # (with -q and -scale for a negative scale: dk = scale dS^T q is the same)
        dk_w = empty((nb, Hkv, T, D), dtype=torch.float32, device=dev)
        dv_w = empty((nb, Hkv, T, D), dtype=torch.float32, device=dev)
        attention_bwd_dkdv_kernel[lambda meta, nb=nb: (triton.cdiv(T, meta["BLOCK_N"]), nb * Hkv)](
            *part, dk_w, dv_w, *strides_c, Hq, Hkv, G, *tail, **win
        )
        # the retrieved part, through the forward's reverse index: the items of batch elements [b0, b1)
        match_bwd_dkdv_kernel[(NI * NSUB,)](
            q,
            k,
            v,
            do_r,
            stats[2],
            stats[3],
            entries,
            items,
            dk_w,
            dv_w,
            dq_w if block_major else dk_w,
            *strides,
            Hq,
            Hkv,
            G,
            T,
            D,
            window,
            block_size,
            NB,
            NI,
            NSUB,
            max(top_k, 1),
            float(scale),
            b0,
            b1,
            LOWP_DOT=lowp,
            DQ_ATOMIC=block_major,
            BLOCK_M=BM_L,
            BLOCK_N=BN_L,
            BLOCK_D=BD,
            num_warps=8,
            num_stages=1,
        )
        dk[sl] = dk_w
        dv[sl] = dv_w
        if block_major:
            dq[sl] = dq_w
    return dq, dk, dv, dgate


class _MatchAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, window, top_k, block_size, gated, scale, tiles, block_major):
        idx = _select(q, k, window=window, top_k=top_k, block_size=block_size, scale=scale)
        block_major = _block_major(block_size, top_k) if block_major is None else block_major and top_k > 0
        rev = _reverse(idx, k.shape[2], block_size)  # once, on the device; the backward reuses it
        kw = dict(window=window, block_size=block_size, gated=gated, scale=scale, tiles=tiles)
        if block_major:
            o, lse, lse_r, o_w, o_r = _fwd_block_major(q, k, v, idx, gate, **kw, rev=rev)
        else:
            o, lse, lse_r, o_w, o_r = _fwd(q, k, v, idx, gate, **kw)
        if gated:
            ctx.save_for_backward(q, k, v, o, lse, lse_r, o_w, o_r, gate, idx, *rev)
        else:
            ctx.save_for_backward(q, k, v, o, lse, idx, *rev)
        ctx.cfg = (window, block_size, gated, scale, block_major, tiles)
        return o

    @staticmethod
    def backward(ctx, do):
        window, block_size, gated, scale, block_major, tiles = ctx.cfg
        if gated:
            q, k, v, o, lse, lse_r, o_w, o_r, gate, idx, *rev = ctx.saved_tensors
        else:
            q, k, v, o, lse, idx, *rev = ctx.saved_tensors
            lse_r = o_w = o_r = gate = None
        dq, dk, dv, dgate = _bwd(
            q,
            k,
            v,
            o,
            lse,
            lse_r,
            o_w,
            o_r,
            gate,
            idx,
            do,
            window=window,
            block_size=block_size,
            gated=gated,
            scale=scale,
            block_major=block_major,
            tiles=tiles,
            rev=rev,
        )
        if dgate is not None:
            dgate = dgate.to(gate.dtype)
        return dq, dk, dv, dgate, None, None, None, None, None, None, None


def match_attention_triton(q, k, v, *, window, top_k, block_size, mode, gate_logit, scale):
    """MATCH attention (joint or gated), differentiable in q, k, v and gate_logit ([B, H_q, T] or None)."""
    return _launch(
        q,
        k,
        v,
        window=window,
        top_k=top_k,
        block_size=block_size,
        mode=mode,
        gate_logit=gate_logit,
        scale=scale,
    )


def _launch(q, k, v, *, window, top_k, block_size, mode, gate_logit, scale, tiles=None, block_major=None):
    """:func:`match_attention_triton` with the launch choices explicit (tests run every path at every tile):
    ``tiles`` = (BLOCK_M, BLOCK_N, BLOCK_R, num_warps) of the window and gathered kernels (default
    ``_tiles(q)``), ``block_major`` the retrieved part's path (default
    ``_block_major(block_size, top_k)``)."""
    requested, top_k = top_k, min(top_k, candidates(k.shape[2], window, block_size))
    _check_triton(q, top_k, requested)
    gated = mode == "gated"
    if gated and gate_logit is None:
        raise ValueError("mode='gated' needs gate_logit [B, H_q, T]")
    gate = gate_logit if gated else None
    return _MatchAttention.apply(
        q, k, v, gate, int(window), int(top_k), int(block_size), gated, float(scale), tiles, block_major
    )


def match_decode_triton(
    q, k_cache, v_cache, *, window, top_k, block_size, mode, gate_logit, scale, summaries=None
):
    """One new query (q [B, H_q, 1, D], position T - 1 of the cache k/v [B, H_kv, T, D]): out [B, H_q, 1, D],
    equal to the last row of ``match_attention_triton`` over the cache. ``summaries``: cached block means
    [B, H_kv, nblocks, D] (any float dtype; at least the candidate blocks), or None to compute them."""
    requested, top_k = top_k, min(top_k, candidates(k_cache.shape[2], window, block_size))
    _check_triton(q, top_k, requested)
    T = k_cache.shape[2]
    gated = mode == "gated"
    if gated and gate_logit is None:
        raise ValueError("mode='gated' needs gate_logit [B, H_q, 1]")
    with torch.no_grad():
        idx = _select(
            q,
            k_cache,
            window=window,
            top_k=top_k,
            block_size=block_size,
            scale=scale,
            q_start=T - 1,
            summaries=summaries if block_size > 1 else None,
        )
        o = _fwd(
            q,
            k_cache,
            v_cache,
            idx,
            gate_logit if gated else None,
            window=window,
            block_size=block_size,
            gated=gated,
            scale=scale,
            q_start=T - 1,
            store_parts=False,
        )[0]
    return o
