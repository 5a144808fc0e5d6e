"""The recall experiment driver (tiny_models/match_grid.py) and the MATCH demo: the model variant, the loss
slice, the attended-fraction accounting, save/load, determinism, grid resumption, the shipped checkpoints."""

import dataclasses
import importlib.util
import json
import os
import pathlib

import pytest
import torch

import tiny_models.match_grid as mg
from tiny_models.gpt import GPT
from tiny_models.recall import IGNORE

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(
    seq_len=16,
    num_kv_pairs=2,
    vocab_size=16,
    n_embd=16,
    n_head=2,
    batch_size=4,
    eval_n=16,
    eval_every=3,
    steps=6,
    warmup=2,
    lr=3e-3,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_attended_fraction_by_hand():
    assert mg.attended_fraction(8, "full", None) == 1.0
    assert mg.attended_fraction(8, "sliding", 8) == 1.0
    # T = 4, w = 1: every query sees 1 key of 1, 2, 3, 4
    assert mg.attended_fraction(4, "sliding", 1) == pytest.approx(4 / 10)
    # plus one retrieved token where one exists: 1, 2, 2, 2
    assert mg.attended_fraction(4, "match", 1, (("top_k", 1), ("block_size", 1))) == pytest.approx(7 / 10)
    # one block of 2: 1, 2, 3, 3
    assert mg.attended_fraction(4, "match", 1, (("top_k", 1), ("block_size", 2))) == pytest.approx(9 / 10)


def test_logits_at_is_the_model_forward_sliced():
    torch.manual_seed(0)
    cfg = mg.RunConfig(**TINY)
    model = mg.new_model(cfg).double()
    x, y = mg.make_batch(cfg, 3, seed=1)
    mask = y != IGNORE
    full = GPT.forward(model, x)  # the plain tiny GPT's forward (prev_mix off)
    torch.testing.assert_close(mg.logits_at(model, x, mask), full[mask], rtol=0, atol=1e-12)


def test_prev_mix_starts_as_the_plain_model_and_looks_one_token_back():
    torch.manual_seed(0)
    cfg = mg.RunConfig(**TINY, prev_mix=True)
    model = mg.new_model(cfg).double()
    x, _ = mg.make_batch(cfg, 2, seed=1)
    torch.testing.assert_close(model(x), GPT.forward(model, x), rtol=0, atol=1e-12)  # W_prev = 0 at init
    torch.nn.init.normal_(model.prev.weight)
    e = model.embed(x)
    x2 = x.clone()
    x2[:, 5] = (x2[:, 5] + 1) % cfg.vocab_size
    changed = (model.embed(x2) - e).abs().amax(-1) > 0  # [B, T]
    assert changed[:, 5].all() and changed[:, 6].all()
    assert not changed[:, :5].any() and not changed[:, 7:].any()


@pytest.mark.parametrize("taps", [2, 3])
def test_multi_tap_mix_starts_as_the_plain_model_and_looks_taps_tokens_back(tmp_path, taps):
    torch.manual_seed(0)
    cfg = mg.RunConfig(**TINY, prev_mix=True, prev_taps=taps)
    model = mg.new_model(cfg).double()
    assert model.prev_taps == taps
    x, _ = mg.make_batch(cfg, 2, seed=1)
    torch.testing.assert_close(model(x), GPT.forward(model, x), rtol=0, atol=1e-12)  # all maps 0 at init
    last = model.prev2 if taps == 2 else model.prev3
    torch.nn.init.normal_(last.weight)  # the farthest tap alone: token t reaches t + taps only
    x2 = x.clone()
    x2[:, 5] = (x2[:, 5] + 1) % cfg.vocab_size
    changed = (model.embed(x2) - model.embed(x)).abs().amax(-1) > 0  # [B, T]
    assert changed[:, 5].all() and changed[:, 5 + taps].all()
    others = [t for t in range(x.shape[1]) if t not in (5, 5 + taps)]
    assert not changed[:, others].any()
    torch.nn.init.normal_(model.prev.weight)
    path = str(tmp_path / "m.safetensors")
    mg.save_run(model.float(), cfg, path, acc=0.5)
    loaded, cfg2 = mg.load_run(path)
    assert cfg2 == cfg and loaded.prev_taps == taps
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    swapped = mg.swapped(loaded, attention="sliding", window=128)  # the window covers T: same function
    assert swapped.prev_taps == taps
    torch.testing.assert_close(swapped(x), loaded(x), rtol=1e-5, atol=1e-5)


def test_bad_taps_and_training_targets_raise():
    with pytest.raises(ValueError, match="prev_taps"):
        mg.new_model(mg.RunConfig(**TINY, prev_taps=4))
    with pytest.raises(ValueError, match="MAD and Shakespeare tasks only"):
        mg.training_config(mg.RunConfig(**TINY, train_targets="lm"))
    with pytest.raises(ValueError, match="train_targets"):
        mg.training_config(mg.RunConfig(task="mad_fuzzy", vocab_size=16, train_targets="all"))


def test_lm_training_targets_label_every_next_token_of_the_same_examples():
    cfg = mg.RunConfig(task="mad_fuzzy", seq_len=32, vocab_size=16, train_targets="lm")
    x_lm, y_lm = mg.make_batch(mg.training_config(cfg), 3, seed=4)
    x, y = mg.make_batch(cfg, 3, seed=4)  # evaluation batches keep the recall targets
    assert torch.equal(x_lm, x)
    lab = y != IGNORE
    assert lab.sum() < (y_lm != IGNORE).sum()
    known = y_lm[:, :-1] != IGNORE  # the left padding is unlabelled
    assert known.float().mean() > 0.5
    assert torch.equal(y_lm[:, :-1][known], x[:, 1:][known])  # the next token wherever it is labelled
    assert torch.equal(y_lm[lab], y[lab])  # every recall target is also a next-token target


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    cfg = mg.RunConfig(**TINY, prev_mix=True, attention="sliding", window=4)
    model = mg.new_model(cfg)
    torch.nn.init.normal_(model.prev.weight)
    path = str(tmp_path / "new_dir" / "m.safetensors")  # a missing directory is created
    mg.save_run(model, cfg, path, acc=0.5)
    loaded, cfg2 = mg.load_run(path)
    assert cfg2 == cfg
    x, _ = mg.make_batch(cfg, 2, seed=3)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        mg.load_run(str(tmp_path / "missing.safetensors"))


def test_train_run_is_deterministic_and_swap_to_itself_is_identity():
    cfg = mg.RunConfig(**TINY, prev_mix=True)
    a = mg.train_run(cfg, progress=False)
    b = mg.train_run(cfg, progress=False)
    assert a["curve"] == b["curve"] and a["steps"] == cfg.steps
    for pa, pb in zip(a["model"].parameters(), b["model"].parameters(), strict=True):
        assert torch.equal(pa, pb)
    x, y = mg.heldout(cfg)
    same = mg.plugin_eval(a["model"], x, y, [("full", "full", None, ())])[0]
    assert same["acc"] == a["acc"] and same["attended"] == 1.0


def test_unknown_task_raises():
    with pytest.raises(ValueError, match="unknown task"):
        mg.make_batch(mg.RunConfig(task="nope"), 2, seed=0)


def test_grid_runs_each_config_once_and_resumes(tmp_path, monkeypatch):
    spec = mg.GridSpec(
        seq_len=16,
        pairs=(2,),
        window=4,
        top_ks=(1,),
        block_size=2,
        seeds=(0,),
        steps=3,
        base={k: v for k, v in TINY.items() if k not in ("seq_len", "num_kv_pairs", "steps")},
    )
    runs = mg.grid_runs(spec)
    assert len({mg.run_name(c) for c in runs}) == len(runs) == 3 + 4  # full, SWA w, SWA w+kB, 4 MATCH
    assert {c.n_embd for c in runs} == {16} and {c.n_layer for c in runs} == {2}
    first = mg.run_grid(spec, str(tmp_path), progress=False)
    names = {r["name"] for r in first}
    assert {mg.run_name(c) for c in runs if c.attention != "match"} <= names

    def boom(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(mg.grid, "train_run", boom)  # the name run_grid calls
    again = mg.run_grid(spec, str(tmp_path), progress=False)
    assert [r["name"] for r in again] == [r["name"] for r in first]
    rec = json.loads((tmp_path / first[0]["name"] / "result.json").read_text())
    assert mg.RunConfig.from_dict(rec["config"]) == runs[0] and 0.0 <= rec["acc"] <= 1.0
    rows = mg.summarise(again)
    assert all(r["n_seeds"] == 1 for r in rows) and mg.markdown_table(rows).count("\n") == len(rows) + 1
    # the written results carry every run's own record beside the table
    mg.write_results(again, str(tmp_path / "res"))
    per_run = json.loads((tmp_path / "res" / "grid_runs.json").read_text())
    assert sorted(r["name"] for r in per_run) == sorted(names)
    by_name = {r["name"]: r for r in again}
    for r in per_run:
        assert r["acc"] == by_name[r["name"]]["acc"] and r["config"]["seed"] == 0 and r["curve"]
    assert len(json.loads((tmp_path / "res" / "grid.json").read_text())) == len(rows)


def test_grid_budget_matched_window_attends_the_largest_match_budget():
    # the second SWA baseline sees w + max(top_k) * block_size keys: what the largest MATCH run attends
    spec = mg.GridSpec(window=8, top_ks=(1, 3, 2), block_size=5, seeds=(0, 1), pairs=(4, 8))
    runs = mg.grid_runs(spec)
    sliding = {c.window for c in runs if c.attention == "sliding"}
    assert sliding == {8, 8 + 3 * 5}
    kws = [dict(c.attn_kwargs) for c in runs if c.attn_kwargs]
    assert max(sliding) == spec.window + max(kw["top_k"] * kw["block_size"] for kw in kws)
    names = {mg.run_name(c).split("_")[3] for c in runs if c.attention == "sliding"}
    assert names == {"sliding8", "sliding23"}


CKPTS = [pathlib.Path(mg.CKPT_DIR) / f"{n}.safetensors" for n in ("full", "swa", "match")]


@pytest.mark.skipif(not all(p.exists() for p in CKPTS), reason="the MATCH checkpoints are not built yet")
def test_shipped_checkpoints_and_demo(capsys):
    for p in CKPTS:
        assert p.stat().st_size <= 1024 * 1024
    spec = importlib.util.spec_from_file_location("demo_match", ROOT / "scripts" / "demo_match.py")
    demo_match = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_match)
    out = demo_match.main(n=128)
    text = capsys.readouterr().out
    assert "trained full" in text and "trained match" in text
    # the shipped models show the effect the demo is about: full attention recalls, the window alone cannot
    assert out["full"] >= 0.9 and out["swa"] < out["full"] - 0.3
    assert os.path.exists(CKPTS[0])


def test_plugin_pairs_sweep_table_and_plot(tmp_path):
    cfg = mg.RunConfig(**TINY)
    model = mg.new_model(cfg).eval()
    text = mg.plugin_pairs(
        model, cfg, [1, 2, 3], window=4, top_ks=[1], block_size=2, n=8, plot=str(tmp_path / "p.png")
    )
    head, rule, *rows = text.splitlines()
    assert head.endswith("| 1 pairs | 2 pairs | 3 pairs |")
    assert len(rows[0].split("|")) == len(head.split("|"))
    # the full-attention row equals a direct evaluation at each number of pairs
    for i, P in enumerate([1, 2, 3]):
        x, y = mg.make_batch(dataclasses.replace(cfg, num_kv_pairs=P), 8, mg.DEMO_SEED)
        want = 100 * mg.evaluate(model, x, y)["acc"]
        assert rows[0].startswith("| full |")
        assert float(rows[0].split("|")[3 + i]) == pytest.approx(want, abs=0.05)
    assert (tmp_path / "p.png").stat().st_size > 0
    with pytest.raises(ValueError, match="MQAR"):
        mg.plugin_pairs(
            model, mg.RunConfig(**{**TINY, "task": "mad_noisy"}), [1], window=4, top_ks=[1], block_size=2, n=4
        )


def test_training_only_generator_options_reach_the_training_batches_only():
    cfg = mg.RunConfig(task="mad_fuzzy", seq_len=32, vocab_size=16, train_task_kwargs=(("test", False),))
    assert mg.training_config(cfg).task_kwargs == (("test", False),)
    both = mg.training_config(dataclasses.replace(cfg, train_targets="lm"))
    assert both.task_kwargs == (("test", False), ("targets", "lm"))
    assert mg.training_config(mg.RunConfig(task="mad_fuzzy", vocab_size=16)).task_kwargs == ()
    assert mg.RunConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg  # as in checkpoints
    # training keys of 1-3 tokens (MAD's training form) vs evaluation keys of exactly 3
    x_tr, _ = mg.make_batch(mg.training_config(cfg), 8, seed=2)
    x_ev, _ = mg.make_batch(cfg, 8, seed=2)
    assert not torch.equal(x_tr, x_ev)


def test_early_task_options_reach_the_first_batches_only():
    cfg = mg.RunConfig(
        task="shakespeare",
        seq_len=96,
        vocab_size=256,
        task_kwargs=(("link", "="), ("num_queries", 1)),
        early_task_kwargs=(("num_facts", 1),),
        early_steps=3,
    )
    assert dict(mg.training_config(cfg, 3).task_kwargs) == {"link": "=", "num_queries": 1, "num_facts": 1}
    assert mg.training_config(cfg, 4).task_kwargs == cfg.task_kwargs
    assert mg.training_config(cfg).task_kwargs == cfg.task_kwargs  # no step: the later (test) form
    assert mg.RunConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    # one fact per example early: a single "=" before the query's, so one "=" fewer than later
    x1, _ = mg.make_batch(mg.training_config(cfg, 1), 8, seed=5)
    x2, _ = mg.make_batch(mg.training_config(cfg, 4), 8, seed=5)
    assert ((x1 == ord("=")).sum(1) == 2).all() and ((x2 == ord("=")).sum(1) == 3).all()
    for bad, match in (
        (dict(early_steps=-1), "early_steps"),
        (dict(early_task_kwargs=()), "go together"),
        (dict(early_steps=0), "go together"),
    ):
        with pytest.raises(ValueError, match=match):
            mg.training_config(dataclasses.replace(cfg, **bad))


def _key_run_lengths(x: torch.Tensor, m: int = 7, pad: int = 15) -> set[int]:
    """Lengths of the maximal runs of key tokens (< m) in MAD fuzzy inputs (pad tokens excluded)."""
    lengths = set()
    for row in x.tolist():
        run = 0
        for t in row + [pad]:
            if t < m:
                run += 1
            else:
                if run:
                    lengths.add(run)
                run = 0
    return lengths


def test_key_curriculum_grows_the_training_keys_then_keeps_the_test_form():
    cfg = mg.RunConfig(task="mad_fuzzy", seq_len=48, vocab_size=16, key_curriculum=6)
    sizes = [dict(mg.training_config(cfg, s).task_kwargs).get("k_motif_size") for s in range(1, 9)]
    assert sizes == [1, 1, 2, 2, 3, 3, None, None]  # then the generator's default of 3 (the test form)
    for step, want in ((1, {1}), (3, {2}), (5, {3}), (7, {3})):
        x, _ = mg.make_batch(mg.training_config(cfg, step), 16, seed=step)
        assert _key_run_lengths(x) == want, step
    x_ev, y_ev = mg.make_batch(cfg, 4, seed=1)  # evaluation batches never see the curriculum
    x_7, y_7 = mg.make_batch(mg.training_config(cfg, 7), 4, seed=1)
    assert torch.equal(x_ev, x_7) and torch.equal(y_ev, y_7)
    # a 4-token key size given explicitly sets the last stage; training-only options win over shared ones
    cfg4 = mg.RunConfig(
        task="mad_fuzzy", seq_len=64, vocab_size=16, key_curriculum=8, task_kwargs=(("k_motif_size", 4),)
    )
    sizes4 = [dict(mg.training_config(cfg4, s).task_kwargs)["k_motif_size"] for s in (1, 2, 3, 5, 7, 8, 9)]
    assert sizes4 == [1, 1, 2, 3, 4, 4, 4]
    assert mg.RunConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg4)))) == cfg4


def test_key_curriculum_bad_options_raise():
    with pytest.raises(ValueError, match="key_curriculum needs keys of several tokens"):
        mg.training_config(mg.RunConfig(**TINY, key_curriculum=10), 1)
    with pytest.raises(ValueError, match="test=False"):
        mg.training_config(
            mg.RunConfig(
                task="mad_fuzzy", vocab_size=16, key_curriculum=10, train_task_kwargs=(("test", False),)
            ),
            1,
        )
    with pytest.raises(ValueError, match="key_curriculum must be >= 0"):
        mg.training_config(mg.RunConfig(task="mad_fuzzy", vocab_size=16, key_curriculum=-1))
