"""CPU side-by-side helpers for the benchmark scripts (the torch backends against the eager formulas).

``interleaved_ms(fns)`` times one call of each callable in turn (the order rotating) for ``rep``
rounds and returns the median per callable: on a shared machine, load from other processes then hits
every implementation alike, and the ratio of the medians is what the tables report.

``rss_growth_mb(fn)`` runs ``fn`` once and returns the process's peak resident set during the call
minus its resident set just before, in MiB (Linux: the peak ``VmHWM`` is reset through
``/proc/self/clear_refs`` first; ``ru_maxrss`` cannot be reset, and a child inherits its parent's).
Run it in a fresh subprocess per case (``peak_rss_in_subprocess``), after the inputs are built: the
growth is then the call's own peak memory above its inputs (the gradient, every temporary, and a few
MiB of one-time library initialisation, the same for every implementation). ``tracemalloc`` does not
see torch's allocations, and torch's CPU allocator keeps no peak statistics, hence the resident set.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def interleaved_ms(fns: dict, *, warmup: int = 1, rep: int = 5) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    keys = list(fns)
    for r in range(rep):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotate: no implementation always runs first
            t0 = time.perf_counter()
            fns[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def reps_for(n_elements: int) -> int:
    """More rounds for small problems (each call is milliseconds, and noisier), 5 for large ones."""
    return 25 if n_elements <= 1 << 21 else 5


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def rss_growth_mb(fn) -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def peak_rss_in_subprocess(script: str, *args) -> float:
    """Run ``python script --peak-rss *args`` (the script prints ``rss_growth_mb`` last) and parse it."""
    out = subprocess.run(
        [sys.executable, script, "--peak-rss", *map(str, args)], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])
