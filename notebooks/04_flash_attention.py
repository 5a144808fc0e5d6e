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
# # 04 · Flash attention: full causal and sliding window
#
# From the NumPy definition (`reference/attention.py`) to the online-softmax recurrence that the Triton
# kernel (`fast/attention.py`) runs, then the sliding-window mask, the key blocks the kernel actually
# visits, the fast paths against the oracle (gradients included), and the measured cost growth in $T$ of
# full vs sliding attention.
#
# **Why flash attention exists.** The textbook computation materialises $S = QK^\top$ and $P =
# \text{softmax}(S)$, one $[T, T]$ matrix per (batch, head). At $T = 32768$ that is $2^{30}$ scores:
# 4 GiB in fp32 *per head*, 64 GiB for the 16 heads of one layer (computed in section 1 below): close to
# half of an H200's memory, all of it written to and read back from HBM. Flash attention (*FlashAttention:
# Fast and Memory-Efficient Exact Attention with IO-Awareness*, arXiv 2205.14135) never stores
# it: it streams key blocks through on-chip memory and keeps only $O(T)$ state per head (a running max,
# a running denominator and the $[T, D]$ output), then recomputes $P$ block by block in the backward.
#
# **Convention.** `window = w` means query $i$ sees keys $i - w < j \le i$: **w keys including itself**
# (`w = 1` is the diagonal, `w >= T` is full causal). attention-gym / FlexAttention examples write
# `i - j <= w`, i.e. $w + 1$ keys: their `window_size=w` is our `window=w+1`.

# %%
# without CUDA, importing `fast` sets TRITON_INTERPRET=1: its Triton kernels run in the interpreter on the CPU
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from fast.attention import flash_attention, flash_attention_with_lse, key_block_range
from fast.testing import assert_close
from reference.attention import allowed, attention, attention_by_definition, attention_grad, attention_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
rng = np.random.default_rng(0)

# %% [markdown]
# ### Parameter
#
# `WINDOW` and the tile sizes `BLOCK_M` (query rows) and `BLOCK_N` (keys) of section 4, where the forward
# kernel's key-block loop is drawn for `T_TILES` tokens.
#
# Expected effect: a query block visits exactly the key tiles its rows can see, at most
# `ceil((WINDOW + BLOCK_M − 1) / BLOCK_N) + 1` of them, whatever `T_TILES`: a smaller window or a larger
# `BLOCK_N` visits fewer tiles per query block, and `WINDOW >= T_TILES` visits every causal tile (full
# attention). The cell after the tile picture checks both at the current values.

# %%
T_TILES, BLOCK_M, BLOCK_N, WINDOW = 512, 64, 64, 100

# %% [markdown]
# ## 1. The definition
#
# $S = \text{scale}\cdot QK^\top$, masked to $-\infty$ outside the allowed pairs; $P = \text{softmax}(S)$
# row-wise, $O = PV$ and $\text{lse}_i = \log\sum_j e^{S_{ij}}$. The vectorised oracle and the per-query
# loop ("by the definition") agree:

# %%
T, D, w = 12, 4, 5
q, k, v = rng.standard_normal((3, T, D))
out, lse = attention(q, k, v, window=w)
out_loop, lse_loop = attention_by_definition(q, k, v, window=w)
assert_close(out, out_loop, dtype="float64", name="out")
assert_close(lse, lse_loop, dtype="float64", name="lse")
print("max |vectorised - loop| =", np.abs(out - out_loop).max())
for T_big in (4096, 32768, 131072):  # what the [T, T] score matrix would cost, per head and per layer of 16
    per_head = T_big * T_big * 4  # fp32 scores
    print(
        f"T = {T_big:6d}: [T, T] fp32 = {per_head / 2**30:7.2f} GiB per head, {16 * per_head / 2**30:8.1f} GiB "
        f"for 16 heads; flash attention's state: {T_big * (64 + 2) * 4 / 2**20:.1f} MiB per head (D = 64)"
    )

# %% [markdown]
# ## 2. The online-softmax recurrence, checked step by step
#
# Flash attention never holds a whole row of $S$. It visits key blocks left to right and keeps, per
# query, a running max $m$, a running denominator $\ell$ and an unnormalised accumulator $a$:
#
# $$m' = \max(m, \max_j s_j),\quad \alpha = e^{m - m'},\quad \ell' = \alpha\ell + \sum_j e^{s_j - m'},\quad
#   a' = \alpha a + \sum_j e^{s_j - m'} v_j .$$
#
# After each block, $a/\ell$ must equal attention restricted to the keys seen so far, and
# $m + \log\ell$ their log-sum-exp. A row that has seen only masked keys keeps $m = -\infty$; the kernel
# then uses $m_\text{safe} = 0$ so that $e^{-\infty - (-\infty)}$ (NaN) never happens.

# %%
block = 4
scale = 1 / np.sqrt(D)
m, l, acc = np.full(T, -np.inf), np.zeros(T), np.zeros((T, D))
idx = np.arange(T)
for start in range(0, T, block):
    j = idx[start : start + block]
    s = np.where(allowed(idx[:, None], j[None, :], window=w), scale * q @ k[j].T, -np.inf)
    m_new = np.maximum(m, s.max(axis=1))
    m_safe = np.where(np.isneginf(m_new), 0.0, m_new)
    alpha = np.exp(m - m_safe)
    p = np.exp(s - m_safe[:, None])
    l, acc, m = alpha * l + p.sum(1), alpha[:, None] * acc + p @ v[j], m_new
    # check: attention over keys [0, start + block) only, for the rows that have seen a key
    seen = np.isfinite(m)
    sub = attention_mask(T, window=w)[:, : start + block]
    s_full = np.where(sub, scale * q @ k[: start + block].T, -np.inf)[seen]
    mx = s_full.max(1, keepdims=True)
    pf = np.exp(s_full - mx)
    expect_out = (pf / pf.sum(1, keepdims=True)) @ v[: start + block]
    expect_lse = mx[:, 0] + np.log(pf.sum(1))
    assert_close(acc[seen] / l[seen, None], expect_out, dtype="float64", name=f"block {start}")
    assert_close(m[seen] + np.log(l[seen]), expect_lse, dtype="float64", name=f"lse block {start}")
    print(f"after keys [0, {start + block:2d}): {seen.sum():2d} rows have seen a key, prefix check OK")
assert_close(acc / l[:, None], out, dtype="float64", name="final out")

# %% [markdown]
# ### The same recurrence in the kernel
#
# The forward kernel (`attention_fwd_kernel` in `fast/attention.py`) runs this recurrence per query block
# of `BLOCK_M` rows, in `_fwd_loop`. Line by line, kernel on the left, the NumPy replay above on the right:
#
# | `_fwd_loop` (Triton) | NumPy replay |
# |---|---|
# | `s = _dot(q, tl.trans(k))` raw scores, **unscaled** | `s = scale * q @ k[j].T` |
# | `m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)`, `qk_scale = scale * log2(e)` (masked first on edge blocks) | `m_new = np.maximum(m, s.max(axis=1))` |
# | `p = tl.math.exp2(tl.fma(s, qk_scale, -m_new[:, None]))` | `p = np.exp(s - m_safe[:, None])` |
# | `alpha = tl.math.exp2(m_i - m_new)`, 0 while `m_i = -inf` | `alpha = np.exp(m - m_safe)` |
# | `l_i = l_i * alpha + tl.sum(p, 1)` | `l = alpha * l + p.sum(1)` |
# | `acc = acc * alpha[:, None] + _dot(p, v)` | `acc = alpha[:, None] * acc + p @ v[j]` |
# | epilogue: `out = acc / l_i`, `lse = m_i + log2(l_i)` (log2 units; the API returns it times ln 2) | `acc / l`, `m + log(l)` |
#
# Three differences. (1) $e^x = 2^{x \log_2 e}$: the kernel uses `exp2`, the GPU's native instruction, and
# keeps the running max $m$ and the lse in log2 units, so each score costs one fused multiply-add,
# $s \cdot \text{scale}\log_2 e - m$, before its `exp2`. (2) The key
# range `[a, d)` of a query block is split in three segments, `[a, bb)` edge, `[bb, c)` interior, `[c, d)`
# edge: only edge blocks (the diagonal, the window's left border, a partial last block) evaluate the mask;
# interior blocks are wholly allowed and skip it. (3) A row that has seen no allowed key keeps
# $m = -\infty$ and gets $\alpha = 0$ by an explicit `where`. The NumPy replica below follows the kernel
# (exp2, log2-unit max, the three segments, no mask on interior blocks) and must give the oracle's output.


# %%
def kernel_replica(q, k, v, window, BLOCK_M=4, BLOCK_N=4):  # [T, D] x3 -> [T, D], [T]
    T, D = q.shape
    scale = 1 / np.sqrt(D)
    qk_scale = scale * np.log2(np.e)
    W = T if window is None else window
    out, lse, n_interior = np.zeros((T, D)), np.zeros(T), 0
    for start_m in range(0, T, BLOCK_M):
        rows = np.arange(start_m, min(start_m + BLOCK_M, T))  # [BM]
        m_i, l_i, acc = np.full(len(rows), -np.inf), np.zeros(len(rows)), np.zeros((len(rows), D))
        end_m = min(start_m + BLOCK_M, T)
        a = max(start_m - W + 1, 0) // BLOCK_N * BLOCK_N  # the kernel's segment bounds (causal)
        d = end_m
        c = max(min(min(start_m + 1, T) // BLOCK_N * BLOCK_N, d), a)
        bb = min(max(-(-max(end_m - W, 0) // BLOCK_N) * BLOCK_N, a), c)
        for lo, hi, edge in ((a, bb, True), (bb, c, False), (c, d, True)):
            for start_n in range(lo, hi, BLOCK_N):
                cols = np.arange(start_n, min(start_n + BLOCK_N, T))  # [BN]
                s = q[rows] @ k[cols].T  # [BM, BN] raw scores
                ok = allowed(rows[:, None], cols[None, :], window=window)
                if edge:
                    s = np.where(ok, s, -np.inf)
                else:
                    assert ok.all(), "an interior block must be wholly allowed"
                    n_interior += 1
                m_new = np.maximum(m_i, s.max(axis=1) * qk_scale)  # log2 units
                m_safe = np.where(np.isneginf(m_new), 0.0, m_new)
                p = np.exp2(s * qk_scale - m_safe[:, None])  # one fused multiply-add per score
                alpha = np.where(np.isneginf(m_i), 0.0, np.exp2(m_i - m_safe))
                l_i, acc, m_i = l_i * alpha + p.sum(axis=1), acc * alpha[:, None] + p @ v[cols], m_new
        out[rows], lse[rows] = acc / l_i[:, None], (m_i + np.log2(l_i)) * np.log(2)
    return out, lse, n_interior


T2 = 23
q2, k2, v2 = rng.standard_normal((3, T2, D))
for w2 in (None, 9):
    o_rep, l_rep, n_int = kernel_replica(q2, k2, v2, w2)
    o_ref, l_ref = attention(q2, k2, v2, window=w2)
    assert_close(o_rep, o_ref, dtype="float64", name=f"replica out, window={w2}")
    assert_close(l_rep, l_ref, dtype="float64", name=f"replica lse, window={w2}")
    print(f"window={w2}: kernel replica = oracle (T={T2}, blocks 4x4); {n_int} interior blocks ran unmasked")

# %% [markdown]
# ## 3. The sliding-window mask
#
# Drawn from the predicate `allowed(i, j, causal, window)` that the tests compare exactly with the dense mask.

# %%
T_draw = 24
fig, axes = plt.subplots(1, 3, figsize=(12, 4))
panels = [
    ("full causal", dict(window=None)),
    ("window = 6 (6 keys incl. self)", dict(window=6)),
    ("non-causal window = 4 (|i-j| < 4)", dict(causal=False, window=4)),
]
for ax, (title, kw) in zip(axes, panels, strict=True):
    ax.imshow(attention_mask(T_draw, **kw), cmap="Blues")
    ax.set_title(title)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Which key blocks the kernel visits
#
# Each program of the forward kernel owns one query block and loops over
# `range(lo, hi, BLOCK_N)` with `lo, hi = key_block_range(...)`: blocks wholly left of the window are
# never loaded, so the work per query block is about $(w + \text{BLOCK})/\text{BLOCK}_N$ tiles whatever $T$.
# Dark tiles are visited; the mask is drawn on top. Tiles on the band edges are visited but partly masked.

# %%
T_tiles, BM, BN, w_tiles = T_TILES, BLOCK_M, BLOCK_N, WINDOW
mask = attention_mask(T_tiles, window=w_tiles)
n_qb, n_kb = -(-T_tiles // BM), -(-T_tiles // BN)  # query and key blocks (a partial last one counts)
visited = np.zeros((n_qb, n_kb), dtype=bool)
for bm in range(n_qb):
    lo, hi = key_block_range(bm * BM, BM, BN, T_tiles, window=w_tiles)
    for start_n in range(lo, hi, BN):
        visited[bm, start_n // BN] = True
fig, ax = plt.subplots(figsize=(5, 5))
ax.imshow(np.kron(visited, np.ones((BM, BN)))[:T_tiles, :T_tiles], cmap="Greys", alpha=0.35)
ax.imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.8)
tile_seen = np.array(  # tile (query block, key block) holds at least one allowed (query, key) pair
    [[mask[a * BM : (a + 1) * BM, c * BN : (c + 1) * BN].any() for c in range(n_kb)] for a in range(n_qb)]
)
causal_tiles = sum(1 for a in range(n_qb) for c in range(n_kb) if c * BN <= min((a + 1) * BM, T_tiles) - 1)
ax.set_title(
    f"T={T_tiles}, window={w_tiles}, blocks {BM}x{BN}: {visited.sum()} of {causal_tiles} causal tiles visited"
)
ax.set_xlabel("key")
ax.set_ylabel("query")
plt.show()
for bm in range(n_qb):
    lo, hi = key_block_range(bm * BM, BM, BN, T_tiles, window=w_tiles)
    print(f"query block {bm}: key blocks {list(range(lo // BN, -(-hi // BN)))}")

# %%
bound = -(-(w_tiles + BM - 1) // BN) + 1
print(
    f"tiles per query block: at most {visited.sum(1).max()}, bound ceil((w + BLOCK_M - 1) / BLOCK_N) + 1 = {bound}"
)
assert (visited == tile_seen).all(), "the kernel visits exactly the tiles that hold an allowed pair"
assert visited.sum(1).max() <= bound, "the tiles per query block do not grow with T"

# %% [markdown]
# ## 5. The fast paths on an odd shape
#
# Grouped-query attention (6 query heads, 2 kv heads), $T = 77$ (not a block multiple), $D = 20$
# (padded to 32 inside the kernel), window 9, a random output cotangent; both backends against the oracle,
# which takes the GQA shapes directly (query head $h$ reads kv head $h // 3$): out, lse, and the gradients
# $dq, dk, dv$ against `reference.attention.attention_grad` ($dk, dv$ of a kv head sum its 3 query heads).

# %%
B, Hq, Hkv, T5, D5, w5 = 1, 6, 2, 77, 20, 9
g = torch.Generator().manual_seed(0)
q5, k5, v5 = (torch.randn(B, h, T5, D5, generator=g) for h in (Hq, Hkv, Hkv))  # [1, 6|2|2, 77, 20]
do5 = torch.randn(B, Hq, T5, D5, generator=g)  # [1, 6, 77, 20]
qn, kn, vn, don = (x.double().numpy() for x in (q5, k5, v5, do5))
ref_out, ref_lse = attention(qn, kn, vn, window=w5)  # [1, 6, 77, 20], [1, 6, 77]
ref_dq, ref_dk, ref_dv = attention_grad(qn, kn, vn, don, window=w5)  # shaped as q, k, v
for backend in ("torch", "triton"):
    qd, kd, vd = (x.clone().to(DEVICE).requires_grad_() for x in (q5, k5, v5))
    # The interpreter evaluates both branches of every tl.where with NumPy: a discarded branch may compute
    # -inf - (-inf) = NaN (e.g. `(m_i - m_new) * qk_scale` in `alpha` for a row that has seen no key yet,
    # or a masked score minus a -inf max), and NumPy warns about it. The where then drops that NaN (the checks below
    # would catch any NaN in the results), so the warning is silenced here.
    with np.errstate(invalid="ignore"):
        o5, l5 = flash_attention_with_lse(qd, kd, vd, window=w5, backend=backend)
        o5.backward(do5.to(DEVICE))
    assert_close(o5, ref_out, dtype=torch.float32, name=f"{backend} out")
    assert_close(l5, ref_lse, dtype=torch.float32, name=f"{backend} lse")
    for name, t, r in (("dq", qd, ref_dq), ("dk", kd, ref_dk), ("dv", vd, ref_dv)):
        assert_close(t.grad, r, dtype=torch.float32, name=f"{backend} {name}")
    print(
        backend,
        "out, lse, dq, dk, dv match the oracle; max |dk - oracle| =",
        f"{np.abs(kd.grad.cpu().double().numpy() - ref_dk).max():.1e}",
    )

# %% [markdown]
# ## 6. Cost growth in $T$ on the torch path (CPU)
#
# The torch backend processes 256 query rows at a time and multiplies only the keys those rows can
# see, so full causal attention costs $O(T^2)$ and sliding-window attention $O(T\cdot w)$. We time the
# forward and fit the exponent on a log-log scale over the larger sizes. The machine this runs on may be
# shared, so we measure *CPU time of this process* (`time.process_time`) on one thread, min of 3: other
# processes then barely disturb the numbers.

# %%
Ts = [512, 1024, 2048, 4096, 8192]
w6, D6 = 128, 32
threads = torch.get_num_threads()
torch.set_num_threads(1)


def timed(T, window, reps=3):
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(1, 2, T, D6, generator=g) for _ in range(3))
    flash_attention(q, k, v, window=window, backend="torch")  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        flash_attention(q, k, v, window=window, backend="torch")
        times.append(time.process_time() - t0)
    return min(times)


t_full = [timed(T, None) for T in Ts]
t_win = [timed(T, w6) for T in Ts]
torch.set_num_threads(threads)
slope_full = np.polyfit(np.log(Ts[2:]), np.log(t_full[2:]), 1)[0]
slope_win = np.polyfit(np.log(Ts[2:]), np.log(t_win[2:]), 1)[0]
fig, ax = plt.subplots(figsize=(5, 4))
ax.loglog(Ts, t_full, "o-", label=f"full causal (fitted exponent {slope_full:.2f})")
ax.loglog(Ts, t_win, "s-", label=f"window {w6} (fitted exponent {slope_win:.2f})")
ax.set_xlabel("T")
ax.set_ylabel("forward CPU time [s]")
ax.set_xticks(Ts, [str(T) for T in Ts])
ax.minorticks_off()
ax.legend()
plt.show()
# full lands a bit under 2: at these sizes the linear terms (per-chunk overhead, concatenation) still count
print(f"fitted exponents (T >= 2048): full {slope_full:.2f} (expect ~2), sliding {slope_win:.2f} (expect ~1)")
assert slope_full > slope_win + 0.3, "full attention should grow clearly faster than sliding-window"

# %% [markdown]
# On a GPU the kernels are timed by `benchmarks/attention.py`; the committed rows of the last H200 run
# (`benchmarks/results/gpu_report_h200.md`, `make gpu-check`; bf16, B1 H16, D64). They time the restructured
# kernels *before* their softmax moved to log2 units (the `exp2` form of section 2) and their tile table
# became per Triton version: the current kernels have not been timed on a GPU yet (`docs/kernels.md`).

# %%
import pathlib  # noqa: E402

rows = [
    ln
    for ln in pathlib.Path("../benchmarks/results/gpu_report_h200.md").read_text().splitlines()
    if ln.startswith("| attn fwd+bwd |")
]
print(
    "committed: one NVIDIA H200 (torch 2.11, triton 3.6), bf16, the restructured attention kernels of"
    " 30 November 2026,\nolder than this code: the log2-unit softmax and per-version tiles are not yet timed on a GPU"
)
print("| op | impl | shape | median_ms | ratio | gbps | tflops | peak_mb | note |")
print("\n".join(rows[:8]))
