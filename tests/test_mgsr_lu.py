"""tiny_models/mgsr_lu.py: the labelled / unlabelled split, the scored sets, and the paired tables recomputed
from fixture runs with known numbers."""

import argparse
import collections
import json
import math
import shutil

import numpy as np
import pytest

from tiny_models import mgsr_lu
from tiny_models.mgsr_lu import (
    adaptive_stats,
    compact_log,
    labelled_split,
    machinery_table,
    paired,
    summarise,
    table,
)
from tiny_models.model_io import load_model
from tiny_models.tasks import TRAIN_FAMILIES, build_dataset


def test_split_per_family_disjoint_and_seeded():
    train = build_dataset(0, n_per_family=60)["train"]
    L, U = labelled_split(train, 7, seed=3)
    counts = collections.Counter(e.family for e in L)
    assert counts == {f: 7 for f in TRAIN_FAMILIES}
    assert len(L) + len(U) == len(train)
    assert {id(e) for e in L}.isdisjoint({id(e) for e in U})
    L2, _ = labelled_split(train, 7, seed=3)
    L3, _ = labelled_split(train, 7, seed=4)
    assert [e.prompt for e in L] == [e.prompt for e in L2] and [e.prompt for e in L] != [e.prompt for e in L3]


def test_fresh_prompts_are_new():
    sets = mgsr_lu.eval_sets(5)
    ds = build_dataset(0, n_eval_per_family=5)
    seen = {e.prompt for k in ("train", "valid", "test") for e in ds[k]}
    assert sets["fresh"] and not {e.prompt for e in sets["fresh"]} & seen
    assert [e.prompt for e in sets["test"]] == [e.prompt for e in ds["test"]]
    assert set(sets) == set(mgsr_lu.HEADLINE) | set(mgsr_lu.NEAR_FLOOR)


def test_paired_difference_interval_and_seed_spread():
    x = {0: [1.0, 2.0, 3.0], 1: [3.0, 4.0, 5.0]}
    y = {0: [0.0, 0.0, 0.0], 1: [0.0, 0.0, 0.0]}
    p = paired(x, y, [0, 1], np.random.default_rng(0))
    assert p["mean"] == pytest.approx(3.0)  # per-prompt differences averaged over seeds: 2, 3, 4
    assert p["sd"] == pytest.approx(math.sqrt(2.0))  # per-seed means 2 and 4
    assert 2.0 <= p["lo"] < 3.0 < p["hi"] <= 4.0
    one = paired({0: [5.0, 5.0]}, {0: [4.0, 4.0]}, [0], np.random.default_rng(0))
    assert one == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "sd": 0.0}


def test_paired_interval_is_a_95_percent_bootstrap_interval():
    # 1,000 prompts with differences 0..999: the standard error of the mean is sd / sqrt(n) = 9.13, so a 95 %
    # interval is about 2 * 1.96 * 9.13 = 35.8 wide (a 90 % one 30.0); the bootstrap's own noise is ~3 %
    x = {0: np.arange(1000.0)}
    p = paired(x, {0: np.zeros(1000)}, [0], np.random.default_rng(1))
    se = np.arange(1000.0).std() / math.sqrt(1000)
    assert p["hi"] - p["lo"] == pytest.approx(2 * 1.96 * se, rel=0.08)
    assert p["mean"] == pytest.approx(499.5) and p["lo"] < p["mean"] < p["hi"]


def _rec(seed, test, longer, sampled_shift=0.0, sources=None, log=None):
    sc = {"test": test, "longer": longer}
    return {
        "seed": seed,
        "scores": {"greedy": sc, "sampled": {k: [v + sampled_shift for v in vs] for k, vs in sc.items()}},
        "sources": sources or {"gt": 1.0},
        "threshold_end": 0.2,
        "scrg_revised": 0,
        "kept_off_gt": None,
        "log": log or [],
    }


def test_tables_from_fixture_runs():
    results = {
        ("sft", 0): _rec(0, [10.0, 20.0, 30.0], [0.0, 10.0]),
        ("sft", 1): _rec(1, [0.0, 0.0, 60.0], [10.0, 10.0]),
        ("kd", 0): _rec(0, [12.0, 22.0, 32.0], [1.0, 11.0]),
        ("kd", 1): _rec(1, [2.0, 2.0, 62.0], [11.0, 11.0]),
        ("mgsr", 0): _rec(0, [13.0, 23.0, 33.0], [0.0, 10.0], -1.0, {"gt": 0.5, "fresh": 0.3, "replay": 0.2}),
        ("mgsr", 1): _rec(1, [4.0, 4.0, 64.0], [10.0, 10.0], -1.0, {"gt": 0.7, "fresh": 0.3}),
    }
    summary = summarise(results, ["test", "longer"])
    g, s = summary["greedy"], summary["sampled"]
    assert g["kd"]["test"]["mean"] == pytest.approx(22.0)  # (22 + 22) / 2
    assert g["kd"]["test"]["vs_floor"]["mean"] == pytest.approx(2.0)
    assert g["kd"]["test"]["vs_floor"]["lo"] == g["kd"]["test"]["vs_floor"]["hi"] == pytest.approx(2.0)
    assert g["mgsr"]["test"]["vs_floor"]["mean"] == pytest.approx(3.5)  # +3 on seed 0, +4 on seed 1
    assert g["mgsr"]["test"]["vs_floor"]["sd"] == pytest.approx(math.sqrt(0.5))
    assert g["mgsr"]["test"]["vs_ref"]["mean"] == pytest.approx(1.5)
    assert g["mgsr"]["longer"]["vs_ref"]["mean"] == pytest.approx(-1.0)
    assert s["mgsr"]["test"]["vs_floor"]["mean"] == pytest.approx(2.5)  # sampled: 1 lower than greedy
    assert g["mgsr"]["seeds"] == [0, 1]
    row = next(
        line for line in table(summary, "greedy", ["test"]).splitlines() if line.startswith("| mgsr |")
    )
    # per-prompt differences are +3 (seed 0) and +4 (seed 1) everywhere: the interval over prompts is a
    # point, the spread is over seeds
    assert row.split(" | ")[1:5] == ["2", "23.5", "+3.5 [+3.5, +3.5] ±0.7", "+1.5 [+1.5, +1.5] ±0.7 |"]
    # another reference: the differences to it, under its name
    other = summarise(results, ["test"], ref="mgsr")
    assert other["greedy"]["kd"]["test"]["vs_ref"]["mean"] == pytest.approx(-1.5)
    head = table(other, "greedy", ["test"], "mgsr").splitlines()[0]
    assert head.endswith("test − mgsr |")
    m = next(line for line in machinery_table(results).splitlines() if line.startswith("| mgsr |"))
    assert m.split(" | ")[1:6] == ["0.60", "0.30", "0.10", "0.00", "0.20"]
    # a method that never samples from the student does not read the threshold: none is shown
    k = next(line for line in machinery_table(results).splitlines() if line.startswith("| kd |"))
    assert k.split(" | ")[5] == "–"
    with pytest.raises(KeyError):
        summarise({("kd", 0): results[("kd", 0)]}, ["test"])  # no floor run: no paired difference


def test_compact_log_and_adaptive_stats():
    log = [
        {"step": t, "loss": 1.0 / t, "lr": 1e-3, "step_s": 0.1, "time_s": t, "source": "gt", "threshold": 0.2}
        for t in range(1, 26)
    ]
    log[6]["val_loss"] = 2.0
    log[11].update(source="fresh", scrg_revised=5, kept=0.25)
    log[12].update(source="replay", kept=0.75)
    log[-1]["threshold"] = 0.4
    c = compact_log(log)
    assert [r["step"] for r in c] == [7, 10, 20, 25]  # every 10th, the validation step, the last
    assert all("lr" not in r and "time_s" not in r for r in c) and c[0]["val_loss"] == 2.0
    st = adaptive_stats(log)
    assert st["sources"] == {"gt": 23 / 25, "fresh": 1 / 25, "replay": 1 / 25}
    assert st["threshold_end"] == 0.4 and st["scrg_revised"] == 5 and st["kept_off_gt"] == pytest.approx(0.5)


def test_driver_end_to_end(tmp_path):
    # three methods, a few steps: trains, scores the last checkpoint, writes the tables, plots and per-run
    # files; a rerun trains nothing, and a run without its eval.json is re-scored, not retrained
    runs, res = tmp_path / "runs", tmp_path / "res"
    argv = [
        "--seeds",
        "0",
        "--steps",
        "3",
        "--base_steps",
        "3",
        "--eval_every",
        "3",
        "--n_eval_per_family",
        "2",
    ]
    argv += ["--samples", "1", "--methods", "sft", "kd", "mgsr", "--runs", str(runs), "--results", str(res)]
    mgsr_lu.main([*argv, "--no_progress"])
    for f in ("results.md", "summary.json", "curves.png", "deltas.png", "runs/mgsr/seed0.json"):
        assert (res / f).exists(), f
    rec = json.loads((res / "runs" / "mgsr" / "seed0.json").read_text())
    assert [r["step"] for r in rec["log"]] == [3] and rec["steps"] == 3
    assert set(rec["scores"]["sampled"]) == set(mgsr_lu.HEADLINE) | set(mgsr_lu.NEAR_FLOOR)
    # exported students: the scored checkpoint, a card with the tables' numbers, which the file reproduces
    mgsr_lu.main([*argv, "--no_progress", "--export", "mgsr", "sft"])
    card = json.loads((res / "students" / "mgsr.json").read_text())
    rec = json.loads((runs / "mgsr" / "seed0" / "eval.json").read_text())
    assert card["rougeL_mean"]["greedy"]["test"] == round(np.mean(rec["scores"]["greedy"]["test"]), 2)
    assert "--export" not in card["command"] and (res / "students" / "README.md").exists()
    model, _ = load_model(str(res / "students" / "mgsr.safetensors"))
    again = mgsr_lu.score(model.eval(), mgsr_lu.eval_sets(2), 1)
    for d in mgsr_lu.DECODINGS:
        for s in mgsr_lu.HEADLINE:
            assert round(np.mean(again[d][s]), 2) == card["rougeL_mean"][d][s]
    log = runs / "kd" / "seed0" / "log.jsonl"
    before = log.read_text()
    (runs / "kd" / "seed0" / "eval.json").unlink()
    (res / "runs" / "kd" / "seed0.json").unlink()
    mgsr_lu.main([*argv, "--no_progress"])
    assert log.read_text() == before and (runs / "kd" / "seed0" / "eval.json").exists()
    # a finished run of another setting is not re-scored as this one
    with pytest.raises(ValueError, match="init_threshold"):
        mgsr_lu.main([*argv, "--no_progress", "--init_threshold", "1.0"])
    # with the training directories gone, the committed per-run files (scores rounded to 0.01) stand in:
    # nothing is trained and the summary is rebuilt from them
    summary = json.loads((res / "summary.json").read_text())
    shutil.rmtree(runs)
    mgsr_lu.main([*argv, "--no_progress"])
    assert not runs.exists()
    again = json.loads((res / "summary.json").read_text())
    for dec in summary:
        for m in summary[dec]:
            for s in mgsr_lu.HEADLINE:
                assert again[dec][m][s]["mean"] == pytest.approx(summary[dec][m][s]["mean"], abs=0.01)
    mgsr_lu.main([*argv, "--no_progress", "--methods", "sft", "kd", "--report", "ablations"])  # beside them
    assert (res / "ablations.md").exists() and (res / "ablations_summary.json").exists()
    assert set(json.loads((res / "ablations_summary.json").read_text())["greedy"]) == {"sft", "kd"}
    assert set(json.loads((res / "summary.json").read_text())["greedy"]) == {"sft", "kd", "mgsr"}
    # --only_done tabulates what is stored and trains nothing: rkl (never run) is named and left out
    mgsr_lu.main(
        [*argv, "--no_progress", "--methods", "sft", "rkl", "mgsr", "--report", "done", "--only_done"]
    )
    assert not runs.exists()
    assert set(json.loads((res / "done_summary.json").read_text())["greedy"]) == {"sft", "mgsr"}
    with pytest.raises(ValueError, match="checkpoint is needed"):  # scores alone cannot be exported
        mgsr_lu.main([*argv, "--no_progress", "--export", "kd"])
    # a committed run is taken only for the same steps, samples and sets
    rec = json.loads((res / "runs" / "mgsr" / "seed0.json").read_text())
    sets = dict.fromkeys(rec["scores"]["greedy"])

    def ns(**kw):  # this test's options (base_steps 3), with kw changed
        return argparse.Namespace(**{"steps": 3, "samples": 1, "base_steps": 3, **kw})

    assert mgsr_lu.usable(rec, ns(), sets)
    assert not mgsr_lu.usable(rec, ns(steps=4), sets)
    assert not mgsr_lu.usable(rec, ns(samples=3), sets)
    assert not mgsr_lu.usable(rec, ns(), {"test": None})
    assert rec["init_threshold"] == 0.2 and rec["labelled"] == 20  # the setting is stored with the run
    assert not mgsr_lu.usable(rec, ns(init_threshold=1.0), sets)
    assert not mgsr_lu.usable(rec, ns(base_steps=600), sets)
    old = {k: v for k, v in rec.items() if k not in mgsr_lu.SETTING}  # written before the setting was stored
    assert mgsr_lu.usable(old, ns(base_steps=600, init_threshold=0.2), sets)  # the defaults of that time
    assert not mgsr_lu.usable(old, ns(base_steps=600, labelled=10), sets)


def test_score_greedy_and_the_mean_of_sampled_decodings_with_shared_seeds(monkeypatch):
    # greedy once, then `samples` decodings at T = 1 with the seeds 1000, 1001, ...; sampled = their mean
    calls = []

    def fake(model, exs, *, temperature=0.0, seed=0, max_new_tokens=48):
        calls.append((temperature, seed))
        # decoding k returns the reference for the first k + 1 prompts (greedy: none), garbage elsewhere
        k = -1 if temperature == 0 else seed - 1000
        return [e.response if i <= k else "zzz" for i, e in enumerate(exs)]

    monkeypatch.setattr(mgsr_lu, "generate_responses", fake)
    exs = build_dataset(0, n_per_family=40, n_eval_per_family=1)["test"][:3]
    out = mgsr_lu.score(None, {"test": exs}, samples=2)
    assert calls == [(0.0, 0), (1.0, 1000), (1.0, 1001)]
    assert out["greedy"]["test"] == [0.0, 0.0, 0.0]
    assert out["sampled"]["test"] == pytest.approx([100.0, 50.0, 0.0])  # right in 2, 1 and 0 of 2 decodings
