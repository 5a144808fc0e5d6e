"""More checks where experiment numbers come from: the seed of each sampled evaluation, the validation split
of SFT, the step streams of different seeds, the step a MATCH run reports when it stops early, the MGSR
parts logged on student samples, and kernel_stats' spill count."""

import subprocess

import numpy as np
import pytest
import torch

import tiny_models.evaluate as ev
from fast.training.loop import step_indices
from tiny_models.gpt import GPT, GPTConfig
from tiny_models.tasks import build_dataset, example_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_each_sampling_seed_reaches_the_generator(monkeypatch):
    seen = []
    real = ev.generate_texts

    def spy(*a, seed, **kw):
        seen.append(seed)
        return real(*a, seed=seed, **kw)

    monkeypatch.setattr(ev, "generate_texts", spy)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=96)).eval()
    exs = build_dataset(0, n_per_family=10, n_eval_per_family=1)["test"][:2]
    ev.evaluate(model, {"test": exs}, temperature=1.0, seeds=(0, 1, 2), max_new_tokens=3)
    assert seen == [0, 1, 2]
    seen.clear()
    ev.evaluate(model, {"test": exs}, temperature=0.0, seeds=(4, 5), max_new_tokens=3)
    assert seen == [4]  # greedy: one run, its std 0


def test_evaluate_reports_the_mean_and_sample_std_over_sampling_seeds(monkeypatch):
    # per seed a known ROUGE-L (10, 20, 60): the row's mean is 30 and its std the sample std over seeds
    # (ddof 1: 26.46), not the population one (21.60)
    per_seed = {0: 10.0, 1: 20.0, 2: 60.0}
    monkeypatch.setattr(ev, "generate_responses", lambda model, exs, *, seed, **kw: [seed] * len(exs))
    monkeypatch.setattr(
        ev, "score", lambda outs, exs: {"rougeL": per_seed[outs[0]], "exact_match": 0.0, "n": 2}
    )
    row = ev.evaluate(None, {"test": [None, None]}, temperature=1.0, seeds=(0, 1, 2))["test"]
    assert row["rougeL"] == pytest.approx(30.0)
    assert row["rougeL_std"] == pytest.approx(np.std([10.0, 20.0, 60.0], ddof=1))
    assert row["exact_match_std"] == 0.0 and row["n"] == 2


def test_sft_validates_on_the_validation_split():
    from tiny_models.train import InstructData, TrainConfig

    cfg = TrainConfig(n_per_family=30, eval_examples=7)
    data = InstructData(cfg)
    ds = build_dataset(cfg.data_seed, n_per_family=30)
    assert data.valid == [example_ids(e.prompt, e.response) for e in ds["valid"]][:7]
    test = {tuple(example_ids(e.prompt, e.response)[0]) for e in ds["test"]}
    assert not test & {tuple(i) for i, _ in data.valid}


def test_step_streams_of_different_seeds_differ():
    # (seed, step) pairs must not share batches: (1, 2) and (2, 1) are different streams
    batches = {(s, t): tuple(step_indices(s, t, 10_000, 16)) for s in range(4) for t in range(1, 6)}
    assert len(set(batches.values())) == len(batches)


def test_a_match_run_reports_the_step_it_stopped_at():
    from tiny_models.match_grid import RunConfig, train_run

    cfg = RunConfig(
        seq_len=16,
        num_kv_pairs=2,
        vocab_size=16,
        n_embd=16,
        steps=5,
        eval_every=1,
        eval_n=8,
        early_stop=-1.0,
        batch_size=4,
        warmup=1,
    )
    out = train_run(cfg, progress=False)
    assert out["steps"] == 1 and [s for s, _ in out["curve"]] == [1]


def test_mgsr_parts_on_student_samples_are_normalised_by_their_own_tokens():
    import tiny_models.distill as distill
    from fast.training.lm import logits_of
    from tiny_models.tasks import IGNORE, collate

    torch.manual_seed(0)
    t = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=96))
    s = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=96))
    cfg = distill.DistillConfig(
        method="mgsr-no-dackl",
        block_size=96,
        max_new_tokens=6,
        init_threshold=1.0,
        w_span=0.0,
        backend="torch",
        device="cpu",
    )
    examples = distill.as_pairs(build_dataset(0, n_per_family=30)["train"][:3])
    for fused in (True, False):
        d = distill.Distiller(cfg, t, s)
        d.fused = fused
        plan = d.plan(1, examples)
        assert plan.source == "fresh"
        _, parts = d.objective(plan)
        with torch.no_grad():
            x, y = collate(plan.seqs, block_size=96)
            ls, lt = logits_of(s, x).double(), logits_of(t, x).double()
            m = y != IGNORE
            lp, lq = lt.log_softmax(-1)[m], ls.log_softmax(-1)[m]
            kl = (lp.exp() * (lp - lq)).sum(-1).mean()  # over the samples' own tokens
            xg, yg = collate(plan.gt, block_size=96)
            ce = torch.nn.functional.cross_entropy(logits_of(s, xg).double().flatten(0, 1), yg.flatten())
        assert torch.allclose(parts["token"].double(), kl, rtol=1e-4), (fused, parts["token"], kl)
        assert torch.allclose(parts["sft"].double(), ce, rtol=1e-4), (fused, parts["sft"], ce)


def test_spill_bytes_count_stores_and_loads(monkeypatch):
    from fast.devtools import kernel_stats as ks

    log = "ptxas info    : Used 40 registers\n    8 bytes spill stores, 12 bytes spill loads\n"

    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 0, stdout=log, stderr="")

    monkeypatch.setattr(ks.subprocess, "run", fake_run)
    info = ks.ptxas_info(".version 8.0", {"ptxas": "ptxas"}, {})
    assert info["spill_bytes"] == 20 and info["registers"] == 40
    assert np.isfinite(info["spill_bytes"])


def test_an_accumulated_step_logs_and_follows_the_mean_of_its_micro_batches():
    # grad_accum = 2 over 4 examples: the logged loss is the mean of the two halves' objectives, each
    # computed by a separate un-accumulated Distiller from the same initial student
    import tiny_models.distill as distill

    examples = distill.as_pairs(build_dataset(0, n_per_family=30)["train"][:4])
    base = dict(method="kd", block_size=96, batch_size=4, backend="torch", device="cpu", lr=1e-3)

    def fresh(**kw):
        torch.manual_seed(0)
        t = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=96))
        s = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=96))
        return distill.Distiller(distill.DistillConfig(**base, **kw), t, s)

    halves, grads = [], []
    for part in (examples[:2], examples[2:]):
        d = fresh()
        loss, _ = d.objective(d.plan(1, part))
        loss.backward()
        halves.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in d.student.parameters() if p.grad is not None]))
    rec = fresh(grad_accum=2).step(1, examples)
    assert halves[0] != pytest.approx(halves[1])  # the halves differ: a last-only or first-only log is caught
    assert rec["loss"] == pytest.approx(sum(halves) / 2, rel=1e-5)
    # ... and the update follows the mean of the micro-batch gradients (its norm, logged before clipping)
    assert rec["grad_norm"] == pytest.approx(float(((grads[0] + grads[1]) / 2).norm()), rel=1e-4)


def test_the_draw_sites_of_one_step_use_different_generators(monkeypatch):
    # an MGSR step that samples from the student and revises with SCRG draws from two generators; they must
    # be seeded differently (the same seed would correlate SCRG's draws with the samples it revises), and
    # the coin and the replay draw must not reuse either
    import fast.training.distill as fd
    import fast.training.methods as fm
    import tiny_models.distill as distill

    seeds = []
    real = fm._gen

    def spy(*a, **kw):
        g = real(*a, **kw)
        seeds.append(g.initial_seed())
        return g

    monkeypatch.setattr(fm, "_gen", spy)
    monkeypatch.setattr(fd, "_gen", spy)
    torch.manual_seed(0)
    t = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=96))
    s = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=96))
    cfg = distill.DistillConfig(
        method="mgsr", block_size=96, max_new_tokens=5, init_threshold=1.0, backend="torch", device="cpu"
    )
    d = distill.Distiller(cfg, t, s)
    examples = distill.as_pairs(build_dataset(0, n_per_family=30)["train"][:3])
    plan = d.plan(1, examples)
    assert plan.source == "fresh" and "scrg_positions" in plan.extra
    assert len(seeds) == 2 and len(set(seeds)) == 2, seeds  # sampling and SCRG: two different seeds
    first = list(seeds)
    seeds.clear()
    d.plan(1, examples)  # the same step again: the same two generators (the step is reproducible)
    assert seeds == first
    seeds.clear()
    d.plan(2, examples)  # the next step: two new ones
    assert len(seeds) == 2 and not set(seeds) & set(first)


def test_sampled_generation_draws_one_stream_across_batches():
    # the same prompt four times in batches of two: one generator for the whole set, so the second batch is
    # not a replay of the first (a generator re-seeded per batch would repeat it); the same seed repeats all
    from fast.training.evaluate import generate_texts
    from tiny_models.gpt import EOS, PAD
    from tiny_models.tasks import decode, prompt_ids

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=96)).eval()
    prompts = [prompt_ids("reverse: abc")] * 4
    kw = dict(eos_id=EOS, pad_id=PAD, temperature=1.0, seed=3, batch_size=2, max_new_tokens=12)
    out = generate_texts(model, prompts, decode, **kw)
    assert out[:2] != out[2:]
    assert generate_texts(model, prompts, decode, **kw) == out
