"""The learning-rate schedule at its landmarks, the rates the MATCH driver really sets, and the
budget-matched sliding-window baseline of the MATCH grid (its window and its label agree).

``fast.training.schedule.warmup_cosine``: steps count from 1; linear warmup to ``lr`` at step ``warmup``,
then cosine from ``lr`` to ``min_lr`` at step ``steps``, and ``min_lr`` beyond."""

import dataclasses
import math

import pytest

import tiny_models.match_grid as mg
from fast.training import loop as loop_mod
from fast.training.schedule import lr_at, warmup_cosine
from tiny_models.match_grid import grid, reports
from tiny_models.match_grid import run as run_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _by_hand(step, lr, min_lr, warmup, steps):
    if warmup and step <= warmup:
        return lr * step / warmup
    done = min(step - warmup, steps - warmup) / (steps - warmup)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * done)) / 2


@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_warmup_cosine_landmarks(warmup):
    lr, min_lr, steps = 2.0, 0.2, 50
    f = lambda s: warmup_cosine(s, lr=lr, min_lr=min_lr, warmup=warmup, steps=steps)  # noqa: E731
    assert f(0) == 0.0  # before the first step
    if warmup:
        assert f(1) == pytest.approx(lr / warmup)
        assert f(warmup) == pytest.approx(lr)  # the end of the warmup is the peak
    else:
        assert f(1) == pytest.approx(_by_hand(1, lr, min_lr, 0, steps)) and f(1) < lr
    # one step into the cosine: just below the peak
    assert f(warmup + 1) == pytest.approx(
        min_lr + (lr - min_lr) * (1 + math.cos(math.pi / (steps - warmup))) / 2
    )
    assert f(warmup + 1) < lr
    # the middle of the cosine: half way between lr and min_lr
    if (steps - warmup) % 2 == 0:
        assert f(warmup + (steps - warmup) // 2) == pytest.approx((lr + min_lr) / 2)
    assert f(steps) == pytest.approx(min_lr)  # the last step ends on the floor
    for s in (steps + 1, steps + 7, 3 * steps):
        assert f(s) == pytest.approx(min_lr), s  # and stays there
    # every step, against an independent formula, and monotone after the warmup
    vals = [f(s) for s in range(1, steps + 5)]
    assert vals == pytest.approx([_by_hand(s, lr, min_lr, warmup, steps) for s in range(1, steps + 5)])
    after = vals[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:], strict=False))


def test_warmup_as_long_as_the_run_never_reaches_the_cosine():
    assert [warmup_cosine(s, lr=1.0, min_lr=0.1, warmup=4, steps=4) for s in range(5)] == [
        0.0,
        0.25,
        0.5,
        0.75,
        1.0,
    ]
    assert warmup_cosine(5, lr=1.0, min_lr=0.1, warmup=4, steps=4) == pytest.approx(0.1)


def test_match_run_config_floor_is_a_fraction_of_lr():
    cfg = mg.RunConfig(lr=4e-3, min_lr_frac=0.25, warmup=3, steps=11)
    assert cfg.min_lr == pytest.approx(1e-3)
    for s in range(0, 15):
        assert lr_at(s, cfg) == pytest.approx(_by_hand(s, 4e-3, 1e-3, 3, 11) if s else 0.0)
    assert lr_at(11, cfg) == pytest.approx(1e-3) and lr_at(3, cfg) == pytest.approx(4e-3)


def test_train_run_sets_the_schedule_each_step(monkeypatch):
    # spy on the optimiser the MATCH driver builds: the rate of its param groups at each update
    seen = []
    real = loop_mod.adamw

    def spy(*a, **k):
        opt = real(*a, **k)
        step = opt.step

        def recorded(*sa, **sk):
            seen.append({g["lr"] for g in opt.param_groups})
            return step(*sa, **sk)

        opt.step = recorded
        return opt

    monkeypatch.setattr(run_mod, "adamw", spy)
    cfg = mg.RunConfig(
        seq_len=16,
        num_kv_pairs=2,
        vocab_size=16,
        n_embd=16,
        n_head=2,
        batch_size=2,
        eval_n=4,
        eval_every=100,
        steps=5,
        warmup=2,
        lr=1e-2,
        min_lr_frac=0.1,
        early_stop=None,
    )
    mg.train_run(cfg, progress=False)
    assert len(seen) == 5 and all(len(s) == 1 for s in seen)
    got = [s.pop() for s in seen]
    want = [_by_hand(s, 1e-2, 1e-3, 2, 5) for s in range(1, 6)]
    assert got == pytest.approx(want)
    assert got[1] == pytest.approx(1e-2) and got[-1] == pytest.approx(1e-3)


# ----------------------------------------------------------------------------------------------------
# the budget-matched baseline: SWA with window w + max(top_k) * B


@pytest.mark.parametrize("window,top_ks,block_size", [(8, (1, 4), 4), (16, (2, 3, 1), 8), (4, (1,), 2)])
def test_budget_matched_baseline_window_and_label(window, top_ks, block_size):
    spec = mg.GridSpec(seq_len=128, window=window, top_ks=top_ks, block_size=block_size, seeds=(0,))
    runs = grid.grid_runs(spec)
    budget = window + max(top_ks) * block_size
    swa = sorted({c.window for c in runs if c.attention == "sliding"})
    assert swa == [window, budget]
    matched = [c for c in runs if c.attention == "sliding" and c.window == budget]
    assert len(matched) == 1
    assert reports._label(dataclasses.asdict(matched[0])) == f"SWA w={budget}"
    # the baseline attends exactly as many keys as the largest MATCH budget (block retrieval, top_k max)
    kw = (("top_k", max(top_ks)), ("block_size", block_size))
    assert mg.attended_fraction(128, "sliding", budget) == pytest.approx(
        mg.attended_fraction(128, "match", window, kw)
    )
    # every MATCH run keeps the base window w
    assert {c.window for c in runs if c.attention == "match"} == {window}
    assert {dict(c.attn_kwargs)["top_k"] for c in runs if c.attention == "match"} == set(top_ks)


def test_plugin_budget_labels_name_their_windows():
    for label, att, w, _ in mg.plugin_variants(8, top_ks=(1, 2, 4), block_size=4):
        if att == "sliding" and "+" in label:
            extra = int(label.split("+ ")[1].split(" ")[0])
            assert label == f"SWA w=8 + {extra} (window {w})" and w == 8 + extra
            assert extra in (4, 8, 16)
