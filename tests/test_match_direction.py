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
    assert "SWA → MATCH at inference (a)" in (res / "results.md").read_text()

    def boom(*a, **k):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr(dr, "train_run", boom)
    dr.main([*ARGV, "--out", str(out)])


def _args():
    import argparse

    return argparse.Namespace(seq_len=16, pairs=2, window=4, top_k=1, block_size=2, steps=4, lr=3e-3)


def test_score_splits_by_the_window(monkeypatch):
    # distances 1, 3, 4, 9 with window 4: inside are 1 and 3 (right, wrong), beyond 4 and 9 (right, right)
    ev = {"acc": 0.75, "correct": torch.tensor([True, False, True, True]), "dist": torch.tensor([1, 3, 4, 9])}
    monkeypatch.setattr(dr, "evaluate", lambda m, x, y: ev)
    monkeypatch.setattr(dr, "heldout", lambda cfg: (None, None))
    s = dr.score(None, None, window=4)
    assert (s["acc"], s["acc_inside"], s["acc_beyond"], s["frac_beyond"]) == (0.75, 0.5, 1.0, 0.5)


def test_table_means_and_spread_over_seeds():
    recs = [
        {"task": "mqar", "variant": "swa", "acc": a, "acc_inside": 1.0, "acc_beyond": b}
        for a, b in ((0.5, 0.2), (0.7, 0.4))
    ]
    row = next(line for line in dr.table(recs).splitlines() if "| SWA |" in line)
    assert row == "| mqar | SWA | 2 | 60.0 ± 14.1 | 100.0 ± 0.0 | 30.0 ± 14.1 |"
