# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # 05 · MATCH: sliding-window attention plus in-context retrieval
#
# Paper: *Modulating Attention via In-Context Retrieval for Long-Context Transformers* (MATCH),
# arXiv 2606.29844. Only its abstract was available; the choices below that go beyond it are this
# project's reconstruction, listed with their alternatives in [../docs/match.md](../docs/match.md).
#
# **Why.** Sliding-window attention (SWA) costs $O(T w)$ instead of $O(T^2)$, but a query cannot see
# anything older than $w$ tokens. MATCH lets each query *retrieve* a few out-of-window keys of its own
# context, chosen by the query itself, and attend to them together with its window. The cost stays
# $O(T (w + K B) D)$ for the attention (K retrieved blocks of B keys); only the scoring that picks them
# touches the whole past.
#
# Path of this notebook: the NumPy oracle (`reference/match.py`) step by step on a toy sequence → a
# picture of what each query attends to → ties → the joint log-sum-exp merge, checked numerically →
# gated mode → the Triton kernel (`fast/match_triton.py`) beside the oracle on an odd shape, forward,
# gradients and selection → timing.
#
# **Conventions.** `window = w`: query $i$ sees keys $i - w < j \le i$ ($w$ keys including itself).
# Candidates for retrieval are exactly the keys the window cannot see, $j \le i - w$.

# %%
# without CUDA, importing `fast` sets TRITON_INTERPRET=1: its Triton kernels run in the interpreter on the CPU
import pathlib
import re
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import ListedColormap

from fast.attention import flash_attention
from fast.match import match_attention, retrieve
from fast.testing import assert_close
from reference import match as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
rng = np.random.default_rng(0)

# %% [markdown]
# ### Parameter
#
# `WINDOW` (w), `TOP_K` (K) and `BLOCK_SIZE` (B) of the toy sequence in sections 1-3 and 5-7 (T = 24;
# block retrieval needs `BLOCK_SIZE <= WINDOW`). Section 4 pins its own values (its tie is built for them).
#
# Expected effect: query i attends to its window, `min(i + 1, w)` keys, plus the out-of-window keys of its K
# selected blocks, so **at most w + K·B keys whatever T**; a query with at most K candidate blocks retrieves
# all of them and attends to its whole causal past (i + 1 keys). Raising w widens the blue band of the
# picture, raising K or B the orange part. The cell after the picture checks both at the current values.

# %%
WINDOW, TOP_K, BLOCK_SIZE = 6, 2, 3

# %% [markdown]
# ## 1. The toy sequence and its scores
#
# One head, $T = 24$, $D = 4$, window $w$ = `WINDOW`, blocks of $B$ = `BLOCK_SIZE` keys, a budget of $K$ =
# `TOP_K` blocks (by default 6, 3 and 2; the numbers quoted in the text below are for those).
# The selection score of query $i$ and key $j$ is the attention logit $s_{ij} = q_i \cdot k_j / \sqrt D$.
# The oracle sets non-candidates ($j > i - w$) to $-\infty$.

# %%
T, D, w, B, K = 24, 4, WINDOW, BLOCK_SIZE, TOP_K
q, k, v = rng.standard_normal((3, T, D))  # each [T, D] = [24, 4]
scale = 1 / np.sqrt(D)
s_tok = ref.retrieval_scores(q, k, window=w)  # [T, T] = [24, 24]; -inf where j > i - w
print(f"candidates of query 10 (j <= 10 - {w} = {10 - w}):", np.flatnonzero(np.isfinite(s_tok[10])))
print("their scores:", np.round(s_tok[10][np.isfinite(s_tok[10])], 3))
print(f"query {w - 1} has", np.isfinite(s_tok[w - 1]).sum(), "candidates: its window already reaches key 0")

# %% [markdown]
# ## 2. Blocks, their mean keys, the candidate blocks
#
# The sequence is cut into blocks $[bB, (b+1)B)$. Block $b$ is summarised by its mean key $\bar k_b$
# and is a candidate for query $i$ iff $bB \le i - w$ (it holds at least one out-of-window key). Because
# $B \le w$, a candidate block ends at $(b+1)B - 1 \le i - w + B - 1 < i$: it lies wholly in the past.
# The block score is $q_i \cdot \bar k_b / \sqrt D$.

# %%
kbar = ref.block_summaries(k, B)  # [ceil(T / B), D] = [8, 4]
assert_close(kbar[2], k[2 * B : 3 * B].mean(axis=0), dtype="float64", name="block 2 = mean of its B keys")
s_blk = ref.retrieval_scores(q, k, window=w, block_size=B)  # [T, ceil(T / B)] = [24, 8]
i = 14
cands = np.flatnonzero(np.isfinite(s_blk[i]))  # blocks b with bB <= i - w (defaults: 3b <= 8, b = 0, 1, 2)
print(f"query {i}: candidate blocks {cands.tolist()} (bB <= {i - w}), scores {np.round(s_blk[i, cands], 3)}")
idx = ref.retrieve(q, k, window=w, top_k=K, block_size=B)  # [T, K] = [24, 2]; -1 = empty slot
print(f"query {i}: selected blocks {idx[i].tolist()} (descending score)")
# what is retrieved from a selected block is exactly its candidate keys j <= i - w. With the defaults,
# query 14's window is keys 9..14, so block 2 (keys 6, 7, 8) lies wholly out of window; for query 12
# (window 7..12) only key 6 of block 2 is a candidate, and only key 6 would be retrieved from it
print("rows 0..11 of idx:", idx[:12].tolist())

# %% [markdown]
# ## 3. The picture: window band plus retrieved blocks
#
# Each row is a query, each column a key. Blue: the window (the SWA band). Orange: the retrieved keys
# (the candidate keys of the $K$ selected blocks). Light grey: candidates that were *not* selected.
# White: the future. The union of blue and orange is what query $i$ attends to.

# %%
m_w = ref.window_mask(T, window=w)  # [T, T] bool
m_r = ref.retrieved_mask(idx, T, window=w, block_size=B)  # [T, T] bool
m_c = ref.candidate_mask(T, window=w)  # [T, T] bool
assert not (m_w & m_r).any(), "window and retrieved sets are disjoint"
picture = np.zeros((T, T), dtype=int)  # 0 future
picture[m_c] = 1  # candidate, not selected
picture[m_w] = 2  # window
picture[m_r] = 3  # retrieved
cmap = ListedColormap(["white", "#dddddd", "#4477aa", "#ee7733"])
fig, ax = plt.subplots(figsize=(6, 6))
ax.imshow(picture, cmap=cmap, vmin=-0.5, vmax=3.5)
for b in range(1, -(-T // B)):
    ax.axvline(b * B - 0.5, color="k", lw=0.3)
ax.set_title(
    f"T={T}, window={w}, block_size={B}, top_k={K}\nblue: window, orange: retrieved, "
    "grey: unselected candidates"
)
ax.set_xlabel("key j")
ax.set_ylabel("query i")
plt.show()
print("keys attended per query:", (m_w | m_r).sum(axis=1).tolist())

# %%
attended = (m_w | m_r).sum(axis=1)  # [T]
n_cand_blocks = np.isfinite(s_blk).sum(axis=1)  # [T] candidate blocks per query
whole_past = n_cand_blocks <= K
print(
    f"w = {w}, K = {K}, B = {B}: at most {attended.max()} keys per query (w + K·B = {w + K * B}); "
    f"{whole_past.sum()} of {T} queries have at most K candidate blocks"
)
assert attended.max() <= w + K * B, "a query attends to at most w + K·B keys"
assert (attended[whole_past] == np.arange(T)[whole_past] + 1).all(), "<= K candidate blocks: the whole past"

# %% [markdown]
# ## 4. The tie-break: the lower index wins
#
# Scores can tie exactly (identical keys, or a zero query). The rule is: among equal scores the lower
# token / block index wins, and `idx` lists the selection in descending score. The oracle gets this
# from a *stable* descending sort; the by-definition loop sorts Python tuples `(-score, index)`.
# Below (with the default w = 6, B = 3, K = 2, pinned here whatever the parameter cell says), blocks 0, 2
# and 4 are made identical and aligned with query 23, so they tie for the top score and only two fit in the
# budget: block 4 loses.

# %%
wt, Bt, Kt = 6, 3, 2  # the defaults, pinned
k_tie, q_tie = k.copy(), q.copy()
k_tie[0:3] = 3 * np.eye(D)[0]  # block 0: three keys 3 e_0
k_tie[6:9] = k_tie[0:3]  # block 2 = block 0
k_tie[12:15] = k_tie[0:3]  # block 4 = block 0
q_tie[23] = 2 * np.eye(D)[0]  # query 23 (candidate blocks 0..5): score 2 * 3 / sqrt(4) = 3 for 0, 2, 4
s23 = ref.retrieval_scores(q_tie, k_tie, window=wt, block_size=Bt)[23]  # [8]
print("scores of query 23 per block:", np.round(s23, 3))
idx_tie = ref.retrieve(q_tie, k_tie, window=wt, top_k=Kt, block_size=Bt)[23]  # [K]
ranked = sorted((-s, b) for b, s in enumerate(s23) if np.isfinite(s))[:Kt]
print("selected:", idx_tie.tolist(), " by (-score, index) tuples:", [b for _, b in ranked])
assert idx_tie.tolist() == [0, 2] == [b for _, b in ranked]

# %% [markdown]
# ## 5. Joint mode: two partial attentions merged by their log-sum-exps
#
# A partial attention over a key set $S$ returns $o_S = \sum_{j\in S} e^{s_{ij} - L_S} v_j$ and
# $L_S = \log\sum_{j\in S} e^{s_{ij}}$. Window $W_i$ and retrieved set $R_i$ are disjoint, so
# $e^{L_{W\cup R}} = e^{L_W} + e^{L_R}$ and one softmax over $W_i \cup R_i$ equals
#
# $$o = \frac{e^{L_W} o_W + e^{L_R} o_R}{e^{L_W} + e^{L_R}} .$$
#
# An empty $R_i$ (early queries) has $L_R = -\infty$, $e^{L_R} = 0$: $o = o_W$. Checked numerically:

# %%
o_w, L_w = ref.partial_attention(q, k, v, m_w, scale)  # [T, D], [T]
o_r, L_r = ref.partial_attention(q, k, v, m_r, scale)  # [T, D], [T]; L_r = -inf where R_i is empty
merged = (np.exp(L_w)[:, None] * o_w + np.exp(L_r)[:, None] * o_r) / (np.exp(L_w) + np.exp(L_r))[:, None]
o_union, _ = ref.partial_attention(q, k, v, m_w | m_r, scale)  # one softmax over W u R
assert_close(merged, o_union, dtype="float64", name="merge identity")
print(
    f"query {i}: e^L_W = {np.exp(L_w[i]):.3f}, e^L_R = {np.exp(L_r[i]):.3f}, "
    f"weight of the retrieved part = {np.exp(L_r[i]) / (np.exp(L_w[i]) + np.exp(L_r[i])):.3f}"
)
print("max |merged - single softmax| =", np.abs(merged - o_union).max())
out_joint = ref.match_attention(q, k, v, window=w, top_k=K, block_size=B)  # [T, D]
out_loop = ref.match_attention_by_definition(q, k, v, window=w, top_k=K, block_size=B)  # [T, D]
assert_close(out_joint, merged, dtype="float64", name="oracle = merge")
assert_close(out_joint, out_loop, dtype="float64", name="oracle = per-query loop")
# the two ends: top_k = 0 is SWA, top_k >= #blocks is full causal attention
o_full, _ = ref.partial_attention(q, k, v, np.tril(np.ones((T, T), dtype=bool)), scale)
assert_close(ref.match_attention(q, k, v, window=w, top_k=0, block_size=B), o_w, name="top_k=0 is SWA")
assert_close(ref.match_attention(q, k, v, window=w, top_k=T, block_size=B), o_full, name="top_k=T is full")
print("top_k = 0 equals SWA, top_k = T equals full causal attention")

# %% [markdown]
# ## 6. Gated mode
#
# The alternative integration (the "modulating" reading of the title, a reconstruction):
# $o = g\,o_R + (1 - g)\,o_W$ with $g = \sigma(\text{gate\_logit}_i)$; a query with nothing retrieved
# gets $o = o_W$ whatever its gate. Unlike joint mode, the weight of the retrieved part is now learned
# rather than set by the logits.

# %%
gate_logit = rng.standard_normal(T)  # [T]
out_gated = ref.match_attention(
    q, k, v, window=w, top_k=K, block_size=B, mode="gated", gate_logit=gate_logit
)  # [T, D]
g = 1 / (1 + np.exp(-gate_logit))  # [T]
has_r = m_r.any(axis=1)  # [T]
by_hand = np.where(has_r[:, None], g[:, None] * o_r + (1 - g[:, None]) * o_w, o_w)  # [T, D]
assert_close(out_gated, by_hand, dtype="float64", name="gated")
print("rows with nothing retrieved (o = o_W):", np.flatnonzero(~has_r).tolist())
print(
    f"query {i}: gate {g[i]:.3f} (gated) vs softmax weight "
    f"{np.exp(L_r[i]) / (np.exp(L_w[i]) + np.exp(L_r[i])):.3f} (joint) on the retrieved part"
)

# %% [markdown]
# ## 7. The Triton kernel beside the oracle
#
# `fast/match_triton.py` runs three steps (on CPU here, through the Triton interpreter):
#
# | step | kernel | oracle counterpart |
# |---|---|---|
# | mean key of every full block | `match_summary_kernel` | `block_summaries` |
# | running top-$K$ over streamed candidate chunks, no $[T, T/B]$ score matrix stored | `match_select_kernel` | `retrieval_scores` + stable sort in `retrieve` |
# | window loop (key blocks that meet the tile's window) then the row's retrieved keys, one online softmax | `match_fwd_kernel` | `partial_attention` twice + `merge_partials` |
#
# The select kernel keeps, per query row, `K` (value, index) pairs in registers. Candidates arrive in
# increasing index order; one enters the list only if its score is *strictly* larger than the list's worst
# entry, so an equal score already in the list (lower index) stays: the same tie rule as the stable sort.
#
# The forward kernel does not merge two finished partial results: it runs **one** online softmax whose
# running max $m$, sum $\ell$ and accumulator continue from the window keys into the retrieved keys, which
# is the same merge done incrementally. That is the kernel's path for blocks of fewer than 16 keys (the toy's
# B, 3 by default, the odd shape's B = 4 below, and token retrieval). From 16 keys on, the kernels turn the
# loop inside out (block-major, as MoBA does): one program per selected block (or per slice of its list, when
# many queries select it) loads its keys once and attends to every query that selected it with tensor-core
# tiles. Storing a partial result per (query, slot) would cost `K·D` floats per query, so it makes two passes
# instead: the first finds each slot's log-sum-exp $L_s$, whence the joint $L$ (the merge's denominator, as in
# `merge_partials`); the second adds each block's $\sum_j e^{s_{ij} - L} v_j$, already normalised, to the
# output, starting from $e^{L_W - L} o_W$.
# The per-row path's retrieved loop, in NumPy, for one query row:

# %%
LOG2E = np.log2(np.e)
row = 14
m_i, l_i, acc = -np.inf, 0.0, np.zeros(D)
for j in np.flatnonzero(m_w[row]):  # window part (the kernel: key tiles with tl.dot)
    s2 = scale * LOG2E * (q[row] @ k[j])  # log2-domain logit, exp2 in the kernel
    m_new = max(m_i, s2)
    alpha, p = 2.0 ** (m_i - m_new), 2.0 ** (s2 - m_new)
    l_i, acc, m_i = l_i * alpha + p, acc * alpha + p * v[j], m_new
for slot in idx[row]:  # retrieved part: flattened (slot, offset) list, key = idx * B + offset
    for off in range(B):
        j = slot * B + off
        if slot < 0 or j > row - w:  # empty slot, or the block's in-window tail: masked
            continue
        s2 = scale * LOG2E * (q[row] @ k[j])
        m_new = max(m_i, s2)
        alpha, p = 2.0 ** (m_i - m_new), 2.0 ** (s2 - m_new)
        l_i, acc, m_i = l_i * alpha + p, acc * alpha + p * v[j], m_new
assert_close(acc / l_i, out_joint[row], dtype="float64", name="one online softmax = joint output")
print(
    f"row {row}: lse = {(m_i + np.log2(l_i)) / LOG2E:.4f} "
    f"= logaddexp(L_W, L_R) = {np.logaddexp(L_w[row], L_r[row]):.4f}"
)

# %% [markdown]
# ### The odd-shape check
#
# $T = 37$ (not a multiple of $B = 4$: a partial last block), grouped-query attention (4 query heads on
# 2 KV heads), $D = 12$ (padded to 16 inside the kernel), window 7, top_k 3, joint and gated.
# What is checked, exactly:
#
# * **selection**: `retrieve(..., backend="triton")` equals the oracle's grouped selection element for
#   element (GQA: one selection per KV head from the scores summed over its query heads). $q$ and $k$ are
#   drawn from the grid $\{-1, -\frac12, 0, \frac12, 1\}$ and the scale is $\frac14$, so every score, sum
#   and block mean is exact in fp32 and float64 alike and exact ties occur and must break the same way;
# * **forward** against the oracle (one call per query head with its KV head and the group's selection);
# * **gradients** $dq, dk, dv$ (and $d\,\text{gate\_logit}$ in gated mode) with a random `grad_output`,
#   against `reference.match.match_attention_grad`; $dk, dv$ of a KV head sum its query heads.

# %%
Bt, Hq, Hkv, T7, D7, w7, K7, B7 = 1, 4, 2, 37, 12, 7, 3, 4
G, sc7 = Hq // Hkv, 0.25
gen = torch.Generator().manual_seed(0)
q7 = torch.randint(-2, 3, (Bt, Hq, T7, D7), generator=gen) / 2.0  # [1, 4, 37, 12]
k7 = torch.randint(-2, 3, (Bt, Hkv, T7, D7), generator=gen) / 2.0  # [1, 2, 37, 12]
v7 = torch.randn(Bt, Hkv, T7, D7, generator=gen)  # [1, 2, 37, 12]
gl7 = torch.randn(Bt, Hq, T7, generator=gen)  # [1, 4, 37]
do7 = torch.randn(Bt, Hq, T7, D7, generator=gen)  # [1, 4, 37, 12]
qn, kn, vn, gn, don = (x.double().numpy()[0] for x in (q7, k7, v7, gl7, do7))  # batch 0

idx_ref = ref.retrieve(
    qn.reshape(Hkv, G, T7, D7), kn, window=w7, top_k=K7, block_size=B7, scale=sc7, grouped=True
)  # [Hkv, T, K] = [2, 37, 3]
idx_tri = retrieve(
    q7.to(DEVICE), k7.to(DEVICE), window=w7, top_k=K7, block_size=B7, scale=sc7, backend="triton"
)  # [1, Hkv, T, K]
assert np.array_equal(idx_tri[0].cpu().numpy(), idx_ref), "selection differs"
s_grp = ref.retrieval_scores(
    qn.reshape(Hkv, G, T7, D7), kn, window=w7, block_size=B7, scale=sc7, grouped=True
)  # [2, 37, 10]
finite = [r[np.isfinite(r)] for r in s_grp.reshape(-1, s_grp.shape[-1])]
n_ties = sum(len(np.unique(r)) < len(r) for r in finite)  # rows with two equal candidate scores
print(
    f"selection: all {idx_ref.size} entries equal; {n_ties} of {len(finite)} rows have tied candidate scores"
)
assert n_ties > 0, "the grid inputs must produce exact ties, or the tie rule goes untested"

for mode in ("joint", "gated"):
    qd, kd, vd = (x.clone().to(DEVICE).requires_grad_() for x in (q7, k7, v7))
    gd = gl7.clone().to(DEVICE).requires_grad_()
    kw = dict(mode="gated", gate_logit=gd) if mode == "gated" else {}
    out7 = match_attention(qd, kd, vd, window=w7, top_k=K7, block_size=B7, scale=sc7, backend="triton", **kw)
    out7.backward(do7.to(DEVICE))
    ref_out, ref_dq = np.zeros((Hq, T7, D7)), np.zeros((Hq, T7, D7))
    ref_dk, ref_dv, ref_dg = np.zeros((Hkv, T7, D7)), np.zeros((Hkv, T7, D7)), np.zeros((Hq, T7))
    for h in range(Hq):  # the oracle is one head per call: query head h reads KV head h // G
        hk = h // G
        args = dict(
            window=w7,
            top_k=K7,
            block_size=B7,
            scale=sc7,
            idx=idx_ref[hk],
            mode=mode,
            gate_logit=gn[h] if mode == "gated" else None,
        )
        ref_out[h] = ref.match_attention(qn[h], kn[hk], vn[hk], **args)
        dq_h, dk_h, dv_h, dg_h = ref.match_attention_grad(qn[h], kn[hk], vn[hk], don[h], **args)
        ref_dq[h] = dq_h
        ref_dk[hk] += dk_h
        ref_dv[hk] += dv_h
        if mode == "gated":
            ref_dg[h] = dg_h
    assert_close(out7[0], ref_out, dtype=torch.float32, name=f"{mode} out")
    for name, t, r in (("dq", qd, ref_dq), ("dk", kd, ref_dk), ("dv", vd, ref_dv)):
        assert_close(t.grad[0], r, dtype=torch.float32, name=f"{mode} {name}")
    if mode == "gated":
        assert_close(gd.grad[0], ref_dg, dtype=torch.float32, name="gated dgate_logit")
    print(
        f"{mode}: out, dq, dk, dv{', dgate_logit' if mode == 'gated' else ''} match the oracle; "
        f"max |out - oracle| = {np.abs(out7[0].detach().cpu().double().numpy() - ref_out).max():.2e}"
    )

# %% [markdown]
# ## 8. Timing
#
# **On CPU** (this run, unless a GPU is present) we time the forward of the torch backend of MATCH
# (block scoring against the mean keys in chunks of 128 query rows, a stable sort, gathered keys, two
# partial attentions merged) beside full causal attention and SWA (the blocked torch path of
# `fast/attention.py`), one thread,
# CPU time of this process, min of 3, up to T = 16,384 (about 15 s on a 2-core CPU). The selection scores
# every (query, block) pair, $O(T^2 D / B)$, so MATCH is not linear in $T$; the attention part is
# $O(T(w + KB)D)$.
#
# **On CUDA** the same cell times the Triton kernels live (wall clock, synchronised).

# %%
Ts, D8, w8, K8, B8 = [512, 1024, 2048, 4096, 8192, 16384], 32, 128, 4, 32
threads = torch.get_num_threads()
torch.set_num_threads(1)
backend = "triton" if DEVICE == "cuda" else "torch"


def timed(fn, reps=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        else:
            t0 = time.process_time()
            fn()
            best = min(best, time.process_time() - t0)
    return best


rows = []
for T8 in Ts:
    gen = torch.Generator().manual_seed(T8)
    q8, k8, v8 = (torch.randn(1, 2, T8, D8, generator=gen).to(DEVICE) for _ in range(3))
    with torch.no_grad():
        t_full = timed(lambda q=q8, k=k8, v=v8: flash_attention(q, k, v, window=None, backend=backend))
        t_swa = timed(lambda q=q8, k=k8, v=v8: flash_attention(q, k, v, window=w8, backend=backend))
        t_match = timed(
            lambda q=q8, k=k8, v=v8: match_attention(
                q, k, v, window=w8, top_k=K8, block_size=B8, backend=backend
            )
        )
    rows.append((T8, t_full, t_swa, t_match))
torch.set_num_threads(threads)
print(
    f"{'T':>6} {'full [ms]':>10} {'SWA [ms]':>10} {'MATCH [ms]':>11}   (batch 1, H=2, D={D8}, w={w8}, "
    f"top_k={K8} blocks of {B8}, {backend} backend on {DEVICE})"
)
for T8, a, b, c in rows:
    print(f"{T8:6d} {1e3 * a:10.2f} {1e3 * b:10.2f} {1e3 * c:11.2f}")
fig, ax = plt.subplots(figsize=(5, 4))
for col, label, mk in ((1, "full causal", "o-"), (2, f"SWA w={w8}", "s-"), (3, "MATCH", "^-")):
    ax.loglog(Ts, [r[col] for r in rows], mk, label=label)
ax.set_xticks(Ts, [str(t) for t in Ts])
ax.minorticks_off()
ax.set_xlabel("T")
ax.set_ylabel(f"forward time [s] ({DEVICE})")
ax.legend()
plt.show()
for (Ta, *ta), (Tb, *tb) in zip(rows, rows[1:], strict=False):
    print(
        f"T {Ta} -> {Tb}: time x{tb[0] / ta[0]:.1f} full, x{tb[1] / ta[1]:.1f} SWA, "
        f"x{tb[2] / ta[2]:.1f} MATCH"
    )
ratio = {T8: a / c for T8, a, _, c in rows}  # full / MATCH
slope_full, slope_match = (
    np.polyfit(np.log(Ts[2:]), np.log([r[col] for r in rows[2:]]), 1)[0] for col in (1, 3)
)
print(
    f"this run: full / MATCH = {ratio[Ts[0]]:.2f} at T = {Ts[0]}, {ratio[Ts[-1]]:.2f} at T = {Ts[-1]} "
    f"(MATCH {'ahead' if ratio[Ts[-1]] > 1 else 'behind'} there); fitted exponents (T >= {Ts[2]}): "
    f"full {slope_full:.2f}, MATCH {slope_match:.2f}"
)
if DEVICE == "cpu":  # the growth, not the crossing: at T = 16K the two are too close to order reliably
    assert slope_full > slope_match + 0.3, "full attention should grow clearly faster than MATCH"
    assert ratio[Ts[-1]] > 2 * ratio[Ts[2]], "the gap to full attention should close with T"

# %% [markdown]
# Reading the CPU table: up to a few thousand tokens the torch backend of MATCH is several times *slower*
# than full attention. The cause is its retrieved part (`benchmarks/results/match_cpu.md`): every query row
# gathers its own $K \cdot B$ keys and values and multiplies them as one-row products, $O(T K B D)$ work on
# gathered copies, where full attention and the window part are dense matrix products per chunk of queries.
# That cost is linear in $T$ with a large constant; the quadratic part, the block scoring ($T^2 D / B$
# multiply-adds), stays small at these lengths. So full attention's time roughly quadruples per doubling
# of $T$ and MATCH's grows more slowly (about twofold per doubling up to T = 8K, faster beyond, where the
# block scoring starts to count), and the gap closes: with these settings the two meet around
# T = 16,384 on a 2-core CPU (the last line above says which one was ahead in this run; it varies from
# run to run). The cell checks the growth, not the crossing.
#
# **Committed GPU numbers, of the old kernel path.** `benchmarks/results/match_h200.md` holds the output of
# `benchmarks/match.py` on one H200 (bf16, batch 1, 16 heads, window 512, 8 retrieved blocks of 64 keys; the
# file gives the exact command), measured when the Triton kernels still gathered the retrieved keys per query
# row. The block-major kernels that now serve blocks of 16 keys or more (section 7) have not been timed on a
# GPU yet (`docs/kernels.md`). The cell reads that table and plots MATCH against SWA and full-causal SDPA.
# As the file says, the targets (MATCH ≤ 2× the sliding kernel, ≥ 8× faster than full attention at T = 32K)
# are **not met** by that old path; the cell prints the ratios.

# %%
path = pathlib.Path("../benchmarks/results/match_h200.md")
if not path.exists():
    print("No MATCH GPU table is committed in benchmarks/results/.")
else:
    table = {}  # (op, impl, T, D) -> median ms
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("match") or cells[1] not in ("full", "swa", "match"):
            continue
        T_, D_ = (int(re.search(rf"\b{c}(\d+)", cells[2]).group(1)) for c in "TD")  # "B1 H16 T32768 D64 ..."
        table[(cells[0], cells[1], T_, D_)] = float(cells[3])
    print(
        "committed: one NVIDIA H200 (torch 2.11, triton 3.6), bf16, the old MATCH kernel path (retrieved keys"
        " gathered per query row);\nthe block-major kernels of this code are not yet timed on a GPU"
    )
    print(
        f"{'op':>14} {'T':>6} {'D':>4} {'full [ms]':>10} {'SWA [ms]':>9} {'MATCH [ms]':>11} "
        f"{'MATCH/SWA':>10} {'full/MATCH':>11}"
    )
    keys = sorted({(op, T_, D_) for op, _, T_, D_ in table})
    for op, T_, D_ in keys:
        f_, w_, m_ = (table.get((op, impl, T_, D_), np.nan) for impl in ("full", "swa", "match"))
        print(f"{op:>14} {T_:6d} {D_:4d} {f_:10.3f} {w_:9.3f} {m_:11.3f} {m_ / w_:10.1f} {f_ / m_:11.2f}")
    fig, ax = plt.subplots(figsize=(5, 4))
    for impl, mk in (("full", "o-"), ("swa", "s-"), ("match", "^-")):
        pts = sorted(
            (T_, v)
            for (op, im, T_, D_), v in table.items()
            if op == "match fwd+bwd" and im == impl and D_ == 64
        )
        if pts:
            ax.loglog(
                *zip(*pts, strict=True),
                mk,
                label=impl + (" (old per-row kernel path)" if impl == "match" else ""),
            )
    ax.set_xlabel("T")
    ax.set_ylabel("fwd+bwd median [ms], H200, bf16, D = 64")
    ax.set_title("match_h200.md: MATCH's old per-row kernel path, one H200")
    ax.legend()
    plt.show()
