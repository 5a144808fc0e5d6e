"""Shared timing helpers for the benchmark scripts (scripts, not timed tests).

``median_ms(fn)`` runs ``fn`` a few times to warm up, then times ``rep`` calls one by one and returns
the median in milliseconds: CUDA events on a GPU (after a synchronize), ``perf_counter`` on CPU.
``peak_mb(fn)`` runs ``fn`` once and returns the peak CUDA memory allocated during it (MiB), or
``None`` on CPU. Absolute times are only meaningful from a GPU; on CPU compare ratios side by side.
"""

from __future__ import annotations

import statistics
import time

import torch


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, *, device: str, warmup: int = 3, rep: int = 10) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    if str(device).startswith("cuda"):
        for _ in range(rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mb(fn, *, device: str):
    if not str(device).startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fmt_table(rows: list[dict], cols: list[str]) -> str:
    """A markdown table of ``rows`` restricted to ``cols`` (missing -> '')."""

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def cli(run, cols: list[str], description: str = "", argv=None) -> list[dict]:
    """The shared ``main()`` of a benchmark script: ``--device`` (default cuda when present), ``--quick``."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    rows = run(device=a.device, quick=a.quick)
    print(fmt_table(rows, cols))
    return rows
