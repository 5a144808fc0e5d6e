"""DAC-KL: the NumPy oracle against finite differences and hand-computed cases, then the torch and Triton
backends against the oracle (forward, d student, d upper, d lower, kept mass, target class) for both
``bounds`` modes, every ablation switch, ugly shapes, ties, one-hot / uniform teachers, -inf padding,
+-1e4 logits and fp16/bf16 inputs; the module with its sub-network; bad input."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from _error_bounds import dac_kl_bound_grad_scale
from hypothesis import example, given, settings
from hypothesis import strategies as st

import reference.dac_kl as R
from fast.dac_kl import DACKL, dac_kl, teacher_features
from fast.testing import assert_close, central_difference, examples, tolerance_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# interpreter: exp overflow in the sigmoid tails and -inf - -inf before a where (both intended)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _inputs(seed, N, V, scale=3.0, kind="normal"):
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(N, V)) * scale
    s = rng.normal(size=(N, V)) * scale
    if kind == "ties":
        t[:, : V // 2] = 1.25  # half the vocabulary tied
    elif kind == "onehot":
        t[:] = -1e4
        t[:, V // 3] = 1e4
    elif kind == "uniform":
        t[:] = 0.0
    elif kind == "pad":
        t[:, V - V // 4 :] = -np.inf
        s[:, V - V // 4 :] = -np.inf
    elif kind == "big":
        t = rng.choice([-1e4, 0.0, 1e4], size=(N, V)) + rng.normal(size=(N, V))
        s = rng.choice([-1e4, 0.0, 1e4], size=(N, V)) + rng.normal(size=(N, V))
    u = rng.uniform(0.6, 0.97, N)
    l = u * rng.uniform(0.05, 0.95, N)
    g = rng.normal(size=N)
    return t, s, u, l, g


# ------------------------------------------------------------------------------------ reference (float64)

CFGS = [
    dict(bounds=b, target=tg, band=bd, normalize=nm, floor=fl)
    for b, tg, bd, nm, fl in itertools.product(
        ["value", "mass", "nontarget"], [True, False], [True, False], [True, False], [True, False]
    )
]


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: "-".join(f"{k[:3]}={v}" for k, v in c.items()))
def test_reference_grad_matches_finite_differences(cfg):
    t, s, u, l, g = _inputs(1, 3, 11, kind="pad")
    t[0, :4] = 0.7  # a tie in the teacher
    ds, du, dl = R.dac_kl_grad(t, s, u, l, g=g, **cfg)
    f = lambda s_, u_=u, l_=l: float(np.sum(g * R.dac_kl(t, s_, u_, l_, **cfg)))
    assert_close(ds, central_difference(f, s), dtype="float32", name="d student")  # FD error ~1e-9
    assert_close(du, central_difference(lambda x: f(s, x, l), u), dtype="float32", name="d upper")
    assert_close(dl, central_difference(lambda x: f(s, u, x), l), dtype="float32", name="d lower")
    assert np.any(ds != 0)
    if cfg["band"]:
        assert np.any(du != 0) and np.any(dl != 0)


def test_reference_hand_cases():
    # band off + target on + normalised: the (V+1)-vectors are p and q with the target entry moved -> plain KL
    t, s, u, l, _ = _inputs(2, 4, 9)
    p, q = np.exp(R.log_softmax(t)), np.exp(R.log_softmax(s))
    kl = np.sum(p * (np.log(p) - np.log(q)), -1)
    assert_close(R.dac_kl(t, s, u, l, band=False, floor=False), kl, name="band off = KL")
    # identical teacher and student: KL 0 in every mode
    for cfg in CFGS:
        cfg = {**cfg, "floor": False}
        assert_close(R.dac_kl(t, t, u, l, **cfg), np.zeros(4), name=str(cfg))
    # value quantiles match numpy's linear interpolation; the mask is the product of the two sigmoids
    f = R.dac_kl_parts(t, s, u, l)
    assert_close(f["tau_hi"], [np.quantile(f["p"][i], u[i]) for i in range(4)], name="Q_u")
    assert_close(f["tau_lo"], [np.quantile(f["p"][i], l[i]) for i in range(4)], name="Q_l")
    # convention: the target class is the first argmax of the teacher logits
    t2 = np.array([[1.0, 3.0, 3.0, 0.0]])
    assert R.dac_kl_parts(t2, t2, np.array([0.9]), np.array([0.1]))["target_class"][0] == 1
    # generalised KL (normalize=False) by the definition on the (V+1)-vectors
    f = R.dac_kl_parts(t, s, u, l, normalize=False, floor=False)
    a = np.concatenate([f["mk"] * f["p"], (f["p"] * f["onehot"]).sum(-1, keepdims=True)], -1)
    b = np.concatenate([f["mk"] * f["q"], (f["q"] * f["onehot"]).sum(-1, keepdims=True)], -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        alogab = np.where(a > 0, a * np.log(a / b), 0.0)  # the masked-out target slot is 0 log 0/0 = 0
    assert_close(f["kl"], np.sum(alogab - a + b, -1), name="generalised KL")


def test_reference_nontarget_band_does_not_depend_on_the_teacher_s_confidence():
    # the same non-target shape under a target of 0.5, 0.9, 0.999: bounds="nontarget" keeps the same share
    # of the non-target mass (both thresholds scale with it; exactly so with the band's eps = 0); "mass"
    # keeps none once p_c > upper
    rest = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    u, l = np.array([0.8]), np.array([0.2])
    shares = {}
    for pc in (0.5, 0.9, 0.999):
        t = np.log(np.concatenate([[pc], (1 - pc) * rest]))[None]
        f = R.dac_kl_parts(t, t, u, l, bounds="nontarget", eps=0.0)
        shares[pc] = f["kept"][0] / (1 - pc)
        want = R.mass_quantile(rest[None], rest[None] > 0, u)[0]  # the non-target shape's own quantile
        assert_close(f["tau_lo"] / (1 - pc), want, name="lo")
        if pc > u[0]:
            assert R.dac_kl_parts(t, t, u, l, bounds="mass")["kept"][0] < 1e-6 * (1 - pc)
    assert 0.3 < shares[0.5] < 0.8
    assert_close(np.array([shares[0.9], shares[0.999]]), np.array([shares[0.5]] * 2), name="share")


def test_reference_mass_quantile_by_hand():
    # p = [0.5, 0.3, 0.2]: knots (0, .5), (.5, .5), (.8, .3), (1.0, .2)
    p = np.array([[0.2, 0.5, 0.3]])
    valid = np.ones_like(p, bool)
    for q, want, slope in [
        (0.25, 0.5, 0.0),
        (0.65, 0.5 + 0.5 * (0.3 - 0.5), (0.3 - 0.5) / 0.3),
        (0.9, 0.3 + 0.5 * (0.2 - 0.3), (0.2 - 0.3) / 0.2),
    ]:
        tau, d = R.mass_quantile(p, valid, np.array([q]))
        assert_close(tau, [want], name=f"tau({q})")
        assert_close(d, [slope], name=f"slope({q})")


def test_reference_mlp_backward_matches_finite_differences():
    rng = np.random.default_rng(3)
    t = rng.normal(size=(5, 20)) * 2
    x = R.features(t, 8)
    params = R.mlp_init(np.random.default_rng(0), x.shape[1], hidden=7)
    params["b3"] = rng.normal(size=2)
    cu, cl = rng.normal(size=5), rng.normal(size=5)
    up, lo, cache = R.mlp_bounds(params, x)
    assert np.all((0 <= lo) & (lo < up) & (up <= 1))
    grads = R.mlp_bounds_backward(params, cache, cu, cl)
    for name, val in params.items():

        def f(v, name=name):
            u_, l_, _ = R.mlp_bounds({**params, name: v}, x)
            return float(np.sum(cu * u_ + cl * l_))

        assert_close(grads[name], central_difference(f, val), dtype="float32", name=name)


def test_reference_end_to_end_chain():
    """loss -> (upper, lower) -> MLP parameters, against finite differences on one weight matrix."""
    t, s, _, _, g = _inputs(4, 3, 12)
    x = R.features(t, 6)
    params = R.mlp_init(np.random.default_rng(1), x.shape[1], hidden=5)
    up, lo, cache = R.mlp_bounds(params, x)
    _, du, dl = R.dac_kl_grad(t, s, up, lo, g=g)
    gW = R.mlp_bounds_backward(params, cache, du, dl)["W2"]

    def f(W2):
        u_, l_, _ = R.mlp_bounds({**params, "W2": W2}, x)
        return float(np.sum(g * R.dac_kl(t, s, u_, l_)))

    assert_close(gW, central_difference(f, params["W2"]), dtype="float32", name="dL/dW2")


# ------------------------------------------------------------------------------ fast backends vs oracle


def _level_envelope(tr, sr, ur, lr, g, cfg):
    """How much the oracle's loss, kept mass and d student move when the two levels (and the teacher
    logits) move by a few fp32 epsilons. A float32 computation cannot place the thresholds closer than
    that: the level itself is rounded, ``q (n-1)`` is rounded, and the mass above a candidate is an fp32
    sum; all are absolute errors of ~eps on quantities <= 1, i.e. a level shift. The mass-quantile slope
    ``(x - d)/x`` can be -30 and more (a dominant top token), so this envelope can exceed fp32's atol
    (seen: loss rel. 6e-5)."""
    if not cfg.get("band", True):
        return 0.0, 0.0, 0.0, 0.0, 0.0
    d = 4 * np.finfo(np.float32).eps
    base = R.dac_kl_parts(tr, sr, ur, lr, **cfg)
    gbase = R.dac_kl_grad(tr, sr, ur, lr, g=g, **cfg)
    out = [0.0] * 5  # loss, kept, d student, d upper, d lower
    # the teacher's log-probabilities carry fp32 rounding too (relative eps on p = absolute eps on log p),
    # which the band's sigmoids amplify by beta p: two sign patterns of that size on the teacher logits
    r = np.random.default_rng(0).choice([-1.0, 1.0], size=tr.shape) * d * np.maximum(1.0, np.abs(tr))
    r = np.where(np.isfinite(tr), r, 0.0)
    for su, sl, dt in ((d, d, 0), (d, -d, 0), (-d, d, 0), (-d, -d, 0), (0, 0, r), (0, 0, -r)):
        u2, l2 = np.clip(ur + su, 0, 1), np.clip(lr + sl, 0, 1)
        l2 = np.minimum(l2, u2 - d)
        f = R.dac_kl_parts(tr + dt, sr, u2, l2, **cfg)
        g2 = R.dac_kl_grad(tr + dt, sr, u2, l2, g=g, **cfg)
        out[0] = max(out[0], float(np.abs(f["loss"] - base["loss"]).max()))
        out[1] = max(out[1], float(np.abs(f["kept"] - base["kept"]).max()))
        for k in range(3):
            out[2 + k] = max(out[2 + k], float(np.abs(g2[k] - gbase[k]).max()))
    return tuple(out)


def _weight_rounding(ref, cfg):
    """Relative fp32 error of each band weight m = sigma(z1) sigma(z2), z1 = beta (p - tau_lo),
    z2 = beta (tau_hi - p) ([N, V]; 0 without a band). In fp32, p and tau are rounded independently (the
    envelope's perturbations move them together), so z1 is off by up to 2 eps beta (p + tau_lo), and a
    sigmoid moves its value relatively by sigma(-z) times that: only weights in a sigmoid's tail are
    affected, by up to 2 eps beta. Fuzzing found V = 2 rows (beta 1e4-2e4) where this alone put a kept
    mass of 1.3e-30 1.2e-3 off relatively, and a d student 1.1e-4 off."""
    if not cfg.get("band", True):
        return np.zeros_like(ref["p"])
    eps2b = 2 * np.finfo(np.float32).eps * ref["beta"][:, None]
    return eps2b * (
        R.sigmoid(-ref["z1"]) * (ref["p"] + ref["tau_lo"][:, None])
        + R.sigmoid(-ref["z2"]) * (ref["p"] + ref["tau_hi"][:, None])
    )


def _close(actual, expected, dtype, name, scale=1.0, terms=None, slack=0.0):
    """assert_close with two documented widenings: a true value below fp32's normal range has no
    meaningful relative RMS, and a result that is the cancellation of much larger ``terms`` (their
    magnitudes, per element) cannot be more exact than the fp32 rounding of those terms."""
    expected = np.asarray(expected, np.float64)
    tol = tolerance_for(dtype, scale)
    rms = tol.rms
    if expected.size and np.abs(expected).max() < 1e-30:
        # the true value (e.g. a kept mass of 4e-60 when the band misses every token) is below fp32's
        # smallest normal number: only the absolute check is meaningful, a relative RMS of it is not
        rms = np.inf
    if terms is not None:
        # e.g. d student = w (q/B - p/A): when the two normalised vectors nearly agree the result is much
        # smaller than the terms it is the difference of, and fp32 computes each term to ~1 eps of its own
        # size (q, p, A, B and the quotient each round once): 4 eps |terms| per element, added to the
        # measured slack (seen under fuzzing: |diff| 1.4e-8 on a 2.8e-4 gradient made of terms of 0.6)
        slack = slack + 4 * np.finfo(np.float32).eps * np.asarray(terms, np.float64)
    # slack: the oracle itself moves by that much under fp32-sized perturbations of the levels and the
    # teacher (_level_envelope); fast.testing widens the bound, and the RMS budget, by exactly that
    assert_close(actual, expected, dtype=dtype, name=name, atol=tol.atol, rtol=tol.rtol, rms=rms, slack=slack)


def _run_fast(t, s, u, l, g, backend, dtype=torch.float32, **cfg):
    T = torch.tensor(t, dtype=dtype, device=DEVICE)
    S = torch.tensor(s, dtype=dtype, device=DEVICE, requires_grad=True)
    U = torch.tensor(u, dtype=torch.float32, device=DEVICE, requires_grad=True)
    L = torch.tensor(l, dtype=torch.float32, device=DEVICE, requires_grad=True)
    loss, kept, cls = dac_kl(T, S, U, L, backend=backend, **cfg)
    (loss * torch.tensor(g, dtype=loss.dtype, device=DEVICE)).sum().backward()
    # the oracle sees exactly the (rounded) inputs the fast path saw
    tr, sr = T.double().cpu().numpy(), S.detach().double().cpu().numpy()
    ur, lr = U.detach().double().cpu().numpy(), L.detach().double().cpu().numpy()
    ref = R.dac_kl_parts(tr, sr, ur, lr, **cfg)
    rds, rdu, rdl = R.dac_kl_grad(tr, sr, ur, lr, g=g, **cfg)
    mag_u, mag_l = dac_kl_bound_grad_scale(tr, sr, ur, lr, g=g, **cfg)
    name = f"{backend}/{dtype}/{cfg}"
    env_loss, env_kept, env_ds, env_du, env_dl = _level_envelope(tr, sr, ur, lr, g, cfg)
    _close(loss, ref["loss"], dtype, f"loss {name}", slack=env_loss)
    rel_m = _weight_rounding(ref, cfg)  # kept = sum mk p: each weight's rounding moves it
    kept_slack = env_kept + np.sum(ref["p"] * ref["mk"] * rel_m, -1)
    _close(kept, ref["kept"], dtype, f"kept {name}", slack=kept_slack)
    assert np.array_equal(cls.cpu().numpy(), ref["target_class"]), "target class"
    assert S.grad.dtype == dtype
    # the weights' own rounding (rel_w, relative, per entry; the target's weight 1 is exact) moves
    # d student to first order by the amounts below (each weight, and the sums A, B it enters)
    w, p_, q_, A, B = ref["w"], ref["p"], ref["q"], ref["A"][:, None], ref["B"][:, None]
    rel_w = np.where(ref["onehot"], 0.0, rel_m) if cfg.get("target", True) else rel_m
    if ref["A"].size and cfg.get("normalize", True):
        terms = w * (q_ / B + p_ / A)
        rho_a, rho_b = np.sum(rel_w * w * p_, -1)[:, None] / A, np.sum(rel_w * w * q_, -1)[:, None] / B
        w_slack = w * (q_ / B * (rel_w + rho_b) + p_ / A * (rel_w + rho_a))
    else:
        # d student = w (q - p) + q (A - B): A and B are fp32 sums, each rounded to ~eps of its own
        # size, so their difference is only as exact as eps (A + B), not eps |A - B| (fuzzing: a V = 2
        # row with A ~ B was 1e-4 off relatively on a 5e-4 gradient)
        terms = w * (q_ + p_) + (A + B) * q_
        w_slack = rel_w * w * np.abs(q_ - p_) + q_ * np.sum(rel_w * w * (p_ + q_), -1)[:, None]
    _close(
        S.grad,
        rds,
        dtype,
        f"d student {name}",
        terms=terms * np.abs(g)[:, None],
        slack=env_ds + w_slack * np.abs(g)[:, None],
    )
    _close_bound_grad(U.grad, rdu, mag_u, dtype, f"d upper {name}", env_du)
    _close_bound_grad(L.grad, rdl, mag_l, dtype, f"d lower {name}", env_dl)


def _close_bound_grad(actual, expected, mag, dtype, name, envelope=0.0):
    """d upper / d lower are ill-conditioned by construction (tests/_error_bounds.dac_kl_bound_grad_scale):
    a sum over V of G dm/dtau with heavy cancellation, each term's sigmoid argument amplifying the fp32
    rounding of p by beta p (beta up to 1/(gamma (tau_hi - tau_lo))), times a quantile slope that is a
    difference of neighbouring order statistics ((V-1)(s[k+1] - s[k]) loses eps (V-1)(|s[k]| + |s[k+1]|)).
    On the H200 a V=2500 row missed the plain fp32 budget by exactly that slope term (rel. 2.5e-4).
    So: the dtype's atol/rtol plus a slack, the larger of 8 fp32 epsilons times the oracle's own error
    magnitude ``mag`` and the measured ``envelope`` (how far the oracle's value moves under the fp32-sized
    perturbations of _level_envelope: fuzzing found a V=291 mass-quantile row where the fp32 result was
    2.1e-3 off, the mag estimate allowed 4.3e-4, and the oracle itself moves 7.7e-3..1.3e-2); no RMS
    check (the RMS of a cancelling sum measures the cancellation, not the error). The float64 torch run
    (test_torch_backend_float64_is_the_same_formula) matches at the float64 budget, so the formula is the
    same and what is left is rounding. Every fast path computes in fp32, whatever its input dtype."""
    slack = np.maximum(8 * np.finfo(np.float32).eps * np.asarray(mag, np.float64), envelope)
    assert_close(actual, expected, dtype=dtype, name=name, rms=np.inf, slack=slack)


@pytest.mark.parametrize("cfg", CFGS[::3], ids=str)
def test_torch_backend_float64_is_the_same_formula(cfg):
    t, s, u, l, g = _inputs(13, 3, 57, kind="pad")
    T = torch.tensor(t, dtype=torch.float64)
    S = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    U = torch.tensor(u, dtype=torch.float64, requires_grad=True)
    L = torch.tensor(l, dtype=torch.float64, requires_grad=True)
    loss, kept, _ = dac_kl(T, S, U, L, backend="torch", **cfg)
    (loss * torch.tensor(g)).sum().backward()
    ref = R.dac_kl_parts(t, s, u, l, **cfg)
    rds, rdu, rdl = R.dac_kl_grad(t, s, u, l, g=g, **cfg)
    assert_close(loss, ref["loss"], name="loss")
    assert_close(kept, ref["kept"], name="kept")
    assert_close(S.grad, rds, name="ds")
    assert_close(U.grad, rdu, name="du")
    assert_close(L.grad, rdl, name="dl")


FAST_CFGS = [
    dict(bounds="value"),
    dict(bounds="mass"),
    dict(bounds="value", normalize=False),
    dict(bounds="mass", target=False),
    dict(bounds="value", band=False),
    dict(bounds="mass", floor=False, normalize=False),
    dict(bounds="nontarget"),
    dict(bounds="nontarget", target=False, normalize=False),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cfg", FAST_CFGS, ids=lambda c: "-".join(f"{k[:4]}={v}" for k, v in c.items()))
def test_fast_modes(backend, cfg):
    t, s, u, l, g = _inputs(5, 4, 203)
    _run_fast(t, s, u, l, g, backend, **cfg)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["ties", "onehot", "uniform", "pad", "big"])
@pytest.mark.parametrize("bounds", ["value", "mass", "nontarget"])
def test_fast_nasty_teachers(backend, kind, bounds):
    t, s, u, l, g = _inputs(6, 3, 130, kind=kind)
    _run_fast(t, s, u, l, g, backend, bounds=bounds)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_low_precision(backend, dtype):
    t, s, u, l, g = _inputs(7, 3, 150, scale=2.0)
    _run_fast(t, s, u, l, g, backend, dtype=dtype, bounds="value" if dtype == torch.float16 else "mass")


@pytest.mark.parametrize("bounds", ["value", "mass"])
def test_triton_large_vocab_multi_chunk(bounds):
    # V = 2500 spans three 1024-wide chunks in the interpreter (two 2048... on a GPU: one 4096 block)
    t, s, u, l, g = _inputs(8, 2, 2500, scale=4.0)
    _run_fast(t, s, u, l, g, "triton", bounds=bounds)


def test_triton_target_tie_across_chunks_goes_to_the_lowest_index():
    # the teacher's maximum in the first and in the third 1024-wide chunk, with different student logits
    # there: the target class (and so the loss and its gradient) must be the lower index, as in the oracle
    t, s, u, l, g = _inputs(9, 2, 2500, scale=4.0)
    t[:, [7, 2100]] = t.max() + 3.0
    s[:, 7], s[:, 2100] = -2.0, 5.0
    _run_fast(t, s, u, l, g, "triton")  # compares target_class exactly, loss and gradients to the oracle


def test_triton_value_select_on_tied_and_signed_zero_logits():
    # bounds="value" selects the order statistics on int32 order keys of the fp32 teacher logits (a radix
    # select, one byte per pass), so the cases that stress a key order: long runs of equal logits (the rank
    # falls inside a run, at its end, or the next value lies in another bucket or another 1024-wide chunk),
    # -0.0 next to +0.0 (different keys, the same p), negative and positive logits one ulp apart (they
    # differ only in the last byte), subnormals, -inf padding; levels at exact order statistics and between
    rng = np.random.default_rng(12)
    N, V = 5, 1025  # two 1024-wide chunks in the interpreter; n - 1 = 1024 (row 3: 512) valid entries
    t = rng.choice(np.array([-2.0, -0.5, -0.0, 0.0, 0.5, 2.0]), size=(N, V))  # row 0: six values, many ties
    t[1] = np.where(rng.random(V) < 0.45, -0.0, 0.0)  # row 1: signed zeros with a few other values
    t[1, rng.choice(V, 40, replace=False)] = rng.choice([-1.5, -1e-3, 1e-3, 1.5], 40)
    # row 2: logits 1e4 + k ulp (k < 300: the keys differ in the last byte, or across its boundary), whose p
    # are still 1e-3 apart relatively, so a neighbouring order statistic is told apart at fp32 tolerance
    ulp = 2.0**-10  # the spacing of fp32 numbers in [8192, 16384)
    t[2] = 1e4 + ulp * rng.integers(0, 300, V)
    t[3] = rng.choice(np.array([-1e-40, -0.0, 0.0, 1e-40, -3.0, 3.0]), V)  # row 3: subnormals, padding
    t[3, 513:] = -np.inf
    t[4] = -1e4 - ulp * rng.integers(0, 300, V)  # row 4: the same below -1e4 (bits inverted in the key)
    s = rng.normal(size=(N, V)) * 2.0
    s[3, 513:] = -np.inf
    n = np.isfinite(t).sum(-1)
    g = rng.normal(size=N)
    # levels in fp32, as the kernel reads them; rank / (n - 1) is exact (n - 1 a power of two), so the oracle
    # and the kernel agree on which order statistics a level falls between
    a, b = np.array([999, 523, 1005, 400, 950]), np.array([7, 477, 499, 12, 100])
    for u, l in (
        (rng.uniform(0.6, 0.97, N), rng.uniform(0.05, 0.5, N)),  # anywhere
        (a / (n - 1), b / (n - 1)),  # at order statistics
        ((a + 0.5) / (n - 1), (b + 0.5) / (n - 1)),  # half way to the next one
        (np.ones(N), np.zeros(N)),
    ):  # the maximum (its own neighbour) and the minimum
        u, l = u.astype(np.float32).astype(np.float64), l.astype(np.float32).astype(np.float64)
        T, S = torch.tensor(t, dtype=torch.float32), torch.tensor(s, dtype=torch.float32)
        loss, _, _ = dac_kl(T, S.requires_grad_(), torch.tensor(u), torch.tensor(l), backend="triton")
        stats = loss.grad_fn.saved_tensors[3]  # the thresholds and their slopes the forward saved
        ref = R.dac_kl_parts(T.double().numpy(), S.detach().double().numpy(), u, l)
        for i, key in enumerate(("tau_lo", "tau_hi")):
            assert_close(stats[:, 2 + i], ref[key], dtype="float32", name=key)
        for i, key in enumerate(("dlo", "dhi")):  # (n - 1) (s[k+1] - s[k]): a difference of neighbours, its
            # rounding is relative to them, not to it, so no RMS check (as in _close_bound_grad)
            assert_close(stats[:, 4 + i], ref[key], dtype="float32", name=key, rms=np.inf)
        _run_fast(t, s, u, l, g, "triton")  # loss, kept mass, target class, gradients vs the oracle


@settings(max_examples=examples(10))
@given(
    N=st.integers(1, 5),
    V=st.integers(2, 300),
    seed=st.integers(0, 2**16),
    bounds=st.sampled_from(["value", "mass", "nontarget"]),
    target=st.booleans(),
    normalize=st.booleans(),
)
@example(N=1, V=2, seed=0, bounds="value", target=True, normalize=True)
@example(N=1, V=2, seed=0, bounds="mass", target=False, normalize=True)
@example(N=3, V=257, seed=1, bounds="mass", target=True, normalize=False)
# found by fuzzing (tests' bounds, see _weight_rounding and _close_bound_grad): weights in the sigmoid
# tails; a d lower far more ill-conditioned than the mag estimate alone allowed
@example(N=1, V=2, seed=44737, bounds="value", target=False, normalize=False)
@example(N=1, V=291, seed=65536, bounds="mass", target=False, normalize=False)
def test_torch_backend_property(N, V, seed, bounds, target, normalize):
    t, s, u, l, g = _inputs(seed, N, V)
    _run_fast(t, s, u, l, g, "torch", bounds=bounds, target=target, normalize=normalize)


@settings(max_examples=examples(3))
@given(
    N=st.integers(1, 3),
    V=st.integers(2, 200),
    seed=st.integers(0, 2**16),
    bounds=st.sampled_from(["value", "mass", "nontarget"]),
)
@example(N=1, V=3, seed=2, bounds="mass")
@example(N=1, V=2, seed=809, bounds="mass")  # fuzzing: a kept mass of 1.3e-30 in a sigmoid tail
@example(N=1, V=2, seed=228, bounds="mass")  # fuzzing: a cancelling d student
def test_triton_backend_property(N, V, seed, bounds):
    t, s, u, l, g = _inputs(seed, N, V)
    _run_fast(t, s, u, l, g, "triton", bounds=bounds)


def test_triton_matches_torch_backend_gradient_reduction():
    """The same loss through both backends gives the same autograd result on a [N] sum (cotangent 1)."""
    t, s, u, l, _ = _inputs(9, 3, 77)
    outs = []
    for be in ("torch", "triton"):
        S = torch.tensor(s, dtype=torch.float32, device=DEVICE, requires_grad=True)
        loss, _, _ = dac_kl(
            torch.tensor(t, dtype=torch.float32, device=DEVICE),
            S,
            torch.tensor(u, dtype=torch.float32, device=DEVICE),
            torch.tensor(l, dtype=torch.float32, device=DEVICE),
            backend=be,
        )
        loss.sum().backward()
        outs.append((loss.detach(), S.grad))
    assert_close(outs[1][0], outs[0][0].double(), dtype=torch.float32, name="loss")
    assert_close(outs[1][1], outs[0][1].double(), dtype=torch.float32, name="grad")


# ------------------------------------------------------------------------------------------- the module


def test_module_matches_reference_mlp_and_trains_bounds():
    gen = torch.Generator().manual_seed(0)
    mod = DACKL(k=8, hidden=16, generator=gen, backend="torch").double()
    t, s, _, _, _ = _inputs(10, 6, 40)
    T = torch.tensor(t, dtype=torch.float64)
    S = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    params = {
        "W1": mod.mlp[0].weight.detach().T.numpy(),
        "b1": mod.mlp[0].bias.detach().numpy(),
        "W2": mod.mlp[2].weight.detach().T.numpy(),
        "b2": mod.mlp[2].bias.detach().numpy(),
        "W3": mod.mlp[4].weight.detach().T.numpy(),
        "b3": mod.mlp[4].bias.detach().numpy(),
    }
    x = R.features(t, 8)
    assert_close(teacher_features(T, 8), x, dtype=torch.float32, name="features")  # features are fp32
    up, lo, cache = R.mlp_bounds(params, x)
    loss, info = mod(T, S)
    assert_close(info["upper"], up, dtype=torch.float32, name="upper")
    assert_close(info["lower"], lo, dtype=torch.float32, name="lower")
    loss.backward()
    g = np.full(6, 1.0 / 6)
    _, du, dl = R.dac_kl_grad(t, s, up, lo, g=g)
    grads = R.mlp_bounds_backward(params, cache, du, dl)
    assert_close(mod.mlp[2].weight.grad.T, grads["W2"], dtype=torch.float32, name="dW2")
    assert_close(mod.mlp[0].weight.grad.T, grads["W1"], dtype=torch.float32, name="dW1")


@pytest.mark.parametrize("bounds", ["value", "nontarget"])
def test_module_logs_kept_mass_and_its_share_of_the_non_target_mass(bounds):
    # kept = sum over v != c of m_v p_v (the oracle's), share = kept / (1 - p_c), per token
    mod = DACKL(fixed_bounds=(0.8, 0.3), backend="torch", bounds=bounds).double()
    t, s, u, l, _ = _inputs(11, 5, 37)
    _, info = mod(torch.tensor(t), torch.tensor(s))
    f = R.dac_kl_parts(t, s, np.full(5, 0.8), np.full(5, 0.3), bounds=bounds)
    r = 1.0 - f["p"].max(-1)
    assert_close(info["kept"], f["kept"], name="kept")
    assert_close(info["share"], f["kept"] / r, name="share")


def test_module_fixed_bounds_and_mask():
    mod = DACKL(fixed_bounds=(0.9, 0.2), backend="torch")
    assert mod.mlp is None and len(list(mod.parameters())) == 0
    t, s, u, l, _ = _inputs(11, 6, 30)
    T = torch.tensor(t, dtype=torch.float32).reshape(2, 3, 30)
    S = torch.tensor(s, dtype=torch.float32).reshape(2, 3, 30)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    loss, info = mod(T, S, mask)
    keep = mask.reshape(-1).numpy()
    ref = R.dac_kl(t[keep], s[keep], np.full(4, 0.9), np.full(4, 0.2))
    assert_close(loss, ref.mean(), dtype=torch.float32, name="masked mean, fixed bounds")
    with pytest.raises(ValueError, match="fixed_bounds"):
        DACKL(fixed_bounds=(0.3, 0.5))


def test_kept_mass_floor_keeps_the_band_open():
    """With the floor, shrinking the band (a 'cheap' way to lower the KL) is penalised: d loss / d upper is
    negative (widen) when the kept mass is below rho_min. Without it the gradient can point either way."""
    t, s, u, l, _ = _inputs(12, 4, 64, scale=1.0)
    f = R.dac_kl_parts(t, s, u, l, rho_min=0.99, lam_m=10.0)
    assert np.all(f["active"])
    _, du, _ = R.dac_kl_grad(t, s, u, l, rho_min=0.99, lam_m=10.0)
    assert np.all(du < 0)


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(backend):
    t = torch.zeros(2, 5, device=DEVICE)
    u = torch.tensor([0.9, 0.8], device=DEVICE)
    l = torch.tensor([0.1, 0.2], device=DEVICE)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dac_kl(t, t, torch.tensor([1.5, 0.8], device=DEVICE), l, backend=backend)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dac_kl(t, t, u, torch.tensor([-0.1, 0.2], device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="lower < upper.*row 1"):
        dac_kl(t, t, u, torch.tensor([0.1, 0.8], device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"\[N, V\].*\(2, 5\).*\(2, 4\)"):
        dac_kl(t, t[:, :4], u, l, backend=backend)
    with pytest.raises(ValueError, match="upper/lower must be"):
        dac_kl(t, t, u[:1], l, backend=backend)
    with pytest.raises(ValueError, match="bounds must be one of"):
        dac_kl(t, t, u, l, backend=backend, bounds="quantile")
    with pytest.raises(ValueError, match="unknown DAC-KL option"):
        dac_kl(t, t, u, l, backend=backend, temperature=2.0)
    tt = t.clone()
    tt[0] = float("-inf")
    with pytest.raises(ValueError, match="entirely -inf"):
        dac_kl(tt, tt, u, l, backend=backend)
    ss = t.clone()
    ss[1, 2] = float("-inf")
    with pytest.raises(ValueError, match="padding must be shared"):
        dac_kl(t, ss, u, l, backend=backend)
    if backend == "triton":  # validate=False skips these checks (no sync); the kernel still runs through
        for bad_t, bad_s in ((tt, tt), (t, ss)):  # (the losses of the unchecked rows mean nothing)
            assert dac_kl(bad_t, bad_s, u, l, backend=backend, validate=False)[0].shape == (2,)
    with pytest.raises(ValueError, match="lower < upper"):
        R.dac_kl(np.zeros((1, 3)), np.zeros((1, 3)), np.array([0.5]), np.array([0.5]))


def test_empty_batch():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for be in ("torch", "triton"):
            e = torch.zeros(0, 7, device=DEVICE)
            z = torch.zeros(0, device=DEVICE)
            loss, kept, cls = dac_kl(e, e, z, z, backend=be)
            assert loss.shape == (0,) and kept.shape == (0,) and cls.shape == (0,)


def test_module_features_and_bounds_with_a_padded_vocabulary():
    # A -inf padded vocabulary (teacher and student share the padding): the features (top-k and entropy)
    # must ignore the padded entries (0 * log 0 = 0, not NaN), the bounds and the loss must match the oracle.
    gen = torch.Generator().manual_seed(3)
    mod = DACKL(k=8, hidden=16, generator=gen, backend="torch").double()
    t, s, _, _, _ = _inputs(12, 5, 29)
    t[:, 23:] = s[:, 23:] = -np.inf  # 6 padded vocabulary entries in every row
    t[2, :20] = s[2, :20] = -np.inf  # a row with only 3 real entries: fewer than k
    T = torch.tensor(t, dtype=torch.float64)
    S = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    x = R.features(t, 8)
    assert np.isfinite(x).all()
    assert_close(teacher_features(T, 8), x, dtype=torch.float32, name="features, padded vocabulary")
    params = {
        "W1": mod.mlp[0].weight.detach().T.numpy(),
        "b1": mod.mlp[0].bias.detach().numpy(),
        "W2": mod.mlp[2].weight.detach().T.numpy(),
        "b2": mod.mlp[2].bias.detach().numpy(),
        "W3": mod.mlp[4].weight.detach().T.numpy(),
        "b3": mod.mlp[4].bias.detach().numpy(),
    }
    up, lo, _ = R.mlp_bounds(params, x)
    loss, info = mod(T, S)
    assert_close(info["upper"], up, dtype=torch.float32, name="upper, padded vocabulary")
    assert_close(info["lower"], lo, dtype=torch.float32, name="lower, padded vocabulary")
    assert_close(loss, R.dac_kl(t, s, up, lo).mean(), dtype=torch.float32, name="loss, padded vocabulary")
    loss.backward()
    assert torch.isfinite(S.grad).all() and (S.grad[:, 23:] == 0).all()
