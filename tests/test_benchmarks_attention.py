"""Smoke test: the attention benchmark runs at its tiny CPU size and returns finite timings."""

import math

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
