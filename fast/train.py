"""Train a tiny GPT: AdamW, warmup + cosine, clipping, accumulation, exact resume, DDP. CLI and function.

    python fast/train.py --out_dir runs/x --n_layer 2 --n_embd 96 --n_head 2 --steps 400
    torchrun --standalone --nproc_per_node 2 fast/train.py --out_dir runs/x ...   # DDP (gloo on CPU)

Why the run is exactly resumable: no hidden data-loader state exists. The examples of global step s are
drawn by ``np.random.default_rng([seed, s])``, so a run needs only (weights, AdamW moments, step) to
continue -- all in the checkpoint, next to the global torch/NumPy RNG states for anything else that draws.
A resumed run therefore reproduces the uninterrupted run's losses bit for bit on the same machine (tested).

Why the loss is normalised by the global token count: a step's loss is ``sum of token losses / number of
target tokens in the whole step`` (every micro-batch, every rank; the counts are known before the forward).
Each micro-batch backpropagates its share, scaled by the world size because DDP averages gradients, so
gradient accumulation and DDP give the same gradient as one big batch (up to float summation order), not a
mean of per-micro-batch means.

A second SFT stage starts from earlier weights with ``--init_from path/model.safetensors`` (fresh AdamW state
and schedule; the model config must match).

Files in ``out_dir``: ``model.safetensors`` (fp32 weights; metadata: config JSON, step, sha256),
``state.safetensors`` (AdamW state, RNG states, train config), ``log.jsonl`` and ``log.csv``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

if __package__ in (None, ""):  # `python fast/train.py` / torchrun: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiny_models.gpt import GPT, GPTConfig  # noqa: E402
from tiny_models.tasks import IGNORE, build_dataset, collate, example_ids, shakespeare_text  # noqa: E402


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match the model / run it is loaded into."""


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/tiny"
    # model
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    block_size: int = 160
    attention: str = "full"
    window: int | None = None
    # data: "instruct" (tiny_models.tasks) or "shakespeare" (LM on the plays)
    data: str = "instruct"
    data_seed: int = 0
    n_per_family: int = 2000
    text_chars: int = 2_000_000
    # optimisation
    steps: int = 200
    batch_size: int = 32  # examples per micro-batch per rank
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    seed: int = 1
    # bookkeeping
    eval_every: int = 50
    eval_examples: int = 256
    ckpt_every: int = 100
    stop_after: int | None = None  # stop (with a checkpoint) after this step: simulates a killed run
    resume: bool = False
    init_from: str | None = (
        None  # start from these weights (fresh optimizer and schedule): a second SFT stage
    )
    threads: int | None = None
    progress: bool = True
    device: str = "auto"

    def model_config(self) -> GPTConfig:
        return GPTConfig(
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            block_size=self.block_size,
            attention=self.attention,
            window=self.window,
        )


# fields that may differ between a run and its resumption (they do not change the trajectory)
RESUME_FREE = {"out_dir", "stop_after", "resume", "threads", "progress", "device", "ckpt_every"}


# ----------------------------------------------------------------------------------------------------
# checkpoints


def _sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str) -> None:
    """Write atomically (tmp file + rename), so a run killed mid-write leaves the previous checkpoint."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**meta, "sha256": _sha256(tensors)}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def _load(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {e}") from e
    if "sha256" not in meta:
        raise CheckpointError(f"checkpoint {path} has no sha256 in its metadata (not written by fast.train?)")
    if _sha256(tensors) != meta["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: the tensor sha256 does not match its metadata")
    return tensors, meta


def save_model(model: GPT, path: str, **meta) -> None:
    """fp32 weights (the tied output head is stored once, as ``wte.weight``) + config JSON metadata."""
    sd = {k: v.float() for k, v in model.state_dict().items()}
    _save(sd, {"config": model.cfg.to_json(), **{k: json.dumps(v) for k, v in meta.items()}}, path)


def load_model(path: str, *, config: GPTConfig | None = None, device="cpu", dtype=torch.float32):
    """(model, metadata) from ``model.safetensors``. ``config`` (optional) must equal the stored one."""
    tensors, meta = _load(path)
    if "config" not in meta:
        raise CheckpointError(f"checkpoint {path} has no model config in its metadata")
    stored = GPTConfig.from_json(meta["config"])
    if config is not None and config != stored:
        diff = {
            f.name: (getattr(stored, f.name), getattr(config, f.name))
            for f in dataclasses.fields(GPTConfig)
            if getattr(stored, f.name) != getattr(config, f.name)
        }
        raise CheckpointError(
            f"checkpoint {path} was saved with a different model config (stored, wanted): {diff}"
        )
    model = GPT(stored)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit GPT({stored}): {e}") from e
    extra = {k: json.loads(v) for k, v in meta.items() if k not in ("config", "sha256")}
    return model.to(device=device, dtype=dtype).eval(), extra


def _save_state(opt, step: int, cfg: TrainConfig, elapsed: float, path: str) -> None:
    sd = opt.state_dict()
    tensors = {f"opt.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {
        "step": str(step),
        "param_groups": json.dumps(sd["param_groups"]),
        "train_config": json.dumps(dataclasses.asdict(cfg)),
        "elapsed_s": str(elapsed),
        "rng.numpy.pos": str(np_state[2]),
    }
    _save(tensors, meta, path)


def _load_state(opt, cfg: TrainConfig, path: str) -> tuple[int, float]:
    tensors, meta = _load(path)
    saved = json.loads(meta["train_config"])
    now = dataclasses.asdict(cfg)
    diff = {k: (saved.get(k), now[k]) for k in now if k not in RESUME_FREE and saved.get(k) != now[k]}
    if diff:
        raise CheckpointError(f"cannot resume from {path}: the run config differs (saved, now): {diff}")
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    torch.set_rng_state(tensors["rng.torch"])
    np.random.set_state(
        ("MT19937", tensors["rng.numpy"].numpy().astype(np.uint32), int(meta["rng.numpy.pos"]), 0, 0.0)
    )
    return int(meta["step"]), float(meta["elapsed_s"])


# ----------------------------------------------------------------------------------------------------
# data


class InstructData:
    """SFT examples of tiny_models.tasks: loss on the response tokens only (labels -100 on the prompt)."""

    def __init__(self, cfg: TrainConfig):
        ds = build_dataset(cfg.data_seed, n_per_family=cfg.n_per_family)
        self.train = [example_ids(e.prompt, e.response) for e in ds["train"]]
        self.valid = [example_ids(e.prompt, e.response) for e in ds["valid"]][: cfg.eval_examples]
        self.block_size = cfg.block_size
        self.counts = np.array([sum(t != IGNORE for t in lab[: cfg.block_size]) for _, lab in self.train])

    def __len__(self):
        return len(self.train)

    def get(self, idx):  # [n] -> list of (inputs, labels)
        return [self.train[i] for i in idx]


class TextData:
    """Language modelling on windows of the Shakespeare plays (every position is a target)."""

    def __init__(self, cfg: TrainConfig):
        ids = np.frombuffer(shakespeare_text(cfg.text_chars).encode("utf-8"), dtype=np.uint8).astype(np.int64)
        n_val = max(len(ids) // 20, cfg.block_size + 2)
        self.ids, val = ids[:-n_val], ids[-n_val:]
        self.block_size = cfg.block_size
        r = np.random.default_rng(0)
        starts = r.integers(0, len(val) - cfg.block_size - 1, size=min(cfg.eval_examples, 64))
        self.valid = [self._window(val, s) for s in starts]
        self.counts = None

    def _window(self, ids, s):
        w = ids[s : s + self.block_size + 1].tolist()
        return w[:-1], w[1:]

    def __len__(self):
        return len(self.ids) - self.block_size - 1

    def get(self, idx):
        return [self._window(self.ids, i) for i in idx]

    def n_tokens(self, idx):
        return len(idx) * self.block_size


def step_indices(seed: int, step: int, n: int, size: int) -> np.ndarray:
    """The example indices of one global step: a pure function of (seed, step)."""
    return np.random.default_rng([seed, step]).integers(0, n, size=size)


def micro_batch_slice(m: int, rank: int, world: int, batch_size: int) -> slice:
    """The examples of micro-batch ``m`` on ``rank`` among a step's ``batch_size * grad_accum * world``:
    micro-batch-major, then rank, so the micro-batches of all ranks partition the step's examples."""
    lo = (m * world + rank) * batch_size
    return slice(lo, lo + batch_size)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` to ``min_lr`` at ``steps``."""
    if step <= cfg.warmup:
        return cfg.lr * step / max(cfg.warmup, 1)
    frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * min(frac, 1.0)))


@torch.no_grad()
def eval_loss(model, examples, *, block_size: int, device, batch_size: int = 64) -> float:
    """Mean token loss (response tokens only for SFT data) over a fixed example list."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y = collate(examples[i : i + batch_size], block_size=block_size)
        logits = model(x.to(device))
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.to(device).flatten(), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += int((y != IGNORE).sum())
    model.train()
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------------
# training


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_process(device_name: str, threads: int = 0) -> tuple[int, int, torch.device]:
    """(world size, rank, device) of this process; under torchrun (``WORLD_SIZE > 1``) it joins the process
    group (NCCL on CUDA, one GPU per ``LOCAL_RANK``; gloo on CPU). ``threads`` > 0 sets torch's threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = _resolve_device(device_name)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if threads:
        torch.set_num_threads(threads)
    return world, rank, device


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns {"losses": [...], "val": [...], "elapsed_s", "step", "num_params"}.

    ``losses`` are only the steps run in this call. Under torchrun (``WORLD_SIZE > 1``) every rank calls
    this; rank 0 writes the files.
    """
    world, rank, device = setup_process(cfg.device, cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    data = InstructData(cfg) if cfg.data == "instruct" else TextData(cfg)
    model = GPT(cfg.model_config()).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
    )
    os.makedirs(cfg.out_dir, exist_ok=True)
    model_path, state_path = (
        os.path.join(cfg.out_dir, "model.safetensors"),
        os.path.join(cfg.out_dir, "state.safetensors"),
    )
    start, elapsed = 0, 0.0
    if cfg.init_from:  # on resume the checkpoint below overrides these weights
        init, _ = load_model(cfg.init_from, config=cfg.model_config(), device=device)
        model.load_state_dict(init.state_dict())
    if cfg.resume and os.path.exists(state_path):
        loaded, _ = load_model(model_path, config=cfg.model_config(), device=device)
        model.load_state_dict(loaded.state_dict())
        start, elapsed = _load_state(opt, cfg, state_path)
    elif rank == 0:
        for name in ("log.jsonl", "log.csv"):
            if os.path.exists(os.path.join(cfg.out_dir, name)):
                os.remove(os.path.join(cfg.out_dir, name))
    if rank == 0:
        _truncate_logs(cfg.out_dir, start)

    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    per_step = cfg.batch_size * cfg.grad_accum * world
    losses, vals = [], []
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    from tqdm.auto import tqdm

    bar = tqdm(range(start + 1, end + 1), desc="train", disable=not cfg.progress or rank != 0, leave=False)
    t0 = time.perf_counter()
    for step in bar:
        idx = step_indices(cfg.seed, step, len(data), per_step)
        n_tok = int(data.counts[idx].sum()) if data.counts is not None else data.n_tokens(idx)
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for m in range(cfg.grad_accum):
            x, y = collate(data.get(idx[micro_batch_slice(m, rank, world, cfg.batch_size)]),
                           block_size=cfg.block_size)
            x, y = x.to(device), y.to(device)
            sync = m == cfg.grad_accum - 1
            ctx = ddp.no_sync() if (world > 1 and not sync) else _null()
            with ctx:
                logits = ddp(x)
                tok_sum = torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum"
                )
                (tok_sum * (world / n_tok)).backward()
            step_loss += tok_sum.detach().double() / n_tok
        if world > 1:
            torch.distributed.all_reduce(step_loss)
        gnorm = (
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            if cfg.clip > 0
            else torch.tensor(0.0)
        )
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(step_loss)
        losses.append(loss)
        now = elapsed + time.perf_counter() - t0
        rec = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(gnorm),
            "tokens": n_tok,
            "time_s": round(now, 3),
        }
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if rank == 0:
                rec["val_loss"] = eval_loss(model, data.valid, block_size=cfg.block_size, device=device)
                vals.append((step, rec["val_loss"]))
        if rank == 0:
            _log(cfg.out_dir, rec)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
            if step % cfg.ckpt_every == 0 or step == end:
                now = elapsed + time.perf_counter() - t0
                save_model(model, model_path, step=step, train_config=dataclasses.asdict(cfg), elapsed_s=now)
                _save_state(opt, step, cfg, now, state_path)
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    return {
        "losses": losses,
        "val": vals,
        "elapsed_s": elapsed + time.perf_counter() - t0,
        "step": end,
        "num_params": model.num_params(),
        "model": model,
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


_CSV_COLS = ["step", "loss", "lr", "grad_norm", "tokens", "time_s", "val_loss"]


def _log(out_dir: str, rec: dict, cols=None) -> None:
    """Append ``rec`` to log.jsonl and its ``cols`` (default: this trainer's) to log.csv."""
    cols = _CSV_COLS if cols is None else cols
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    path = os.path.join(out_dir, "log.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        if new:
            w.writeheader()
        w.writerow({k: rec.get(k, "") for k in cols})


def _truncate_logs(out_dir: str, step: int, cols=None) -> None:
    """Drop log lines after the checkpoint step (a killed run may have logged steps it never saved)."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return
    recs = [json.loads(line) for line in open(path) if line.strip()]
    recs = [r for r in recs if r["step"] <= step]
    os.remove(path)
    csv_path = os.path.join(out_dir, "log.csv")
    if os.path.exists(csv_path):
        os.remove(csv_path)
    for r in recs:
        _log(out_dir, r, cols)


def read_log(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _parse(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(TrainConfig):
        kind = {"int": int, "float": float, "str": str, "bool": None}.get(str(f.type).split(" ")[0], None)
        if f.type in ("bool",):
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        elif "None" in str(f.type):
            base = int if "int" in str(f.type) else str
            p.add_argument(
                f"--{f.name}", type=lambda s, b=base: None if s.lower() == "none" else b(s), default=f.default
            )
        else:
            p.add_argument(f"--{f.name}", type=kind or str, default=f.default)
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> None:
    cfg = _parse(argv)
    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        last = out["val"][-1][1] if out["val"] else float("nan")
        print(
            json.dumps(
                {
                    "step": out["step"],
                    "final_loss": out["losses"][-1] if out["losses"] else None,
                    "val_loss": last,
                    "elapsed_s": round(out["elapsed_s"], 1),
                    "num_params": out["num_params"],
                }
            )
        )


if __name__ == "__main__":
    main()
