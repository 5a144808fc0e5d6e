"""The grid: every (attention, seed[, pairs]) run of a preset, resumable (finished runs are skipped)."""

from __future__ import annotations

import dataclasses
import json
import os

from tiny_models.match_grid.config import TASK_DEFAULTS, GridSpec, RunConfig, run_name
from tiny_models.match_grid.model import save_run
from tiny_models.match_grid.plugin import attended_fraction
from tiny_models.match_grid.reports import by_distance
from tiny_models.match_grid.run import train_run


def grid_runs(spec: GridSpec) -> list[RunConfig]:
    """Equal width and depth everywhere: full; SWA w; SWA w + top_k*B (the same attended budget as the
    largest MATCH budget); SWA + MATCH with token and block retrieval, joint and gated, each top_k."""
    w = spec.window
    kmax = max(spec.top_ks)
    atts: list[tuple[str, int | None, tuple]] = [
        ("full", None, ()),
        ("sliding", w, ()),
        ("sliding", w + kmax * spec.block_size, ()),
    ]
    for bs in (1, spec.block_size):
        for mode in ("joint", "gated"):
            for k in spec.top_ks:
                atts.append(("match", w, (("top_k", k), ("block_size", bs), ("mode", mode))))
    runs = []
    for task in spec.tasks:
        for p in spec.pairs if task == "mqar" else spec.pairs[:1]:
            for s in spec.seeds:  # seeds before attentions: a partial grid still covers every model
                for att, win, kw in atts:
                    fields = dict(
                        task=task,
                        seq_len=spec.seq_len,
                        num_kv_pairs=p,
                        steps=spec.steps,
                        attention=att,
                        window=win,
                        attn_kwargs=kw,
                        seed=s,
                    )
                    runs.append(RunConfig(**{**fields, **TASK_DEFAULTS[task], **spec.base}))
    return runs


def run_grid(spec: GridSpec, out_dir: str, *, progress: bool = True) -> list[dict]:
    """Run every grid run not finished in ``out_dir`` (``<run>/result.json`` marks a finished run)."""
    os.makedirs(out_dir, exist_ok=True)
    results = []
    runs = grid_runs(spec)
    for i, cfg in enumerate(runs):
        d = os.path.join(out_dir, run_name(cfg))
        done = os.path.join(d, "result.json")
        if os.path.exists(done):
            results.append(json.load(open(done)))
            continue
        os.makedirs(d, exist_ok=True)
        print(f"[{i + 1}/{len(runs)}] {run_name(cfg)}", flush=True)
        try:
            with open(os.path.join(d, "log.jsonl"), "w") as log:
                out = train_run(cfg, progress=progress, log=log)
        except Exception as e:  # one broken configuration must not stop the rest of the grid
            print(f"  FAILED {run_name(cfg)}: {type(e).__name__}: {e}", flush=True)
            continue
        ev = out["eval"]
        rec = {
            "name": run_name(cfg),
            "config": dataclasses.asdict(cfg),
            "acc": out["acc"],
            "steps": out["steps"],
            "time_s": round(out["time_s"], 1),
            "num_params": out["num_params"],
            "attended": attended_fraction(cfg.seq_len, cfg.attention, cfg.window, cfg.attn_kwargs),
            "curve": out["curve"],
            "by_distance": by_distance(ev["correct"], ev["dist"]),
        }
        save_run(out["model"], cfg, os.path.join(d, "model.safetensors"), acc=out["acc"], steps=out["steps"])
        with open(done + ".tmp", "w") as f:
            json.dump(rec, f)
        os.replace(done + ".tmp", done)
        results.append(rec)
    return results


def finished_runs(out_dir: str) -> list[dict]:
    """The ``result.json`` of every finished run in a grid directory, in name order."""
    names = sorted(d for d in os.listdir(out_dir) if os.path.exists(os.path.join(out_dir, d, "result.json")))
    return [json.load(open(os.path.join(out_dir, d, "result.json"))) for d in names]
