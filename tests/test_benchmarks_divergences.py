"""Smoke test: benchmarks/divergences.py runs at its quick CPU size and returns rows with finite times."""

import math

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_quick_run_returns_rows():
    import torch

    from benchmarks.divergences import run

    cuda = torch.cuda.is_available()  # CPU: Triton interpreted (conftest); GPU: compiled, quick size
    rows = run(device="cuda" if cuda else "cpu", quick=True)
    assert {r["op"] for r in rows} == {"forward_kl fwd+bwd", "js_divergence fwd+bwd"}
    assert {r["impl"] for r in rows} >= {"torch", "triton"}
    compiled = [r for r in rows if r["impl"] == "torch.compile"]
    assert compiled and "median_ms" in compiled[0], compiled  # inductor ran (--quick: forward KL only)
    for r in rows:
        if r["impl"] == "liger" and "note" in r:
            continue  # "liger_kernel not importable" (it is not a requirement)
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0, r
        assert r["gbps"] > 0


def test_demo_script_prints_the_table(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "demo_divergences.py"
    spec = importlib.util.spec_from_file_location("demo_divergences", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import fast.divergences as F

    real = F.demo_fit
    F.demo_fit = lambda **kw: real(V=16, steps=5)  # the table's shape, not the fit, is tested here
    try:
        mod.main()
    finally:
        F.demo_fit = real
    out = capsys.readouterr().out
    for name in F.DIVERGENCES:
        assert name in out
