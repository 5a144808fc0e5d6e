"""Smoke test: the benchmark script runs at its quick CPU size and returns rows with finite times."""

import math

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_quick_run_returns_rows():
    from benchmarks.mgsr_losses import run

    rows = run(device="cpu", quick=True)
    assert {r["op"] for r in rows} == {"dac_kl fwd+bwd (value)", "dac_kl fwd+bwd (mass)", "span fwd+bwd"}
    assert {r["impl"] for r in rows} >= {"torch"}
    for r in rows:
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0, r
        assert {"op", "impl", "shape", "median_ms"} <= set(r)
