"""The tolerance helper is itself tested: inputs that must pass, and inputs that must fail."""

import numpy as np
import pytest
import torch

from fast.testing import TOLERANCES, assert_close, central_difference, compare, rel_rms, tolerance_for
from reference.nn import softmax


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_identical_passes(dtype):
    x = np.random.default_rng(0).standard_normal((7, 13))
    assert_close(x, x.copy(), dtype=dtype)


def test_small_error_within_tolerance_passes():
    x = np.random.default_rng(1).standard_normal(1000)
    assert_close(x * (1 + 1e-6), x, dtype="float32")


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_nan_in_actual_fails(dtype):
    x = np.ones(10)
    y = x.copy()
    y[3] = np.nan
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(y, x, dtype=dtype)


def test_nan_in_both_fails():
    x = np.array([1.0, np.nan])
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(x, x.copy())


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_inf_against_finite_fails(bad):
    x = np.ones(10)
    y = x.copy()
    y[5] = bad
    with pytest.raises(AssertionError, match="infinity"):
        assert_close(y, x, dtype="bfloat16")
    with pytest.raises(AssertionError, match="infinity"):
        assert_close(x, y, dtype="bfloat16")


def test_matching_infinities_pass_and_opposite_fail():
    x = np.array([-np.inf, 1.0, np.inf])
    assert_close(x.copy(), x)
    with pytest.raises(AssertionError, match="infinity mismatch"):
        assert_close(np.array([np.inf, 1.0, -np.inf]), x)  # only the infinities differ, in sign


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_single_wrong_element_fails(dtype):
    x = np.random.default_rng(2).standard_normal((200, 200))
    y = x.copy()
    y[17, 23] += 0.5  # one element off: the relative RMS alone (~0.0025) would not notice at bf16
    ok, report, stats = compare(y, x, dtype=dtype)
    assert not ok and stats["n_bad"] == 1 and "[17, 23]" in report
    if dtype == "bfloat16":
        assert stats["rel_rms"] < tolerance_for(dtype).rms  # caught by the elementwise test alone
    with pytest.raises(AssertionError):
        assert_close(y, x, dtype=dtype)


def test_spread_error_fails_on_rms():
    # A scale error below the elementwise bound but above the rms bound.
    x = np.random.default_rng(3).standard_normal(10000)
    tol = tolerance_for("float32")
    y = x * (1 + 0.5 * tol.rtol)  # elementwise passes, rms = 0.5*rtol > rms tol
    ok, report, _ = compare(y, x, dtype="float32")
    assert not ok and "relative RMS" in report


def test_shape_mismatch_fails():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.zeros(3), np.zeros(4))


def test_accepts_torch_tensors_of_every_dtype():
    x = torch.linspace(-3, 3, 11)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert_close(x.to(dt), x.to(dt).double().numpy(), dtype=dt)


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="no tolerance"):
        tolerance_for("int8")


def test_rel_rms_zero_reference():
    assert rel_rms(np.zeros(3), np.zeros(3)) == 0.0
    assert rel_rms(np.ones(3), np.zeros(3)) == float("inf")


def test_report_lists_first_mismatches():
    x = np.zeros(20)
    y = x.copy()
    y[[2, 4, 6, 8, 10, 12, 14]] = 1.0
    ok, report, stats = compare(y, x)
    assert not ok and stats["n_bad"] == 7
    assert report.count("at [") == 5  # only the first five are printed


def test_all_zero_reference_uses_atol_only():
    z = np.zeros(50)
    assert_close(z + 1e-12, z, dtype="float32")  # within atol: passes although the relative RMS is infinite
    with pytest.raises(AssertionError, match="exceed atol"):
        assert_close(z + 1e-3, z, dtype="float32")
    y = z.copy()
    y[7] = np.nan
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(y, z, dtype="float32")


# ---- slack: the oracle's measured conditioning, an explicit widening --------------------------------
def test_slack_admits_exactly_its_size_and_no_more():
    x = np.random.default_rng(5).standard_normal(500)
    tol = tolerance_for("float32")
    y = x.copy()
    y[7] += 1e-3  # far above fp32's atol + rtol·|x|
    assert not compare(y, x, dtype="float32")[0]
    bound7 = tol.atol + tol.rtol * abs(x[7])
    assert compare(y, x, dtype="float32", slack=1e-3 - bound7 + 1e-9)[0]
    ok, report, _ = compare(y, x, dtype="float32", slack=1e-3 - bound7 - 1e-7)
    assert not ok and "slack" in report


def test_slack_per_element_applies_where_it_is_given():
    x = np.random.default_rng(6).standard_normal((4, 50))
    y = x.copy()
    y[2, 10] += 1e-3
    sl = np.zeros((4, 1))
    sl[2] = 2e-3  # row 2 is ill-conditioned, the others are not
    assert compare(y, x, dtype="float32", slack=sl)[0]
    y[1, 10] += 1e-3  # a row without slack: must still fail
    ok, report, stats = compare(y, x, dtype="float32", slack=sl)
    assert not ok and stats["n_bad"] == 1 and "[1, 10]" in report


def test_slack_widens_rms_to_what_the_slack_alone_gives():
    x = np.random.default_rng(7).standard_normal(10000)
    tol = tolerance_for("float32")
    y = x * (1 + 0.5 * tol.rtol)  # fails on the relative RMS alone (test_spread_error_fails_on_rms)
    err = np.abs(y - x).max()
    assert compare(y, x, dtype="float32", slack=err)[0]
    assert not compare(y, x, dtype="float32", slack=1e-3 * err)[0]  # a tiny slack does not excuse it


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_slack_never_excuses_nan_or_inf(bad):
    x = np.ones(10)
    y = x.copy()
    y[4] = bad
    with pytest.raises(AssertionError):
        assert_close(y, x, dtype="bfloat16", slack=1e6)


@pytest.mark.parametrize("slack", [-1e-3, np.nan, np.inf, np.ones(3)])
def test_bad_slack_is_a_value_error(slack):
    with pytest.raises(ValueError, match="slack"):
        compare(np.zeros(4), np.zeros(4), slack=slack)


def test_rms_inf_switches_the_rms_metric_off_but_not_the_elementwise_one():
    x = np.random.default_rng(8).standard_normal(10000)
    tol = tolerance_for("float32")
    assert compare(x * (1 + 0.5 * tol.rtol), x, dtype="float32", rms=np.inf)[0]
    y = x.copy()
    y[3] += 1.0
    assert not compare(y, x, dtype="float32", rms=np.inf)[0]


def test_expensive_property_tests_follow_the_fuzz_profile(monkeypatch):
    from fast.testing import examples

    monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)
    assert examples(3) == 3  # make test: the test's own small count
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "fuzz")
    monkeypatch.setenv("HYPOTHESIS_MAX_EXAMPLES", "77")
    assert examples(3) == 77  # fuzzing reaches the pinned tests too


# ---- paths that a broken helper would silently pass -------------------------------------------------
# (Liger-Kernel once shipped a wrong kernel because its compare helper was wrong: the helper is the root
# of trust of every other test, so each of its branches has an input that must fail.)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_nan_in_expected_alone_fails(dtype):
    e = np.linspace(1.0, 2.0, 9)
    e[4] = np.nan  # a broken oracle: the finite-only metrics would never look at this element
    ok, report, _ = compare(np.linspace(1.0, 2.0, 9), e, dtype=dtype)
    assert not ok and "expected (oracle) has 1 NaN" in report


def test_partly_zero_reference_still_checks_the_zero_elements():
    e = np.ones(40)
    e[::4] = 0.0  # exact zeros, as a padded vocabulary or a masked row gives
    a = e.copy()
    a[8] = 1e-3  # wrong only where the reference is exactly zero
    ok, report, stats = compare(a, e, dtype="float32")
    assert not ok and stats["n_bad"] == 1 and "at [8]" in report


def test_partly_zero_reference_keeps_the_rms_metric():
    # A 3e-5 relative error on every nonzero element: under fp32's elementwise bound (2e-5 + 2e-4 |e|) but
    # over its 2e-5 relative RMS. Some exact zeros in the reference must not switch the RMS metric off.
    e = np.ones(40)
    e[::4] = 0.0
    ok, report, stats = compare(e * (1 + 3e-5), e, dtype="float32")
    assert stats["n_bad"] == 0 and not ok and "relative RMS" in report


def _lse(x):  # [..., V] -> [...]  log-sum-exp; its gradient is softmax(x)
    return np.logaddexp.reduce(x, axis=-1)


def test_central_difference_matches_an_analytic_gradient():
    x = np.random.default_rng(3).standard_normal((4, 5))
    f = lambda x: float(np.sum(_lse(x)) + np.sum(x**3) / 3)  # d/dx: softmax(x) + x²
    want = softmax(x) + x**2
    got = central_difference(f, x)
    assert got.shape == x.shape and got.dtype == np.float64
    assert_close(got, want, atol=1e-8, rtol=1e-7, rms=1e-8)  # truncation ~eps², rounding ~1e-16/eps
    assert_close(central_difference(f, x, eps=1e-4), want, atol=1e-6, rtol=1e-6, rms=1e-6)  # eps² ~ 1e-8


def test_central_difference_jacobian_of_an_array_valued_function():
    x = np.random.default_rng(4).standard_normal((3, 4))
    jac = central_difference(_lse, x)  # [3] values of a [3, 4] input -> [3, 3, 4]
    assert jac.shape == (3, 3, 4)
    rows = np.arange(3)
    assert_close(jac[rows, rows], softmax(x), atol=1e-8, rtol=1e-7, rms=1e-8)
    off = ~np.eye(3, dtype=bool)
    assert np.all(jac[off] == 0.0)  # row k's value does not depend on another row: exactly 0
    x1 = x[0].copy()
    assert_close(central_difference(np.sin, x1), np.diag(np.cos(x1)), atol=1e-8, rtol=1e-7, rms=1e-8)


def test_central_difference_leaves_non_finite_entries_alone():
    x = np.array([[0.3, -np.inf, 1.2], [-np.inf, -np.inf, -np.inf]])
    calls = []

    def f(x):
        calls.append(x.copy())
        return float(_lse(x[0]))

    got = central_difference(f, x)
    assert len(calls) == 2 * 2  # two calls per finite entry, none for the -inf ones
    assert got[0, 1] == 0.0 and np.all(got[1] == 0.0)
    p = softmax(x[0])
    assert_close(got[0, [0, 2]], p[[0, 2]], atol=1e-8, rtol=1e-7, rms=1e-8)
    nothing = central_difference(lambda x: np.zeros(2), np.full(3, -np.inf))  # no finite entry at all
    assert nothing.shape == (2, 3) and not nothing.any()
