# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · DAC-KL: what the learned band keeps
#
# Paper: *Multi-Granularity Semantic Revision for Large Language Model Distillation* (MGSR), arXiv 2407.10068.
#
# DAC-KL, MGSR's token-level loss, distils only a *band* of the teacher distribution: a small sub-network looks at
# the sorted teacher probabilities and predicts two levels `0 <= l < u <= 1`; they become two value
# thresholds `tau_lo <= tau_hi`, a soft sigmoid mask keeps the tokens with `tau_lo <= p <= tau_hi`, the
# teacher's top class is appended as an extra entry, and the loss is the KL between the clipped teacher
# and the student clipped by the *same* mask. Everything here that the paper does not state is our
# reconstruction ([RECON]; see `reference/dac_kl.py` and [../docs/papers.md](../docs/papers.md)).
#
# Sections: the band on one distribution → training the sub-network → what the learned band keeps →
# the Triton kernel's threshold search for value bounds (a radix select on integer keys of the fp32 logits,
# one byte per pass) replayed in NumPy → kernel vs torch vs oracle on an odd shape, every gradient included.
#
# This notebook uses a synthetic Zipf teacher (no model download): each token's teacher distribution is a
# shuffled Zipf law with its own exponent, so some positions are peaked and some flat.

# %%
# without CUDA, importing `fast` sets TRITON_INTERPRET=1: its Triton kernels run in the interpreter on the CPU
import matplotlib.pyplot as plt
import numpy as np
import torch

import reference.dac_kl as R
from fast.dac_kl import DACKL, dac_kl
from fast.testing import assert_close

torch.manual_seed(0)
rng = np.random.default_rng(0)

# %% [markdown]
# ### Parameter
#
# `UPPER, LOWER` are the levels `u` and `l` of the band drawn in the next section, on one teacher row of
# V = 400 entries, under both quantile semantics.
#
# Expected effect: with `bounds="value"` the band keeps (mask above 1/2) the entries whose probability lies
# between the `l`- and `u`-quantiles of the V probabilities, so it keeps about `(u − l)(V − 1)` entries
# whatever the teacher's shape (152 at the default 0.98 and 0.6): widening `[l, u]` keeps more entries,
# moving it up keeps larger probabilities. The cell after the figure checks the count at the current levels.

# %%
UPPER, LOWER = 0.98, 0.6

# %% [markdown]
# ## A Zipf teacher
# `p_v ∝ rank(v)^(-alpha)`, alpha drawn per token in [0.8, 1.6], ranks shuffled.

# %%
N, V = 128, 400


def zipf_logits(n, v, rng):
    alpha = rng.uniform(0.8, 1.6, size=(n, 1))
    ranks = np.stack([rng.permutation(v) + 1 for _ in range(n)])
    return -alpha * np.log(ranks), alpha[:, 0]


t_np, alpha = zipf_logits(N, V, rng)
teacher = torch.tensor(t_np, dtype=torch.float32)
p = teacher.softmax(-1)
top1 = np.quantile(p.max(-1).values.numpy(), [0, 0.5, 1])
print("top-1 mass: min %.3f  median %.3f  max %.3f" % tuple(top1))

# %% [markdown]
# ## The band on one distribution, both quantile semantics
# `bounds="value"`: value quantiles of the V probabilities (the default). `bounds="mass"`: a window on the
# cumulative mass of the descending-sorted distribution. Same levels (`UPPER`, `LOWER`; by default
# `u = 0.98, l = 0.6`), very different bands: value quantiles at 0.6-0.98 sit in the *body* of the multiset
# (most of V is tail), the mass window cuts the head.

# %%
i = int(np.argmin(np.abs(alpha - 1.1)))
u, l = np.array([UPPER]), np.array([LOWER])
parts = {}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for ax, bounds in zip(axes, ["value", "mass"], strict=True):
    f = parts[bounds] = R.dac_kl_parts(t_np[i : i + 1], t_np[i : i + 1], u, l, bounds=bounds)
    order = np.argsort(-f["p"][0])
    ax.semilogy(f["p"][0][order], label="teacher p (sorted)")
    ax.semilogy(np.maximum(f["mk"][0][order] * f["p"][0][order], 1e-12), label="kept m * p")
    ax.axhline(f["tau_hi"][0], color="k", ls="--", lw=0.8)
    ax.axhline(f["tau_lo"][0], color="k", ls=":", lw=0.8)
    ax.set_ylim(1e-6, 1)
    ax.set_title(f'bounds="{bounds}": kept mass {f["kept"][0]:.2f}, {(f["m"][0] > 0.5).sum()} entries')
    ax.set_xlabel("rank")
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %%
n_kept = int((parts["value"]["m"][0] > 0.5).sum())
print(
    f"u = {UPPER}, l = {LOWER}: the value band keeps {n_kept} of {V} entries; (u - l)(V - 1) = {(UPPER - LOWER) * (V - 1):.1f}"
)
assert abs(n_kept - (UPPER - LOWER) * (V - 1)) <= 2, "a value band keeps about (u - l)(V - 1) entries"

# %% [markdown]
# A third semantics, `bounds="nontarget"` (the training default of `fast/training/distill.py`): the same
# cumulative-mass window, over the non-target entries only, at the masses `u r` and `l r` (`r = 1 - p_c`).
# The levels are then shares of the non-target mass, whatever the teacher's confidence. Below, the most
# confident row of this teacher and the same row made confident (logits x 4, as a trained byte-level teacher
# is on most tokens): the value band and the mass window (whose head is the target) change what they keep,
# the non-target window keeps a share of the non-target mass of the order of `u - l` in both.

# %%
conf = int(np.argmax(t_np.max(-1) - np.log(np.exp(t_np).sum(-1))))  # the most confident row
for sharp in (1.0, 4.0):
    row = sharp * t_np[conf : conf + 1]
    for bounds in ["value", "mass", "nontarget"]:
        f = R.dac_kl_parts(row, row, u, l, bounds=bounds)
        r = 1 - f["p"][0].max()
        print(
            f"x{sharp:.0f} {bounds:>9}: p_c = {1 - r:.4f}, kept {f['kept'][0]:.1e} = {f['kept'][0] / r:.2f} of r"
        )
        if bounds == "nontarget":
            assert f["kept"][0] / r > 0.5 * (UPPER - LOWER), "the non-target window keeps a share near u - l"
        elif sharp > 1:
            assert f["kept"][0] / r < 0.01, "on a confident row the value and mass bands keep almost nothing"

# %% [markdown]
# ## Training the sub-network (and a student) end to end
# The student is a free table of logits; the sub-network `f_sub` (top-64 sorted probabilities + entropy ->
# 2 hidden layers of 64 -> (a, b)) is trained jointly through the DAC-KL loss (the paper trains it through the loss it clips).
# We log the mean `u`, `l` and the kept teacher mass for three settings:
#
# * `value`, floor weight `lam_m = 1` (the default of `reference/dac_kl.py`): **the band collapses.** `u` and `l` both
#   run to 1,
#   the band shrinks onto the top probability values, which are the target class, excluded from the band
#   because it already has its own entry. Only the target entry is left, the normalised KL of a one-entry
#   vector is 0, and the floor's penalty (at most `rho_min = 0.5`) is cheaper than the KL it removes; once the
#   sigmoids saturate the floor has no gradient left. A degenerate optimum, not a bug of the kernel.
# * `value`, `lam_m = 10`: the floor now outweighs the KL and the band stays open (kept mass ~ `rho_min`).
# * `mass`, `lam_m = 10`: the cumulative-mass window, same floor.
#
# So the kept-mass floor (a safeguard this project adds; the paper has no such term) needs a weight comparable
# with the KL itself. The alternative: detach the mask for the student and train `f_sub` on held-out tokens.
# Worth reporting.

# %%
N_TRAIN, STEPS = 96, 80
runs = {
    "value, lam_m=1": dict(lam_m=1.0),
    "value, lam_m=10": dict(lam_m=10.0),
    "mass, lam_m=10": dict(bounds="mass", lam_m=10.0),
}


def train(cfg, steps=STEPS, seed=0):
    torch.manual_seed(seed)
    dac = DACKL(k=64, hidden=64, backend="torch", rho_min=0.5, **cfg)
    student = torch.nn.Parameter(0.3 * torch.randn(N_TRAIN, V))
    opt = torch.optim.Adam([{"params": dac.parameters(), "lr": 3e-3}, {"params": [student], "lr": 5e-2}])
    log = {"u": [], "l": [], "kept": [], "loss": []}
    for _ in range(steps):
        loss, info = dac(teacher[:N_TRAIN], student)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log["u"].append(info["upper"].mean().item())
        log["l"].append(info["lower"].mean().item())
        log["kept"].append(info["kept"].mean().item())
        log["loss"].append(loss.item())
    return dac, student, log


trained = {name: train(cfg) for name, cfg in runs.items()}

fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
for j, (name, (_, _, log)) in enumerate(trained.items()):
    axes[0].plot(log["u"], color=f"C{j}", label=f"u, {name}")
    axes[0].plot(log["l"], color=f"C{j}", ls="--", label=f"l, {name}")
    axes[1].plot(log["kept"], color=f"C{j}", label=name)
    axes[2].plot(log["loss"], color=f"C{j}", label=name)
axes[0].set_title("levels u (solid), l (dashed), mean over tokens")
axes[1].set_title("kept teacher mass (target excluded)")
axes[2].set_title("DAC-KL loss (KL + floor term)")
for ax in axes:
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
plt.tight_layout()
plt.show()
for name, (_, _, log) in trained.items():
    print(f"{name:>16}: final u {log['u'][-1]:.4f}  l {log['l'][-1]:.4f}  kept mass {log['kept'][-1]:.3f}")
final = {name: {k: v[-1] for k, v in log.items()} for name, (_, _, log) in trained.items()}
assert min(final["value, lam_m=1"]["u"], final["value, lam_m=1"]["l"]) > 0.99, "lam_m = 1: u, l run to 1"
assert final["value, lam_m=1"]["kept"] < 0.01, "lam_m = 1: the band keeps nothing"
assert final["value, lam_m=10"]["kept"] > 0.45 and final["mass, lam_m=10"]["kept"] > 0.45, "lam_m = 10: open"
dac_f, student_f, _ = trained["value, lam_m=10"]

# %% [markdown]
# ## What the learned band keeps, per token
# The sub-network sees the sorted top-64 probabilities and the entropy, so it *could* give peaked teachers
# (large alpha) and flat ones different levels. In the `value, lam_m=10` run it does not: the left panel shows
# `u ≈ 1` and `l ≈ 0` for every token, whatever its exponent, so the band spans the whole distribution (value
# levels 0 and 1 are the smallest and the largest probability). The kept mass (right) does fall with alpha,
# but that is the teacher's shape, not the band: the fixed band `u = 1, l = 0` keeps the same mass to within
# 1e-4 (checked below). It stays well under `1 −` (top-1 mass) because the sigmoid edges are
# `gamma (tau_hi − tau_lo)` wide: the many tail entries near the smallest probability get a weight of about 1/2.

# %%
with torch.no_grad():
    up, lo = dac_f.bounds(teacher[:N_TRAIN])
    _, kept, _ = dac_kl(teacher[:N_TRAIN], student_f.detach(), up, lo, backend="torch", lam_m=10.0)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
a_tr = alpha[:N_TRAIN]
axes[0].scatter(a_tr, up.numpy(), s=6, label="u")
axes[0].scatter(a_tr, lo.numpy(), s=6, label="l")
axes[0].set_xlabel("Zipf exponent alpha")
axes[0].legend()
axes[1].scatter(a_tr, kept.numpy(), s=6)
axes[1].set_xlabel("Zipf exponent alpha")
axes[1].set_ylabel("kept mass (target excluded)")
plt.tight_layout()
plt.show()
with torch.no_grad():
    ones, zeros = torch.ones(N_TRAIN), torch.zeros(N_TRAIN)
    _, kept_fixed, _ = dac_kl(teacher[:N_TRAIN], student_f.detach(), ones, zeros, backend="torch", lam_m=10.0)
gap = float((kept - kept_fixed).abs().max())
print(f"learned u in [{up.min():.5f}, {up.max():.5f}], l in [{lo.min():.5f}, {lo.max():.5f}]")
print(f"max |kept mass, learned band - fixed band u = 1, l = 0| = {gap:.1e}")
assert up.min() > 0.99 and lo.max() < 0.01, "the learned band is the whole distribution for every token"
assert gap < 1e-4, "its kept mass is the fixed full band's"

# %% [markdown]
# ## How the kernel finds a threshold without sorting
#
# A value quantile needs one or two order statistics, not the whole order. Since
# $p_v = \exp((t_v - \max t) - \log z)$ is non-decreasing in the teacher logit $t_v$, the $k$-th smallest
# probability (0-based) is exp of the $k$-th smallest logit, and the kernel (`fast/dac_kl.py`,
# `bounds="value"`) selects among the fp32 *logits* with integer work only, no `exp`. Each logit becomes an
# int32 key whose signed order is the value order (`_order_key`: the bit pattern itself for $t \ge +0$, the
# pattern with its 31 low bits inverted for $t \le -0$). A **radix select** then fixes the key one byte at a
# time: the first pass over $V$ (the log-sum-exp pass) also builds a 256-bin histogram of the keys' top bytes
# (`tl.histogram`); its cumulative counts say which bucket holds rank $k$ and the rank inside that bucket
# (`_radix_pick`); each of three more passes histograms the next byte of the keys that share the bytes chosen
# so far. After four bytes the key, hence the logit, is exact; the last pass also gives the next order
# statistic, for the linear interpolation $Q = s_k + \text{frac}\,(s_{k+1} - s_k)$, $\text{idx} =
# \text{level}\,(n - 1)$, done on the probabilities. Both thresholds share the passes: 5 passes over $V$
# with the final sums. (`bounds="mass"` still bisects: the mass above a candidate is a sum of probabilities,
# not a count, so it takes 31 passes, each with an `exp`, plus one.) Replayed in NumPy on one row and compared
# with `np.quantile`:

# %%
x32 = teacher[i].numpy().astype(np.float32)  # [V] fp32 teacher logits, as the kernel loads them


def order_key(x):  # [V] fp32 -> [V] int64 holding the kernel's int32 keys (_order_key)
    b = x.view(np.int32).astype(np.int64)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def key_value(key):  # the inverse (_key_value): one key -> its fp32 value
    b = np.array([key ^ ((key >> 31) & 0x7FFFFFFF)], dtype=np.int64).astype(np.int32)
    return b.view(np.float32)[0]


def radix_select(keys, k):  # [V] keys, rank k -> (key of rank k, entries left in its bucket after each pass)
    prefix, r, left = 0, k, []
    for sh in (24, 16, 8, 0):
        same = keys if sh == 24 else keys[(keys >> (sh + 8)) == (prefix >> (sh + 8))]  # bytes so far agree
        digit = (same >> sh) & 255
        if sh == 24:
            digit = digit ^ 128  # the top byte holds the sign: flipping its high bit puts negative keys first
        hist = np.bincount(digit, minlength=256)  # tl.histogram
        d = int((np.cumsum(hist) <= r).sum())  # the bucket that holds rank r (_radix_pick)
        r -= int(hist[:d].sum())  # the rank inside that bucket
        left.append(int(hist[d]))
        top = d ^ 128
        prefix += ((top - 256 if top >= 128 else top) if sh == 24 else d) << sh  # signed int32 key
    return prefix, left


keys = order_key(x32)  # [V]
assert (np.argsort(keys, kind="stable") == np.argsort(x32, kind="stable")).all(), "keys order like values"
mt = x32.max()
lz = np.log(np.exp(x32 - mt).sum(dtype=np.float32))
p_of = lambda t: np.float32(np.exp((t - mt) - lz))  # the kernel's p from a logit, fp32
lefts = {}
for level in (LOWER, UPPER):
    idx_f = level * (V - 1)
    k = int(np.floor(idx_f))
    key_k, lefts[level] = radix_select(keys, k)
    s_k = key_value(key_k)
    assert s_k == np.sort(x32)[k], "four byte passes land exactly on the k-th smallest logit"
    s_next = key_value(radix_select(keys, min(k + 1, V - 1))[0])  # the kernel reads it off the last pass
    tau = float(p_of(s_k)) + (idx_f - k) * (float(p_of(s_next)) - float(p_of(s_k)))
    want = np.quantile(torch.softmax(teacher[i].double(), -1).numpy(), level)  # numpy's 'linear' method
    assert_close(tau, want, dtype="float32", name=f"quantile {level}")
    print(
        f"level {level}: k = {k}, entries left in the chosen bucket after passes 1-4: {lefts[level]}; "
        f"tau = {tau:.6e}, np.quantile = {want:.6e}"
    )
plt.figure(figsize=(5, 2.6))
for level, left in lefts.items():
    plt.semilogy(range(5), [V, *left], "o-", ms=3, label=f"level {level}")
plt.xticks(range(5), ["start", "byte 1", "byte 2", "byte 3", "byte 4"])
plt.ylabel("candidate logits left")
plt.title(f"radix select over V = {V} logits")
plt.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Correctness on an odd shape: Triton kernel vs torch backend vs NumPy oracle
# $N = 3$ rows, $V = 77$ (not a power of two). Under `TRITON_INTERPRET=1` the kernel runs on the CPU, so the
# shape is tiny. Compared against `reference/dac_kl.py`: the loss per row and **every gradient** of
# $\sum_i g_i\,\text{loss}_i$ with a random cotangent $g$ ($g \ne 1$): the student logits, and the two
# levels `upper`, `lower` through the thresholds (the gradient that trains the bounds sub-network).

# %%
t_s = teacher[:3, :77].contiguous()
s_s = (0.5 * torch.randn(3, 77)).requires_grad_()
u_s = torch.tensor([0.9, 0.8, 0.95], requires_grad=True)
l_s = torch.tensor([0.2, 0.5, 0.05], requires_grad=True)
g_s = torch.tensor([0.7, -1.3, 2.1])  # grad_output != 1
args = (
    t_s.double().numpy(),
    s_s.detach().double().numpy(),
    u_s.detach().double().numpy(),
    l_s.detach().double().numpy(),
)
for bounds in ("value", "mass"):
    ref = R.dac_kl(*args, bounds=bounds)  # [3]
    rds, rdu, rdl = R.dac_kl_grad(*args, g=g_s.double().numpy(), bounds=bounds)  # [3, 77], [3], [3]
    for be in ("torch", "triton"):
        s_s.grad = u_s.grad = l_s.grad = None
        # the interpreter evaluates both branches of every tl.where with NumPy, so discarded lanes (padding
        # beyond V = 77, -inf logits) compute exp overflows and -inf - (-inf) and NumPy warns; the where drops
        # them, and the checks below would catch a NaN or inf that leaked into a result
        with np.errstate(over="ignore", invalid="ignore"):
            loss, kept, _ = dac_kl(t_s, s_s, u_s, l_s, backend=be, bounds=bounds)
            loss.backward(g_s)
        assert_close(loss, ref, dtype=torch.float32, name=f"{be} {bounds} loss")
        assert_close(s_s.grad, rds, dtype=torch.float32, name=f"{be} {bounds} d student")
        assert_close(u_s.grad, rdu, dtype=torch.float32, name=f"{be} {bounds} d upper")
        assert_close(l_s.grad, rdl, dtype=torch.float32, name=f"{be} {bounds} d lower")
    print(
        f"{bounds}: loss {ref.round(4)}, d upper {rdu.round(4)}, d lower {rdl.round(4)}: "
        "torch and triton match the oracle (loss, d student, d upper, d lower)"
    )

# %% [markdown]
# ## Timing
#
# On a CPU: the torch backend beside the NumPy oracle (the readable version), forward + backward through the
# student logits; on CUDA the Triton kernel too. The GPU rows are a committed measurement on one H200
# (`benchmarks/results/mgsr_losses_h200.md`) of the *first* DAC-KL kernel, which still bisected the value
# bounds: the radix-select kernel above has not been timed on a GPU yet (`docs/kernels.md`).
# `benchmarks/mgsr_losses.py` is the full benchmark.

# %%
from fast.utils import committed_rows, median_ms  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
rng_t = np.random.default_rng(5)
t_np = rng_t.normal(size=(64, 1024)) * 3
s_np = rng_t.normal(size=(64, 1024)) * 3
up_np, lo_np = np.full(64, 0.9), np.full(64, 0.2)
t_b = torch.tensor(t_np, dtype=torch.float32, device=dev)
s_b = torch.tensor(s_np, dtype=torch.float32, device=dev, requires_grad=True)
up_b, lo_b = torch.tensor(up_np, device=dev), torch.tensor(lo_np, device=dev)
impls = {
    "NumPy oracle (fwd+bwd)": lambda: R.dac_kl_grad(t_np, s_np, up_np, lo_np),
    "torch backend": lambda: dac_kl(t_b, s_b, up_b, lo_b, backend="torch")[0].sum().backward(),
}
if torch.cuda.is_available():
    impls["triton"] = lambda: dac_kl(t_b, s_b, up_b, lo_b, backend="triton")[0].sum().backward()
for label, fn in impls.items():
    print(f"DAC-KL, N=64 V=1024 on {dev}: {label:24s} {median_ms(fn, reps=1):8.1f} ms")
MGSR_H200 = "../benchmarks/results/mgsr_losses_h200.md"
print(
    "\ncommitted: one NVIDIA H200 (torch 2.11, triton 3.6), bf16, the first DAC-KL kernel (value bounds by"
    " bisection, 28 November 2026),\nolder than this code: the radix-select kernel is not yet timed on a GPU"
)
print(
    "\n".join(committed_rows(MGSR_H200, "op")[:1] + committed_rows(MGSR_H200, "dac_kl fwd+bwd (value)")[:2])
)
