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
# visits, and the measured cost growth in $T$ of full vs sliding attention.
#
# **Convention.** `window = w` means query $i$ sees keys $i - w < j \le i$: **w keys including itself**
# (`w = 1` is the diagonal, `w >= T` is full causal). attention-gym / FlexAttention examples write
# `i - j <= w`, i.e. $w + 1$ keys: their `window_size=w` is our `window=w+1`.

# %%
import os

import torch

if not torch.cuda.is_available():  # before importing any module with @triton.jit kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import time

import matplotlib.pyplot as plt
import numpy as np

from fast.attention import flash_attention, flash_attention_with_lse, key_block_range
from fast.testing import assert_close
from reference.attention import allowed, attention, attention_by_definition, attention_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
rng = np.random.default_rng(0)

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
    j = idx[start:start + block]
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
    expect_lse = (mx[:, 0] + np.log(pf.sum(1)))
    assert_close(acc[seen] / l[seen, None], expect_out, dtype="float64", name=f"block {start}")
    assert_close(m[seen] + np.log(l[seen]), expect_lse, dtype="float64", name=f"lse block {start}")
    print(f"after keys [0, {start + block:2d}): {seen.sum():2d} rows have seen a key, prefix check OK")
assert_close(acc / l[:, None], out, dtype="float64", name="final out")

# %% [markdown]
# ## 3. The sliding-window mask
#
# Drawn from the predicate `allowed(i, j, causal, window)` that the tests compare exactly with the dense mask.

# %%
T_draw = 24
fig, axes = plt.subplots(1, 3, figsize=(12, 4))
panels = [("full causal", dict(window=None)),
          ("window = 6 (6 keys incl. self)", dict(window=6)),
          ("non-causal window = 4 (|i-j| < 4)", dict(causal=False, window=4))]
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
T_tiles, BM, BN, w_tiles = 512, 64, 64, 100
mask = attention_mask(T_tiles, window=w_tiles)
visited = np.zeros((T_tiles // BM, T_tiles // BN), dtype=bool)
for bm in range(T_tiles // BM):
    lo, hi = key_block_range(bm * BM, BM, BN, T_tiles, window=w_tiles)
    for start_n in range(lo, hi, BN):
        visited[bm, start_n // BN] = True
fig, ax = plt.subplots(figsize=(5, 5))
ax.imshow(np.kron(visited, np.ones((BM, BN))), cmap="Greys", alpha=0.35)
ax.imshow(np.ma.masked_where(~mask, mask), cmap="autumn", alpha=0.8)
ax.set_title(f"T={T_tiles}, window={w_tiles}, blocks {BM}x{BN}: {visited.sum()} of "
             f"{(T_tiles // BM) * (T_tiles // BN + 1) // 2} causal tiles visited")
ax.set_xlabel("key")
ax.set_ylabel("query")
plt.show()
for bm in range(T_tiles // BM):
    lo, hi = key_block_range(bm * BM, BM, BN, T_tiles, window=w_tiles)
    print(f"query block {bm}: key blocks {list(range(lo // BN, -(-hi // BN)))}")

# %% [markdown]
# ## 5. The fast paths on an odd shape
#
# Grouped-query attention (6 query heads, 2 kv heads), $T = 77$ (not a block multiple), $D = 20$
# (padded to 32 inside the kernel), window 9; both backends against the oracle, gradients included.

# %%
B, Hq, Hkv, T5, D5, w5 = 1, 6, 2, 77, 20, 9
g = torch.Generator().manual_seed(0)
q5, k5, v5 = (torch.randn(B, h, T5, D5, generator=g) for h in (Hq, Hkv, Hkv))
do5 = torch.randn(B, Hq, T5, D5, generator=g)
G = Hq // Hkv
ref_out, ref_lse = attention(q5.double().numpy(), np.repeat(k5.double().numpy(), G, 1),
                             np.repeat(v5.double().numpy(), G, 1), window=w5)
for backend in ("torch", "triton"):
    qd, kd, vd = (x.clone().to(DEVICE).requires_grad_() for x in (q5, k5, v5))
    o5, l5 = flash_attention_with_lse(qd, kd, vd, window=w5, backend=backend)
    o5.backward(do5.to(DEVICE))
    assert_close(o5, ref_out, dtype=torch.float32, name=f"{backend} out")
    assert_close(l5, ref_lse, dtype=torch.float32, name=f"{backend} lse")
    print(backend, "out/lse match the oracle; |dq|, |dk|, |dv| =",
          [round(float(t.grad.norm()), 3) for t in (qd, kd, vd)])

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
