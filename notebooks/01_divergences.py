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
# # 01 · Token-level distillation divergences
#
# The losses of MGSR's token level (*Multi-Granularity Semantic Revision for LLM distillation*, arXiv
# 2407.10068) and of its baselines; the skew KLs are DistiLLM's (arXiv 2402.03898).
#
# A teacher gives a distribution `p = softmax(t/τ)` over the vocabulary at every token, the student
# `q = softmax(s/τ)`. Distillation minimises a divergence between them. This notebook covers:
#
# 1. **mode covering vs mode seeking**: a unimodal student fitted to a bimodal teacher with each divergence;
# 2. **the gradients**, derived by hand and checked against finite differences;
# 3. **the Triton kernel**, walked through with its memory traffic counted;
# 4. **an odd-shape check** of the kernel (interpreted on CPU) against the NumPy oracle.
#
# Code: `reference/divergences.py` (NumPy, float64, the definitions) and `fast/divergences.py` (torch + Triton).
# Conventions (all tested): KL is KL, not soft cross-entropy; **no τ² factor**; −inf marks a padded vocabulary
# entry shared by teacher and student and contributes exactly 0; mixtures are formed in log space.

# %%
# without CUDA, importing `fast` sets TRITON_INTERPRET=1: its Triton kernels run in the interpreter on the CPU
import os
import time

import matplotlib
import torch

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fast.divergences import divergence  # noqa: E402
from fast.testing import assert_close, central_difference  # noqa: E402
from reference import divergences as R  # noqa: E402

NAMES = list(R.DIVERGENCES)
T0 = time.perf_counter()
print("Triton interpreter:", os.environ.get("TRITON_INTERPRET") == "1")

# %% [markdown]
# ### Parameter
#
# `TEMPERATURE` (τ) divides both the teacher's and the student's logits in every fit of section 1.
#
# Expected effect: τ flattens the teacher, `p ∝ p₁^(1/τ)` with `p₁` its τ = 1 distribution, and fills the
# valley between its two modes, so covering both costs reverse KL less and less. (The student's family does not
# change: a Gaussian logit divided by τ is a wider Gaussian.) For this teacher, reverse KL's best unimodal fit
# (the lower loss of two fits, one started between the modes, one at the heavier mode) seeks one mode up to
# τ ≈ 3 and covers both from τ ≈ 4 on. The cell after the figure checks this at the current value. The
# readings of the figure in the text are for the default τ = 1.

# %%
TEMPERATURE = 1.0

# %% [markdown]
# ## 1. Mode covering vs mode seeking
#
# The teacher has two modes (weights 0.6 / 0.4). The student can only be one discretised Gaussian
# (two parameters: centre and width), so it cannot match the teacher and each divergence decides what to give up:
#
# * **forward KL** `Σ p log(p/q)` is infinite-ish wherever `p > 0` and `q ≈ 0`: the student must *cover* every mode;
# * **reverse KL** `Σ q log(q/p)` is infinite-ish wherever `q > 0` and `p ≈ 0`: the student must avoid the valley
#   between the modes, so it *seeks* one mode;
# * JSD, TV and the skew KLs can end either way: each has a covering and a mode-seeking minimum.
#
# Every fit in the figure starts from the same point, a wide Gaussian centred between the modes (centre
# 0.45 V, width 0.2 V). From there reverse KL still runs to a mode, but JSD, TV and both skew KLs settle on a
# covering fit that lies on forward KL's (the right panel against the left). That shows the starting point,
# not the divergence: the cell after the figure starts the same four at the heavier mode, where each settles
# on a mode-seeking fit with a *lower* loss than its covering one.

# %%
V = 64
x = torch.arange(V, dtype=torch.float32)


def bump(c, w):
    return torch.exp(-0.5 * ((x - c) / w) ** 2)


p_teacher = 0.6 * bump(V * 0.25, V / 24) + 0.4 * bump(V * 0.75, V / 24) + 1e-6
teacher = (p_teacher / p_teacher.sum()).log()[None]  # [1, V] teacher logits


BETWEEN, HEAVY = (0.45, 0.2), (0.25, 0.05)  # starting (centre, width) in units of V


def fit(name, start=BETWEEN, steps=200, lr=0.05, **params):  # -> (student distribution [V], final loss)
    centre = torch.tensor(start[0], requires_grad=True)  # units of V
    log_width = torch.tensor(np.log(start[1]), dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([centre, log_width], lr=lr)

    def student():
        return (-0.5 * ((x / V - centre) / log_width.exp()) ** 2)[None]  # [1, V] logits

    def loss():
        return divergence(name, teacher, student(), backend="torch", temperature=TEMPERATURE, **params)

    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        return torch.softmax(student() / TEMPERATURE, -1)[0], float(loss())


def minority(q):  # the mass on the lighter side of the valley: ~0 for a mode-seeking fit
    return min(float(q[: V // 2].sum()), float(q[V // 2 :].sum()))


fits, losses = {}, {}
for name in NAMES:
    fits[name], losses[name] = fit(name)

fig, axes = plt.subplots(1, 2, figsize=(12, 3.5), sharey=True)
p_plot = torch.softmax(teacher / TEMPERATURE, -1)[0]
GROUPS = [
    ["forward_kl", "reverse_kl", "symmetric_kl"],
    ["js_divergence", "tv_distance", "skew_forward_kl", "skew_reverse_kl"],
]
for ax, group in zip(axes, GROUPS, strict=True):
    ax.fill_between(x, p_plot, color="lightgray", label="teacher p")
    for name in group:
        ax.plot(x, fits[name], label=name)
    ax.set_xlabel("token id")
    ax.legend(fontsize=8)
axes[0].set_ylabel("probability")
fig.suptitle(
    f"A unimodal student fitted to a bimodal teacher (τ = {TEMPERATURE:g}, every fit started between the modes)"
)
plt.show()

for name, q in fits.items():
    left, right = float(q[: V // 2].sum()), float(q[V // 2 :].sum())
    print(f"{name:16s} mass left {left:.3f}  right {right:.3f}  loss {losses[name]:.4f}")
assert minority(fits["forward_kl"]) > 0.2, "forward KL covers both modes"

# %% [markdown]
# The same four divergences started at the heavier mode (centre 0.25 V, width 0.05 V), beside their fits above:

# %%
FOUR = ["js_divergence", "tv_distance", "skew_forward_kl", "skew_reverse_kl"]
from_mode = {name: fit(name, start=HEAVY) for name in FOUR}
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.fill_between(x, p_plot, color="lightgray", label="teacher p")
for j, name in enumerate(FOUR):
    q_m, loss_m = from_mode[name]
    ax.plot(x, q_m, color=f"C{j + 3}", label=f"{name} (loss {loss_m:.3f} vs {losses[name]:.3f} between)")
ax.set_xlabel("token id")
ax.set_ylabel("probability")
ax.set_title("started at the heavier mode")
ax.legend(fontsize=8)
plt.show()
for name in FOUR:
    q_m, loss_m = from_mode[name]
    print(
        f"{name:16s} started between: minority mass {minority(fits[name]):.3f}, loss {losses[name]:.4f};"
        f"  at the mode: minority mass {minority(q_m):.3f}, loss {loss_m:.4f}"
    )
if TEMPERATURE == 1.0:  # the reading of the text, made at the default temperature
    fwd_left = float(fits["forward_kl"][: V // 2].sum())
    for name in FOUR:
        assert abs(float(fits[name][: V // 2].sum()) - fwd_left) < 0.05, (
            f"{name} between: on forward KL's fit"
        )
        assert minority(from_mode[name][0]) < 0.02, f"{name} from the mode: mode-seeking"
        assert from_mode[name][1] < losses[name], f"{name}: the mode-seeking fit has the lower loss"
    assert minority(fits["reverse_kl"]) < 0.02, "reverse KL seeks a mode even from between the modes"

# %% [markdown]
# The parameter's claim, reverse KL's best fit at the current τ:

# %%
rk = {"between": (fits["reverse_kl"], losses["reverse_kl"]), "at the mode": fit("reverse_kl", start=HEAVY)}
best = min(rk, key=lambda k: rk[k][1])
print(
    f"τ = {TEMPERATURE:g}: reverse KL "
    + ", ".join(f"started {k}: loss {lq:.4f}, minority mass {minority(q):.3f}" for k, (q, lq) in rk.items())
    + f"; best: started {best}"
)
if TEMPERATURE <= 3:
    assert minority(rk[best][0]) < 0.02, "reverse KL's best fit should seek one mode"
elif TEMPERATURE >= 4:
    assert minority(rk[best][0]) > 0.3, "reverse KL's best fit should cover both modes"
else:
    print("3 < τ < 4: near the switch, no claim")

# %% [markdown]
# ## 2. The gradients, derived and checked
#
# Write `b = s/τ`, so `q = softmax(b)` and `∂q_v/∂b_k = q_v(δ_vk − q_k)`. For any loss `L(q)` with
# `g_v = ∂L/∂q_v`, the chain rule gives the **softmax VJP**
#
# $$\frac{\partial L}{\partial b_k} = q_k\Big(g_k - \sum_v q_v g_v\Big), \qquad \frac{\partial L}{\partial s} = \frac1\tau \frac{\partial L}{\partial b}.$$
#
# * forward KL: `g = −p/q` → `∂L/∂b = q − p`.
# * reverse KL: `g = log q − log p + 1`; the constant cancels → `∂L/∂b = q ⊙ (log q − log p − KL(q‖p))`.
#   The kernel needs the *row scalar* `KL(q‖p)`, which is why the forward saves it.
# * JSD(β), `m = βp + (1−β)q`: `g = (1−β)(log q − log m)` (the `±1` terms cancel because `Σm = 1`).
# * TV: `g = ½ sign(q − p)` (a subgradient at ties).
# * skew KLs: see `reference/divergences.py`. As α → 1 both gradients are small differences of `O(q)` terms;
#   the fast path rewrites them (e.g. `q/m − 1 = (1−α)(q−p)/m` for skew reverse KL) so that those `O(q)` parts
#   cancel *on paper*, not in fp32, where they would cost a factor 1/(1−α) in relative accuracy.
#
# Check each hand-derived gradient against central finite differences in float64:

# %%
rng = np.random.default_rng(0)
t_np, s_np = rng.normal(size=(3, 9)) * 2, rng.normal(size=(3, 9)) * 2
t_np[:, 4] = s_np[:, 4] = -np.inf  # a padded vocabulary entry


def fd_grad(f, t, s, **kw):
    """d loss_i / d s_ij by central differences (step 1e-6): `central_difference` moves one logit at a time
    (a -inf padded entry stays put and gets 0) and returns the Jacobian [n, n, V]; row i's loss depends
    on row i's logits only, so the gradient is its diagonal blocks [n, V]."""
    jac = central_difference(lambda x: f(t, x, **kw), s)
    return jac[np.arange(len(s)), np.arange(len(s))]


print(f"{'divergence':16s} {'τ':>4s}  max |analytic − finite difference|")
for name, (f, g) in R.DIVERGENCES.items():
    for tau in (0.5, 2.0):
        kw = {k: 0.3 for k in R.PARAMS[name]}
        err = np.abs(
            g(t_np, s_np, temperature=tau, **kw) - fd_grad(f, t_np, s_np, temperature=tau, **kw)
        ).max()
        print(f"{name:16s} {tau:4.1f}  {err:.2e}")
        assert err < 1e-7

# %% [markdown]
# ## 3. The Triton kernel, walked through
#
# `divergence_fwd_kernel` runs **one program per row** (token) and streams the vocabulary in chunks of `BLOCK_V`:
#
# 1. **pass 1** keeps a running max and a rescaled sum (online log-sum-exp) of `t/τ` and `s/τ`, and ORs the
#    input checks (NaN/+inf, unshared −inf, all −inf) into a status word. It stores the *raw* max and `log z`,
#    so that later `log p = (t − max t)/τ − log z`: no large `lse = max + log z` is ever rounded to its own ulp;
# 2. **pass 2** re-reads both rows and accumulates the loss and one or two row scalars the gradient needs
#    (`KL(q‖p)` for reverse KL, `Σ q·½sign(q−p)` for TV, ...).
#
# `divergence_bwd_kernel` makes **one pass**: it recomputes `log p, log q` chunk by chunk from the six saved
# row scalars and writes `grad_output/τ · ∂L/∂b` straight into the gradient. No `[N, V]` temporary exists
# besides the gradient itself. Here is the heart of pass 1:

# %%
import inspect  # noqa: E402

from fast import divergences as Fd  # noqa: E402

src = inspect.getsource(Fd.divergence_fwd_kernel.fn)
start = src.index("# ---- pass 1")
print(src[start : src.index("# ---- pass 2")])

# %% [markdown]
# **Pass 2 and the backward: where each divergence lives.** Pass 1 is the same for every divergence; the
# divergence is chosen by the compile-time constant `DIV` in pass 2 (the loss and the row scalars `c0`, `c1`)
# and in the backward (the line that writes $\partial L/\partial b$). Both branches, from the kernel source:

# %%
fwd_src = src[src.index("# ---- pass 2") :]
print(fwd_src[: fwd_src.index("tl.store(LOSS")])
bwd_src = inspect.getsource(Fd.divergence_bwd_kernel.fn)
print(bwd_src[bwd_src.index("# ∂L/∂b") : bwd_src.index("g = tl.where(valid, g, 0.0)")])

# %% [markdown]
# Each branch replayed in NumPy, line for line (`log_w`, `log_1mw` are $\log w$, $\log(1-w)$ of the mixture
# weight, β for JSD and α for the skew KLs): pass 2 gives the loss and the row scalars from the pass-1
# statistics; the backward rebuilds $\partial L/\partial b$ from those six numbers alone, and
# $\partial L/\partial s = \frac1\tau\,\partial L/\partial b$. Both are compared with the oracle, on the
# rows of section 2 (which hold a padded −inf entry), at τ = 2.


# %%
def lae(x, y):  # log(e^x + e^y) with -inf allowed
    return np.logaddexp(x, y)


def kernel_replay(name, t, s, tau, w=None):  # [N, V] x2 -> loss [N], dL/ds [N, V]
    code = NAMES.index(name)
    valid = t != -np.inf
    log_w = np.log(w) if w else -np.inf
    log_1mw = np.log1p(-w) if w is not None and w < 1 else -np.inf
    ma, mb = t.max(-1, keepdims=True), s.max(-1, keepdims=True)  # pass 1 (raw max, log z)
    lza = np.log(np.exp((t - ma) / tau).sum(-1, keepdims=True))
    lzb = np.log(np.exp((s - mb) / tau).sum(-1, keepdims=True))
    lp = np.where(valid, (t - ma) / tau - lza, 0.0)
    lq = np.where(valid, (s - mb) / tau - lzb, 0.0)
    p, q = np.where(valid, np.exp(lp), 0.0), np.where(valid, np.exp(lq), 0.0)
    c1 = 0.0
    if code == 0:  # forward KL
        loss = (p * (lp - lq)).sum(-1)
        g = q - p
    elif code in (1, 2):  # reverse KL, symmetric KL
        c0 = (q * (lq - lp)).sum(-1, keepdims=True)
        loss = c0[:, 0] + ((p * (lp - lq)).sum(-1) if code == 2 else 0.0)
        g = q * (lq - lp - c0) + ((q - p) if code == 2 else 0.0)
    elif code == 3:  # JSD(β)
        lm = lae(log_w + lp, log_1mw + lq)
        acc, c0 = (p * (lp - lm)).sum(-1), (q * (lq - lm)).sum(-1, keepdims=True)
        loss = np.exp(log_w) * acc + np.exp(log_1mw) * c0[:, 0]
        g = np.exp(log_1mw) * q * (lq - lm - c0)
    elif code == 4:  # TV
        sgn = np.where(q > p, 0.5, np.where(q < p, -0.5, 0.0))
        loss, c0 = (0.5 * np.abs(p - q)).sum(-1), (q * sgn).sum(-1, keepdims=True)
        g = q * (sgn - c0)
    elif code == 5:  # skew forward KL
        lm = lae(log_w + lp, log_1mw + lq)
        k = np.where(valid, np.exp(lq - lm) * (p - q), 0.0)
        loss, c0 = (p * (lp - lm)).sum(-1), k.sum(-1, keepdims=True)
        g = -np.exp(2.0 * log_1mw) * (k - q * c0)
    else:  # skew reverse KL
        lm = lae(log_w + lq, log_1mw + lp)
        h = np.where(valid, np.exp(lq - lm) * (q - p), 0.0)
        c0, c1 = (q * (lq - lm)).sum(-1, keepdims=True), h.sum(-1, keepdims=True)
        loss = c0[:, 0]
        g = q * (lq - lm - c0) - np.exp(log_w + log_1mw) * (h - q * c1)
    return loss, np.where(valid, g, 0.0) / tau


for name in NAMES:
    kw = {k: 0.3 for k in R.PARAMS[name]}
    with np.errstate(invalid="ignore", divide="ignore"):  # -inf - -inf on the padded entry, then masked
        loss_r, grad_r = kernel_replay(name, t_np, s_np, 2.0, w=next(iter(kw.values()), None))
    f, g = R.DIVERGENCES[name]
    assert_close(loss_r, f(t_np, s_np, temperature=2.0, **kw), dtype="float64", name=f"{name} replay loss")
    assert_close(grad_r, g(t_np, s_np, temperature=2.0, **kw), dtype="float64", name=f"{name} replay grad")
    print(f"{name:16s} pass 2 + backward replayed = oracle (loss and gradient)")

# %% [markdown]
# **Memory traffic.** Per row of `V` logits in `b` bytes each (bf16: 2), counting HBM reads and writes:
#
# | step | kernel (fwd + bwd) | a straightforward PyTorch version |
# |---|---|---|
# | forward | read t, s twice: `4V·b` | `log_softmax` ×2 (read `2V·b`, write `2V·4`), then the loss terms (read `2V·4` + fp32 temporaries) |
# | backward | read t, s once, write grad: `3V·b` | autograd re-reads the saved `[N, V]` fp32 log-probs and temporaries, writes grad |
# | saved between them | `6` fp32 per row | `≥ 2V` fp32 per row (`log p`, `log q`) |
#
# At the benchmark's largest size the difference is what decides whether the loss fits at all:

# %%
for N, V_big in [(4096, 32000), (16384, 128256)]:
    b = 2  # bf16 logits
    kernel_bytes = (4 + 3) * N * V_big * b  # fwd reads t, s twice; bwd reads t, s and writes grad
    saved_torch = 2 * N * V_big * 4  # log p, log q in fp32 kept for autograd
    print(
        f"N={N:6d} V={V_big:6d}: kernel moves {kernel_bytes / 2**30:6.2f} GiB; "
        f"the inputs alone are {2 * N * V_big * b / 2**30:5.2f} GiB; a naive torch autograd graph keeps "
        f"≥ {saved_torch / 2**30:5.2f} GiB of fp32 log-probs between forward and backward (kernel: "
        f"{N * 6 * 4 / 2**20:.2f} MiB)"
    )

# %% [markdown]
# ## 4. An odd shape against the oracle
#
# 19 tokens × a vocabulary of 1 271 (not a power of two), a vocabulary chunk of 256 (so five chunks with a
# ragged tail), padded entries, a mask, temperature 2, and bf16 inputs. On CPU the kernel runs in the
# Triton interpreter; outputs are compared with the float64 oracle fed the *same bf16-rounded* inputs.

# %%
rng = np.random.default_rng(1)
N_odd, V_odd = 19, 1271
t_odd = torch.tensor(rng.normal(size=(N_odd, V_odd)) * 4.0, dtype=torch.bfloat16)
s_odd = torch.tensor(rng.normal(size=(N_odd, V_odd)) * 4.0, dtype=torch.bfloat16)
t_odd[:, 1000:] = s_odd[:, 1000:] = float("-inf")  # a padded tail of the vocabulary
keep = torch.tensor(rng.random(N_odd) < 0.8)
device = "cuda" if torch.cuda.is_available() else "cpu"

for name in NAMES:
    kw = {k: 0.3 for k in R.PARAMS[name]}
    s_in = s_odd.to(device).clone().requires_grad_(True)
    loss = divergence(
        name,
        t_odd.to(device),
        s_in,
        mask=keep.to(device),
        reduction="sum",
        temperature=2.0,
        backend="triton",
        block_v=256,
        **kw,
    )
    loss.backward()
    tr, sr = t_odd.double().numpy(), s_odd.double().numpy()
    k = keep.numpy()
    want = R.DIVERGENCES[name][0](tr[k], sr[k], temperature=2.0, **kw).sum()
    want_grad = np.zeros_like(sr)
    want_grad[k] = R.DIVERGENCES[name][1](tr[k], sr[k], temperature=2.0, **kw)
    got_grad = s_in.grad.double().cpu().numpy()
    if name == "tv_distance":  # sign(q − p) at fp32 ties: compare the unambiguous entries only
        lp, lq = R.log_softmax(tr / 2.0), R.log_softmax(sr / 2.0)
        amb = np.abs(np.exp(lp) - np.exp(lq)) <= 1e-5 * (np.exp(lp) + np.exp(lq))
        got_grad, want_grad = np.where(amb, 0, got_grad), np.where(amb, 0, want_grad)
    s_loss = assert_close(loss.detach(), np.array(want), dtype="bfloat16", name=f"{name} loss")
    s_grad = assert_close(got_grad, want_grad, dtype="bfloat16", name=f"{name} grad")
    print(
        f"{name:16s} loss {float(loss):10.4f}  max|Δloss| {s_loss['max_abs']:.1e}  "
        f"grad rel-RMS {s_grad['rel_rms']:.1e}"
    )


# %% [markdown]
# ## Would the test catch a wrong kernel?
#
# A check is only worth something if it fails on a wrong kernel. So plant a bug: copy `fast/divergences.py`,
# change one line of the Triton kernel's pass 2 (forward KL weighted by the *student* `q` instead of the teacher
# `p`, a slip that still gives a finite, plausible-looking number), load the copy as a module of its own, and run
# exactly the comparison the tests make. The real kernel passes; the planted one is caught. `make mutants` does
# this for a curated list of such bugs across every kernel, oracle and the trainer (CONTRIBUTING.md).

# %%
import importlib.util  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402

good_line = "                acc += p * (lp - lq)\n            elif DIV == 1:"
bad_line = "                acc += q * (lp - lq)\n            elif DIV == 1:"
src = inspect.getsource(Fd)
assert src.count(good_line) == 1
mutant_path = pathlib.Path(tempfile.mkdtemp()) / "divergences_mutant.py"
mutant_path.write_text(src.replace(good_line, bad_line))  # Triton reads a kernel's source from its file
spec = importlib.util.spec_from_file_location("divergences_mutant", mutant_path)
mutant = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutant)

t_m = torch.tensor(rng.normal(size=(5, 77)) * 2.0)
s_m = torch.tensor(rng.normal(size=(5, 77)) * 2.0)
want = R.forward_kl(t_m.numpy(), s_m.numpy())
caught = {}
for label, module in (("the real kernel", Fd), ("the planted bug", mutant)):
    got = module.divergence(
        "forward_kl", t_m.float().to(device), s_m.float().to(device), reduction="none", backend="triton"
    )
    try:
        assert_close(got.cpu(), want, dtype="float32", name="forward KL per row")
        caught[label] = False
        print(f"{label:16s}: passes")
    except AssertionError as e:
        caught[label] = True
        print(f"{label:16s}: CAUGHT -> {str(e).splitlines()[0][:100]}")
assert caught == {"the real kernel": False, "the planted bug": True}


# %% [markdown]
# ## Timing
#
# On a CPU the torch backend is what trains the tiny models: here beside the textbook eager formula
# `F.kl_div(log_softmax(s), log_softmax(t), log_target=True)`, forward + backward (on CUDA the Triton kernel too).
# The GPU rows are a committed measurement on one H200 (`benchmarks/results/gpu_report_h200.md`,
# `make gpu-check`) of older code: the Triton divergence kernels were reworked since (fewer passes, not yet
# re-timed on a GPU) and so was the torch backend's CUDA chunking (its forward KL went from 206.9 ms to 5.27 ms,
# `divergences_h200.md`); see `docs/kernels.md`. `benchmarks/divergences.py` is the full benchmark.

# %%
import torch.nn.functional as TF  # noqa: E402

from fast.utils import committed_rows, median_ms  # noqa: E402

t_b = torch.randn(512, 4096, device=device)
s_b = torch.randn(512, 4096, device=device, requires_grad=True)


def eager_kl():
    TF.kl_div(
        TF.log_softmax(s_b, -1), TF.log_softmax(t_b, -1), log_target=True, reduction="batchmean"
    ).backward()


impls = {
    "eager formula": eager_kl,
    "torch backend": lambda: divergence("forward_kl", t_b, s_b, backend="torch").backward(),
}
if torch.cuda.is_available():
    impls["triton"] = lambda: divergence("forward_kl", t_b, s_b, backend="triton").backward()
for label, fn in impls.items():
    print(f"forward KL fwd+bwd, N=512 V=4096 fp32 on {device}: {label:14s} {median_ms(fn):8.1f} ms")
GPU_REPORT = "../benchmarks/results/gpu_report_h200.md"
print(
    "\ncommitted: one NVIDIA H200 (torch 2.11, triton 3.6), bf16, the divergence kernels and torch backend of"
    " 30 November 2026,\nolder than this code (docs/kernels.md): the Triton kernels were reworked since and not"
    " re-timed; the torch row predates its CUDA chunking"
)
print("\n".join(committed_rows(GPU_REPORT, "op")[:1] + committed_rows(GPU_REPORT, "forward_kl fwd+bwd")[:3]))

print(f"notebook ran in {time.perf_counter() - T0:.1f}s")
