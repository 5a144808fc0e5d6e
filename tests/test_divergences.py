"""The NumPy oracle ``reference/divergences.py``: gradients by finite differences, each written-down
convention with a hand-computed case, a by-the-definition second oracle, and the properties."""

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fast.testing import assert_close, central_difference
from reference import divergences as R

NAMES = list(R.DIVERGENCES)


def _param_cases(name, values=(0.0, 0.3, 0.9, 1.0)):
    """Every parameter value of a divergence, the degenerate ends included."""
    if not R.PARAMS[name]:
        return [{}]
    (k,) = R.PARAMS[name]
    return [{k: v} for v in values]


CASES = [(n, p) for n in NAMES for p in _param_cases(n)]
CASE_IDS = [n + ("" if not p else f"-{next(iter(p))}={next(iter(p.values()))}") for n, p in CASES]


def _logits(rng, n, v, scale=2.0, pad=()):  # -> teacher, student [n, v]; `pad` columns -inf in both
    t = rng.normal(size=(n, v)) * scale
    s = rng.normal(size=(n, v)) * scale
    for j in pad:
        t[:, j] = s[:, j] = -np.inf
    return t, s


# ---- gradients vs central finite differences ------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5, 4.0])
@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_reference_grad_matches_finite_differences(name, params, temperature):
    rng = np.random.default_rng(hash((name, temperature)) % 2**32)
    t, s = _logits(rng, 3, 7, pad=(2,))
    f, g = R.DIVERGENCES[name]
    got = g(t, s, temperature=temperature, **params)
    jac = central_difference(lambda x: f(t, x, temperature=temperature, **params), s)  # [n, n, v]
    fd = jac[np.arange(len(s)), np.arange(len(s))]  # row i's loss by row i's logits -> [n, v]
    assert not np.isnan(got).any()
    assert np.all(got[:, 2] == 0.0), "padded entries get exactly zero gradient"
    # FD with h=1e-6: truncation ~h², rounding ~1e-16/h = 1e-10 absolute (rms loose: some grads are ~1e-6)
    # relative RMS is meaningless against an all-(near-)zero gradient (the degenerate ends)
    rms = 1e-5 if np.abs(fd).max() > 1e-6 else np.inf
    assert_close(got, fd, dtype="float64", atol=1e-8, rtol=1e-6, rms=rms, name=f"{name} grad")


def test_reference_grad_through_leading_dims():
    rng = np.random.default_rng(1)
    t, s = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    for name, (f, g) in R.DIVERGENCES.items():
        assert f(t, s).shape == (2, 3)
        assert_close(g(t, s).reshape(6, 5), g(t.reshape(6, 5), s.reshape(6, 5)), name=name)


# ---- conventions (each one written down in the reference's docstring) ------------------------------
def test_convention_kl_not_soft_cross_entropy():
    # hand-computed: p = [3/4, 1/4], q = [1/2, 1/2]
    t, s = np.log([[0.75, 0.25]]), np.zeros((1, 2))
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    soft_ce = -(0.75 * math.log(0.5) + 0.25 * math.log(0.5))  # DistiLLM's "forward_kl" = KL + H(p)
    h_p = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert R.forward_kl(t, s)[0] == pytest.approx(kl, abs=1e-14)
    assert soft_ce == pytest.approx(kl + h_p, abs=1e-14)
    assert R.forward_kl(t, t)[0] == 0.0  # soft-CE would give H(p) here


def test_convention_no_temperature_squared_factor():
    rng = np.random.default_rng(2)
    t, s = _logits(rng, 4, 9)
    for name, (f, g) in R.DIVERGENCES.items():
        # the loss at τ is the divergence of the softened distributions, not multiplied by τ²
        assert_close(f(t, s, temperature=2.0), f(t / 2.0, s / 2.0), name=name)
        # ...and the gradient carries the chain-rule 1/τ only
        assert_close(g(t, s, temperature=2.0), g(t / 2.0, s / 2.0) / 2.0, name=name)
    # hand-computed: t = [2 ln 3, 0], s = 0, τ = 2 -> p = [3/4, 1/4], q = uniform
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert R.forward_kl(np.array([[2 * math.log(3), 0.0]]), np.zeros((1, 2)), temperature=2.0)[
        0
    ] == pytest.approx(kl, abs=1e-14)


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_convention_padded_entries_are_absent(name, params):
    rng = np.random.default_rng(3)
    t, s = _logits(rng, 3, 6)
    tp = np.concatenate([t, np.full((3, 2), -np.inf)], 1)  # two padded vocabulary entries
    sp = np.concatenate([s, np.full((3, 2), -np.inf)], 1)
    f, g = R.DIVERGENCES[name]
    rms = np.inf if params.get("alpha") == 1.0 or params.get("beta") in (0.0, 1.0) else None  # values ~0
    assert_close(f(tp, sp, **params), f(t, s, **params), atol=1e-14, rms=rms, name=name)
    gp = g(tp, sp, **params)
    assert not np.isnan(gp).any()
    assert np.all(gp[:, 6:] == 0.0)
    assert_close(gp[:, :6], g(t, s, **params), atol=1e-14, rms=rms, name=name)


@pytest.mark.parametrize(
    "bad,match",
    [
        ("nan", "NaN"),
        ("posinf", r"\+inf"),
        ("mismatch", "same positions"),
        ("all_ninf", "everywhere"),
        ("shape", "same shape"),
        ("temperature", "temperature"),
        ("param", "in \\[0, 1\\]"),
    ],
)
def test_reference_bad_input_raises(bad, match):
    t, s = np.zeros((2, 4)), np.zeros((2, 4))
    kw = {}
    if bad == "nan":
        s[1, 2] = np.nan
    elif bad == "posinf":
        t[0, 0] = np.inf
    elif bad == "mismatch":
        t[0, 1] = -np.inf
    elif bad == "all_ninf":
        t[1] = s[1] = -np.inf
    elif bad == "shape":
        s = np.zeros((2, 5))
    elif bad == "temperature":
        kw = {"temperature": 0.0}
    with pytest.raises(ValueError, match=match):
        if bad == "param":
            R.js_divergence(t, s, beta=1.5)
        else:
            R.forward_kl(t, s, **kw)


def test_convention_mixture_in_log_space():
    # p ≈ [1, e^-1000], q ≈ [e^-1000, 1]: JSD(½) = ln 2 to double precision
    t, s = np.array([[1000.0, 0.0]]), np.array([[0.0, 1000.0]])
    assert R.js_divergence(t, s, beta=0.5)[0] == pytest.approx(math.log(2), rel=1e-12)
    # skew KL(p ‖ αp + (1-α)q) = -log(α + (1-α)e^-1000) ≈ -log α
    assert R.skew_forward_kl(t, s, alpha=0.1)[0] == pytest.approx(-math.log(0.1), rel=1e-12)
    # the probability-space formula p·log(p/m) evaluates 0·log(0/0.5) -> 0·(-inf) = NaN here
    with np.errstate(all="ignore"):
        p, q = np.exp(R.log_softmax(t)), np.exp(R.log_softmax(s))
        m = 0.5 * p + 0.5 * q
        naive = 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
    assert np.isnan(naive)


def test_convention_degenerate_ends():
    rng = np.random.default_rng(4)
    t, s = _logits(rng, 5, 11)
    for beta in (0.0, 1.0):
        assert np.all(R.js_divergence(t, s, beta=beta) == 0.0)
        assert np.all(R.js_divergence_grad(t, s, beta=beta) == 0.0)
    assert_close(R.skew_forward_kl(t, s, alpha=1.0), np.zeros(5), atol=1e-15, rms=np.inf)
    assert_close(R.skew_reverse_kl(t, s, alpha=1.0), np.zeros(5), atol=1e-15, rms=np.inf)
    assert_close(R.skew_forward_kl(t, s, alpha=0.0), R.forward_kl(t, s))
    assert_close(R.skew_reverse_kl(t, s, alpha=0.0), R.reverse_kl(t, s))
    assert_close(R.skew_forward_kl_grad(t, s, alpha=0.0), R.forward_kl_grad(t, s))
    assert_close(R.skew_reverse_kl_grad(t, s, alpha=0.0), R.reverse_kl_grad(t, s))


# ---- the oracle of the oracle: per-row, per-entry loops straight from the definitions ---------------
def _by_definition(name, t_row, s_row, tau, params):  # [V], [V] -> float, probability space
    p = [math.exp(x / tau) for x in t_row]
    q = [math.exp(x / tau) for x in s_row]
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]

    def kl(a, b):
        return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b, strict=True) if ai > 0)

    def mix(w, a, b):
        return [w * ai + (1 - w) * bi for ai, bi in zip(a, b, strict=True)]

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "symmetric_kl":
        return kl(p, q) + kl(q, p)
    if name == "js_divergence":
        b = params["beta"]
        m = mix(b, p, q)
        return b * kl(p, m) + (1 - b) * kl(q, m)
    if name == "tv_distance":
        return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))
    if name == "skew_forward_kl":
        return kl(p, mix(params["alpha"], p, q))
    return kl(q, mix(params["alpha"], q, p))


@pytest.mark.parametrize("name,params", CASES, ids=CASE_IDS)
def test_reference_matches_definition(name, params):
    rng = np.random.default_rng(5)
    t, s = _logits(rng, 4, 13, scale=3.0)
    got = R.DIVERGENCES[name][0](t, s, temperature=1.5, **params)
    want = [_by_definition(name, t[i], s[i], 1.5, params) for i in range(4)]
    assert_close(got, np.array(want), atol=1e-12, rtol=1e-9, rms=1e-10, name=name)


# ---- properties ----------------------------------------------------------------------------------
@st.composite
def _rows(draw, max_v=60, scales=(0.1, 1.0, 5.0, 50.0)):
    n = draw(st.integers(1, 6))
    v = draw(st.integers(1, max_v))
    scale = draw(st.sampled_from(scales))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    t, s = _logits(rng, n, v, scale=scale)
    if v > 1 and draw(st.booleans()):
        j = draw(st.integers(0, v - 1))
        t[:, j] = s[:, j] = -np.inf
    return t, s


@given(_rows(), st.sampled_from([0.5, 1.0, 2.0, 4.0]), st.floats(0.0, 1.0))
@example((np.zeros((1, 1)), np.zeros((1, 1))), 1.0, 0.5)
def test_property_nonnegative_and_zero_at_equality(ts, tau, w):
    t, s = ts
    for name in NAMES:
        kw = {k: w for k in R.PARAMS[name]}
        f = R.DIVERGENCES[name][0]
        assert np.all(f(t, s, temperature=tau, **kw) >= -1e-12), name
        # against zero only the elementwise bound means anything (rms=inf)
        assert_close(f(t, t, temperature=tau, **kw), np.zeros(t.shape[0]), atol=1e-12, rms=np.inf, name=name)
        # p = q also when the logits differ by a per-row constant (softmax shift invariance)
        assert_close(
            f(t, t + 3.0, temperature=tau, **kw), np.zeros(t.shape[0]), atol=1e-10, rms=np.inf, name=name
        )
    assert np.all(R.tv_distance(t, s) <= 1 + 1e-12)


@given(_rows(), st.floats(0.0, 1.0))
def test_property_jsd_symmetry(ts, beta):
    t, s = ts
    # values can be ~1e-25 (β near 0 or 1): the elementwise bound decides (rms=inf)
    assert_close(
        R.js_divergence(t, s, beta=beta),
        R.js_divergence(s, t, beta=1 - beta),
        atol=1e-12,
        rtol=1e-9,
        rms=np.inf,
        name="JSD(β)(p,q) vs JSD(1-β)(q,p)",
    )
    assert_close(
        R.js_divergence(t, s, beta=0.5),
        R.js_divergence(s, t, beta=0.5),
        atol=1e-12,
        rtol=1e-9,
        rms=np.inf,
        name="JSD(½) symmetric",
    )


@given(_rows(max_v=30, scales=(0.1, 1.0, 2.0)))
def test_property_skew_tends_to_plain_kl(ts):
    # moderate logits: the limit needs α << min q/p, which for logits of size 50 is below 1e-40
    t, s = ts
    fkl, rkl = R.forward_kl(t, s), R.reverse_kl(t, s)
    errs_f, errs_r = [], []
    for alpha in (1e-2, 1e-4, 1e-6):
        errs_f.append(np.max(np.abs(R.skew_forward_kl(t, s, alpha=alpha) - fkl)))
        errs_r.append(np.max(np.abs(R.skew_reverse_kl(t, s, alpha=alpha) - rkl)))

    # converges as α -> 0: monotone, and within the exact bound at α = 1e-6. KL(p‖q) − KL(p‖αp + (1−α)q)
    # = −Σ p log((1−α) + α p/q), so its size is at most max(−log(1−α), Σ p log(1 + α p/q)) (reverse: p and q
    # swapped); a fixed fraction of the KL is not a bound where q/p is tiny somewhere
    def bound(a, b, alpha):  # logits of the first and second distribution -> [...]
        la = a - np.logaddexp.reduce(a, axis=-1, keepdims=True)
        lb = b - np.logaddexp.reduce(b, axis=-1, keepdims=True)
        with np.errstate(over="ignore", invalid="ignore"):
            terms = np.where(la > -np.inf, np.exp(la) * np.log1p(np.exp(np.log(alpha) + la - lb)), 0.0)
        return np.maximum(-np.log1p(-alpha), terms.sum(-1))

    for errs, b in ((errs_f, bound(t, s, 1e-6)), (errs_r, bound(s, t, 1e-6))):
        assert errs[2] <= errs[1] + 1e-12 <= errs[0] + 2e-12
        assert errs[2] <= np.max(b) * (1 + 1e-6) + 1e-9
