"""Smoke test: the attention benchmark runs at its tiny CPU size and returns finite timings."""

import math

import pytest

from benchmarks import attention as bench


def test_attention_benchmark_quick_cpu():
    from fast.utils import is_interpreting

    rows = bench.run(device="cpu", quick=True)
    impls = {r["impl"] for r in rows}
    # triton runs on CPU only under the interpreter (always the case without CUDA: conftest sets it)
    assert {"torch-blocked", "sdpa"} | ({"triton"} if is_interpreting() else set()) <= impls, impls
    for r in rows:
        assert r["op"] in ("attn fwd", "attn fwd+bwd") and r["shape"]
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
        assert math.isfinite(r["tflops"]) and r["tflops"] > 0


def test_allowed_pairs_matches_mask_count():
    from reference.attention import attention_mask

    for T, w in ((10, None), (10, 3), (10, 10), (7, 1), (5, 9)):
        assert bench.allowed_pairs(T, w) == int(attention_mask(T, causal=True, window=w).sum())


def test_eager_ratio_and_tflops_from_the_medians(monkeypatch):
    # fake medians: eager fwd 6, fwd+bwd 12, then ours 2 and 3 (ms): the notes say 3.00x and 4.00x eager,
    # and each row's TFLOP/s is its flop count over its own median
    seq = iter([6.0, 12.0, 2.0, 3.0])
    monkeypatch.setattr(bench, "median_ms", lambda f, **kw: next(seq, 1.0))
    rows = bench.run(device="cpu", quick=True)
    first = rows[2:4]  # the first case's torch-blocked rows, after its two eager rows
    assert [r["impl"] for r in rows[:4]] == ["eager", "eager", "torch-blocked", "torch-blocked"]
    assert [r["note"].split(";")[0] for r in first] == ["3.00x eager", "4.00x eager"]
    # TFLOP/s = flops / median, the backward counted as 2.5 forwards: tflops x ms is 3.5 times larger for it
    work = [r["tflops"] * r["median_ms"] for r in first]
    assert work[1] == pytest.approx(3.5 * work[0])
