"""Smoke test: the MATCH benchmark runs at its tiny CPU size and returns finite timings, ratios and fits."""

import math

from benchmarks import match as bench


def test_match_benchmark_quick_cpu():
    from fast.utils import is_interpreting

    rows = bench.run(device="cpu", quick=True)
    timed = [r for r in rows if r.get("median_ms") is not None]
    impls = {r["impl"] for r in timed}
    assert {"full", "swa", "match"} | ({"match-triton"} if is_interpreting() else set()) <= impls, impls
    for r in timed:
        assert r["op"] in ("match fwd", "match fwd+bwd") and r["shape"]
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
    notes = [r["note"] for r in rows if r["impl"] == "ratios"]
    assert len(notes) == 4 and all("MATCH/SWA=" in n and "full/MATCH=" in n for n in notes)
    fits = [r["note"] for r in rows if r["impl"].startswith("fit ")]
    assert len(fits) == 6 and all(math.isfinite(float(n.split("^")[1])) for n in fits)


def test_fit_exponent_recovers_a_power_law():
    ts = [1024, 2048, 4096, 8192]
    assert abs(bench.fit_exponent(ts, [3e-6 * t**1.5 for t in ts]) - 1.5) < 1e-12
