"""The grader of the exercises: runs an implementation against the NumPy oracle of ``reference/``.

    python notebooks/exercises/grade.py forward_kl              # your ex_forward_kl.py
    python notebooks/exercises/grade.py forward_kl --solution   # the kept-apart solution
    python notebooks/exercises/grade.py bug_window              # a find-the-bug kernel (fix it in place)
    python notebooks/exercises/grade.py all                     # every exercise and bug, in order
    python notebooks/exercises/grade.py --list
    python notebooks/exercises/grade.py bug_window --brief      # one summary line per failing check
    python -m notebooks.exercises.grade forward_kl              # the same, from the repository root

From ``notebooks/`` it is ``python exercises/grade.py NAME``. Every check feeds odd shapes (T, V, D that are
not powers of two, T not a multiple of the block, padded vocabulary entries, +-1e4 logits where the op takes
logits) to the implementation and to the oracle, compares them with ``fast.testing.compare`` (the project's
one tolerance rule, fp32 row) and prints one line per check, with what differs under a failing one.

Triton kernels always run in Triton's interpreter here, on CPU tensors, so grading needs no GPU: the grader
sets ``TRITON_INTERPRET=1`` before triton is first imported (in a notebook on a GPU machine, set it yourself
before the first import of triton or fast: one process cannot mix interpreted and compiled kernels). Modules are loaded by path (``importlib``), afresh on every
call, so an edited file is picked up in the same Python session.

Exit status: 0 all checks pass, 1 a check fails, 2 the body is still ``raise NotImplementedError``.
Programmatic use: ``grade(name, solution=False)`` returns the list of ``Check``; it raises ``GradeFailure``
(an ``AssertionError``) when one fails and ``NotImplementedError`` for an unwritten body.
"""

import argparse
import importlib.util
import itertools
import os
import pathlib
import sys
from dataclasses import dataclass

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
SOLUTIONS = HERE / "solutions"


@dataclass
class Check:
    label: str
    ok: bool
    report: str


class GradeFailure(AssertionError):
    """At least one check failed; ``checks`` holds all of them."""

    def __init__(self, name, checks):
        self.checks = checks
        bad = [c for c in checks if not c.ok]
        super().__init__(f"{name}: {len(bad)} of {len(checks)} checks failed")


# ----------------------------------------------------------------------------------------------
# loading and running the implementation under test

_loads = itertools.count()


def _check_interpreting():
    """The exercises run in Triton's interpreter, on CPU tensors, GPU or not. Before triton is imported the
    grader can still choose that for the process; afterwards only a process that chose it already will do."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return
    raise RuntimeError(
        "the exercises run in Triton's interpreter, but this process imported triton without it: run the "
        "grader as a script, or set TRITON_INTERPRET=1 before the first import of triton (or of fast)"
    )


def load(path):
    """Import the file at ``path`` as a fresh module."""
    path = pathlib.Path(path)
    name = f"mgsr_exercise_{path.stem}_{next(_loads)}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # inspect (and so triton) finds the source through the module's file
    spec.loader.exec_module(mod)
    return mod


def _run(fn, *args, **kwargs):
    """Call the implementation; a ``NotImplementedError`` raised inside an interpreted kernel reaches us
    wrapped in Triton's ``InterpreterError``: unwrap it. NumPy's floating-point warnings are silenced."""
    try:
        with np.errstate(all="ignore"):  # the interpreter's NumPy warnings (exp overflow to inf, where()'s
            return fn(*args, **kwargs)  # discarded branch): a NaN or inf that matters shows in the report
    except NotImplementedError:
        raise
    except Exception as e:
        cause = e.__cause__
        while cause is not None:
            if isinstance(cause, NotImplementedError):
                raise NotImplementedError(str(cause)) from e
            cause = cause.__cause__
        raise


def _compare(checks, label, actual, expected, **kw):
    from fast.testing import compare

    ok, report, _ = compare(actual, expected, dtype=kw.pop("dtype", "float32"), **kw)
    checks.append(Check(label, ok, report))


def _f32(x):  # numpy -> (fp32 torch tensor, the same values in float64 numpy for the oracle)
    import torch

    t = torch.tensor(np.asarray(x), dtype=torch.float32)
    return t, t.double().numpy()


# ----------------------------------------------------------------------------------------------
# the checks, one function per algorithm: (module under test, checks list) -> None


def _logit_cases(rng, V=37):
    """Named (teacher, student) logit batches: plain, padded vocabulary entries, +-1e4 logits, s == t."""
    t, s = rng.normal(size=(3, V)) * 2, rng.normal(size=(3, V)) * 2
    tp, sp = rng.normal(size=(4, V)), rng.normal(size=(4, V))
    pad = np.zeros((4, V), bool)
    pad[0, [0, 5, V - 1]] = True  # scattered padded entries
    pad[1, V - 7 :] = True  # a padded tail (a vocabulary rounded up)
    pad[2, 1:] = True  # one valid entry left
    tp[pad], sp[pad] = -np.inf, -np.inf
    th = 1e4 * rng.integers(-1, 2, size=(3, V)).astype(float)  # ties at the max: p uniform over them
    sh = 1e4 * rng.integers(-1, 2, size=(3, V)).astype(float)
    same = rng.normal(size=(2, V)) * 3
    return {
        f"plain N=3 V={V}": (t, s),
        f"padded entries (-inf) N=4 V={V}": (tp, sp),
        f"+-1e4 logits N=3 V={V}": (th, sh),
        f"s == t N=2 V={V}": (same, same.copy()),
    }


def check_forward_kl(mod, checks):
    from reference.divergences import forward_kl, forward_kl_grad

    rng = np.random.default_rng(1)
    for label, (t, s) in _logit_cases(rng).items():
        (tt, t64), (st, s64) = _f32(t), _f32(s)
        loss, grad = _run(mod.forward_kl, tt, st)
        _compare(checks, f"{label}: loss", loss, forward_kl(t64, s64))
        _compare(checks, f"{label}: grad", grad, forward_kl_grad(t64, s64))


def check_dac_kl_band(mod, checks):
    from reference.dac_kl import DEFAULTS, dac_kl_parts

    rng = np.random.default_rng(2)
    cases = _logit_cases(rng, V=29)
    for bounds in ("value", "mass"):
        for label, (t, _) in cases.items():
            tt, t64 = _f32(t)
            N = t.shape[0]
            upper, lower = rng.uniform(0.6, 0.95, N), rng.uniform(0.05, 0.4, N)
            parts = dac_kl_parts(t64, t64, upper, lower, bounds=bounds)
            lo, _ = _f32(parts["tau_lo"])
            hi, _ = _f32(parts["tau_hi"])
            m = _run(mod.band, tt, lo, hi, gamma=DEFAULTS["gamma"], eps=DEFAULTS["eps"])
            _compare(checks, f"{bounds} bounds, {label}: m", m, parts["m"])


def check_span_pairs(mod, checks):
    from reference.span import pair_distances

    rng = np.random.default_rng(3)
    T, V = 11, 37
    spans = [(0, 3), (4, 8), (9, 11)]
    big = 1e4 * rng.integers(-1, 2, size=(T, V)).astype(float)
    inputs = {
        f"T={T} V={V} spans {spans}": (rng.normal(size=(T, V)) * 2, rng.normal(size=(T, V)) * 2, spans),
        f"+-1e4 logits, spans {spans}": (big, 1e4 * rng.integers(-1, 2, size=(T, V)).astype(float), spans),
        "one span of 2 tokens at the end": (rng.normal(size=(T, V)), rng.normal(size=(T, V)), [(T - 2, T)]),
        "no spans (no pairs)": (rng.normal(size=(T, V)), rng.normal(size=(T, V)), []),
    }
    for label, (t, s, sp) in inputs.items():
        (tt, t64), (st, s64) = _f32(t), _f32(s)
        for squared in (False, True):
            d = _run(mod.pair_distances, tt, st, sp, squared=squared)
            _compare(checks, f"{label}, squared={squared}", d, pair_distances(t64, s64, sp, squared=squared))


ATTENTION_CASES = (  # (B, H, T, D, causal, window): T not a multiple of the 16-row block, D padded to 32
    (1, 2, 37, 24, True, None),
    (1, 2, 37, 24, True, 5),
    (1, 1, 53, 24, True, 35),
    (1, 2, 37, 24, False, None),
    (1, 1, 53, 20, False, 35),
    (2, 1, 5, 8, True, None),
)


def _attention_inputs(rng, B, H, T, D):
    return [_f32(rng.normal(size=(B, H, T, D))) for _ in range(4)]  # q, k, v, dO


def _case_label(B, H, T, D, causal, window):
    mask = ("causal" if causal else "non-causal") + ("" if window is None else f" window={window}")
    return f"{mask}, B={B} H={H} T={T} D={D}"


def check_attention_fwd(mod, checks):
    from reference.attention import attention

    rng = np.random.default_rng(4)
    for B, H, T, D, causal, window in ATTENTION_CASES:
        (q, q64), (k, k64), (v, v64), _ = _attention_inputs(rng, B, H, T, D)
        out, lse = _run(mod.attention, q, k, v, causal=causal, window=window)
        ref_out, ref_lse = attention(q64, k64, v64, causal=causal, window=window)
        label = _case_label(B, H, T, D, causal, window)
        _compare(checks, f"{label}: out", out, ref_out)
        _compare(checks, f"{label}: lse", lse, ref_lse)


def _backward_inputs(rng, B, H, T, D, causal, window):
    import torch

    from reference.attention import attention

    (q, q64), (k, k64), (v, v64), (do, do64) = _attention_inputs(rng, B, H, T, D)
    out, lse = attention(q64, k64, v64, causal=causal, window=window)
    o = torch.tensor(out, dtype=torch.float32)
    lse = torch.tensor(lse, dtype=torch.float32)
    return (q, k, v, o, do, lse), (q64, k64, v64, do64)


def check_attention_dq(mod, checks):
    from reference.attention import attention_grad

    rng = np.random.default_rng(5)
    for B, H, T, D, causal, window in ATTENTION_CASES:
        args, (q64, k64, v64, do64) = _backward_inputs(rng, B, H, T, D, causal, window)
        dq = _run(mod.attention_dq, *args, causal=causal, window=window)
        ref_dq, _, _ = attention_grad(q64, k64, v64, do64, causal=causal, window=window)
        _compare(checks, f"{_case_label(B, H, T, D, causal, window)}: dq", dq, ref_dq)


def check_attention_dkdv(mod, checks):
    from reference.attention import attention_grad

    rng = np.random.default_rng(6)
    for B, H, T, D, causal, window in ATTENTION_CASES:
        args, (q64, k64, v64, do64) = _backward_inputs(rng, B, H, T, D, causal, window)
        dk, dv = _run(mod.attention_dkdv, *args, causal=causal, window=window)
        _, ref_dk, ref_dv = attention_grad(q64, k64, v64, do64, causal=causal, window=window)
        label = _case_label(B, H, T, D, causal, window)
        _compare(checks, f"{label}: dk", dk, ref_dk)
        _compare(checks, f"{label}: dv", dv, ref_dv)


def check_match_select(mod, checks):
    import torch

    from reference.match import retrieve

    rng = np.random.default_rng(7)
    B, T, D = 2, 23, 8
    q, k = rng.normal(size=(B, T, D)), rng.normal(size=(B, T, D))
    k[:, 6:9] = k[:, 0:3]  # block 2 = block 0 (blocks of 3), tokens 6..8 = tokens 0..2: exact ties
    k[:, 12] = k[:, 4]
    for window, top_k, block_size in ((5, 4, 1), (5, 3, 3), (4, 10, 4), (7, 2, 7), (9, 0, 1)):
        qt, kt = torch.tensor(q), torch.tensor(k)  # float64: the order of near-equal scores is the oracle's
        idx = _run(mod.retrieve, qt, kt, window=window, top_k=top_k, block_size=block_size)
        ref = retrieve(q, k, window=window, top_k=top_k, block_size=block_size)
        label = f"B={B} T={T} D={D} window={window} top_k={top_k} block_size={block_size}: idx"
        _compare(checks, label, np.asarray(idx), ref, dtype="float64", atol=0, rtol=0, rms=0)


def check_scrg_error_position(mod, checks):
    import torch

    from reference.scrg import error_position

    rng = np.random.default_rng(8)
    B, T, V = 7, 13, 5
    d = rng.exponential(size=(B, T))
    y_t = rng.integers(0, V, size=(B, T))
    resp = rng.integers(0, V, size=(B, T))
    lengths = np.array([13, 9, 13, 6, 11, 4, 13])
    start = np.array([0, 2, 5, 0, 3, 4, 13])
    d[0, [3, 8]] = d[0].max() + 1.0  # a tie for the max: the lower index must win
    y_t[0, [3, 8]] = (resp[0, [3, 8]] + 1) % V
    y_t[2] = resp[2]  # the teacher agrees everywhere: no position
    d[1, 9:] = 50.0  # large scores on padding must not win
    y_t[1, 9:] = (resp[1, 9:] + 1) % V
    for b in range(B):
        d[b, : start[b]] = np.nan  # not computed before start (as reference.scrg.error_scores leaves it)
    ref = []
    for b in range(B):
        L = lengths[b]
        j = error_position(d[b, :L], y_t[b, :L], list(resp[b, :L]), start=int(start[b]))
        ref.append(-1 if j is None else j)
    j = _run(
        mod.error_position,
        torch.tensor(d),
        torch.tensor(y_t),
        torch.tensor(resp),
        torch.tensor(lengths),
        torch.tensor(start),
    )
    label = f"B={B} T={T}: ties, padding, NaN before start, rows without a mismatch: j"
    _compare(checks, label, np.asarray(j), np.array(ref), dtype="float64", atol=0, rtol=0, rms=0)


# ----------------------------------------------------------------------------------------------
# the catalogue

EXERCISES = {  # name -> (file, check, what the student writes)
    "forward_kl": ("ex_forward_kl.py", check_forward_kl, "Triton kernel: forward KL loss + grad per row"),
    "dac_kl_band": ("ex_dac_kl_band.py", check_dac_kl_band, "Triton kernel: DAC-KL's sigmoid band"),
    "span_pairs": ("ex_span_pairs.py", check_span_pairs, "PyTorch: the span loss's pair distances"),
    "attention_fwd": ("ex_attention_fwd.py", check_attention_fwd, "Triton kernel: flash-attention forward"),
    "attention_dq": ("ex_attention_dq.py", check_attention_dq, "Triton kernel: flash-attention dQ"),
    "match_select": ("ex_match_select.py", check_match_select, "PyTorch: MATCH's top-k selection"),
    "scrg_error_position": (
        "ex_scrg_error_position.py",
        check_scrg_error_position,
        "PyTorch: SCRG's error position, batched",
    ),
}
BUGS = {  # name -> (file, check, what is broken, in words a student can start from)
    "bug_window": ("bug_window.py", check_attention_fwd, "a sliding-window forward (edge/interior split)"),
    "bug_rescale": ("bug_rescale.py", check_attention_fwd, "an online-softmax forward in log2 units"),
    "bug_dkdv_scale": ("bug_dkdv_scale.py", check_attention_dkdv, "the dK/dV backward kernel"),
}


def path_of(name, solution=False):
    if name in EXERCISES:
        file = EXERCISES[name][0]
    elif name in BUGS:
        file = BUGS[name][0]
    else:
        raise KeyError(f"no exercise {name!r}; known: {', '.join([*EXERCISES, *BUGS])}")
    return (SOLUTIONS if solution else HERE) / file


def grade(name, *, solution=False, path=None, out=print, brief=False):
    """Grade exercise or bug ``name``: the student's file, the solution (``solution=True``) or any ``path``.
    ``brief``: under a failing check only the summary line (max |diff|, relative RMS), not the elements."""
    default = path_of(name, solution)  # a KeyError listing the names for an unknown one
    check = (EXERCISES.get(name) or BUGS[name])[1]
    target = pathlib.Path(path) if path is not None else default
    _check_interpreting()
    checks: list[Check] = []
    check(load(target), checks)
    for c in checks:
        out(f"{'PASS' if c.ok else 'FAIL'}  {c.label}")
        if not c.ok:
            report = c.report.splitlines()[0] if brief else c.report
            out("      " + report.replace("\n", "\n      "))
    if not all(c.ok for c in checks):
        raise GradeFailure(name, checks)
    return checks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?", help="an exercise or bug name, or 'all'")
    ap.add_argument("--solution", action="store_true", help="grade the kept-apart solution instead")
    ap.add_argument("--list", action="store_true", help="list the exercises and the bugs")
    ap.add_argument("--brief", action="store_true", help="one summary line under a failing check")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for name, (file, _, what) in EXERCISES.items():
            print(f"{name:22s} {file:28s} {what}")
        for name, (file, _, what) in BUGS.items():
            print(f"{name:22s} {file:28s} find the bug: {what}")
        return 0
    names = [*EXERCISES, *BUGS] if args.name == "all" else [args.name]
    status = 0
    for name in names:
        which = "solution" if args.solution else "your code"
        print(f"== {name} ({which}: {path_of(name, args.solution).relative_to(HERE.parent.parent)})")
        try:
            grade(name, solution=args.solution, brief=args.brief)
            print(f"== {name}: all checks pass")
        except NotImplementedError as e:
            print(f"== {name}: not implemented yet ({e})")
            status = max(status, 2)
        except GradeFailure as e:
            print(f"== {e}")
            status = max(status, 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
