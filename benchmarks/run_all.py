"""Run every benchmark script side by side and write one markdown report.

Each ``benchmarks/<stem>.py`` exposes ``run(*, device, quick) -> list[dict]``. On CPU (``--quick``,
the default without CUDA) the sizes are tiny: this only proves the scripts run; absolute CPU times
mean nothing, compare the ratios within one table. On CUDA the full-sized problems run.

    python benchmarks/run_all.py                 # auto device, quick on CPU
    python benchmarks/run_all.py --full --out benchmarks/results/gpu.md
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import platform
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent  # sys.path[0] of a script: each benchmark imports by its stem

COLS = ["op", "impl", "shape", "median_ms", "ratio", "gbps", "tflops", "peak_mb", "note"]


def discover() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_") and p.stem != "run_all")


def add_ratios(rows: list[dict]) -> None:
    """ratio = median_ms / the fastest impl's median_ms for the same (op, shape)."""
    best: dict = {}
    for r in rows:
        key = (r.get("op"), str(r.get("shape")))
        t = r.get("median_ms")
        if isinstance(t, (int, float)):
            best[key] = min(best.get(key, float("inf")), t)
    for r in rows:
        t = r.get("median_ms")
        b = best.get((r.get("op"), str(r.get("shape"))))
        if isinstance(t, (int, float)) and b:
            r["ratio"] = t / b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--full", action="store_true", help="full-sized problems (CUDA)")
    ap.add_argument("--only", default=None, help="comma-separated benchmark stems")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    args = ap.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
    quick = not args.full
    from _timing import fmt_table

    stems = args.only.split(",") if args.only else discover()
    dev_name = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or "cpu")
    lines = [
        "# Benchmarks",
        "",
        f"- device: {dev_name}",
        f"- torch {torch.__version__}; python {platform.python_version()}; quick={quick}",
        "- median of timed repetitions after warm-up; ratio = time / fastest impl of the same op and shape",
        "",
    ]
    failed = []
    for stem in stems:
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(stem)
            rows = mod.run(device=device, quick=quick)
            add_ratios(rows)
            lines += [f"## {stem}", "", fmt_table(rows, COLS), "", f"({time.perf_counter() - t0:.1f}s)", ""]
        except Exception:  # report and go on: one broken benchmark must not hide the others
            failed.append(stem)
            lines += [f"## {stem}", "", "FAILED:", "```", traceback.format_exc(), "```", ""]
        print(f"[bench] {stem}: {time.perf_counter() - t0:.1f}s", flush=True)
        if args.out:  # written after every benchmark: a run stopped at a time limit keeps what finished
            pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            pathlib.Path(args.out).write_text("\n".join(lines))
    report = "\n".join(lines)
    print(report)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
