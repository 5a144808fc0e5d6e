"""fast/training/distill.py and methods.py (through tiny_models/distill.py): every registry method
trains, recipes use the sequences they say, exact resume, DDP equals
one process, bad input, transformers interop, the DAC-KL bounds optimiser state round-trips."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import fast.training.methods as methods
import tiny_models.distill as distill
from tiny_models.distill import BASELINES, DistillConfig, Distiller, read_log, resolve, train
from tiny_models.gpt import EOS, GPT, GPTConfig
from tiny_models.model_io import save_model
from tiny_models.tasks import IGNORE, build_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(
    n_per_family=30,
    block_size=96,
    max_new_tokens=6,
    batch_size=3,
    steps=6,
    eval_every=0,
    eval_examples=4,
    progress=False,
    threads=1,
    device="cpu",
    backend="torch",
    dac_k=8,
    dac_hidden=16,
    lr=1e-2,
    min_lr=1e-2,
)


def _models(seed=0, v_student=None):
    torch.manual_seed(seed)
    t = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=96))
    s = GPT(
        GPTConfig(
            n_layer=1, n_head=2, n_embd=16, block_size=96, **({"vocab_size": v_student} if v_student else {})
        )
    )
    return t, s


@pytest.fixture(scope="module")
def examples():
    return distill.as_pairs(build_dataset(0, n_per_family=30)["train"][:3])


def _cfg(method, **kw):
    return DistillConfig(method=method, **{**TINY, "init_threshold": 1.0, **kw})


def test_registry_has_every_method_and_ablation():
    assert set(BASELINES) == {"sft", "kd", "seqkd", "rkl", "imitkd", "gkd", "minillm", "distillm", "mgsr"}
    assert resolve(_cfg("mgsr-no-scrg")).scrg_frequency == 0
    assert resolve(_cfg("mgsr-no-dackl")).token_loss == "forward_kl"
    assert resolve(_cfg("mgsr-no-span")).w_span == 0
    assert resolve(_cfg("mgsr-no-sft")).w_sft == 0 and resolve(_cfg("mgsr-no-sft")).w_span == 1
    assert resolve(_cfg("mgsr-fixed-clip")).dac_fixed == (0.75, 0.375)
    assert [resolve(_cfg(f"mgsr-scrg{f}")).scrg_frequency for f in (0, 1, 3, 5)] == [0, 1, 3, 5]
    divs = {
        "forward_kl",
        "reverse_kl",
        "symmetric_kl",
        "js_divergence",
        "tv_distance",
        "skew_forward_kl",
        "skew_reverse_kl",
    }
    assert {resolve(_cfg(f"mgsr-{n}")).token_loss for n in divs} == divs
    assert "| mgsr | " in distill.describe()


@pytest.mark.parametrize(
    "method",
    [
        *BASELINES,
        "seqkd-fixed",
        "mgsr-no-scrg",
        "mgsr-no-dackl",
        "mgsr-no-span",
        "mgsr-no-sft",
        "mgsr-fixed-clip",
    ],
)
def test_each_method_lowers_its_own_loss_on_a_fixed_batch(method, examples):
    t, s = _models()
    d = Distiller(_cfg(method, gkd_lambda=1.0), t, s)
    plan = d.plan(1, examples)  # fixed sequences; the objective is re-evaluated on them after each update
    losses = []
    for _ in range(5):
        loss, parts = d.objective(plan)
        loss.backward()
        d.opt.step()
        d.opt.zero_grad()
        if d.dac_opt is not None:
            d.dac_opt.step()
            d.dac_opt.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], (method, losses)
    rec = d.step(2, examples)  # and a full step (plan + objective + both optimisers) runs
    assert rec["loss"] == rec["loss"]
    assert rec["source"] in ("gt", "student", "teacher", "mixed", "fresh", "replay")


def test_fixed_clipping_keeps_its_levels_and_trains_no_sub_network(examples):
    # the fixed-clipping ablation: constant (u, l), no sub-network and no second optimiser; a step logs
    # the constant levels, and its state round-trips without a DAC optimiser
    t, s = _models()
    d = Distiller(_cfg("mgsr-fixed-clip", init_threshold=0.0), t, s)
    assert d.dac.mlp is None and d.dac_opt is None and not list(d.dac.parameters())
    _, parts = d.objective(d.plan(1, examples))
    assert float(parts["upper"]) == 0.75 and float(parts["lower"]) == 0.375
    tensors, meta = d.state_tensors()
    assert not any(k.startswith(("dacopt", "dac.")) for k in tensors)
    d.load_state_tensors(tensors, meta)


def test_seqkd_fixed_generates_each_prompt_once_and_keeps_the_set_across_a_resume(monkeypatch, examples):
    # DistiLLM's SeqKD: a prompt's teacher response is made the first time it is drawn, then reused; the
    # set is part of the training state
    t, s = _models()
    calls = []
    real = methods.generate_responses

    def spy(model, prompts, **kw):
        calls.append((model, [tuple(p) for p in prompts]))
        return real(model, prompts, **kw)

    monkeypatch.setattr(methods, "generate_responses", spy)
    d = Distiller(_cfg("seqkd-fixed"), t, s)
    batch = [examples[0], examples[1], examples[0]]  # a prompt twice in one batch: generated once
    p1 = d.plan(1, batch)
    assert len(calls) == 1 and calls[0][0] is t and len(calls[0][1]) == 2
    assert p1.seqs[0] == p1.seqs[2] and p1.source == "teacher"
    p2 = d.plan(2, [examples[1], examples[2]])  # only the new prompt is generated
    assert len(calls) == 2 and calls[1][1] == [tuple(examples[2][0])]
    assert p2.seqs[0] == p1.seqs[1]
    tensors, meta = d.state_tensors()
    d2 = Distiller(_cfg("seqkd-fixed"), *_models())
    d2.load_state_tensors(tensors, meta)
    assert d2.teacher_set == d.teacher_set and len(d2.teacher_set) == 3
    assert d2.plan(3, [examples[2]]).seqs == [p2.seqs[1]] and len(calls) == 2  # nothing generated again


class _Spy:
    def __init__(self, monkeypatch):
        self.calls = []
        real = methods.generate_responses

        def spy(model, prompts, **kw):
            out = real(model, prompts, **kw)
            self.calls.append((model, prompts, out))
            return out

        monkeypatch.setattr(methods, "generate_responses", spy)


def _responses(seqs):  # the label tokens of each row (response + EOS when it ended)
    return [[v for v in lab if v != IGNORE] for _, lab in seqs]


@pytest.mark.parametrize(
    "method, who", [("seqkd", "teacher"), ("imitkd", "student"), ("kd", None), ("sft", None), ("rkl", None)]
)
def test_recipes_train_on_the_sequences_they_name(method, who, examples, monkeypatch):
    t, s = _models()
    spy = _Spy(monkeypatch)
    d = Distiller(_cfg(method), t, s)
    plan = d.plan(1, examples)
    if who is None:
        assert spy.calls == [] and plan.seqs is None and plan.source == "gt"
        return
    ((model, _, (resp, ended)),) = spy.calls
    assert model is {"teacher": t, "student": s}[who]
    assert _responses(plan.seqs) == [r + ([EOS] if e else []) for r, e in zip(resp, ended, strict=True)]
    assert plan.gt[0][0][: len(plan.seqs[0][0]) - len(resp[0]) - ended[0]]  # same prompt prefix


def test_adaptive_sampler_gt_fresh_and_replay(examples, monkeypatch):
    t, s = _models()
    spy = _Spy(monkeypatch)
    d = Distiller(_cfg("distillm", init_threshold=0.0), t, s)  # threshold 0: always the ground truth
    assert d.plan(1, examples).source == "gt" and not spy.calls
    d = Distiller(_cfg("distillm", init_threshold=1.0, capacity=3), t, s)
    p1 = d.plan(1, examples)  # buffer not full: fresh student samples, pushed into the buffer
    assert p1.source == "fresh" and spy.calls[-1][0] is s and list(d.buffer) == p1.seqs
    srcs = {d.plan(k, examples).source for k in range(2, 40)}  # full buffer: fresh (r < decaying) or replay
    assert srcs == {"fresh", "replay"}
    d.after_eval(1.0)
    d.after_eval(1.05)
    assert d.threshold == 1.0  # capped
    d = Distiller(_cfg("distillm", init_threshold=0.2, loss_eps=0.1), t, s)
    for v, want in ((1.0, 0.2), (1.05, 0.2), (1.11, 0.3), (1.15, 0.3), (1.22, 0.4), (1.33, 0.5), (1.44, 0.6)):
        d.after_eval(v)
        assert d.threshold == pytest.approx(want)


def test_mgsr_loss_is_the_weighted_sum_of_its_terms_by_hand(examples):
    """L = w_sft CE + w_token KL + w_span (span distance averaged over every adjacent in-span pair of the
    batch), recomputed here in float64 from the logits with the NumPy span oracle."""
    import numpy as np

    from fast.testing import assert_close
    from fast.training.lm import logits_of
    from fast.training.methods import response_spans
    from reference.span import pair_distances
    from tiny_models.tasks import collate

    t, s = _models()
    w = dict(w_sft=0.7, w_token=1.3, w_span=2.5)
    d = Distiller(_cfg("mgsr-no-dackl", init_threshold=0.0, **w), t, s)  # threshold 0: ground truth
    plan = d.plan(1, examples)
    assert plan.seqs is None
    loss, parts = d.objective(plan)
    x, y = collate(plan.gt, block_size=d.cfg.block_size)
    with torch.no_grad():
        ls = logits_of(s, x).double().numpy()
        lt = d.teacher_logits(plan.gt, x.shape[1]).double().numpy()
    y = y.numpy()
    m = y != IGNORE

    def log_softmax(a):
        a = a - a.max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))

    lps, lpt = log_softmax(ls), log_softmax(lt)
    ce = -np.take_along_axis(lps, np.where(m, y, 0)[..., None], -1)[..., 0][m].mean()
    kl = (np.exp(lpt) * (lpt - lps)).sum(-1)[m].mean()
    dist = np.concatenate([pair_distances(lt[b], ls[b], response_spans(y[b])) for b in range(len(y))])
    assert len(dist) > 1  # several pairs: a sum and a mean differ
    want = w["w_sft"] * ce + w["w_token"] * kl + w["w_span"] * dist.mean()
    assert_close(parts["span"], dist.mean(), dtype=torch.float32, name="span term")
    assert_close(loss.detach(), want, dtype=torch.float32, name="MGSR loss")


def test_mgsr_revises_fresh_samples_with_scrg_before_the_buffer(examples, monkeypatch):
    import fast.scrg

    t, s = _models()
    spy = _Spy(monkeypatch)
    calls = []
    real = fast.scrg.scrg

    def scrg_spy(prompts, responses, teacher, student, **kw):
        out = real(prompts, responses, teacher, student, **kw)
        calls.append((responses, teacher, student, kw, out))
        return out

    monkeypatch.setattr(fast.scrg, "scrg", scrg_spy)
    d = Distiller(_cfg("mgsr-scrg3", gen_temperature=0.7), t, s)
    plan = d.plan(1, examples)
    ((resp_in, teacher, student, kw, (revised, positions)),) = calls
    ((_, _, (resp, ended)),) = spy.calls
    assert teacher is t and student is s and kw["frequency"] == 3
    assert kw["temperature"] == 0.7  # SCRG re-generates at the samples' own temperature
    assert resp_in == [r + ([EOS] if e else []) for r, e in zip(resp, ended, strict=True)]  # the raw samples
    assert _responses(plan.seqs) == [list(r) for r in revised] and list(d.buffer) == plan.seqs
    assert plan.extra["scrg_positions"] == positions
    calls.clear()
    Distiller(_cfg("mgsr-no-scrg"), t, s).plan(1, examples)
    assert calls == []


def _files(tmp_path, v_student=None):
    t, s = _models(v_student=v_student)
    save_model(t, str(tmp_path / "t.safetensors"))
    save_model(s, str(tmp_path / "s.safetensors"))
    return dict(teacher=str(tmp_path / "t.safetensors"), student=str(tmp_path / "s.safetensors"))


def test_kill_and_resume_reproduces_the_run(tmp_path):
    f = _files(tmp_path)
    kw = dict(f, init_threshold=0.6, capacity=4, eval_every=3, ckpt_every=1, lr=3e-3, min_lr=3e-4)
    full = train(_cfg("mgsr", out_dir=str(tmp_path / "full"), **kw))
    train(_cfg("mgsr", out_dir=str(tmp_path / "cut"), stop_after=4, **kw))  # "killed" after step 4
    rest = train(_cfg("mgsr", out_dir=str(tmp_path / "cut"), resume=True, **kw))
    assert len(rest["losses"]) == 2
    srcs = [r["source"] for r in full["records"]]
    assert {"fresh", "replay"} <= set(srcs) and "val_rougeL" in full["records"][2], srcs  # all paths ran
    keys = ("step", "loss", "source", "val_loss", "threshold")
    strip = lambda recs: [{k: r.get(k) for k in keys} for r in recs]
    assert strip(read_log(tmp_path / "cut")) == strip(read_log(tmp_path / "full"))  # bit for bit
    for (k, a), (_, b) in zip(
        full["model"].state_dict().items(), rest["model"].state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    for (k, a), (_, b) in zip(
        full["distiller"].dac.state_dict().items(), rest["distiller"].dac.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k
    assert os.path.exists(tmp_path / "full" / "best.safetensors")


def test_dac_bounds_optimiser_state_round_trips(examples):
    t, s = _models()
    d = Distiller(_cfg("mgsr-no-scrg"), t, s)
    for k in range(1, 4):
        d.step(k, examples)
    assert d.dac_opt.state  # the bounds sub-network has its own AdamW moments
    tensors, meta = d.state_tensors()
    assert any(k.startswith("dacopt.") for k in tensors) and "dacopt.param_groups" in meta
    _, s2 = _models()
    s2.load_state_dict(s.state_dict())
    e = Distiller(_cfg("mgsr-no-scrg"), t, s2)
    e.load_state_tensors(tensors, meta)
    for a, b in zip(d.dac_opt.state.values(), e.dac_opt.state.values(), strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert list(d.buffer) == list(e.buffer) and d.threshold == e.threshold
    ra, rb = d.step(4, examples), e.step(4, examples)
    assert ra == rb
    for (k, a), (_, b) in zip(d.dac.state_dict().items(), e.dac.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_bad_input_raises_value_error_naming_it(examples, tmp_path):
    t, s = _models()
    with pytest.raises(ValueError, match="unknown method 'mgsrr'"):
        Distiller(_cfg("mgsrr"), t, s)
    t2, s2 = _models(v_student=300)
    with pytest.raises(ValueError, match="vocabularies differ: teacher 259, student 300"):
        Distiller(_cfg("kd"), t2, s2)
    with pytest.raises(ValueError, match="empty batch"):
        Distiller(_cfg("kd"), t, s).step(1, [])
    with pytest.raises(ValueError, match="token_loss must be one of"):
        Distiller(_cfg("mgsr", token_loss="kl"), t, s)
    with pytest.raises(ValueError, match="vocabularies differ"):
        train(_cfg("kd", out_dir=str(tmp_path / "v"), **_files(tmp_path, v_student=300)))


def test_gpt2_interop_one_mgsr_step_and_scrg(examples):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    mk = lambda d: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=259, n_positions=128, n_embd=d, n_layer=1, n_head=2, bos_token_id=256, eos_token_id=257
        )
    )
    t, s = mk(32).eval(), mk(16)
    d = Distiller(_cfg("mgsr", max_new_tokens=4), t, s)  # SCRG on fresh samples (threshold 1)
    before = [p.detach().clone() for p in s.parameters()]
    rec = d.step(1, examples)
    assert rec["source"] == "fresh" and rec["loss"] == rec["loss"]
    assert any(not torch.equal(a, b) for a, b in zip(before, s.parameters(), strict=True))
    assert all(len(r) <= 4 for r in d.revise(2, examples, [[65, 66]] * 3, [False] * 3)[0])


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    f = _files(tmp_path)
    cfg = _cfg("kd", out_dir=str(tmp_path / "ddp"), batch_size=2, steps=3, ckpt_every=3, lr=3e-3, **f)
    args = [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items() if v is not None]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "tiny_models.distill",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = [r["loss"] for r in read_log(tmp_path / "ddp")]
    one = train(dataclasses.replace(cfg, out_dir=str(tmp_path / "one"), batch_size=4))
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    from tiny_models.model_io import load_model

    m, _ = load_model(str(tmp_path / "ddp" / "model.safetensors"))
    for (k, a), (_, b) in zip(m.state_dict().items(), one["model"].state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_grid_quick_runs_skips_finished_runs_and_writes_tables(tmp_path):
    from tiny_models import distill_grid

    f = _files(tmp_path)
    argv = [
        "--quick",
        "--no_progress",
        "--methods",
        "sft",
        "kd",
        "--runs",
        str(tmp_path / "runs"),
        "--results",
        str(tmp_path / "res"),
        "--teacher",
        f["teacher"],
        "--student",
        f["student"],
        "--set",
        "max_new_tokens=4",
        "--set",
        "n_per_family=20",
    ]
    distill_grid.main(argv)
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    assert set(res["summary"]) == {"teacher", "student (init)", "sft", "kd"}
    assert res["summary"]["kd"]["step_s"] > 0 and (tmp_path / "res" / "rouge.png").exists()
    done = tmp_path / "runs" / "kd" / "seed1" / "eval.json"
    stamp = done.stat().st_mtime_ns
    distill_grid.main(argv)  # finished runs are skipped, not retrained
    assert done.stat().st_mtime_ns == stamp
    assert "| kd | 1 |" in (tmp_path / "res" / "results.md").read_text()
    distill_grid.main([*argv, "--summarise_only", "--export_students", "kd"])  # checkpoint + model card
    card = json.loads((tmp_path / "res" / "students" / "kd.json").read_text())
    run = json.loads(done.read_text())
    assert (
        card["method"] == "kd"
        and card["training_seed"] == 1
        and card["this_seed"]["greedy"]["test"]["rougeL"] == run["greedy"]["test"]["rougeL"]
    )
    assert "--export_students" not in card["command"] and "--quick" in card["command"]
    from tiny_models.model_io import load_model

    m1, _ = load_model(str(tmp_path / "res" / "students" / "kd.safetensors"))
    m2, _ = load_model(str(tmp_path / "runs" / "kd" / "seed1" / run["checkpoint"]))
    pairs = zip(m1.state_dict().values(), m2.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert "`kd.safetensors`" in (tmp_path / "res" / "students" / "README.md").read_text()


def test_validation_subset_covers_every_family():
    valid = build_dataset(0, n_per_family=200)["valid"]
    sub = distill.validation_subset(valid, 20)
    assert len(sub) == 20 and len(set(map(id, sub))) == 20
    assert {e.family for e in sub} == {e.family for e in valid}
    assert distill.validation_subset(valid[:5], 20) == valid[:5]


def test_scrg_frequency_plot_needs_every_point(tmp_path):
    from tiny_models.distill_grid import SCRG_CURVE, plot_scrg

    row = {"greedy": {"avg": {"rougeL": (30.0, 1.0)}}}
    summary = {m: row for m in SCRG_CURVE.values()}
    assert plot_scrg(summary, tmp_path / "f.png") and (tmp_path / "f.png").stat().st_size > 0
    del summary["mgsr-scrg3"]
    assert not plot_scrg(summary, tmp_path / "g.png") and not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("method", ["imitkd", "seqkd", "gkd", "minillm", "distillm", "mgsr"])
def test_samples_come_from_the_prompt_pool_and_the_ground_truth_from_the_examples(
    method, examples, monkeypatch
):
    # the labelled / unlabelled regime: ground-truth terms read the step's examples, prompt-only terms its
    # prompt batch (responses of the pool are never read)
    t, s = _models()
    spy = _Spy(monkeypatch)
    pool = distill.as_pairs(build_dataset(0, n_per_family=30)["train"][10:13])
    pool = [(p, [999]) for p, _ in pool]  # a hidden response: any use of it would show as token 999
    d = Distiller(_cfg(method, gkd_lambda=1.0), t, s)
    d._prompts = pool
    plan = d.plan(1, examples)
    d._prompts = None
    want_gt = [distill_sft(p, r) for p, r in examples]
    assert plan.gt == want_gt
    assert plan.seqs is not None
    prompts_used = [inputs[: len(p)] for (inputs, _), (p, _) in zip(plan.seqs, pool, strict=True)]
    assert prompts_used == [p for p, _ in pool]
    assert all(999 not in inputs for inputs, _ in plan.seqs)
    if spy.calls:
        assert [list(x) for x in spy.calls[0][1]] == [p for p, _ in pool]
    rec = d.step(2, examples, pool)  # and a whole step with the pool runs
    assert rec["loss"] == rec["loss"] and "scrg_revised" in rec


def distill_sft(p, r):
    from fast.training.data import sft_example

    return sft_example(p, r, EOS)


def test_the_prompt_pool_stream_is_shared_and_reproducible(tmp_path):
    from fast.training import distill as fd
    from tiny_models.model_io import saver

    ds = build_dataset(0, n_per_family=30)
    train_set, pool = distill.as_pairs(ds["train"][:20]), distill.as_pairs(ds["train"][20:60])
    seen = {}
    for method in ("imitkd", "distillm"):
        t, s = _models()
        calls = []
        real = fd.Distiller.step

        def spy(self, step, examples, prompts=None, calls=calls, real=real):
            calls.append((step, [p for p, _ in examples], [p for p, _ in prompts]))
            return real(self, step, examples, prompts)

        fd.Distiller.step = spy
        try:
            fd.train(
                _cfg(method, out_dir=str(tmp_path / method), steps=3),
                t,
                s,
                train_set,
                train_set[:4],
                save_model=saver,
                prompts=pool,
            )
        finally:
            fd.Distiller.step = real
        seen[method] = calls
    assert seen["imitkd"] == seen["distillm"]  # the same examples and prompts at every step: runs are paired
    assert all(set(map(tuple, ps)) <= {tuple(p) for p, _ in pool} for _, _, ps in seen["imitkd"])
