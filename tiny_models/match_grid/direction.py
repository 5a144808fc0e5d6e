"""The paper's direction (arXiv 2606.29844): retrieval switched on in a model trained with a sliding window.

    python -m tiny_models.match_grid.direction --tasks mqar mad_in_context mad_noisy mad_fuzzy \
        --seeds 0 1 2 --out runs/match_direction --results tiny_models/results/match/direction

Per task and seed, with equal width and depth and the same training stream, the variants are:

* ``full``: trained with full attention, the ceiling;
* ``swa``: trained with a sliding window of ``w`` keys;
* ``swa → match (inference)``: (a) the ``swa`` weights with MATCH (window ``w`` + ``top_k`` blocks of
  ``block_size``, joint mode) switched on at inference, no training;
* ``swa → match (fine-tune)``: (b) the ``swa`` weights fine-tuned with MATCH on for ``ft_frac`` of the
  training steps (fresh optimiser and schedule);
* ``match (scratch)``: (c) trained with MATCH from scratch;
* ``full → match (probe)``: the full model restricted to the same MATCH at inference. This is an upper-bound
  probe, not the paper's claim: a model trained with full attention already gives the right key the top
  attention logit, so exact top-k retrieval recovers it almost automatically.

Every variant is scored on the run's held-out set: accuracy overall and split by the distance from the
query to its key, inside the window (``d < w``) or beyond it. Each finished variant leaves
``<out>/<task>_s<seed>/<variant>.json`` (resumable: finished variants are skipped; trained weights are
saved for the variants that reuse them); ``--results`` gets ``results.md`` (mean ± std over seeds) and
``runs.json`` (every variant's record: config, seed, curve, accuracy by distance).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

from tiny_models.match_grid.config import TASK_DEFAULTS, RunConfig, heldout
from tiny_models.match_grid.model import load_run, save_run, use_match_chunk
from tiny_models.match_grid.plugin import attention_cost, swapped
from tiny_models.match_grid.reports import by_distance
from tiny_models.match_grid.run import evaluate, train_run

VARIANTS = ("full", "swa", "swa_match_inference", "swa_match_finetune", "match_scratch", "full_match_probe")
LABELS = {
    "full": "full (ceiling)",
    "swa": "SWA",
    "swa_match_inference": "SWA → MATCH at inference (a)",
    "swa_match_finetune": "SWA → MATCH fine-tuned (b)",
    "match_scratch": "MATCH from scratch (c)",
    "full_match_probe": "full → MATCH at inference (upper-bound probe)",
}


def configs(task: str, seed: int, a) -> dict:
    """The RunConfig of every trained variant (``full``, ``swa``, ``match``)."""
    kw = (("top_k", a.top_k), ("block_size", a.block_size), ("mode", "joint"))
    base = dict(task=task, seq_len=a.seq_len, steps=a.steps, seed=seed, lr=a.lr, **TASK_DEFAULTS[task])
    if task == "mqar":
        base["num_kv_pairs"] = a.pairs
    return {
        "full": RunConfig(attention="full", **base),
        "swa": RunConfig(attention="sliding", window=a.window, **base),
        "match": RunConfig(attention="match", window=a.window, attn_kwargs=kw, **base),
    }


def score(model, cfg: RunConfig, window: int) -> dict:
    """Held-out accuracy overall, inside the window (key-query distance < w), beyond it, and by distance."""
    x, y = heldout(cfg)
    ev = evaluate(model, x, y)
    c, d = ev["correct"], ev["dist"]
    inside, beyond = d < window, d >= window
    return {
        "acc": ev["acc"],
        "acc_inside": float(c[inside].float().mean()) if bool(inside.any()) else None,
        "acc_beyond": float(c[beyond].float().mean()) if bool(beyond.any()) else None,
        "frac_beyond": float(beyond.float().mean()),
        "by_distance": by_distance(c, d),
    }


def run_task_seed(task: str, seed: int, a) -> dict:
    """Every variant of one (task, seed); resumable. Returns {variant: record}."""
    d = os.path.join(a.out, f"{task}_s{seed}")
    os.makedirs(d, exist_ok=True)
    cfgs = configs(task, seed, a)
    out = {}

    def done(v):
        p = os.path.join(d, f"{v}.json")
        return json.load(open(p)) if os.path.exists(p) else None

    def record(v, cfg, model, trained=None, **extra):
        rec = {"variant": v, "task": task, "seed": seed, "config": dataclasses.asdict(cfg), **extra}
        rec["cost"] = attention_cost(
            cfg.seq_len, cfg.attention, cfg.window, cfg.attn_kwargs, head_dim=cfg.n_embd // cfg.n_head
        )
        rec.update(score(model, cfg, a.window))
        if trained is not None:
            rec.update(steps=trained["steps"], curve=trained["curve"], time_s=round(trained["time_s"], 1))
            save_run(model, cfg, os.path.join(d, f"{v}.safetensors"))
        with open(os.path.join(d, f"{v}.json.tmp"), "w") as f:
            json.dump(rec, f)
        os.replace(os.path.join(d, f"{v}.json.tmp"), os.path.join(d, f"{v}.json"))
        return rec

    def trained(v):  # the saved weights of a trained variant (train it first if needed)
        if done(v) is None:
            run(v)
        return load_run(os.path.join(d, f"{v}.safetensors"))[0]

    def run(v):
        if (rec := done(v)) is not None:
            out[v] = rec
            return
        match_cfg = cfgs["match"]
        if v in ("full", "swa"):
            t = train_run(cfgs[v], progress=not a.no_progress)
            out[v] = record(v, cfgs[v], t["model"], t)
        elif v == "match_scratch":
            t = train_run(match_cfg, progress=not a.no_progress)
            out[v] = record(v, match_cfg, t["model"], t)
        elif v in ("swa_match_inference", "full_match_probe"):
            src = trained("swa" if v == "swa_match_inference" else "full")
            m = swapped(src, attention="match", window=a.window, attn_kwargs=match_cfg.attn_kwargs)
            out[v] = record(v, match_cfg, m)
        else:  # swa_match_finetune
            ft = dataclasses.replace(match_cfg, steps=max(1, round(a.ft_frac * a.steps)), warmup=0)
            t = train_run(ft, progress=not a.no_progress, init=trained("swa").state_dict())
            out[v] = record(v, ft, t["model"], t, init="swa")

    for v in VARIANTS:
        run(v)
    return out


def table(records: list[dict]) -> str:
    """Mean ± std over seeds per (task, variant): accuracy overall, inside the window, beyond it."""
    lines = [
        "| task | variant | seeds | accuracy | inside the window | beyond the window |",
        "|---|---|---|---|---|---|",
    ]

    def ms(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "–"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{100 * statistics.fmean(vals):.1f} ± {100 * sd:.1f}"

    tasks = list(dict.fromkeys(r["task"] for r in records))
    for task in tasks:
        for v in VARIANTS:
            rs = [r for r in records if r["task"] == task and r["variant"] == v]
            if rs:
                cells = [ms([r[k] for r in rs]) for k in ("acc", "acc_inside", "acc_beyond")]
                lines.append(f"| {task} | {LABELS[v]} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["mqar", "mad_in_context", "mad_noisy", "mad_fuzzy"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--pairs", type=int, default=8, help="MQAR key-value pairs")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--top_k", type=int, default=4)
    p.add_argument("--block_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ft_frac", type=float, default=0.1, help="fine-tune steps as a fraction of --steps")
    p.add_argument("--out", default="runs/match_direction")
    p.add_argument("--results", default=None)
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    use_match_chunk()
    records = []
    for task in a.tasks:
        for seed in a.seeds:
            records += list(run_task_seed(task, seed, a).values())
    text = table(records)
    print(text)
    if a.results:
        os.makedirs(a.results, exist_ok=True)
        args = " ".join(sys.argv[1:] if argv is None else argv)
        with open(os.path.join(a.results, "results.md"), "w") as f:
            f.write(f"Command: `python -m tiny_models.match_grid.direction {args}`\n\n{text}\n")
        with open(os.path.join(a.results, "runs.json"), "w") as f:
            json.dump(records, f)


if __name__ == "__main__":
    main()
