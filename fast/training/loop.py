"""The step loop shared by every trainer, and what a run needs around it.

``run_loop`` drives steps ``start + 1 .. end``: it calls the trainer's ``step_fn(step) -> record``, times it,
runs ``eval_fn`` every ``eval_every`` steps (and at the schedule's last step), hands the record to
``log_fn``, saves with ``ckpt_fn`` every ``ckpt_every`` steps (and at ``end``), and stops early when
``stop_fn(record)`` says so. Which examples a step sees is a pure function of ``(seed, step)``
(:func:`step_indices`), so a run needs only its checkpoint to continue exactly.

Logs: ``log.jsonl`` (every field) and ``log.csv`` (a fixed column list) in the run directory; a resumed run
first drops the lines after its checkpoint step (a killed run may have logged steps it never saved).
"""

from __future__ import annotations

import csv
import json
import os
import time
from typing import Callable

import numpy as np
import torch


def step_indices(seed: int, step: int, n: int, size: int) -> np.ndarray:
    """The example indices of one global step: a pure function of (seed, step)."""
    return np.random.default_rng([seed, step]).integers(0, n, size=size)


def micro_batch_slice(m: int, rank: int, world: int, batch_size: int) -> slice:
    """The examples of micro-batch ``m`` on ``rank`` among a step's ``batch_size * grad_accum * world``:
    micro-batch-major, then rank, so the micro-batches of all ranks partition the step's examples."""
    lo = (m * world + rank) * batch_size
    return slice(lo, lo + batch_size)


def adamw(model: torch.nn.Module, *, lr: float, betas, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on biases and norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=tuple(betas),
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup_process(device_name: str, threads: int = 0) -> tuple[int, int, torch.device]:
    """(world size, rank, device) of this process; under torchrun (``WORLD_SIZE > 1``) it joins the process
    group (NCCL on CUDA, one GPU per ``LOCAL_RANK``; gloo on CPU). ``threads`` > 0 sets torch's threads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(device_name)
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


# ----------------------------------------------------------------------------------------------------
# logs


def write_log(out_dir: str, rec: dict, cols: list[str]) -> None:
    """Append ``rec`` to log.jsonl and its ``cols`` to log.csv."""
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    path = os.path.join(out_dir, "log.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        if new:
            w.writeheader()
        w.writerow({k: rec.get(k, "") for k in cols})


def start_logs(out_dir: str, step: int, cols: list[str]) -> None:
    """Logs of a run starting at ``step``: none for a fresh run (0), else the lines up to ``step``."""
    path = os.path.join(out_dir, "log.jsonl")
    recs = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
    for name in ("log.jsonl", "log.csv"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    for r in recs:
        if r["step"] <= step:
            write_log(out_dir, r, cols)


def read_log(out_dir: str) -> list[dict]:
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------------
# the loop


def run_loop(
    step_fn: Callable[[int], dict],
    *,
    start: int,
    end: int,
    total: int,
    eval_every: int = 0,
    eval_fn: Callable[[int], dict] | None = None,
    ckpt_every: int = 0,
    ckpt_fn: Callable[[int, float], None] | None = None,
    log_fn: Callable[[dict], None] | None = None,
    stop_fn: Callable[[dict], bool] | None = None,
    postfix: Callable[[dict], dict] | None = None,
    elapsed: float = 0.0,
    progress: bool = True,
    desc: str = "train",
    **tqdm_kw,
) -> tuple[list[dict], int, float]:
    """Run steps ``start + 1 .. end`` of a ``total``-step schedule; returns (records, last step, elapsed s).

    Each record gets ``step_s`` (the update alone) and ``time_s`` (the run's time so far, ``elapsed``
    included); evaluation merges its fields into the record of its step.
    """
    from tqdm.auto import tqdm

    bar = tqdm(range(start + 1, end + 1), desc=desc, disable=not progress, leave=False, **tqdm_kw)
    records, step = [], start
    t0 = time.perf_counter()
    for step in bar:
        ts = time.perf_counter()
        rec = step_fn(step)
        rec["step_s"] = round(time.perf_counter() - ts, 4)
        rec["time_s"] = round(elapsed + time.perf_counter() - t0, 3)
        if eval_fn is not None and eval_every > 0 and (step % eval_every == 0 or step == total):
            rec.update(eval_fn(step))
        records.append(rec)
        if log_fn is not None:
            log_fn(rec)
        if postfix is not None:
            bar.set_postfix(**postfix(rec))
        if ckpt_fn is not None and ((ckpt_every > 0 and step % ckpt_every == 0) or step == end):
            ckpt_fn(step, elapsed + time.perf_counter() - t0)
        if stop_fn is not None and stop_fn(rec):
            break
    bar.close()
    return records, step, elapsed + time.perf_counter() - t0
