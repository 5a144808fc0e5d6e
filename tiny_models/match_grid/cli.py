"""The command line: ``python -m tiny_models.match_grid {train,plugin,grid,table} ...``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from tiny_models.match_grid.config import (
    _KV_FIELDS,
    DEMO_SEED,
    TASK_DEFAULTS,
    GridSpec,
    RunConfig,
    make_batch,
    run_name,
)
from tiny_models.match_grid.grid import finished_runs, run_grid
from tiny_models.match_grid.model import load_run, save_run, use_match_chunk
from tiny_models.match_grid.plugin import plugin_pairs, plugin_table
from tiny_models.match_grid.reports import write_results
from tiny_models.match_grid.run import train_run


def _parse_kv(items) -> tuple:
    out = []
    for it in items or []:
        k, v = it.split("=", 1)
        if v.lower() in ("true", "false"):
            out.append((k, v.lower() == "true"))
            continue
        try:
            v = int(v)
        except ValueError:
            try:
                v = float(v)
            except ValueError:
                pass
        out.append((k, v))
    return tuple(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="one run; prints the accuracy curve")
    for f in dataclasses.fields(RunConfig):
        if f.name in _KV_FIELDS:
            t.add_argument(f"--{f.name}", nargs="*", default=[], help="name=value pairs")
        elif isinstance(f.default, bool):
            t.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        elif f.name in ("window", "early_stop"):
            t.add_argument(
                f"--{f.name}", type=lambda s: None if s.lower() == "none" else float(s), default=f.default
            )
        else:
            t.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    t.add_argument("--save", default=None, help="write the trained model here (safetensors)")
    g = sub.add_parser("grid", help="run (or resume) the grid, then write table + plot")
    g.add_argument("--out", default="runs/match_grid")
    g.add_argument("--tasks", nargs="+", default=list(GridSpec.tasks), choices=sorted(TASK_DEFAULTS))
    g.add_argument("--seq_len", type=int, default=GridSpec.seq_len)
    g.add_argument("--pairs", type=int, nargs="+", default=list(GridSpec.pairs))
    g.add_argument("--window", type=int, default=GridSpec.window)
    g.add_argument("--top_ks", type=int, nargs="+", default=list(GridSpec.top_ks))
    g.add_argument("--block_size", type=int, default=GridSpec.block_size)
    g.add_argument("--seeds", type=int, nargs="+", default=list(GridSpec.seeds))
    g.add_argument("--steps", type=int, default=GridSpec.steps)
    g.add_argument("--set", nargs="*", default=[], help="extra RunConfig fields, name=value")
    g.add_argument("--results", default="tiny_models/results/match", help="table/plot destination")
    g.add_argument("--no_progress", action="store_true")
    tb = sub.add_parser("table", help="table + plot from the finished runs of a grid directory (no training)")
    tb.add_argument("--out", default="runs/match_grid")
    tb.add_argument("--results", default="tiny_models/results/match")
    pl = sub.add_parser("plugin", help="a trained model with its attention swapped at inference")
    pl.add_argument("checkpoint")
    pl.add_argument("--windows", type=int, nargs="+", default=[8, 16])
    pl.add_argument("--top_ks", type=int, nargs="+", default=[1, 2, 4])
    pl.add_argument("--block_size", type=int, default=4)
    pl.add_argument("--n", type=int, default=512)
    pl.add_argument("--out", default=None, help="write the markdown table here")
    pl.add_argument(
        "--pairs",
        type=int,
        nargs="+",
        default=None,
        help="instead: accuracy vs number of key-value pairs (MQAR), first window only",
    )
    pl.add_argument("--plot", default=None, help="with --pairs: write the accuracy-vs-pairs plot here")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    use_match_chunk()
    if a.cmd == "train":
        d = {f.name: getattr(a, f.name) for f in dataclasses.fields(RunConfig)}
        d.update({k: _parse_kv(getattr(a, k)) for k in _KV_FIELDS})
        d["window"] = None if d["window"] is None else int(d["window"])
        cfg = RunConfig(**d)
        out = train_run(cfg, log=sys.stdout)
        print(
            json.dumps(
                {
                    "name": run_name(cfg),
                    "acc": out["acc"],
                    "steps": out["steps"],
                    "time_s": round(out["time_s"], 1),
                    "num_params": out["num_params"],
                }
            )
        )
        if a.save:
            save_run(out["model"], cfg, a.save, acc=out["acc"], steps=out["steps"])
    elif a.cmd == "table":
        write_results(finished_runs(a.out), a.results)
    elif a.cmd == "plugin":
        model, cfg = load_run(a.checkpoint)
        if a.pairs:
            table = plugin_pairs(
                model,
                cfg,
                a.pairs,
                window=a.windows[0],
                top_ks=a.top_ks,
                block_size=a.block_size,
                n=a.n,
                plot=a.plot,
            )
        else:
            x, y = make_batch(cfg, a.n, DEMO_SEED)
            table = plugin_table(model, x, y, windows=a.windows, top_ks=a.top_ks, block_size=a.block_size)
        print(table)
        if a.out:
            with open(a.out, "w") as f:
                f.write(table + "\n")
    elif a.cmd == "grid":
        spec = GridSpec(
            tasks=tuple(a.tasks),
            seq_len=a.seq_len,
            pairs=tuple(a.pairs),
            window=a.window,
            top_ks=tuple(a.top_ks),
            block_size=a.block_size,
            seeds=tuple(a.seeds),
            steps=a.steps,
            base=dict(_parse_kv(a.set)),
        )
        results = run_grid(spec, a.out, progress=not a.no_progress)
        write_results(results, a.results)
