"""Benchmark: token-level divergences, forward + backward through the student logits.

Implementations side by side: the Triton kernels, the vectorised torch backend, ``torch.compile`` of
the torch backend (inductor, one graph: see ``fast.divergences.divergence``; at the first size only,
since compilation per shape costs tens of seconds; with ``--quick`` for forward KL only), and
Liger-Kernel's KL / JSD when ``liger_kernel`` is importable (it takes log-probabilities, so its rows
include a ``log_softmax`` of both inputs).

Full size (CUDA): N ∈ {4096, 16384} tokens × V ∈ {32000, 128256}, bf16 logits, forward KL and JSD(β=0.5).
Reported: median time, effective GB/s = (bytes of teacher + student + gradient) / time, i.e. the
minimum traffic of a fused fwd+bwd (the kernel itself reads both inputs three times: two forward
passes and one backward pass), and peak CUDA memory above the inputs. On CUDA the script stops timing
new rows after ``BENCH_DIVERGENCES_BUDGET_S`` (60 s) and marks the rest skipped, so it ends well within
90 s; sizes that do not fit are marked "out of memory". ``--quick``: a tiny size so
the script is exercised on CPU (Triton interpreted there); CPU times mean nothing in absolute terms.

    python benchmarks/divergences.py --device cuda
    python benchmarks/divergences.py --device cpu --quick
"""
from __future__ import annotations

import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fast.* (which defines @triton.jit kernels)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._timing import cli, median_ms, peak_mb  # noqa: E402
from fast.divergences import divergence  # noqa: E402
from fast.utils import is_interpreting  # noqa: E402

BUDGET_S = float(os.environ.get("BENCH_DIVERGENCES_BUDGET_S", "60"))  # the whole script, on CUDA


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


def _fwd_bwd(fwd, t, s):
    def fn():
        s.grad = None
        fwd(t, s).backward()
    return fn


def run(*, device: str, quick: bool) -> list[dict]:
    cuda = str(device).startswith("cuda")
    t_start = time.perf_counter()
    if quick:
        shapes, dtype = [(8, 300)], torch.float32
        warmup, rep = (1, 3) if cuda else (0, 1)  # interpreted Triton: one call is enough to exercise it
    else:
        shapes, dtype = [(4096, 32000), (16384, 32000), (4096, 128256), (16384, 128256)], torch.bfloat16
        warmup, rep = 2, 5
    # phase 1: the kernels vs the eager torch backend at every size; phase 2: the extras, torch.compile
    # at the first size (its compile time would dominate the budget) and Liger if present. On CPU the
    # extras run only with --quick; --quick compiles forward KL only (one inductor compile, ~30 s on 2 cores)
    phases = [["triton", "torch"] if (cuda or is_interpreting()) else ["torch"]]
    if cuda or quick:
        phases.append(["torch.compile", "liger"])
    rows = []
    for phase in phases:
        for name in ("forward_kl", "js_divergence"):
            for N, V in shapes:
                shape = f"N={N} V={V} {str(dtype)[6:]}"
                extra = phase[0] == "torch.compile"
                if extra and ((N, V) != shapes[0] or (quick and name != "forward_kl")):
                    continue
                g = torch.Generator(device="cpu").manual_seed(0)
                t = (3 * torch.randn(N, V, generator=g)).to(device=device, dtype=dtype)
                s = (3 * torch.randn(N, V, generator=g)).to(device=device, dtype=dtype).requires_grad_()
                nbytes = 3 * N * V * t.element_size()  # read t, s; write the gradient
                for impl in phase:
                    row = dict(op=f"{name} fwd+bwd", impl=impl, shape=shape)
                    rows.append(row)
                    if cuda and time.perf_counter() - t_start > BUDGET_S:
                        row["note"] = f"skipped: the script's {BUDGET_S:.0f}s budget is spent"
                        continue
                    if impl == "liger":
                        fwd = _liger(name)
                        if fwd is None:
                            row["note"] = "liger_kernel not importable"
                            continue
                    elif impl == "torch.compile":
                        fwd = torch.compile(lambda a, b, _n=name: divergence(_n, a, b, backend="torch"))
                    else:
                        fwd = (lambda a, b, _n=name, _i=impl: divergence(_n, a, b, backend=_i))
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
    return rows


def main():
    cli(run, ["op", "impl", "shape", "median_ms", "gbps", "peak_mb", "note"], __doc__.split("\n")[0])


if __name__ == "__main__":
    main()
