"""Smoke test: the MATCH benchmark runs at its tiny CPU size and returns finite timings, ratios and fits."""

import math

import pytest

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
    for n in notes:  # the block-major balance: no program gets more than a work item
        longest, most = (int(x) for x in n.replace(",", "").split() if x.isdigit())
        assert 0 < most <= min(longest, 256)
    fits = [r["note"] for r in rows if r["impl"].startswith("fit ")]
    assert len(fits) == 6 and all(math.isfinite(float(n.split("^")[1])) for n in fits)


def test_fit_exponent_recovers_a_power_law():
    ts = [1024, 2048, 4096, 8192]
    assert abs(bench.fit_exponent(ts, [3e-6 * t**1.5 for t in ts]) - 1.5) < 1e-12


def test_the_cost_model_counts_what_the_kernels_do(capsys):
    from benchmarks import match_cost as mc

    rows = {r["kernel"]: r for r in mc.match_step(1, 4, 2, 4096, 64, 256, 4, 32)}
    rows8 = {r["kernel"]: r for r in mc.match_step(1, 4, 2, 4096, 64, 256, 8, 32)}
    # the retrieved part's tensor-core work: 2 (lse) + 4 (accumulate) + 10 (backward) flops per listed
    # (query head, query, slot) x block x D
    listed = 1 * 4 * 4096 * 4
    assert rows["blocks: lse pass"]["flops"] == 2 * listed * 32 * 64
    assert rows["blocks: accumulate pass (atomic)"]["flops"] == 4 * listed * 32 * 64
    assert rows["blocks: dk/dv + dq (atomic)"]["flops"] == 10 * listed * 32 * 64
    for name in ("blocks: lse pass", "blocks: accumulate pass (atomic)", "blocks: dk/dv + dq (atomic)"):
        assert rows8[name]["flops"] == 2 * rows[name]["flops"]  # linear in top_k
    # the window part is the sliding-window kernel's: the same rows as the baseline
    assert rows["window fwd (o_W fp32)"]["flops"] == mc.window_parts(1, 4, 2, 4096, 64, 256)[0]["flops"]
    # extra memory: per extra slot a few bytes of index, not a D-vector
    grow = [
        (mc.extra_memory(1, 4, 4, 4096, D, 16, 32) - mc.extra_memory(1, 4, 4, 4096, D, 8, 32))
        / (4 * 4096 * 8)
        for D in (64, 128)
    ]
    assert grow[0] == grow[1] and 0 < grow[0] < 64
    s = mc.print_report(1, 16, 16, 32768, 64, 512, 8, 64)
    out = capsys.readouterr().out
    assert "MATCH total" in out and s["match_over_swa"] > 1 and s["sdpa_over_match"] > 1
    assert abs(s["match_ms"] - sum(r["ms"] for r in mc.match_step(1, 16, 16, 32768, 64, 512, 8, 64))) < 1e-9


def test_the_ratio_notes_divide_the_right_medians(monkeypatch):
    # fake medians in the order the script measures them (per case: full, swa, match; fwd then fwd+bwd)
    per_case = [10.0, 20.0, 2.0, 4.0, 3.0, 8.0]
    seq = iter(per_case * 2)
    monkeypatch.setattr(bench, "median_ms", lambda f, **kw: next(seq, 1.0))
    rows = bench.run(device="cpu", quick=True)
    notes = [r["note"] for r in rows if r["impl"] == "ratios"]
    assert [n.split(" longest")[0] for n in notes] == [
        "MATCH/SWA=1.50 full/MATCH=3.33",  # fwd: 3 / 2, 10 / 3
        "MATCH/SWA=2.00 full/MATCH=2.50",  # fwd+bwd: 8 / 4, 20 / 8
    ] * 2


def test_median_ms_is_the_median_of_the_timed_calls_after_the_warmup(monkeypatch):
    from benchmarks import _timing

    clock, durations = [0.0], iter([9.0, 9.0, 0.005, 0.001, 0.100, 0.002, 0.003])  # seconds per call
    monkeypatch.setattr(_timing.time, "perf_counter", lambda: clock[0])

    def fn():
        clock[0] += next(durations)

    assert _timing.median_ms(fn, device="cpu", warmup=2, rep=5) == pytest.approx(3.0)  # ms; warm-up untimed
    assert _timing.fmt_table([{"a": 1.23456, "b": None}], ["a", "b"]).splitlines()[-1] == "| 1.235 |  |"


def test_the_cost_model_prices_causal_sdpa_and_the_window_by_their_pairs():
    # compute-bound shapes: causal SDPA attends T (T + 1) / 2 ~ T^2 / 2 pairs per head at 4 D flops (forward),
    # the backward 2.5 times that; the sliding window attends T w pairs
    from benchmarks import match_cost as mc

    B, H, T, D, w = 1, 16, 32768, 64, 512
    _, s = mc.report(B, H, H, T, D, w, 8, 64)
    sdpa_flops = 3.5 * 4 * D * B * H * T * T / 2
    assert s["sdpa_ms"] == pytest.approx(sdpa_flops / mc.PEAK_TC * 1e3 + 2 * mc.LAUNCH_S * 1e3, rel=1e-3)
    win = mc.window_parts(B, H, H, T, D, w)
    assert sum(r["flops"] for r in win) == pytest.approx(3.5 * 4 * D * B * H * T * w)
    # the floor: 512 window keys + 8 x 64 retrieved = 2x the window's work
    assert s["floor_over_swa"] == 2.0 and s["sdpa_over_floor"] == pytest.approx(
        s["sdpa_ms"] / (2 * s["swa_ms"])
    )


def test_the_cost_model_prices_both_selections():
    # (query row, candidate) pairs: T * NB / 2 per kv head; the exact pass 2 D fp32 flops each (+ the group
    # sum), the band twice that on tensor cores plus KG = next_pow2(top_k + 8) re-scored candidates per row
    from benchmarks import match_cost as mc

    B, H, T, D, K, bs = 1, 4, 4096, 64, 8, 32
    pairs = B * H * T * (T // bs) / 2
    exact = mc.selection(B, H, H, T, D, K, bs, select="exact")
    band = mc.selection(B, H, H, T, D, K, bs, select="band")
    assert [r["kernel"] for r in exact] == ["selection (exact, fp32)"] and len(band) == 2
    assert exact[0]["flops"] == 2 * pairs * D + B * H * T * D
    assert band[0]["flops"] == 4 * pairs * D and band[1]["flops"] == 2 * B * H * T * 16 * D
    assert (
        mc.selection(B, H, H, T, D, 9, bs, select="band")[1]["flops"] == 2 * B * H * T * 32 * D
    )  # 9 + 8 -> 32 slots
    rows = {r["kernel"] for r in mc.match_step(B, H, H, T, D, 256, K, bs, select="exact")}
    assert "selection (exact, fp32)" in rows and not any("band" in r for r in rows)
