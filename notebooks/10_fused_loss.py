# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 10 · Distillation at a real vocabulary: the chunked lm-head + loss, and an offline teacher
#
# The tiny models have 259 tokens. Qwen2.5 has 151,936. Every distillation loss of this project (notebooks
# 01-03) takes the logits `[B·T, V]` of the teacher and of the student; at a real vocabulary those tensors are
# where the memory goes. This notebook builds `fast.fused.fused_distill_loss` from the unfused loss:
#
# 1. why `[B·T, V]` dominates (the numbers);
# 2. the oracle: the unfused loss on materialised logits;
# 3. the chunk loop, written out in a dozen lines, checked against the oracle and against `fast.fused`;
# 4. odd shapes: a span that crosses a chunk boundary;
# 5. the memory curve against the chunk size, and the measured benchmark;
# 6. an offline teacher (`fast.teacher_cache`) and what its sparsity costs the student.

# %%
import json
import math
import os
import time

import matplotlib
import torch

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402

from fast.dac_kl import DACKL  # noqa: E402
from fast.divergences import divergence  # noqa: E402
from fast.fused import default_chunk_rows, default_loss_rows, fused_distill_loss  # noqa: E402
from fast.span import span_loss  # noqa: E402
from fast.testing import assert_close  # noqa: E402

torch.set_num_threads(1)
T0 = time.perf_counter()
ROOT = os.path.dirname(os.getcwd())

# %% [markdown]
# ## 1. Why `[B·T, V]` dominates
#
# One step of a 0.5B student (hidden size H = 896) on B·T = 2,048 tokens: the hidden states are small,
# the output weight is large but fixed, and every logits-shaped tensor is as large as the weight again.

# %%
N, H, V = 2048, 896, 151_936
gib = 2**30
print(f"hidden states [N, H]      {N * H * 4 / gib:6.3f} GiB")
print(f"output weight [V, H]      {V * H * 4 / gib:6.3f} GiB (and its gradient, the same)")
print(f"one fp32 logits [N, V]    {N * V * 4 / gib:6.3f} GiB; a loss step holds several of them")
assert N * V > 100 * N * H  # the logits are two orders of magnitude larger than the hidden states

# %% [markdown]
# ## 2. The oracle: the unfused loss
#
# The knobs of this section: the objective and the chunk size. **Expected effect:** any chunk size gives the
# same loss and gradients as the unfused computation (to rounding); a smaller chunk only holds fewer rows
# of logits at a time.

# %%
OBJECTIVE = "js_divergence"  # "ce", any divergence of fast.divergences
CHUNK = 7  # rows of logits per chunk

g = torch.Generator().manual_seed(0)
n, h, ht_dim, v = 45, 16, 24, 301  # small enough to check in float64
hs = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
ws = (torch.randn(v, h, generator=g, dtype=torch.float64) / 4).requires_grad_()
ht = torch.randn(n, ht_dim, generator=g, dtype=torch.float64)
wt = torch.randn(v, ht_dim, generator=g, dtype=torch.float64) / 3
labels = torch.randint(0, v, (n,), generator=g)


def unfused(hs, ws):
    s, t = hs @ ws.T, ht @ wt.T  # the whole [n, v] logits of both models
    if OBJECTIVE == "ce":
        return torch.nn.functional.cross_entropy(s, labels)
    return divergence(OBJECTIVE, t, s, backend="torch")


loss_ref = unfused(hs, ws)
dh_ref, dw_ref = torch.autograd.grad(loss_ref, [hs, ws])
print(f"unfused {OBJECTIVE}: {float(loss_ref.detach()):.6f}")

# %% [markdown]
# ## 3. The chunk loop
#
# For each chunk of rows: compute that chunk's logits, its share of the loss (normalised by the whole batch)
# and the gradient of that share with respect to the chunk's logits; push the gradient through the lm head
# at once (`dh = ds @ W`, `dW += ds.T @ h`) and drop the logits. The gradients are complete at the end of the
# forward; the backward only scales them by `grad_output`.


# %%
def chunked(hs, ws, chunk):
    total, dh, dw = 0.0, torch.zeros_like(hs), torch.zeros_like(ws)
    for a in range(0, len(hs), chunk):
        s = (hs[a : a + chunk] @ ws.T).detach().requires_grad_()  # [chunk, v]: the only logits alive
        t = ht[a : a + chunk] @ wt.T
        if OBJECTIVE == "ce":
            part = torch.nn.functional.cross_entropy(s, labels[a : a + chunk], reduction="sum") / len(hs)
        else:
            part = divergence(OBJECTIVE, t, s, reduction="sum", backend="torch") / len(hs)
        (ds,) = torch.autograd.grad(part, s)
        dh[a : a + chunk] = ds @ ws.detach()
        dw += ds.T @ hs[a : a + chunk].detach()
        total += float(part.detach())
    return total, dh, dw


total, dh, dw = chunked(hs, ws, CHUNK)
assert_close(torch.tensor(total, dtype=torch.float64), loss_ref, name="loss")
assert_close(dh, dh_ref, name="dh")
assert_close(dw, dw_ref, name="dW")
fused, _ = fused_distill_loss(
    hs, ws, ht, wt, objective=OBJECTIVE, labels=labels, chunk_rows=CHUNK, backend="torch"
)
dh_f, dw_f = torch.autograd.grad(fused, [hs, ws])
assert_close(fused, loss_ref, name="fast.fused loss")
assert_close(dh_f, dh_ref, name="fast.fused dh")
assert_close(dw_f, dw_ref, name="fast.fused dW")
print("the dozen-line loop and fast.fused both equal the unfused loss and gradients")

# %% [markdown]
# ## 4. An odd shape: MGSR, with spans that cross chunk boundaries
#
# MGSR's span term compares *adjacent* rows. A chunk therefore also computes the logits of the row after it:
# the pair `(b - 1, b)` belongs to the chunk `[a, b)`, row `b`'s own terms to the next chunk. With chunks of
# 4 rows and spans of 5 to 9 rows, most spans straddle a boundary; the fused loss must still equal the
# unfused one, DAC-KL's bounds sub-network gradient included.

# %%
dac = DACKL(k=8, hidden=16, backend="torch", generator=torch.Generator().manual_seed(1)).double()
spans = torch.tensor([[0, 5], [5, 14], [14, 21], [26, 33], [33, 45]])
params = [hs, ws, *dac.parameters()]
fl, parts = fused_distill_loss(
    hs,
    ws,
    ht,
    wt,
    objective="mgsr",
    labels=labels,
    spans=spans,
    dac=dac,
    chunk_rows=4,
    backend="torch",
    weights=(1.0, 1.0, 2.0),
)
s, t = hs @ ws.T, ht @ wt.T
ref = (
    torch.nn.functional.cross_entropy(s, labels)
    + dac(t, s)[0]
    + 2.0 * span_loss(t, s, spans, backend="torch")
)
for a, b in zip(torch.autograd.grad(fl, params), torch.autograd.grad(ref, params), strict=True):
    assert_close(a, b, name="MGSR gradient")
assert_close(fl, ref, name="MGSR loss")
print({k: round(float(x), 4) for k, x in parts.items()})

# %% [markdown]
# ## 5. Memory and time against the chunk size
#
# Peak memory above the inputs is about the weight's gradient (`[V, H]`, fp32) plus what a chunk holds. The
# loop above would want small chunks for memory, but each chunk reads the whole weight for `s = h @ W.T`,
# again for `dh = ds @ W` and reads and writes `dW` once more: with a few dozen rows these matrix products
# are bound by memory traffic, not arithmetic, and the fused loss runs about 1.4x slower than the unfused
# one on a CPU. `fast.fused` therefore works on two levels:
#
# - a **chunk** of `R` rows (`fast.fused.default_chunk_rows`, about 144 MiB): the two models' logits
#   `[R, V]` are computed at once, so the lm-head products see `R` rows (about 124 at V = 151,936);
# - **pieces** of `C <= R` rows (`fast.fused.default_loss_rows`, about 48 MiB of the loss's temporaries: a
#   divergence holds about 6 copies of `[C, V]`, MGSR's DAC-KL about 20): the loss and its gradient are
#   computed piece by piece, and each piece's gradient is written over the teacher's logits it no longer
#   needs, so the chunk's gradient `[R, V]` costs no third buffer.
#
# The curve below is this model of memory (`dW + 2 R V + copies C V` floats), not a measurement; the
# measured numbers, from `benchmarks/fused_loss.py` on a 2-core CPU, are printed under it when committed.

# %%
chunks = [1, 8, 32, 128, 512, 2048]
copies = {"forward_kl": 6, "mgsr": 20}
fig, ax = plt.subplots(figsize=(5.5, 3.2))
for obj, c in copies.items():
    model = [(V * H * 4 + (2 * R + c * default_loss_rows(R, V, obj)) * V * 4) / gib for R in chunks]
    ax.plot(chunks, model, "o-", label=f"{obj} (model)")
ax.axvline(default_chunk_rows(N, V), ls=":", color="gray")
ax.axhline(V * H * 4 / gib, color="k", lw=0.8, label="dW alone")
ax.set_xscale("log", base=2)
ax.set_xlabel("chunk rows R (dotted: the default)")
ax.set_ylabel("GiB above the inputs")
ax.set_title(f"N = {N}, H = {H}, V = {V}", fontsize=9)
ax.legend(fontsize=7)
fig.tight_layout()
R0 = default_chunk_rows(N, V)
assert default_loss_rows(R0, V, "mgsr") < default_loss_rows(
    R0, V, "forward_kl"
)  # more temporaries, fewer rows

measured = os.path.join(ROOT, "benchmarks", "results", "fused_loss_cpu.md")
if os.path.exists(measured):
    print(open(measured).read())

# %% [markdown]
# ## 6. An offline teacher, and what sparsity costs
#
# For fixed sequences the teacher can run once and store, per token, only `k` entries
# (`python -m fast.teacher_cache`): its top-k log-probabilities plus the tail mass, or `k` tokens sampled
# from it with importance weights (random-sampling KD, arXiv 2503.16870: unbiased for the gradient). Only the
# forward KL can be computed from such a teacher; DAC-KL and the span term need the whole distribution.
# `python -m tiny_models.cache_bias` distils the tiny student both ways and from the full teacher; its
# committed table is printed when present.

# %%
from fast.teacher_cache import sampled_entries, sparse_kd_loss, topk_entries  # noqa: E402

t_rows, s_rows = ht @ wt.T, (hs @ ws.T).detach().requires_grad_()
(want,) = torch.autograd.grad(
    divergence("forward_kl", t_rows, s_rows, reduction="sum", backend="torch"), s_rows
)
ids, vals, rest = topk_entries(t_rows, 8)
(g_top,) = torch.autograd.grad(sparse_kd_loss(s_rows, ids, vals, rest, "topk").sum(), s_rows)
gen, acc, reps = torch.Generator().manual_seed(0), torch.zeros_like(s_rows), 200
for _ in range(reps):
    ids_s, w_s = sampled_entries(t_rows, 8, gen)
    acc += torch.autograd.grad(sparse_kd_loss(s_rows, ids_s, w_s, None, "sampled").sum(), s_rows)[0]
err_top = float((g_top - want).norm() / want.norm())
err_sampled = float((acc / reps - want).norm() / want.norm())
print(
    f"relative gradient error, k = 8 of {v}: top-k {err_top:.3f} (biased: fixed), sampled mean of {reps} "
    f"caches {err_sampled:.3f} (unbiased: shrinks with more caches)"
)
assert err_sampled < err_top or err_top < 0.05

results = os.path.join(ROOT, "tiny_models", "results", "teacher_cache", "README.md")
if os.path.exists(results):
    print(open(results).read())

# %%
print(f"notebook ran in {time.perf_counter() - T0:.1f}s")
assert json is not None and math.isfinite(float(fl))
