# ruff: noqa: E501  (the markdown templates below are clearer unwrapped)
"""Copy trained runs into ``tiny_models/checkpoints/`` and write their model cards (JSON + markdown).

    python -m tiny_models.make_cards --runs runs          # after training runs/teacher and runs/student

For each model: ``<name>.safetensors`` (weights only), ``<name>_log.csv`` (training curve), ``<name>.json``
(config, exact command, seed, parameter count, file size, training wall/CPU time, and metrics on every
evaluation set: greedy ROUGE-L / exact match, and sampled (T = 1) mean +- std over 3 seeds).
``checkpoints/README.md`` and ``tiny_models/README.md`` are regenerated from the JSON cards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil

import torch

from fast.train import load_model, read_log
from tiny_models.evaluate import evaluate
from tiny_models.tasks import EVAL_SETS, build_dataset

HERE = os.path.dirname(os.path.abspath(__file__))
CKPT = os.path.join(HERE, "checkpoints")
SETS = ("valid", *EVAL_SETS)
SAMPLE_SEEDS = (0, 1, 2)


def card(name: str, run_dirs: list[str], cpu_s: float | None) -> dict:
    """Card of a model trained in one or more stages (each stage a ``fast/train.py`` run in ``run_dirs``;
    a later stage starts from the previous weights with ``--init_from``). The last stage is the checkpoint."""
    os.makedirs(CKPT, exist_ok=True)
    dst = os.path.join(CKPT, f"{name}.safetensors")
    shutil.copyfile(os.path.join(run_dirs[-1], "model.safetensors"), dst)
    model, meta = load_model(dst)
    tc = meta["train_config"]
    log, commands, wall, offset = [], [], 0.0, 0
    for k, run_dir in enumerate(run_dirs):
        stage_meta = load_model(os.path.join(run_dir, "model.safetensors"))[1]
        log += [{**r, "step": r["step"] + offset, "stage": k + 1} for r in read_log(run_dir)]
        offset += stage_meta["step"]
        wall += stage_meta["elapsed_s"]
        cmd_file = run_dir.rstrip("/") + ".cmd"
        if os.path.exists(cmd_file):
            commands.append("nice -n 10 .venv/bin/python " + open(cmd_file).read().strip())
    with open(os.path.join(CKPT, f"{name}_log.csv"), "w") as f:
        cols = ["step", "stage", "loss", "lr", "grad_norm", "val_loss"]
        f.write(",".join(cols) + "\n")
        for r in log:
            f.write(",".join(str(r.get(c, "")) for c in cols) + "\n")
    ds = build_dataset(tc["data_seed"], n_per_family=tc["n_per_family"])
    sets = {s: ds[s] for s in SETS}
    greedy = evaluate(model, sets, temperature=0.0)
    sampled = evaluate(model, sets, temperature=1.0, seeds=SAMPLE_SEEDS)
    return {
        "name": name,
        "file": f"{name}.safetensors",
        "size_bytes": os.path.getsize(dst),
        "num_params": model.num_params(),
        "config": json.loads(model.cfg.to_json()),
        "train_config": tc,
        "command": " && ".join(commands) if commands else None,
        "commands": commands,
        "seed": tc["seed"],
        "data_seed": tc["data_seed"],
        "steps": meta["step"],
        "total_steps": offset,
        "train_wall_s": round(wall, 1),
        "train_cpu_s": cpu_s,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, torch {torch.__version__}",
        "final_train_loss": log[-1]["loss"],
        "final_val_loss": next(r["val_loss"] for r in reversed(log) if "val_loss" in r),
        "greedy": greedy,
        "sampled_T1": sampled,
        "sample_seeds": list(SAMPLE_SEEDS),
    }


def _stage_note(c):
    if len(c.get("commands", [])) < 2:
        return ""
    return (
        "; stage 2 starts from stage 1's weights: `runs/teacher_stage1.safetensors` is a copy of "
        "`runs/teacher/model.safetensors`"
    )


def _row(c, key):
    return " | ".join(
        f"{c[key][s]['rougeL']:.1f}" + (f" ± {c[key][s]['rougeL_std']:.1f}" if key != "greedy" else "")
        for s in SETS
    )


def write_markdown(cards: dict[str, dict]) -> None:
    t, s = cards["teacher"], cards["student"]
    head = "| model | params | size | " + " | ".join(SETS) + " |\n|---|---|---|" + "---|" * len(SETS) + "\n"
    rows = ""
    for key, label in (("greedy", "greedy"), ("sampled_T1", "sampled T=1, mean ± std over seeds 0,1,2")):
        rows += f"\n**ROUGE-L F1 (x100), {label}**\n\n" + head
        for c in (t, s):
            rows += (
                f"| {c['name']} | {c['num_params']:,} | {c['size_bytes'] / 1e6:.1f} MB | {_row(c, key)} |\n"
            )
        rows += (
            "| gap (teacher − student) | | | "
            + " | ".join(f"{t[key][x]['rougeL'] - s[key][x]['rougeL']:+.1f}" for x in SETS)
            + " |\n"
        )
    em = (
        "\n**Exact match (x100), greedy**\n\n"
        + head
        + "".join(
            f"| {c['name']} | {c['num_params']:,} | {c['size_bytes'] / 1e6:.1f} MB | "
            + " | ".join(f"{c['greedy'][x]['exact_match']:.1f}" for x in SETS)
            + " |\n"
            for c in (t, s)
        )
    )
    n = " | ".join(f"{x}: {t['greedy'][x]['n']}" for x in SETS)
    timing = "".join(
        f"| {c['name']} | {c['config']['n_layer']} | {c['config']['n_embd']} | {c['config']['n_head']} | "
        f"{c['num_params']:,} | {c.get('total_steps', c['steps'])} | {c['train_wall_s']:.0f} s | "
        f"{'%.0f s' % c['train_cpu_s'] if c['train_cpu_s'] else 'n/a'} | {c['final_val_loss']:.3f} |\n"
        for c in (t, s)
    )
    summary = (
        "| model | layers | d | heads | params | steps | wall time | CPU time | val loss |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + timing
    )
    section = f"""## Tiny teacher and student

Two SFT'd byte-level GPTs (`tiny_models/gpt.py`: pre-LN, RoPE, tied embeddings, no biases in linears),
trained from random initialisation on the synthetic instruction suite (`tiny_models/tasks.py`, data seed
{t["data_seed"]}) with `fast/train.py` on the 2-core CPU of the development machine, one thread each, under
`nice`, while other jobs shared the cores (so wall time is an upper bound; CPU time is the process's own).
The student is one run of 800 steps; the teacher is two (800 steps, then 800 more from those weights with a fresh
warmup + cosine schedule and another batch-order seed, `--init_from`), because after 800 steps it was only
~1.5 ROUGE-L points ahead of the student.

{summary}
Evaluation sets (examples per set: {n}): `valid` (in-distribution, used for model selection), `test`
(in-distribution), `unseen_templates` (trained families, a held-out prompt template), `longer` (trained families,
longer inputs than in training), `unseen_families` (acronym / last-word tasks never trained on).
{rows}{em}
The gap row is what the distillation methods (MGSR, the divergences of `fast/`) try to close.
Reproduce: the exact commands and metrics are in `tiny_models/checkpoints/README.md`.
"""
    with open(os.path.join(HERE, "README.md"), "w") as f:
        f.write(
            "# tiny_models\n\nModel (`gpt.py`), tasks and data (`tasks.py`), evaluation (`evaluate.py`), "
            "checkpoints (`checkpoints/`).\nTrain with `fast/train.py`; evaluate with "
            "`python -m tiny_models.evaluate tiny_models/checkpoints/teacher.safetensors`.\n\n" + section
        )
    cards_md = (
        "# Model cards: tiny teacher and student\n\n" + section.split("\n", 2)[2].rsplit("Reproduce:", 1)[0]
    )
    for c in (t, s):
        cards_md += f"""
## {c["name"]}

- file: `{c["file"]}` ({c["size_bytes"]:,} bytes, fp32 safetensors, weights only; the config JSON is in its metadata)
- config: `{json.dumps(c["config"])}`
- parameters: {c["num_params"]:,}
- commands (from the repo root, in order{_stage_note(c)}):
{"".join(f"  {k + 1}. `{cmd}`" + chr(10) for k, cmd in enumerate(c["commands"]))}- last stage: seed {c["seed"]} (init and batch order), data seed {c["data_seed"]}; {c["steps"]} steps of
  {c["train_config"]["batch_size"]} examples, AdamW lr {c["train_config"]["lr"]} → {c["train_config"]["min_lr"]}
  (warmup {c["train_config"]["warmup"]}, cosine), weight decay {c["train_config"]["weight_decay"]}, clip {c["train_config"]["clip"]};
  {c.get("total_steps", c["steps"])} steps in all
- training time: {c["train_wall_s"]:.0f} s wall, {("%.0f s" % c["train_cpu_s"]) if c["train_cpu_s"] else "n/a"} CPU ({c["machine"]})
- final train loss {c["final_train_loss"]:.3f}, validation loss {c["final_val_loss"]:.3f} (response tokens only)
- training curve: `{c["name"]}_log.csv`
- metrics (ROUGE-L F1 and exact match x100; greedy is deterministic, sampled is T = 1 over seeds {c["sample_seeds"]}):

| set | n | ROUGE-L greedy | EM greedy | ROUGE-L sampled | EM sampled |
|---|---|---|---|---|---|
""" + "".join(
            f"| {x} | {c['greedy'][x]['n']} | {c['greedy'][x]['rougeL']:.2f} | {c['greedy'][x]['exact_match']:.2f} | "
            f"{c['sampled_T1'][x]['rougeL']:.2f} ± {c['sampled_T1'][x]['rougeL_std']:.2f} | "
            f"{c['sampled_T1'][x]['exact_match']:.2f} ± {c['sampled_T1'][x]['exact_match_std']:.2f} |\n"
            for x in SETS
        )
    with open(os.path.join(CKPT, "README.md"), "w") as f:
        f.write(cards_md)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs")
    p.add_argument(
        "--stages",
        nargs="*",
        default=[],
        help="NAME=DIR1,DIR2: a model trained in stages (dirs under --runs)",
    )
    p.add_argument("--names", nargs="+", default=["teacher", "student"])
    p.add_argument("--cpu_s", type=float, nargs="*", default=None, help="CPU seconds per model, same order")
    p.add_argument("--markdown_only", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: extra OpenMP threads only add synchronisation
    cards = {}
    for i, name in enumerate(a.names):
        path = os.path.join(CKPT, f"{name}.json")
        if a.markdown_only:
            cards[name] = json.load(open(path))
            continue
        stages = dict(x.split("=", 1) for x in a.stages).get(name, name).split(",")
        cards[name] = card(name, [os.path.join(a.runs, d) for d in stages], a.cpu_s[i] if a.cpu_s else None)
        with open(path, "w") as f:
            json.dump(cards[name], f, indent=1)
        print(name, json.dumps({k: round(v["rougeL"], 2) for k, v in cards[name]["greedy"].items()}))
    if {"teacher", "student"} <= set(cards):
        write_markdown(cards)


if __name__ == "__main__":
    main()
