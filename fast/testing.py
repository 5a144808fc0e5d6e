"""The one tolerance helper of the project: compare a fast result with its float64 oracle.

Two metrics, both must pass:

* elementwise ``|actual - expected| <= atol + rtol * |expected|`` (catches a single wrong element);
* relative RMS ``||actual - expected||_2 / ||expected||_2 <= rms`` (catches a small error spread
  everywhere, e.g. a missing scale factor that stays under ``atol`` element by element).

An all-zero expected value (e.g. the gradient of a fully masked batch) has no scale, so there the
relative RMS is skipped and ``atol`` alone decides.

Non-finite values: NaN never passes (in either argument). ``+inf``/``-inf`` pass only where the
expected value is the same infinity at the same position (e.g. the log-sum-exp of a fully masked
row); an infinity against a finite value fails.

The tolerances are per *input* dtype of the fast computation (the fast code accumulates in fp32
whatever its input dtype; for fp16/bf16 inputs the oracle must be fed the *rounded* inputs, so the
tolerance only has to cover the fast path's own arithmetic and its output rounding):

=========  ========  ========  ========
dtype      atol      rtol      rel-RMS
=========  ========  ========  ========
float64    1e-10     1e-8      1e-9
float32    2e-5      2e-4      2e-5
float16    2e-3      1e-2      2e-3
bfloat16   1.6e-2    5e-2      1e-2
=========  ========  ========  ========

fp32 on a GPU: ``tl.dot`` on fp32 uses TF32 unless told otherwise; kernels in this project request
``input_precision="ieee"`` for fp32 dots so the fp32 row above also holds compiled.

Two explicit widenings, each to be justified where it is used, never picked to make a test pass:

* ``scale`` (``tolerance_for``): all three numbers times a factor derived from the computation, e.g.
  a log-ratio of size R resolves to R·eps only.
* ``slack`` (``compare`` / ``assert_close``): the **conditioning** of the oracle itself. Some results
  are ill-conditioned by construction (a quantile threshold, a cancelling sum): perturbing the inputs
  by a few units of the fast path's precision moves the *exact* answer by more than the dtype's atol.
  The caller measures that movement with the oracle (e.g. by re-running it on perturbed inputs) and
  passes it as ``slack`` (a number, or an array broadcast against ``expected`` for a per-element
  bound). It is added to the elementwise bound, and the RMS budget becomes
  ``max(rms, ||slack|| / ||expected||)``, the relative RMS that a shift of exactly ``slack`` gives.
  NaN and infinity rules are unchanged, whatever the slack.

``rms=math.inf`` switches the RMS metric off; callers say why (the RMS of a cancelling sum, or of a
value below fp32's normal range, measures the cancellation, not the error).

``central_difference(f, x)``: the finite-difference gradient (or Jacobian) that the oracles' analytic
gradients are checked against.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Tolerance",
    "TOLERANCES",
    "tolerance_for",
    "compare",
    "assert_close",
    "rel_rms",
    "central_difference",
    "fuzz_examples",
    "examples",
]


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    rms: float


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(atol=1e-10, rtol=1e-8, rms=1e-9),
    "float32": Tolerance(atol=2e-5, rtol=2e-4, rms=2e-5),
    "float16": Tolerance(atol=2e-3, rtol=1e-2, rms=2e-3),
    "bfloat16": Tolerance(atol=1.6e-2, rtol=5e-2, rms=1e-2),
}


def _dtype_name(dtype) -> str:
    """Accept a torch dtype, a numpy dtype or a string; return 'float32' etc."""
    if isinstance(dtype, str):
        name = dtype
    else:
        name = str(dtype)
    name = name.replace("torch.", "")
    aliases = {
        "fp64": "float64",
        "double": "float64",
        "fp32": "float32",
        "float": "float32",
        "fp16": "float16",
        "half": "float16",
        "bf16": "bfloat16",
    }
    name = aliases.get(name, name)
    if name not in TOLERANCES:
        raise ValueError(f"no tolerance defined for dtype {dtype!r}; known: {sorted(TOLERANCES)}")
    return name


def tolerance_for(dtype, scale: float = 1.0) -> Tolerance:
    """The tolerance for a dtype. ``scale`` multiplies all three numbers; callers that use it must
    say why in a comment (e.g. a quantity that sums V terms)."""
    t = TOLERANCES[_dtype_name(dtype)]
    return Tolerance(t.atol * scale, t.rtol * scale, t.rms * scale)


def _to_f64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().to("cpu")
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=np.float64)


def rel_rms(actual, expected) -> float:
    """||a - e|| / ||e|| over finite entries of e (0 when both are 0)."""
    a, e = _to_f64(actual), _to_f64(expected)
    fin = np.isfinite(e)
    num = float(np.sqrt(np.sum((a[fin] - e[fin]) ** 2)))
    den = float(np.sqrt(np.sum(e[fin] ** 2)))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def _slack_array(slack, shape) -> np.ndarray:
    sl = np.asarray(_to_f64(slack), dtype=np.float64)
    try:
        sl = np.broadcast_to(sl, shape)
    except ValueError:
        raise ValueError(f"slack of shape {sl.shape} does not broadcast to the shape {shape}") from None
    if not np.all(np.isfinite(sl)) or np.any(sl < 0):
        raise ValueError(
            f"slack must be finite and >= 0, got min {sl.min() if sl.size else 0!r}, "
            f"non-finite {int((~np.isfinite(sl)).sum())}"
        )
    return sl


def compare(actual, expected, *, dtype="float64", atol=None, rtol=None, rms=None, slack=0.0):
    """Return (ok: bool, report: str, stats: dict). See the module docstring for the rules
    (``slack``: the oracle's own conditioning, measured by the caller)."""
    a, e = _to_f64(actual), _to_f64(expected)
    if a.shape != e.shape:
        return False, f"shape mismatch: actual {a.shape} vs expected {e.shape}", {}
    tol = tolerance_for(dtype)
    atol = tol.atol if atol is None else atol
    rtol = tol.rtol if rtol is None else rtol
    rms = tol.rms if rms is None else rms
    sl = _slack_array(slack, e.shape)

    problems = []
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    if nan_e.any():
        problems.append(f"expected (oracle) has {int(nan_e.sum())} NaN(s): the reference itself is broken")
    if nan_a.any():
        problems.append(f"actual has {int(nan_a.sum())} NaN(s), first at {np.argwhere(nan_a)[0].tolist()}")
    inf_a, inf_e = np.isinf(a), np.isinf(e)
    inf_bad = (inf_a | inf_e) & ~(inf_a & inf_e & (np.sign(a) == np.sign(e)))
    if inf_bad.any():
        idx = tuple(int(i) for i in np.argwhere(inf_bad)[0])
        problems.append(
            f"{int(inf_bad.sum())} infinity mismatch(es), first at {list(idx)}: "
            f"actual {a[idx]!r} vs expected {e[idx]!r}"
        )

    fin = np.isfinite(a) & np.isfinite(e)
    err = np.zeros_like(a)
    err[fin] = np.abs(a[fin] - e[fin])
    bound = atol + rtol * np.abs(np.where(fin, e, 0.0)) + sl
    bad = fin & (err > bound)
    max_abs = float(err.max()) if err.size else 0.0
    r = rel_rms(np.where(fin, a, 0.0), np.where(fin, e, 0.0)) if err.size else 0.0
    if sl.size and sl.any():
        e_norm = float(np.sqrt(np.sum(np.where(fin, e, 0.0) ** 2)))
        if e_norm > 0:  # the relative RMS that a shift of exactly `slack` gives
            rms = max(rms, float(np.sqrt(np.sum(np.where(fin, sl, 0.0) ** 2))) / e_norm)
    stats = {"max_abs": max_abs, "rel_rms": r, "n_bad": int(bad.sum()), "n": int(a.size)}
    if bad.any():
        extra = f" + slack (max {float(sl.max()):.3g})" if sl.any() else ""
        lines = [f"{int(bad.sum())}/{a.size} elements exceed atol={atol:g} + rtol={rtol:g}*|expected|{extra}"]
        for idx in np.argwhere(bad)[:5]:
            t = tuple(int(i) for i in idx)
            lines.append(f"  at {list(t)}: actual {a[t]!r} expected {e[t]!r} |diff| {err[t]:.3g}")
        problems.append("\n".join(lines))
    zero_ref = not np.any(np.where(fin, e, 0.0))
    if r > rms and not zero_ref:  # an all-zero reference has no scale: the elementwise atol alone decides
        problems.append(f"relative RMS {r:.3g} > {rms:g}")
    head = f"max_abs={max_abs:.3g} rel_rms={r:.3g} (dtype={_dtype_name(dtype)}, shape={a.shape})"
    return (not problems), head + ("\n" + "\n".join(problems) if problems else ""), stats


def assert_close(
    actual, expected, *, dtype="float64", name: str = "", atol=None, rtol=None, rms=None, slack=0.0
):
    """Raise AssertionError with a readable report unless ``actual`` matches ``expected``."""
    ok, report, stats = compare(actual, expected, dtype=dtype, atol=atol, rtol=rtol, rms=rms, slack=slack)
    if not ok:
        raise AssertionError(f"{name or 'value'} mismatch: {report}")
    return stats


def central_difference(f, x, eps: float = 1e-6) -> np.ndarray:
    """Central differences in float64: entry ``i`` is ``(f(x + eps e_i) - f(x - eps e_i)) / (2 eps)``.

    For a scalar ``f`` that is the gradient, shaped like ``x``; for an array-valued ``f``, the Jacobian
    ``[*f(x).shape, *x.shape]`` (``d f[k] / d x[i]`` at ``[k, i]``), two calls of ``f`` per entry of ``x``
    either way. A non-finite entry of ``x`` (a ``-inf`` padded logit) does not move under ``± eps``: it is
    left alone and gets 0. Error per entry: truncation ~ eps² times the third derivative, rounding
    ~ 1e-16 |f| / eps (about 1e-10 at the default eps for |f| ~ 1).
    """
    x = np.asarray(x, dtype=np.float64)
    out = None
    for i in np.ndindex(x.shape):
        if not np.isfinite(x[i]):
            continue
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        d = (np.asarray(f(xp), dtype=np.float64) - np.asarray(f(xm), dtype=np.float64)) / (2 * eps)
        if out is None:
            out = np.zeros(d.shape + x.shape)
        out[(...,) + i] = d
    if out is None:  # no finite entry: the shape of f's value alone decides
        out = np.zeros(np.shape(f(x)) + x.shape)
    return out


def fuzz_examples() -> int:
    """Examples per property test under ``HYPOTHESIS_PROFILE=fuzz`` (``HYPOTHESIS_MAX_EXAMPLES``, 400)."""
    return int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "400"))


def examples(n: int) -> int:
    """``max_examples`` for a property test too expensive for the default profile's count: ``n`` in
    ``make test``, the fuzz count under ``HYPOTHESIS_PROFILE=fuzz``, so fuzzing reaches every test."""
    return fuzz_examples() if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else n
