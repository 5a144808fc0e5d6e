"""Supervised fine-tuning of any causal LM: AdamW, warmup + cosine, clipping, accumulation, exact resume, DDP.

Why the run is exactly resumable: no hidden data-loader state exists. The examples of global step s are
drawn by ``np.random.default_rng([seed, s])``, so a run needs only (weights, AdamW moments, step) to
continue -- all in the checkpoint, next to the global torch/NumPy RNG states for anything else that draws.
A resumed run therefore reproduces the uninterrupted run's losses bit for bit on the same machine (tested).

Why the loss is normalised by the global token count: a step's loss is ``sum of token losses / number of
target tokens in the whole step`` (every micro-batch, every rank; the counts are known before the forward).
Each micro-batch backpropagates its share, scaled by the world size because DDP averages gradients, so
gradient accumulation and DDP give the same gradient as one big batch (up to float summation order), not a
mean of per-micro-batch means.

The data object: ``len(data)``; ``data.get(idx) -> [(inputs, labels)]``; ``data.valid`` (a fixed list of
examples); ``data.pad_id``; the target-token count of a step from ``data.counts[idx].sum()`` when
``data.counts`` is not None, else ``data.n_tokens(idx)``.

Files in ``out_dir``: ``model.safetensors`` (fp32 weights and the metadata ``save_model`` adds),
``state.safetensors`` (AdamW state, RNG states, train config), ``log.jsonl`` and ``log.csv``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fast.training.checkpoint import (
    check_same_run,
    load_optimizer,
    load_tensors,
    load_weights,
    optimizer_tensors,
    save_tensors,
)
from fast.training.data import IGNORE, collate
from fast.training.loop import (
    adamw,
    micro_batch_slice,
    run_loop,
    setup_process,
    start_logs,
    step_indices,
    write_log,
)
from fast.training.schedule import lr_at


@dataclass(frozen=True)
class SFTConfig:
    out_dir: str = "runs/tiny"
    block_size: int = 160
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
    threads: int | None = None
    progress: bool = True
    device: str = "auto"


# fields that may differ between a run and its resumption (they do not change the trajectory)
RESUME_FREE = {"out_dir", "stop_after", "resume", "threads", "progress", "device", "ckpt_every"}
LOG_COLS = ["step", "loss", "lr", "grad_norm", "tokens", "time_s", "val_loss"]


def save_state(opt, step: int, cfg, elapsed: float, path: str) -> None:
    tensors, groups = optimizer_tensors(opt, "opt")
    tensors["rng.torch"] = torch.get_rng_state()
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {
        "step": str(step),
        "param_groups": groups,
        "train_config": json.dumps(dataclasses.asdict(cfg)),
        "elapsed_s": str(elapsed),
        "rng.numpy.pos": str(np_state[2]),
    }
    save_tensors(tensors, meta, path)


def load_state(opt, cfg, path: str) -> tuple[int, float]:
    tensors, meta = load_tensors(path)
    check_same_run(json.loads(meta["train_config"]), cfg, RESUME_FREE, path)
    load_optimizer(opt, tensors, "opt", meta["param_groups"])
    torch.set_rng_state(tensors["rng.torch"])
    np.random.set_state(
        ("MT19937", tensors["rng.numpy"].numpy().astype(np.uint32), int(meta["rng.numpy.pos"]), 0, 0.0)
    )
    return int(meta["step"]), float(meta["elapsed_s"])


@torch.no_grad()
def eval_loss(model, examples, *, block_size: int, device, pad_id: int = 0, batch_size: int = 64) -> float:
    """Mean token loss (labelled tokens only) over a fixed example list."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        x, y = collate(examples[i : i + batch_size], pad_id=pad_id, block_size=block_size)
        logits = model(x.to(device))
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.to(device).flatten(), ignore_index=IGNORE, reduction="sum"
        ).item()
        count += int((y != IGNORE).sum())
    model.train()
    return total / max(count, 1)


def train(
    cfg,
    model: torch.nn.Module,
    data,
    *,
    save_model: Callable[[torch.nn.Module, str, dict], None],
    world_rank_device=None,
) -> dict:
    """Run (or resume) SFT of ``model`` (trained in place) on ``data``; returns {"losses": [...],
    "val": [(step, loss)], "elapsed_s", "step", "model"}. ``losses`` are only the steps run in this call.

    ``save_model(model, path, meta)`` writes a weights file (``fast.training.checkpoint.save_weights`` plus
    the model's own metadata). Under torchrun (``WORLD_SIZE > 1``) every rank calls this; rank 0 writes.
    """
    world, rank, device = world_rank_device or setup_process(cfg.device, cfg.threads)
    model = model.to(device)
    opt = adamw(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    os.makedirs(cfg.out_dir, exist_ok=True)
    model_path = os.path.join(cfg.out_dir, "model.safetensors")
    state_path = os.path.join(cfg.out_dir, "state.safetensors")
    start, elapsed = 0, 0.0
    if cfg.resume and os.path.exists(state_path):
        load_weights(model, model_path)
        start, elapsed = load_state(opt, cfg, state_path)
    if rank == 0:
        start_logs(cfg.out_dir, start, LOG_COLS)
    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    model.train()
    per_step = cfg.batch_size * cfg.grad_accum * world
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    pad_id = getattr(data, "pad_id", 0)

    def step_fn(step):
        idx = step_indices(cfg.seed, step, len(data), per_step)
        n_tok = int(data.counts[idx].sum()) if data.counts is not None else data.n_tokens(idx)
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for m in range(cfg.grad_accum):
            batch = data.get(idx[micro_batch_slice(m, rank, world, cfg.batch_size)])
            x, y = collate(batch, pad_id=pad_id, block_size=cfg.block_size)
            x, y = x.to(device), y.to(device)
            last = m == cfg.grad_accum - 1
            with ddp.no_sync() if (world > 1 and not last) else _null():
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
        return {"step": step, "loss": float(step_loss), "lr": lr, "grad_norm": float(gnorm), "tokens": n_tok}

    def eval_fn(step):
        if rank != 0:
            return {}
        return {
            "val_loss": eval_loss(model, data.valid, block_size=cfg.block_size, device=device, pad_id=pad_id)
        }

    def ckpt_fn(step, now):
        if rank == 0:
            save_model(
                model, model_path, {"step": step, "train_config": dataclasses.asdict(cfg), "elapsed_s": now}
            )
            save_state(opt, step, cfg, now, state_path)

    records, _, elapsed = run_loop(
        step_fn,
        start=start,
        end=end,
        total=cfg.steps,
        eval_every=cfg.eval_every,
        eval_fn=eval_fn,
        ckpt_every=cfg.ckpt_every,
        ckpt_fn=ckpt_fn,
        elapsed=elapsed,
        log_fn=(lambda rec: write_log(cfg.out_dir, rec, LOG_COLS)) if rank == 0 else None,
        postfix=lambda rec: {"loss": f"{rec['loss']:.3f}", "lr": f"{rec['lr']:.1e}"},
        progress=cfg.progress and rank == 0,
        desc="train",
    )
    if world > 1:
        torch.distributed.barrier()
    return {
        "losses": [r["loss"] for r in records],
        "val": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
        "elapsed_s": elapsed,
        "step": end,
        "model": model,
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
