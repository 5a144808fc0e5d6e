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
# the Triton kernel's threshold search (31 bisection steps on the fp32 bit pattern) replayed in NumPy →
# kernel vs torch vs oracle on an odd shape, every gradient included.
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
# cumulative mass of the descending-sorted distribution. Same levels `u = 0.98, l = 0.6`, very different
# bands: value quantiles at 0.6-0.98 sit in the *body* of the multiset (most of V is tail), the mass window
# cuts the head.

# %%
i = int(np.argmin(np.abs(alpha - 1.1)))
u, l = np.array([0.98]), np.array([0.6])
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for ax, bounds in zip(axes, ["value", "mass"], strict=True):
    f = R.dac_kl_parts(t_np[i : i + 1], t_np[i : i + 1], u, l, bounds=bounds)
    order = np.argsort(-f["p"][0])
    ax.semilogy(f["p"][0][order], label="teacher p (sorted)")
    ax.semilogy(np.maximum(f["mk"][0][order] * f["p"][0][order], 1e-12), label="kept m * p")
    ax.axhline(f["tau_hi"][0], color="k", ls="--", lw=0.8)
    ax.axhline(f["tau_lo"][0], color="k", ls=":", lw=0.8)
    ax.set_ylim(1e-6, 1)
    ax.set_title(f'bounds="{bounds}": kept mass {f["kept"][0]:.2f}')
    ax.set_xlabel("rank")
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

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
dac_f, student_f, _ = trained["value, lam_m=10"]

# %% [markdown]
# ## What the learned band keeps, per token
# Peaked teachers (large alpha) and flat ones get different levels: the sub-network sees the sorted top-k
# probabilities and the entropy, so it can adapt the band to the shape.

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

# %% [markdown]
# ## How the kernel finds a threshold without sorting
#
# A value quantile needs one or two order statistics, not the whole order. For non-negative fp32 numbers the
# bit pattern read as an int32 orders exactly like the value, so the $k$-th smallest probability (0-based) is
# the smallest bit pattern $b$ with $\#\{v : \text{bits}(p_v) \le b\} \ge k + 1$. The count is monotone in
# $b$, so bisection on the integer range $[0, \text{bits}(1.0)] = [0, \texttt{0x3F800000}]$ finds it; that
# range holds about $1.07\cdot 10^9 < 2^{31}$ integers, so **31 steps** give the exact answer. The kernel does
# one streaming pass over $V$ per step (the count), both thresholds in the same pass; a last pass finds the
# next larger value for the linear interpolation $Q = s_k + \text{frac}\,(s_{k+1} - s_k)$,
# $\text{idx} = \text{level}\,(n - 1)$. Replayed in NumPy on one row and compared with `np.quantile`:

# %%
p32 = torch.softmax(teacher[i], -1).numpy().astype(np.float32)  # [V] fp32, as in the kernel
bits = p32.view(np.int32)  # [V] the bit patterns; monotone in the value for p >= 0
assert (np.argsort(bits, kind="stable") == np.argsort(p32, kind="stable")).all()


def kth_smallest_by_bisection(bits, k, steps=31):  # [V] int32, int -> int32 bit pattern, widths per step
    lo, hi, widths = 0, 0x3F800000, []
    for _ in range(steps):
        mid = lo + ((hi - lo) >> 1)
        if (bits <= mid).sum() >= k + 1:  # one pass over V: the count at or below the candidate
            hi = mid
        else:
            lo = mid + 1
        widths.append(hi - lo)
    return np.int32(hi), widths


for level in (0.6, 0.98):
    idx_f = level * (V - 1)
    k = int(np.floor(idx_f))
    b_k, widths = kth_smallest_by_bisection(bits, k)
    s_k = np.array(b_k, dtype=np.int32).view(np.float32)  # back to a float
    s_next = p32[p32 > s_k].min() if (p32 > s_k).any() else s_k  # the kernel's extra pass
    assert s_k == np.sort(p32)[k], "bisection must land exactly on the k-th order statistic"
    tau = float(s_k) + (idx_f - k) * (float(s_next) - float(s_k))
    want = np.quantile(p32.astype(np.float64), level)  # numpy's default 'linear' method
    assert_close(tau, want, dtype="float64", name=f"quantile {level}")
    print(
        f"level {level}: k = {k}, interval width after steps 1, 10, 20, 31: "
        f"{[widths[j] for j in (0, 9, 19, 30)]}; tau = {tau:.6e}, np.quantile = {want:.6e}"
    )
plt.figure(figsize=(5, 2.6))
plt.semilogy(np.arange(1, 32), np.maximum(widths, 0.5), "o-", ms=3)
plt.xlabel("bisection step")
plt.ylabel("bit patterns left (0 shown as 0.5)")
plt.title("31 halvings of [0, bits(1.0)]")
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
# student logits; on CUDA the Triton kernel too. The GPU rows are the committed measurement on one H200
# (`benchmarks/results/mgsr_losses_h200.md`; `benchmarks/mgsr_losses.py` is the full benchmark).

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
print("\ncommitted, one H200, bf16:")
print("\n".join(committed_rows("../benchmarks/results/mgsr_losses_h200.md", "dac_kl fwd+bwd (value)")[:2]))
