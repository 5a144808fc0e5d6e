"""tiny_models/match_grid/direction.py: the paper's direction (retrieval switched on in a model trained with a
sliding window): which weights each variant uses, the distance split, the table, resuming."""

import json

import pytest
import torch

from tiny_models.match_grid import direction as dr

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARGV = ["--tasks", "mqar", "--seeds", "0", "--seq_len", "16", "--pairs", "2", "--window", "4", "--top_k", "1"]
ARGV += ["--block_size", "2", "--steps", "4", "--ft_frac", "0.5", "--no_progress"]


def test_every_variant_from_the_right_weights_and_resume(tmp_path, monkeypatch):
    out, res = tmp_path / "runs", tmp_path / "res"
    real, calls = dr.train_run, []

    def spy(cfg, **kw):
        t = real(cfg, **kw)
        calls.append((cfg, kw.get("init"), t["model"].state_dict()))
        return t

    monkeypatch.setattr(dr, "train_run", spy)
    dr.main([*ARGV, "--out", str(out), "--results", str(res)])
    trained = {(c.attention, c.steps): (init, sd) for c, init, sd in calls}
    assert sorted(trained) == [("full", 4), ("match", 2), ("match", 4), ("sliding", 4)]  # fine-tune: 0.5 x 4
    swa_sd = trained[("sliding", 4)][1]
    init = trained[("match", 2)][0]
    assert init is not None and all(torch.equal(init[k], swa_sd[k]) for k in swa_sd)  # (b) starts from SWA
    assert trained[("match", 4)][0] is None  # (c) from scratch
    recs = {r["variant"]: r for r in json.loads((res / "runs.json").read_text())}
    assert set(recs) == set(dr.VARIANTS)
    assert (
        recs["swa_match_inference"]["config"]["attention"] == "match"
        and "steps" not in recs["swa_match_inference"]
    )
    assert recs["swa_match_finetune"]["init"] == "swa" and recs["swa_match_finetune"]["steps"] <= 2
    x, y = dr.heldout(dr.configs("mqar", 0, _args())["swa"])
    for r in recs.values():  # every labelled held-out position is in one distance bin
        assert 0.0 <= r["acc"] <= 1.0 and sum(b["n"] for b in r["by_distance"]) == int((y != -100).sum())
    assert (
        "SWA → MATCH at inference (a)" in (res / "results.md").read_text()
        and (res / "direction.png").exists()
    )

    def boom(*a, **k):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr(dr, "train_run", boom)
    dr.main([*ARGV, "--out", str(out)])
    # the training directory gone, the committed records stand in: nothing is trained, the table is the same
    table = (res / "results.md").read_text()
    import shutil

    shutil.rmtree(out)
    dr.main([*ARGV, "--out", str(out), "--results", str(res)])
    assert (res / "results.md").read_text() == table
    # other settings are not taken from them: a longer fine-tune trains (b) again, from the SWA weights,
    # which are trained again first since no weights were committed
    monkeypatch.setattr(dr, "train_run", spy)
    calls.clear()
    dr.main([*ARGV[:-3], "--ft_frac", "0.75", "--no_progress", "--out", str(out), "--results", str(res)])
    assert sorted((c.attention, c.steps) for c, _, _ in calls) == [("match", 3), ("sliding", 4)]
    # every command that made these records is listed once
    cmds = (res / "commands.txt").read_text().splitlines()
    assert (
        len(cmds) == 2
        and "--ft_frac 0.75" in cmds[1]
        and all(c in (res / "results.md").read_text() for c in cmds)
    )


def _args():
    import argparse

    return argparse.Namespace(seq_len=16, pairs=2, window=4, top_k=1, block_size=2, steps=4, lr=3e-3)


def test_score_splits_by_the_window(monkeypatch):
    # distances 1, 3, 4, 9 with window 4: inside are 1 and 3 (right, wrong), beyond 4 and 9 (right, right)
    # (positions 0, 1 in example 0; 2 in example 1; 3 in example 3; example 2 has none)
    ev = {"acc": 0.75, "correct": torch.tensor([True, False, True, True]), "dist": torch.tensor([1, 3, 4, 9])}
    ev["row"] = torch.tensor([0, 0, 1, 3])
    monkeypatch.setattr(dr, "evaluate", lambda m, x, y: ev)
    monkeypatch.setattr(dr, "heldout", lambda cfg: (None, None))
    s = dr.score(None, None, window=4)
    assert (s["acc"], s["acc_inside"], s["acc_beyond"], s["frac_beyond"]) == (0.75, 0.5, 1.0, 0.5)
    assert (s["ex_correct"], s["ex_n"]) == ([1, 1, 0, 1], [2, 1, 0, 1])


def test_evaluate_rows_match_the_labelled_positions(monkeypatch):
    # two examples with 2 and 1 labelled positions, batches of one: rows follow y[mask]'s row-major order
    from tiny_models.match_grid import run as rr

    y = torch.full((2, 5), -100)
    y[0, 1], y[0, 3], y[1, 4] = 1, 2, 3
    monkeypatch.setattr(rr, "logits_at", lambda model, xb, mask: torch.zeros(int(mask.sum()), 8))
    monkeypatch.setattr(rr, "key_distance", lambda xb, yb: torch.zeros_like(yb))
    ev = rr.evaluate(torch.nn.Linear(1, 1), torch.zeros(2, 5, dtype=torch.long), y, batch=1)
    assert ev["row"].tolist() == [0, 0, 1] and ev["correct"].tolist() == [False, False, False]


def test_paired_difference_and_interval():
    # seed 0: per-example accuracies (a) 1, 1, 0.5, 1 against SWA 0, 1, 0.5, 0 -> differences 1, 0, 0, 1;
    # seed 1: 0, 0.5 against 0, 0 -> 0, 0.5. Mean over seeds of the per-seed means: (0.5 + 0.25) / 2
    recs = [
        {"seed": 0, "variant": "swa_match_inference", "ex_correct": [2, 2, 1, 2], "ex_n": [2, 2, 2, 2]},
        {"seed": 0, "variant": "swa", "ex_correct": [0, 2, 1, 0], "ex_n": [2, 2, 2, 2]},
        {"seed": 1, "variant": "swa_match_inference", "ex_correct": [0, 1], "ex_n": [2, 2]},
        {"seed": 1, "variant": "swa", "ex_correct": [0, 0], "ex_n": [2, 2]},
    ]
    d = dr.paired(recs, "swa_match_inference")
    assert d["mean"] == pytest.approx(0.375) and d["seeds"] == 2
    assert d["sd"] == pytest.approx(0.125 * 2**0.5)  # the per-seed means 0.5 and 0.25
    # the bootstrap means lie between the extremes a resample can give: (0 + 0) / 2 and (1 + 0.5) / 2
    assert 0.0 <= d["lo"] < 0.375 < d["hi"] <= 0.75
    same = [dict(r, variant="swa") for r in recs if r["variant"] == "swa"]
    z = dr.paired(same + [dict(r, variant="x") for r in same], "x")
    assert (z["mean"], z["lo"], z["hi"]) == (0.0, 0.0, 0.0)
    assert dr.paired(recs, "match_scratch") is None
    bad = [recs[0], dict(recs[1], ex_n=[1, 2, 2, 2], ex_correct=[0, 2, 1, 0])]
    with pytest.raises(ValueError, match="different held-out sets"):
        dr.paired(bad, "swa_match_inference")


def test_table_means_and_spread_over_seeds():
    recs = [
        {"task": "mqar", "variant": "swa", "acc": a, "acc_inside": 1.0, "acc_beyond": b}
        for a, b in ((0.5, 0.2), (0.7, 0.4))
    ]
    row = next(line for line in dr.table(recs).splitlines() if "| SWA |" in line)
    assert row == "| mqar | SWA | 2 | 60.0 ± 14.1 | 100.0 ± 0.0 | 30.0 ± 14.1 | – |"
    # a variant gets its paired difference to SWA: per example 1 - 0 and 1 - 1 -> +50.0, interval [0, 100]
    recs = [
        {"task": "mqar", "seed": 0, "variant": v, "acc": 0.5, "acc_inside": None, "acc_beyond": 0.5}
        | {"ex_correct": c, "ex_n": [1, 1]}
        for v, c in (("swa", [0, 1]), ("swa_match_inference", [1, 1]))
    ]
    row = next(line for line in dr.table(recs).splitlines() if "(a)" in line)
    assert row.endswith("| 50.0 ± 0.0 | – | 50.0 ± 0.0 | +50.0 [+0.0, +100.0] |")


def test_table_groups_settings_and_pairs_with_the_same_window():
    # two MQAR lengths; at T = 16 two windows. (a) at w 4 pairs with SWA w 4 (+100), not with SWA w 8 (0)
    def rec(T, v, w, correct, kw=()):
        cfg = {"task": "mqar", "seq_len": T, "num_kv_pairs": 2, "vocab_size": 64, "window": w, "lr": 0.003}
        cfg["attn_kwargs"] = [list(p) for p in kw]
        return {"task": "mqar", "seed": 0, "variant": v, "config": cfg, "acc": sum(correct) / 2}, {
            "acc_inside": None,
            "acc_beyond": None,
            "ex_correct": correct,
            "ex_n": [1, 1],
        }

    kw = (("top_k", 1), ("block_size", 2), ("mode", "joint"))
    recs = [
        a | b
        for a, b in (
            rec(16, "swa", 4, [0, 0]),
            rec(16, "swa", 8, [1, 1]),
            rec(16, "swa_match_inference", 4, [1, 1], kw),
            rec(32, "swa", 4, [1, 1]),
            rec(32, "swa_match_inference", 4, [1, 1], kw),
        )
    ]
    lines = dr.table(recs).splitlines()
    a16 = next(
        x
        for x in lines
        if x.startswith("| mqar T=16 P=2 V=64 lr=0.003 | SWA → MATCH at inference (a) (w 4, top_k 1")
    )
    a32 = next(
        x
        for x in lines
        if x.startswith("| mqar T=32 P=2 V=64 lr=0.003 | SWA → MATCH at inference (a) (w 4, top_k 1")
    )
    assert a16.endswith("| +100.0 [+100.0, +100.0] |") and a32.endswith("| +0.0 [+0.0, +0.0] |")
    assert sum("| SWA (w " in x for x in lines) == 3


def test_best_learning_rate_per_model():
    # SWA at two rates (the better one, 1e-2, by the mean over two seeds), full at one: one row each,
    # and no table when no setting has two rates
    def rec(v, lr, acc, seed=0):
        cfg = {"task": "mqar", "seq_len": 16, "num_kv_pairs": 2, "vocab_size": 64, "window": 4, "lr": lr}
        return {"task": "mqar", "seed": seed, "variant": v, "config": cfg | {"attn_kwargs": []}, "acc": acc}

    recs = [rec("swa", 3e-3, 0.5), rec("swa", 3e-3, 0.7, 1), rec("swa", 1e-2, 0.9), rec("swa", 1e-2, 0.6, 1)]
    recs.append(rec("full", 3e-3, 1.0))
    wide = rec("swa", 3e-3, 1.0)  # another window is another model: not averaged with w = 4
    wide["config"]["window"] = 8
    assert dr.best_lr_table(recs[-1:]) is None
    lines = dr.best_lr_table([*recs, wide]).splitlines()
    swa = next(x for x in lines if "| SWA (w 4) |" in x)
    assert swa == "| mqar T=16 P=2 V=64 | SWA (w 4) | 0.01 | 75.0 (2 seeds) | 0.003: 60.0, 0.01: 75.0 |"
    assert any("| SWA (w 8) | 0.003 | 100.0 (1 seeds) | 0.003: 100.0 |" in x for x in lines)
    assert any("| full (ceiling) | 0.003 | 100.0 (1 seeds)" in x for x in lines)
