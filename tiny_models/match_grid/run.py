"""One training run of a recall model, and its held-out evaluation."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from fast.training.loop import adamw, run_loop
from fast.training.schedule import lr_at
from tiny_models.gpt import GPT
from tiny_models.match_grid.config import RunConfig, heldout, make_batch, run_name, training_config
from tiny_models.match_grid.model import logits_at, new_model
from tiny_models.recall import IGNORE, key_distance


@torch.no_grad()
def evaluate(model: GPT, x: torch.Tensor, y: torch.Tensor, *, batch: int = 256) -> dict:
    """Accuracy over labelled positions, plus per-position correctness, key distances (for binning) and the
    example (row of ``x``) each position belongs to."""
    model.eval()
    dev = next(model.parameters()).device  # the data stays where it is; the model's device runs it
    correct, dists, rows = [], [], []
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch].cpu(), y[i : i + batch].cpu()
        mask = yb != IGNORE
        correct.append(logits_at(model, xb.to(dev), mask.to(dev)).argmax(-1).cpu() == yb[mask])
        dists.append(key_distance(xb, yb)[mask])
        rows.append(mask.nonzero()[:, 0] + i)  # row-major, the order of yb[mask]
    c, d = torch.cat(correct), torch.cat(dists)
    return {"acc": float(c.float().mean()), "correct": c, "dist": d, "row": torch.cat(rows)}


def train_run(
    cfg: RunConfig, *, progress: bool = True, log=None, init: dict | None = None, device: str = "cpu"
) -> dict:
    """Train one model; returns a dict: model, acc, curve [(step, acc)], steps, time_s, num_params, eval.
    ``init``: a state dict to start from (a fine-tune: the weights of a run trained with another attention;
    fresh AdamW state and schedule). ``device``: where the model trains (the batches are drawn on the CPU,
    as everywhere, so a run's data does not depend on it); the returned model stays there.

    The step loop and the schedule are ``fast.training``'s (``run_loop``, ``lr_at``): fresh batches every
    step, cross-entropy on the labelled positions only, clipping at 1, evaluation every ``eval_every`` steps
    and early stop once held-out accuracy exceeds ``early_stop``. ``log``: a file that receives one JSON line
    per evaluation."""
    training_config(cfg)  # bad training options fail before the model is built
    torch.manual_seed(cfg.seed)
    model = new_model(cfg)
    if init is not None:
        model.load_state_dict(init, strict=True)
    model = model.to(device)
    opt = adamw(model, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    xe, ye = heldout(cfg)
    curve: list[tuple[int, float]] = []

    def step_fn(step):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x, y = make_batch(training_config(cfg, step), cfg.batch_size, 1_000_003 * cfg.seed + step)
        x, y = x.to(device), y.to(device)
        model.train()
        mask = y != IGNORE
        loss = F.cross_entropy(logits_at(model, x, mask), y[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return {"step": step, "loss": loss.item()}

    def eval_fn(step):
        acc = evaluate(model, xe, ye)["acc"]
        curve.append((step, acc))
        return {"acc": acc}

    def log_fn(rec):
        if log is not None and "acc" in rec:
            print(
                json.dumps(
                    {
                        "step": rec["step"],
                        "loss": round(rec["loss"], 4),
                        "acc": round(rec["acc"], 4),
                        "time_s": round(rec["time_s"], 1),
                    }
                ),
                file=log,
                flush=True,
            )

    _, step, elapsed = run_loop(
        step_fn,
        start=0,
        end=cfg.steps,
        total=cfg.steps,
        eval_every=cfg.eval_every,
        eval_fn=eval_fn,
        log_fn=log_fn,
        stop_fn=lambda rec: cfg.early_stop is not None and rec.get("acc", 0.0) > cfg.early_stop,
        postfix=lambda rec: {
            "loss": f"{rec['loss']:.3f}",
            **({"acc": f"{rec['acc']:.3f}"} if "acc" in rec else {}),
        },
        progress=progress,
        desc=run_name(cfg),
        mininterval=2,
    )
    res = evaluate(model, xe, ye)
    return {
        "model": model.eval(),
        "acc": res["acc"],
        "curve": curve,
        "steps": step,
        "time_s": elapsed,
        "num_params": model.num_params(),
        "eval": res,
    }
