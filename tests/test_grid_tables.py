"""The grid drivers' numbers recomputed by hand from small fixture runs with known values.

* ``tiny_models/distill_grid.py``: ``summarise`` (which sets enter the held-out average, means and sample
  std over training seeds, the sampled within-run spread, the median seconds per step), ``table`` (the
  markdown cells) and ``run_one`` (the best-validation checkpoint is the one scored).
* ``tiny_models/match_grid``: ``reports.summarise`` / ``_merge_dist`` / ``by_distance`` /
  ``markdown_table`` and ``plugin.attended_fraction``.

Every expected value is recomputed here with ``statistics`` (or plain loops), never by calling the code
under test a second time.
"""

import dataclasses
import json
import os
import statistics
import types

import pytest
import torch

from tiny_models import distill_grid as dg
from tiny_models.match_grid import plugin, reports
from tiny_models.match_grid.config import RunConfig
from tiny_models.tasks import EVAL_SETS

# ----------------------------------------------------------------------------------------------------
# distill_grid

SETS = ["valid", "test", "unseen_templates", "longer", "unseen_families"]
HELD = ["test", "unseen_templates", "longer", "unseen_families"]  # everything but the validation set

# per method, per training seed, per set: greedy ROUGE-L, greedy exact match, sampled ROUGE-L (mean over
# sampling seeds), sampled ROUGE-L std over sampling seeds, sampled exact match. The validation column is
# far from the others, greedy and sampled differ, and no seed equals the mean, so a wrong set, a swapped
# mode or a first-seed-only statistic changes the numbers.
GREEDY = {
    "kd": [[95.0, 10.0, 20.0, 30.0, 40.0], [85.0, 14.0, 26.0, 30.0, 50.0], [5.0, 30.0, 20.0, 15.0, 20.0]],
    "mgsr": [[60.0, 50.0, 40.0, 33.0, 70.0], [70.0, 41.0, 48.0, 35.0, 61.0], [99.0, 59.0, 46.0, 30.0, 64.0]],
}
EXACT = {
    "kd": [[50.0, 1.0, 2.0, 3.0, 4.0], [40.0, 3.0, 2.0, 7.0, 0.0], [10.0, 8.0, 5.0, 1.0, 6.0]],
    "mgsr": [[20.0, 9.0, 4.0, 2.0, 30.0], [25.0, 13.0, 6.0, 3.0, 20.0], [30.0, 2.0, 9.0, 8.0, 10.0]],
}
SAMPLED = {
    "kd": [[70.0, 5.0, 12.0, 21.0, 33.0], [66.0, 9.0, 18.0, 22.0, 41.0], [8.0, 19.0, 15.0, 9.0, 12.0]],
    "mgsr": [[40.0, 35.0, 30.0, 25.0, 55.0], [52.0, 30.0, 37.0, 24.0, 43.0], [81.0, 47.0, 33.0, 21.0, 50.0]],
}
SAMPLED_STD = {
    "kd": [[1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 1.0, 0.5, 7.0], [6.0, 3.0, 2.0, 1.5, 2.5]],
    "mgsr": [[0.5, 1.5, 2.5, 3.5, 4.5], [3.0, 1.0, 2.0, 6.0, 1.0], [2.0, 2.0, 4.0, 1.0, 0.0]],
}
SAMPLED_EM = {
    "kd": [[30.0, 0.0, 1.0, 2.0, 3.0], [35.0, 2.0, 0.0, 4.0, 1.0], [5.0, 6.0, 3.0, 0.0, 2.0]],
    "mgsr": [[15.0, 6.0, 2.0, 1.0, 22.0], [12.0, 10.0, 4.0, 0.0, 18.0], [20.0, 1.0, 7.0, 5.0, 6.0]],
}
STEP_S = {"kd": [0.30, 0.10, 0.50], "mgsr": [0.90, 0.20, 0.40]}  # medians 0.30 / 0.40, means differ


def _run(method: str, k: int, *, step_s=True) -> dict:
    r = {
        "greedy": {
            s: {"rougeL": GREEDY[method][k][i], "exact_match": EXACT[method][k][i], "rougeL_std": 0.0}
            for i, s in enumerate(SETS)
        },
        "sampled": {
            s: {
                "rougeL": SAMPLED[method][k][i],
                "exact_match": SAMPLED_EM[method][k][i],
                "rougeL_std": SAMPLED_STD[method][k][i],
            }
            for i, s in enumerate(SETS)
        },
        "seed": k + 1,
    }
    if step_s:
        r["step_s"] = STEP_S[method][k]
    return r


def _results() -> dict:
    out = {m: [_run(m, k) for k in range(3)] for m in ("kd", "mgsr")}
    out["student (init)"] = [_run("kd", 1, step_s=False)]  # one evaluation, no training seed
    return out


def _mean_std(xs):
    return statistics.fmean(xs), statistics.stdev(xs)


def test_the_grid_scores_the_validation_set_and_every_held_out_set():
    assert dg.SETS == ("valid", *EVAL_SETS)
    assert list(EVAL_SETS) == HELD


def test_summarise_per_set_mean_and_sample_std_over_seeds():
    s = dg.summarise(_results(), SETS)
    for m in ("kd", "mgsr"):
        row = s[m]
        assert row["n_seeds"] == 3
        for i, name in enumerate(SETS):
            g = [GREEDY[m][k][i] for k in range(3)]
            e = [EXACT[m][k][i] for k in range(3)]
            assert row["greedy"][name]["rougeL"] == pytest.approx(_mean_std(g), abs=1e-12)
            assert row["greedy"][name]["exact_match"] == pytest.approx(_mean_std(e), abs=1e-12)
            sm = [SAMPLED[m][k][i] for k in range(3)]
            se = [SAMPLED_EM[m][k][i] for k in range(3)]
            assert row["sampled"][name]["rougeL"] == pytest.approx(_mean_std(sm), abs=1e-12)
            assert row["sampled"][name]["exact_match"] == pytest.approx(_mean_std(se), abs=1e-12)


def test_summarise_sampled_spread_between_and_within_runs():
    # sampled decoding: the table's mean ± std is over training seeds of each run's mean over sampling
    # seeds; the within-run spread (std over sampling seeds) is the mean of the runs' own stds
    s = dg.summarise(_results(), SETS)
    for m in ("kd", "mgsr"):
        for i, name in enumerate(SETS):
            within = statistics.fmean(SAMPLED_STD[m][k][i] for k in range(3))
            assert s[m]["sampled"][name]["rougeL_within"] == pytest.approx(within, abs=1e-12)
        assert "rougeL_within" not in s[m]["greedy"]["test"]


def test_summarise_held_out_average_excludes_validation_only():
    # each run's average over the four held-out sets, then mean and sample std of those over seeds
    s = dg.summarise(_results(), SETS)
    for m in ("kd", "mgsr"):
        for mode, vals in (("greedy", GREEDY), ("sampled", SAMPLED)):
            per_run = [statistics.fmean(vals[m][k][SETS.index(h)] for h in HELD) for k in range(3)]
            assert s[m][mode]["avg"]["rougeL"] == pytest.approx(_mean_std(per_run), abs=1e-12)
    # the numbers by hand for one cell: kd greedy runs average 25, 30 and 21.25
    mu, sd = s["kd"]["greedy"]["avg"]["rougeL"]
    assert mu == pytest.approx(76.25 / 3) and sd == pytest.approx(statistics.stdev([25.0, 30.0, 21.25]))


def test_summarise_median_step_time_and_single_runs():
    s = dg.summarise(_results(), SETS)
    assert s["kd"]["step_s"] == pytest.approx(0.30) and s["mgsr"]["step_s"] == pytest.approx(0.40)
    one = s["student (init)"]
    assert one["n_seeds"] == 1 and one["step_s"] is None
    assert one["greedy"]["test"]["rougeL"] == (GREEDY["kd"][1][1], 0.0)
    assert one["greedy"]["avg"]["rougeL"] == (statistics.fmean(GREEDY["kd"][1][1:]), 0.0)
    # a set list without the validation set averages every set it is given
    sub = dg.summarise({"kd": _results()["kd"]}, ["test", "longer"])
    per_run = [(GREEDY["kd"][k][1] + GREEDY["kd"][k][3]) / 2 for k in range(3)]
    assert sub["kd"]["greedy"]["avg"]["rougeL"] == pytest.approx(_mean_std(per_run))


def _cells(vals_by_set, with_avg):
    cells = []
    for i in range(len(SETS)):
        mu, sd = _mean_std([vals_by_set[k][i] for k in range(3)])
        cells.append(f"{mu:.1f} ± {sd:.1f}")
    if with_avg:
        mu, sd = _mean_std([statistics.fmean(vals_by_set[k][1:]) for k in range(3)])
        cells.append(f"{mu:.1f} ± {sd:.1f}")
    else:
        cells.append("")
    return cells


def test_table_cells_are_the_summary_rounded():
    s = dg.summarise(_results(), SETS)
    text = dg.table(s, SETS, "greedy", "rougeL", "ROUGE-L")
    lines = text.split("\n")
    assert lines[0] == "**ROUGE-L**"
    assert lines[2] == "| method | seeds | s/step | " + " | ".join([*SETS, "avg (held-out)"]) + " |"
    assert "| kd | 3 | 0.30 | " + " | ".join(_cells(GREEDY["kd"], True)) + " |" in lines
    assert "| mgsr | 3 | 0.40 | " + " | ".join(_cells(GREEDY["mgsr"], True)) + " |" in lines
    samp = dg.table(s, SETS, "sampled", "rougeL", "x").split("\n")
    assert "| mgsr | 3 | 0.40 | " + " | ".join(_cells(SAMPLED["mgsr"], True)) + " |" in samp
    em = dg.table(s, SETS, "greedy", "exact_match", "x").split("\n")
    assert "| kd | 3 | 0.30 | " + " | ".join(_cells(EXACT["kd"], False)) + " |" in em
    one = [ln for ln in lines if ln.startswith("| student (init) |")]
    assert one and one[0].startswith("| student (init) | 1 | - | 85.0 ± 0.0 | 14.0 ± 0.0 |")


def _args(tmp_path):
    return types.SimpleNamespace(
        runs=str(tmp_path),
        steps=4,
        batch_size=2,
        eval_every=2,
        eval_examples=2,
        max_new_tokens=4,
        n_per_family=10,
        no_progress=True,
        teacher="teacher.safetensors",
        student="student.safetensors",
        override={},
        sample_seeds=[0],
    )


@pytest.mark.parametrize("has_best", [True, False])
def test_run_one_scores_the_best_validation_checkpoint(tmp_path, monkeypatch, has_best):
    run_dir = tmp_path / "kd" / "seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "model.safetensors").write_bytes(b"last")
    if has_best:
        (run_dir / "best.safetensors").write_bytes(b"best")
    calls = {"train": 0, "loaded": []}

    def fake_train(cfg):
        calls["train"] += 1
        assert cfg.out_dir == str(run_dir) and cfg.seed == 1 and cfg.steps == 4 and cfg.resume

    def fake_load(path):
        calls["loaded"].append(path)
        return open(path, "rb").read(), {"step": 3 if path.endswith("best.safetensors") else 4}

    monkeypatch.setattr(dg, "train", fake_train)
    monkeypatch.setattr(dg, "load_model", fake_load)
    monkeypatch.setattr(dg, "score_model", lambda model, sets, args: {"scored": model.decode()})
    monkeypatch.setattr(dg, "read_log", lambda d: [{"step_s": 0.5}, {"step_s": 0.1}, {"step_s": 0.2}])
    res = dg.run_one(_args(tmp_path), "kd", 1, {})
    want = "best" if has_best else "model"
    assert calls["loaded"] == [os.path.join(str(run_dir), f"{want}.safetensors")]
    assert res["scored"] == ("best" if has_best else "last")
    assert res["checkpoint"] == f"{want}.safetensors" and res["best_step"] == (3 if has_best else 4)
    assert res["step_s"] == 0.2 and res["method"] == "kd" and res["seed"] == 1
    assert json.loads((run_dir / "eval.json").read_text()) == res
    # a finished run is read back, not trained or scored again
    assert dg.run_one(_args(tmp_path), "kd", 1, {}) == res and calls["train"] == 1


# ----------------------------------------------------------------------------------------------------
# match_grid reports


def _result(seed, acc, *, attention="full", window=None, attn_kwargs=(), pairs=8, task="mqar", dist=None):
    cfg = RunConfig(
        task=task,
        num_kv_pairs=pairs,
        attention=attention,
        window=window,
        attn_kwargs=attn_kwargs,
        seed=seed,
    )
    rec = {
        "config": dataclasses.asdict(cfg),
        "acc": acc,
        "steps": 100 * (seed + 1),
        "time_s": 10.0 * (seed + 2),
        "attended": plugin.attended_fraction(cfg.seq_len, attention, window, attn_kwargs),
        "by_distance": dist or [{"lo": 0, "hi": 8, "n": 5, "acc": acc}],
    }
    return json.loads(json.dumps(rec))  # as read back from result.json: tuples become lists


MATCH_TOK = (("top_k", 2), ("block_size", 1), ("mode", "joint"))
MATCH_BLK = (("top_k", 1), ("block_size", 4), ("mode", "gated"))


def _grid_results():
    d = lambda a, b, c: [  # noqa: E731
        {"lo": 0, "hi": 8, "n": 10, "acc": a},
        {"lo": 8, "hi": 16, "n": 6, "acc": b},
        {"lo": 16, "hi": 32, "n": 4, "acc": c},
    ]
    return [
        _result(0, 0.5, attention="match", window=8, attn_kwargs=MATCH_BLK),
        _result(0, 0.9, dist=d(1.0, 0.8, 0.6)),
        _result(1, 0.7, dist=d(0.5, 0.6, 0.2)),
        _result(2, 0.8, dist=d(0.9, 0.1, 0.4)),
        _result(0, 0.30, attention="sliding", window=24),
        _result(1, 0.20, attention="sliding", window=24),
        _result(0, 0.40, attention="sliding", window=8),
        _result(1, 0.25, attention="sliding", window=8),
        _result(2, 0.10, attention="sliding", window=8),
        _result(0, 0.6, attention="match", window=8, attn_kwargs=MATCH_TOK),
        _result(1, 0.4, attention="match", window=8, attn_kwargs=MATCH_TOK),
        _result(0, 0.55, pairs=16),
        _result(0, 0.95, task="mad_noisy"),
    ]


def test_match_summarise_groups_by_model_and_pairs_with_sample_std():
    rows = reports.summarise(_grid_results())
    key = [(r["task"], r["pairs"], r["model"]) for r in rows]
    assert key == [
        ("mad_noisy", 8, "full"),
        ("mqar", 8, "full"),
        ("mqar", 8, "SWA w=8"),
        ("mqar", 8, "SWA w=24"),
        ("mqar", 8, "SWA w=8 + MATCH token joint top_k=2"),
        ("mqar", 8, "SWA w=8 + MATCH block B=4 gated top_k=1"),
        ("mqar", 16, "full"),
    ]
    by = {(r["task"], r["pairs"], r["model"]): r for r in rows}
    expect = {
        "full": [0.9, 0.7, 0.8],
        "SWA w=8": [0.40, 0.25, 0.10],
        "SWA w=24": [0.30, 0.20],
        "SWA w=8 + MATCH token joint top_k=2": [0.6, 0.4],
        "SWA w=8 + MATCH block B=4 gated top_k=1": [0.5],
    }
    seeds = {"full": [0, 1, 2], "SWA w=8": [0, 1, 2], "SWA w=24": [0, 1]}
    for model, accs in expect.items():
        r = by[("mqar", 8, model)]
        assert r["n_seeds"] == len(accs) and r["seq_len"] == 128
        assert r["acc_mean"] == pytest.approx(statistics.fmean(accs), abs=1e-12)
        assert r["acc_std"] == pytest.approx(statistics.stdev(accs) if len(accs) > 1 else 0.0, abs=1e-12)
        ss = seeds.get(model, list(range(len(accs))))
        assert r["steps_mean"] == pytest.approx(statistics.fmean(100 * (s + 1) for s in ss))
        assert r["time_s_mean"] == pytest.approx(statistics.fmean(10.0 * (s + 2) for s in ss))
    assert by[("mqar", 16, "full")]["acc_mean"] == 0.55 and by[("mqar", 16, "full")]["n_seeds"] == 1
    assert by[("mad_noisy", 8, "full")]["acc_mean"] == 0.95
    # the distance curve of a model: per bin, the mean over its seeds
    full = by[("mqar", 8, "full")]["by_distance"]
    assert [(b["lo"], b["hi"]) for b in full] == [(0, 8), (8, 16), (16, 32)]
    assert [b["acc"] for b in full] == pytest.approx([0.8, 0.5, 0.4])


def test_merge_dist_averages_each_bin_over_the_runs_that_have_it():
    a = [{"lo": 8, "hi": 16, "n": 3, "acc": 0.5}, {"lo": 0, "hi": 8, "n": 4, "acc": 1.0}]
    b = [{"lo": 0, "hi": 8, "n": 4, "acc": 0.0}]
    c = [{"lo": 0, "hi": 8, "n": 4, "acc": 0.5}, {"lo": 32, "hi": 64, "n": 1, "acc": 0.25}]
    out = reports._merge_dist([a, b, c])
    assert [(x["lo"], x["hi"]) for x in out] == [(0, 8), (8, 16), (32, 64)]  # sorted by bin
    assert [x["acc"] for x in out] == pytest.approx([0.5, 0.5, 0.25])
    assert [x["n"] for x in out] == [4, 3, 1]


def test_by_distance_bins_are_half_open_on_the_right():
    dist = torch.tensor([0, 7, 8, 15, 16, 31, 32, 100, -1, -1])
    correct = torch.tensor([1, 1, 0, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    out = reports.by_distance(correct, dist)
    # -1 (no label / no earlier copy) is in no bin; [64, 128) holds 100; empty bins are left out
    want = []
    for lo, hi in zip(reports.DIST_BINS[:-1], reports.DIST_BINS[1:], strict=True):
        idx = [i for i, d in enumerate(dist.tolist()) if lo <= d < hi]
        if idx:
            want.append((lo, hi, len(idx), sum(bool(correct[i]) for i in idx) / len(idx)))
    assert want == [(0, 8, 2, 1.0), (8, 16, 2, 0.5), (16, 32, 2, 0.5), (32, 64, 1, 0.0), (64, 128, 1, 1.0)]
    assert [(b["lo"], b["hi"], b["n"], b["acc"]) for b in out] == want
    custom = reports.by_distance(correct, dist, bins=(0, 8, 9))
    assert [(b["lo"], b["hi"], b["n"]) for b in custom] == [(0, 8, 2), (8, 9, 1)]


def test_markdown_table_cells():
    rows = reports.summarise(_grid_results())
    lines = reports.markdown_table(rows).split("\n")
    assert len(lines) == 2 + len(rows)
    full = statistics.fmean([0.9, 0.7, 0.8]), statistics.stdev([0.9, 0.7, 0.8])
    # cost columns, per head (D = 64 / 2 = 32) and layer over T = 128 queries: full attention attends
    # 128 * 129 / 2 pairs at 4 D flops each; MATCH block B=4 w=8 top_k=1 scores, for t >= 8, the
    # (t - 8) // 4 + 1 candidate blocks at 2 D flops each (sum 1,860) plus the summaries (D per key), and
    # keeps 12 bytes per query and slot
    f_full = 4 * 32 * (128 * 129 // 2) / 1e6
    pairs_blk = sum(min(t + 1, 8) + min(4, t + 1 - min(t + 1, 8)) for t in range(128))
    sel = sum((t - 8) // 4 + 1 for t in range(8, 128))
    assert sel == 1860
    cost_full = f"{f_full:.2f} | 0.00 | 0.0"
    cost_blk = (
        f"{4 * 32 * pairs_blk / 1e6:.2f} | {(2 * 32 * sel + 32 * 128) / 1e6:.2f} | {12 * 128 / 1024:.1f}"
    )
    assert (
        f"| mqar | full | 128 | 8 | 3 | {100 * full[0]:.1f} ± {100 * full[1]:.1f} | 1.000 | {cost_full} "
        "| 200 | 30 |" in lines
    )
    att = plugin.attended_fraction(128, "match", 8, MATCH_BLK)
    assert (
        f"| mqar | SWA w=8 + MATCH block B=4 gated top_k=1 | 128 | 8 | 1 | 50.0 | {att:.3f} | {cost_blk} "
        "| 100 | 20 |" in lines
    )
    assert f"| mad_noisy | full | 128 | – | 1 | 95.0 | 1.000 | {cost_full} | 100 | 20 |" in lines


# ----------------------------------------------------------------------------------------------------
# attended fraction


def test_token_retrieval_scores_every_out_of_window_key():
    # token MATCH (w = 8) scores keys j <= t - 8 for every t >= 8: 1 + 2 + ... + 120 pairs at 2 D flops; a
    # sliding window scores nothing, and top_k only changes the attended pairs and the extra bytes
    c = plugin.attention_cost(128, "match", 8, MATCH_TOK, head_dim=32)
    assert c["select_flops"] == 2 * 32 * (120 * 121 // 2) and c["extra_bytes"] == 12 * 2 * 128
    assert plugin.attention_cost(128, "sliding", 8, (), head_dim=32) == {
        "attn_flops": 4 * 32 * sum(min(t + 1, 8) for t in range(128)),
        "select_flops": 0,
        "extra_bytes": 0,
    }


def _attended_by_hand(T, attention, window, top_k=0, block_size=1):
    num = den = 0
    for t in range(T):
        past = t + 1  # keys full causal attention sees at position t
        if attention == "full" or window is None:
            seen = past
        elif attention == "sliding":
            seen = min(past, window)
        else:  # the window, plus what retrieval can add from the out-of-window past, which may be less
            out_of_window = past - min(past, window)
            seen = min(past, window) + min(top_k * block_size, out_of_window)
        num += seen
        den += past
    return num / den


@pytest.mark.parametrize("T", [1, 5, 12, 33])
@pytest.mark.parametrize("window", [1, 3, 8, 40])
def test_attended_fraction_matches_the_formula(T, window):
    assert plugin.attended_fraction(T, "full", None) == 1.0
    assert plugin.attended_fraction(T, "full", window) == 1.0
    assert plugin.attended_fraction(T, "sliding", window) == _attended_by_hand(T, "sliding", window)
    # sum(min(t + 1, w)) / sum(t + 1), closed form
    assert plugin.attended_fraction(T, "sliding", window) == pytest.approx(
        sum(min(t + 1, window) for t in range(T)) / (T * (T + 1) / 2)
    )
    for top_k, bs in ((1, 1), (2, 1), (1, 4), (3, 4), (50, 2)):
        kw = (("top_k", top_k), ("block_size", bs))
        got = plugin.attended_fraction(T, "match", window, kw)
        assert got == _attended_by_hand(T, "match", window, top_k, bs)
        # retrieval never brings more than the past holds: the same budget as a window of w + k * B
        assert got == pytest.approx(plugin.attended_fraction(T, "sliding", window + top_k * bs))
        assert got <= 1.0


def test_attended_fraction_cap_by_hand():
    # T = 6, w = 2, 3 blocks of 2: positions see 1, 2, 3, 4, 5, 6 keys (the cap binds at every t), so 1.0;
    # without the cap it would be 1, 2, 8, 8, 8, 8
    assert plugin.attended_fraction(6, "match", 2, (("top_k", 3), ("block_size", 2))) == 1.0
    # T = 6, w = 2, one block of 2: 1, 2, 3, 4, 4, 4 over 1..6
    assert plugin.attended_fraction(6, "match", 2, (("top_k", 1), ("block_size", 2))) == 18 / 21
