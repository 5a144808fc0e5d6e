"""Benchmark: token-level divergences, forward + backward through the student logits.

Implementations side by side: the Triton kernels, the torch backend, the textbook eager formula
(``eager``: ``F.kl_div(F.log_softmax(s), F.log_softmax(t), log_target=True)`` for forward KL; for JSD(β)
``β·KL(p‖m) + (1−β)·KL(q‖m)`` with ``log m = log(β·p + (1−β)·q)``, through autograd; no masks, no input
checks), ``torch.compile`` of the torch backend (inductor, one graph: see
``fast.divergences.divergence``; at the first size only, since compilation per shape costs tens of
seconds; with ``--quick`` for forward KL only), and Liger-Kernel's KL / JSD when ``liger_kernel`` is
importable (it takes log-probabilities, so its rows include a ``log_softmax`` of both inputs).
``vs_eager`` = eager time / this row's time, measured in the same run (> 1: faster than eager).

CUDA: N ∈ {4096, 16384} tokens × V ∈ {32000, 128256}, bf16 logits, forward KL and JSD(β=0.5).
Reported: median time, effective GB/s = (bytes of teacher + student + gradient) / time, i.e. the
minimum traffic of a fused fwd+bwd (the kernel itself reads both inputs three times: two forward
passes and one backward pass), and peak CUDA memory above the inputs. On CUDA the script stops timing
new rows after ``BENCH_DIVERGENCES_BUDGET_S`` (60 s) and marks the rest skipped, so it ends well within
90 s; sizes that do not fit are marked "out of memory".

CPU (without ``--quick``): the torch backend against the eager formula, fp32, at N × V = 1024 × 32000,
4096 × 259 (the tiny GPTs' byte vocabulary) and 256 × 50257, forward KL and JSD(β=0.5). The
implementations are timed interleaved (one call of each in turn, ``rep`` rounds, median per
implementation), so load from other processes hits both alike. ``peak_mb`` on CPU is the growth of
the process's peak resident set over one fwd+bwd call, in a fresh subprocess per row
(``benchmarks/_cpu.py``: the gradient and every temporary, above the inputs).
``--quick``: a tiny size so the script is exercised on CPU (Triton interpreted there).

    python benchmarks/divergences.py --device cuda
    OMP_NUM_THREADS=2 python benchmarks/divergences.py --device cpu
    python benchmarks/divergences.py --device cpu --quick
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

from fast.divergences import divergence
from fast.utils import is_interpreting

if __package__:  # imported as benchmarks.divergences (the tests, from the repository root)
    from benchmarks._cpu import interleaved_ms, peak_rss_in_subprocess, reps_for, rss_growth_mb
    from benchmarks._timing import cli, median_ms, peak_mb
else:  # run as a script (or by run_all.py): benchmarks/ is sys.path[0]
    from _cpu import interleaved_ms, peak_rss_in_subprocess, reps_for, rss_growth_mb
    from _timing import cli, median_ms, peak_mb

BUDGET_S = float(os.environ.get("BENCH_DIVERGENCES_BUDGET_S", "60"))  # the whole script, on CUDA
CPU_SHAPES = {
    "forward_kl": [(1024, 32000), (4096, 259), (256, 50257)],
    "js_divergence": [(1024, 32000), (4096, 259), (256, 50257)],
}


def eager(name, t, s, beta=0.5):
    """The textbook eager formula (mean over rows), autograd for the backward."""
    lq, lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if name == "forward_kl":  # kl_div(input=log q, target=log p) = KL(p‖q)
        return F.kl_div(lq, lp, log_target=True, reduction="batchmean")
    lm = torch.log(beta * lp.exp() + (1 - beta) * lq.exp())
    return beta * F.kl_div(lm, lp, log_target=True, reduction="batchmean") + (1 - beta) * F.kl_div(
        lm, lq, log_target=True, reduction="batchmean"
    )


def _liger(name):
    """A fwd+bwd callable factory for Liger-Kernel's KL / JSD, or None when it is not importable."""
    try:
        from liger_kernel.transformers.functional import liger_jsd, liger_kl_div
    except Exception:
        return None

    def run(t, s):
        lq = torch.log_softmax(s.float(), -1)
        lp = torch.log_softmax(t.float(), -1)
        if name == "forward_kl":  # kl_div(input=log q, target=log p) = KL(p‖q)
            return liger_kl_div(lq, lp, reduction="batchmean", log_target=True)
        return liger_jsd(lq, lp, beta=0.5)

    return run


def _fwd(name, impl):
    if impl == "eager":
        return lambda a, b: eager(name, a, b)
    if impl == "liger":
        return _liger(name)
    if impl == "torch.compile":
        return torch.compile(lambda a, b: divergence(name, a, b, backend="torch"))
    return lambda a, b: divergence(name, a, b, backend=impl)


def _fwd_bwd(fwd, t, s):
    def fn():
        s.grad = None
        fwd(t, s).backward()

    return fn


def _inputs(N, V, dtype, device):  # built in place: no temporary raises the peak RSS before a measurement
    g = torch.Generator(device="cpu").manual_seed(0)
    t = torch.randn(N, V, generator=g).mul_(3).to(device=device, dtype=dtype)
    s = torch.randn(N, V, generator=g).mul_(3).to(device=device, dtype=dtype).requires_grad_()
    return t, s


def _peak_rss_child(name, impl, N, V):
    t, s = _inputs(N, V, torch.float32, "cpu")
    print(rss_growth_mb(_fwd_bwd(_fwd(name, impl), t, s)))


def run_cpu() -> list[dict]:
    """The torch backend vs the eager formula on CPU, fp32, interleaved (see the docstring)."""
    rows = []
    for name, shapes in CPU_SHAPES.items():
        for N, V in shapes:
            t, s = _inputs(N, V, torch.float32, "cpu")
            impls = ("torch", "eager")
            fns = {i: _fwd_bwd(_fwd(name, i), t, s) for i in impls}
            ms = interleaved_ms(fns, warmup=1, rep=reps_for(N * V))
            for impl in impls:
                rows.append(
                    dict(
                        op=f"{name} fwd+bwd",
                        impl=impl,
                        shape=f"N={N} V={V} float32",
                        median_ms=ms[impl],
                        vs_eager=ms["eager"] / ms[impl],
                        gbps=3 * N * V * 4 / ms[impl] / 1e6,
                        peak_mb=peak_rss_in_subprocess(__file__, name, impl, N, V),
                    )
                )
            del t, s
    return rows


def run(*, device: str, quick: bool) -> list[dict]:
    cuda = str(device).startswith("cuda")
    if not cuda and not quick:
        return run_cpu()
    t_start = time.perf_counter()
    if quick:
        shapes, dtype = [(8, 300)], torch.float32
        warmup, rep = (1, 3) if cuda else (0, 1)  # interpreted Triton: one call is enough to exercise it
    else:
        shapes, dtype = [(4096, 32000), (16384, 32000), (4096, 128256), (16384, 128256)], torch.bfloat16
        warmup, rep = 2, 5
    # phase 1: the kernels, the torch backend and the eager formula at every size; phase 2: the extras,
    # torch.compile at the first size (its compile time would dominate the budget) and Liger if present.
    # --quick compiles forward KL only (one inductor compile, ~30 s on 2 cores)
    phases = [
        ["triton", "torch", "eager"] if (cuda or is_interpreting()) else ["torch", "eager"],
        ["torch.compile", "liger"],
    ]
    rows = []
    for phase in phases:
        for name in ("forward_kl", "js_divergence"):
            for N, V in shapes:
                shape = f"N={N} V={V} {str(dtype)[6:]}"
                extra = phase[0] == "torch.compile"
                if extra and ((N, V) != shapes[0] or (quick and name != "forward_kl")):
                    continue
                t, s = _inputs(N, V, dtype, device)
                nbytes = 3 * N * V * t.element_size()  # read t, s; write the gradient
                for impl in phase:
                    row = dict(op=f"{name} fwd+bwd", impl=impl, shape=shape)
                    rows.append(row)
                    if cuda and time.perf_counter() - t_start > BUDGET_S:
                        row["note"] = f"skipped: the script's {BUDGET_S:.0f}s budget is spent"
                        continue
                    fwd = _fwd(name, impl)
                    if fwd is None:
                        row["note"] = "liger_kernel not importable"
                        continue
                    fn = _fwd_bwd(fwd, t, s)
                    try:
                        # the first compiled call is the compilation: never time it
                        w = max(warmup, 1) if impl == "torch.compile" else warmup
                        ms = median_ms(fn, device=device, warmup=w, rep=rep)
                        row.update(median_ms=ms, gbps=nbytes / ms / 1e6, peak_mb=peak_mb(fn, device=device))
                    except torch.OutOfMemoryError:
                        row["note"] = "out of memory"
                    except Exception as e:  # e.g. an inductor failure: report it, keep the other rows
                        row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                    s.grad = None
                    if cuda:
                        torch.cuda.empty_cache()
                del t, s
    base = {(r["op"], r["shape"]): r["median_ms"] for r in rows if r["impl"] == "eager" and "median_ms" in r}
    for r in rows:
        if "median_ms" in r and (r["op"], r["shape"]) in base:
            r["vs_eager"] = base[(r["op"], r["shape"])] / r["median_ms"]
    return rows


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--peak-rss":
        name, impl, N, V = sys.argv[2:6]
        _peak_rss_child(name, impl, int(N), int(V))
        return
    cols = ["op", "impl", "shape", "median_ms", "vs_eager", "gbps", "peak_mb", "note"]
    cli(run, cols, __doc__.split("\n")[0])


if __name__ == "__main__":
    main()
