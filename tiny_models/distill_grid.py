"""Every distillation method and ablation from the same teacher/student checkpoints, evaluated alike.

    python -m tiny_models.distill_grid                  # the full main table (+ ablations: --ablations)
    python -m tiny_models.distill_grid --quick          # a short end-to-end check of the grid
    python -m tiny_models.distill_grid --timing 12      # seconds per training step of every method
    nohup python -m tiny_models.distill_grid --steps 150 > grid.log 2>&1 &     # background-friendly

Each (method, training seed) is one run of ``tiny_models.distill.train`` in ``<runs>/<method>/seed<k>/`` from
the same initial student (``tiny_models/checkpoints/student.safetensors``) and frozen teacher, for the same
number of steps (SFT is the student's SFT continued for those steps: the equal-steps baseline). The run keeps
its best validation-ROUGE-L checkpoint (``best.safetensors``), which is then scored on every evaluation set:
greedy ROUGE-L and exact match, and sampled ROUGE-L (T = 1, sampling seeds 0/1/2). Tables report mean ± std
over the training seeds (for sampled decoding: over training seeds x sampling seeds). Seconds per training
step is the median of the runs' per-step times (the update alone, validation excluded).

Resumable: a finished run leaves ``eval.json`` and is skipped; an unfinished one resumes from its checkpoint.
Writes ``results.json``, ``results.md``, ``rouge.png`` (and ``scrg_frequency.png`` when the SCRG-frequency
runs are in the grid) and ``command.txt`` to ``--results``; ``--export_students kd distillm mgsr`` also copies
those methods' checkpoints (first training seed) with model cards to ``<results>/students/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time

import torch

from tiny_models.distill import BASELINES, METHODS, DistillConfig, read_log, train
from tiny_models.evaluate import evaluate
from tiny_models.model_io import load_model
from tiny_models.tasks import EVAL_SETS, build_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ABLATIONS = (
    "mgsr-no-scrg",
    "mgsr-no-dackl",
    "mgsr-no-span",
    "mgsr-scrg3",
    "mgsr-scrg5",
    "mgsr-reverse_kl",
    "mgsr-symmetric_kl",
    "mgsr-js_divergence",
    "mgsr-tv_distance",
    "mgsr-skew_forward_kl",
    "mgsr-skew_reverse_kl",
)
# not run separately (same config as a run above): mgsr-scrg0 = mgsr-no-scrg, mgsr-scrg1 = mgsr,
# mgsr-forward_kl = mgsr-no-dackl
SAME_AS = {"mgsr-scrg0": "mgsr-no-scrg", "mgsr-scrg1": "mgsr", "mgsr-forward_kl": "mgsr-no-dackl"}
SETS = ("valid", *EVAL_SETS)


def run_one(args, method: str, seed: int, sets) -> dict:
    out_dir = os.path.join(args.runs, method, f"seed{seed}")
    done = os.path.join(out_dir, "eval.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    cfg = DistillConfig(
        method=method,
        out_dir=out_dir,
        seed=seed,
        steps=args.steps,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        eval_examples=args.eval_examples,
        ckpt_every=args.eval_every,
        max_new_tokens=args.max_new_tokens,
        n_per_family=args.n_per_family,
        threads=1,
        progress=not args.no_progress,
        resume=True,
        teacher=args.teacher,
        student=args.student,
    )
    cfg = dataclasses.replace(cfg, **args.override)
    train(cfg)
    path = os.path.join(out_dir, "best.safetensors")
    if not os.path.exists(path):
        path = os.path.join(out_dir, "model.safetensors")
    model, meta = load_model(path)
    res = score_model(model, sets, args)
    recs = read_log(out_dir)
    res.update(
        method=method,
        seed=seed,
        steps=args.steps,
        checkpoint=os.path.basename(path),
        best_step=meta.get("step"),
        step_s=statistics.median(r["step_s"] for r in recs),
        config=dataclasses.asdict(cfg),
    )
    with open(done, "w") as f:
        json.dump(res, f, indent=1)
    return res


def score_model(model, sets, args) -> dict:
    return {
        "greedy": evaluate(model, sets, temperature=0.0, max_new_tokens=args.max_new_tokens),
        "sampled": evaluate(
            model, sets, temperature=1.0, seeds=tuple(args.sample_seeds), max_new_tokens=args.max_new_tokens
        ),
    }


def _ms(vals):
    return (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(results: dict, sets) -> dict:
    """{method: {"n_seeds", "step_s", greedy/sampled {set: {metric: (mean, std)}}}}."""
    out = {}
    for method, runs in results.items():
        row = {
            "n_seeds": len(runs),
            "step_s": statistics.median(r["step_s"] for r in runs)
            if all("step_s" in r for r in runs)
            else None,
        }
        for mode in ("greedy", "sampled"):
            row[mode] = {}
            for s in sets:
                row[mode][s] = {
                    "rougeL": _ms([r[mode][s]["rougeL"] for r in runs]),
                    "exact_match": _ms([r[mode][s]["exact_match"] for r in runs]),
                }
                if mode == "sampled":  # pool training seeds and sampling seeds: the within-run spread too
                    m = [r[mode][s]["rougeL"] for r in runs]
                    w = [r[mode][s]["rougeL_std"] for r in runs]
                    row[mode][s]["rougeL_within"] = statistics.fmean(w)
                    row[mode][s]["rougeL"] = _ms(m)
            held = [s for s in sets if s != "valid"]
            row[mode]["avg"] = {
                "rougeL": _ms([statistics.fmean(r[mode][s]["rougeL"] for s in held) for r in runs])
            }
        out[method] = row
    return out


def table(summary, sets, mode, metric, title) -> str:
    cols = [s for s in sets] + ["avg (held-out)"]
    lines = [
        f"**{title}**",
        "",
        "| method | seeds | s/step | " + " | ".join(cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for m, row in summary.items():
        cells = []
        for s in sets:
            mu, sd = row[mode][s][metric]
            cells.append(f"{mu:.1f} ± {sd:.1f}")
        if metric == "rougeL":
            mu, sd = row[mode]["avg"]["rougeL"]
            cells.append(f"{mu:.1f} ± {sd:.1f}")
        else:
            cells.append("")
        sps = f"{row['step_s']:.2f}" if row.get("step_s") is not None else "-"
        lines.append(f"| {m} | {row['n_seeds']} | {sps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    mu = [summary[n]["greedy"]["avg"]["rougeL"][0] for n in names]
    sd = [summary[n]["greedy"]["avg"]["rougeL"][1] for n in names]
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(names) + 2), 3.6))
    colors = [
        "tab:red"
        if n.startswith("mgsr")
        else "tab:gray"
        if n in ("teacher", "student (init)")
        else "tab:blue"
        for n in names
    ]
    ax.bar(range(len(names)), mu, yerr=sd, color=colors, capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("greedy ROUGE-L, mean of held-out sets")
    ax.set_title("tiny teacher -> tiny student (mean ± std over training seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SCRG_CURVE = {0: "mgsr-no-scrg", 1: "mgsr", 3: "mgsr-scrg3", 5: "mgsr-scrg5"}  # frequency -> run name


def plot_scrg(summary, path) -> bool:
    """Held-out greedy ROUGE-L against the SCRG frequency F (0 = no SCRG); False when a point is missing."""
    if not all(m in summary for m in SCRG_CURVE.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fs = sorted(SCRG_CURVE)
    mu = [summary[SCRG_CURVE[f]]["greedy"]["avg"]["rougeL"][0] for f in fs]
    sd = [summary[SCRG_CURVE[f]]["greedy"]["avg"]["rougeL"][1] for f in fs]
    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    ax.errorbar(fs, mu, yerr=sd, marker="o", capsize=3, color="tab:red")
    for ref, style in (("student (init)", ":"), ("teacher", "--")):
        if ref in summary:
            y = summary[ref]["greedy"]["avg"]["rougeL"][0]
            ax.axhline(y, ls=style, color="gray", lw=1)
            ax.text(fs[-1], y, ref, fontsize=7, va="bottom", ha="right")
    ax.set_xticks(fs)
    ax.set_xlabel("SCRG frequency F (corrections per sample)")
    ax.set_ylabel("greedy ROUGE-L, held-out mean")
    ax.set_title("MGSR: SCRG frequency (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def export_students(args, results: dict, summary: dict, methods, cmd: str) -> None:
    """Copy each method's best-validation checkpoint of the first training seed to
    ``<results>/students/<method>.safetensors`` with a JSON card, and write ``students/README.md``."""
    import shutil

    out = os.path.join(args.results, "students")
    os.makedirs(out, exist_ok=True)
    seed = args.seeds[0]
    cards = {}
    for m in methods:
        run = next((r for r in results.get(m, []) if r["seed"] == seed), None)
        if run is None:
            raise ValueError(f"--export_students {m}: no finished run with training seed {seed}")
        src = os.path.join(args.runs, m, f"seed{seed}", run["checkpoint"])
        dst = os.path.join(out, f"{m}.safetensors")
        shutil.copyfile(src, dst)
        model, _ = load_model(dst)
        recipe = METHODS[m]
        cards[m] = {
            "method": m,
            "sequences": recipe.sequences,
            "loss": recipe.loss,
            "training_seed": seed,
            "steps": run["steps"],
            "best_step": run["best_step"],
            "step_s": run["step_s"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "file_bytes": os.path.getsize(dst),
            "init": os.path.relpath(args.student, ROOT),
            "teacher": os.path.relpath(args.teacher, ROOT),
            "command": cmd,
            "config": run["config"],
            "this_seed": {
                mode: {s: {k: run[mode][s][k] for k in ("n", "rougeL", "exact_match")} for s in run[mode]}
                for mode in ("greedy", "sampled")
            },
            "all_seeds_greedy_avg_rougeL": summary[m]["greedy"]["avg"]["rougeL"],
        }
        with open(os.path.join(out, f"{m}.json"), "w") as f:
            json.dump(cards[m], f, indent=1)
    held = [s for s in SETS if s != "valid"]
    rows = [
        "| file | method | trains on | loss | best step | "
        + " | ".join(held)
        + " | held-out avg (this seed) | all seeds |",
        "|---|---|---|---|---|" + "---|" * (len(held) + 2),
    ]
    for m, c in cards.items():
        g = c["this_seed"]["greedy"]
        avg = statistics.fmean(g[s]["rougeL"] for s in held)
        mu, sd = c["all_seeds_greedy_avg_rougeL"]
        rows.append(
            f"| `{m}.safetensors` | {m} | {c['sequences']} | {c['loss']} | "
            f"{c['best_step']} / {c['steps']} | "
            + " | ".join(f"{g[s]['rougeL']:.1f}" for s in held)
            + f" | {avg:.1f} | {mu:.1f} ± {sd:.1f} |"
        )
    some = next(iter(cards.values()))
    text = [
        "# Distilled students (model cards)",
        "",
        f"Each file is the checkpoint with the best validation ROUGE-L of training seed {seed} of one",
        "method of the distillation grid, from the same initial student "
        f"(`{some['init']}`, {some['parameters']:,} parameters)",
        f"and the same frozen teacher (`{some['teacher']}`). Every run trained {some['steps']} steps of",
        f"{args.batch_size} examples; the weights are fp32 with the model config in the safetensors metadata",
        "(`tiny_models.model_io.load_model(path)` returns the model).",
        "",
        f"Command: `{cmd}`",
        "",
        "Greedy ROUGE-L (x100) on the held-out evaluation sets for this seed, and the held-out average over",
        "all training seeds (mean ± std; the full tables are in `../results.md`). The JSON card next to each",
        "file holds its whole configuration, per-set greedy and sampled scores and exact match.",
        "",
        *rows,
        "",
        "Intended use: teaching and small experiments (answers to the synthetic task families of",
        "`tiny_models/tasks.py`); these models know nothing else.",
        "",
    ]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(text))


def timing(args, methods) -> None:
    """Median seconds per training step of each method (N steps from the same student, validation off)."""
    import tempfile

    rows = ["| method | s/step (median) | s/step (mean) | steps |", "|---|---|---|---|"]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in methods:
            cfg = DistillConfig(
                method=m,
                out_dir=os.path.join(tmp, m),
                steps=args.timing,
                eval_every=0,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                threads=1,
                progress=False,
                teacher=args.teacher,
                student=args.student,
                n_per_family=args.n_per_family,
                ckpt_every=10**9,
            )
            cfg = dataclasses.replace(cfg, **args.override)
            train(cfg)
            t = [r["step_s"] for r in read_log(cfg.out_dir)]
            out[m] = (statistics.median(t), statistics.fmean(t))
            rows.append(f"| {m} | {out[m][0]:.3f} | {out[m][1]:.3f} | {len(t)} |")
            print(rows[-1], flush=True)
    cmd = "python -m tiny_models.distill_grid " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = "\n".join(
        [
            f"Command: `{cmd}`",
            "",
            f"batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, "
            f"one CPU thread (torch {torch.__version__})",
            "",
            *rows,
            "",
        ]
    )
    with open(os.path.join(args.results, "timing.md"), "w") as f:
        f.write(text)
    print(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=None, help="default: every baseline and MGSR")
    p.add_argument("--ablations", action="store_true", help="also run the MGSR ablations")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument(
        "--eval_examples", type=int, default=64, help="validation examples for checkpoint selection"
    )
    p.add_argument("--n_eval_per_family", type=int, default=30, help="evaluation-set size per task family")
    p.add_argument("--sample_seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--n_per_family", type=int, default=2000)
    p.add_argument("--teacher", default=os.path.join(ROOT, "tiny_models/checkpoints/teacher.safetensors"))
    p.add_argument("--student", default=os.path.join(ROOT, "tiny_models/checkpoints/student.safetensors"))
    p.add_argument("--runs", default=os.path.join(ROOT, "runs/distill_grid"))
    p.add_argument("--results", default=os.path.join(ROOT, "tiny_models/results/mgsr"))
    p.add_argument(
        "--set",
        dest="override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a DistillConfig field for every run (e.g. --set init_threshold=0.5)",
    )
    p.add_argument(
        "--quick", action="store_true", help="2 methods x 1 seed x 4 steps, 1 evaluation example per family"
    )
    p.add_argument("--no_progress", action="store_true")
    p.add_argument(
        "--summarise_only",
        action="store_true",
        help="write the tables from the finished runs only (train and evaluate nothing new)",
    )
    p.add_argument(
        "--export_students",
        nargs="+",
        default=None,
        metavar="METHOD",
        help="copy these methods' best checkpoints (first training seed) to <results>/students/ "
        "with model cards",
    )
    p.add_argument(
        "--timing",
        type=int,
        default=0,
        metavar="N",
        help="only time N training steps of every method (no validation) and write timing.md",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    over = {}
    for kv in args.override:
        k, v = kv.split("=", 1)
        if k not in fields:
            raise ValueError(f"--set {k}: not a DistillConfig field")
        over[k] = type(getattr(DistillConfig(), k))(v) if getattr(DistillConfig(), k) is not None else v
    args.override = over
    if args.quick:
        args.methods = args.methods or ["sft", "mgsr"]
        args.seeds, args.steps, args.eval_every = [1], 4, 2
        args.eval_examples, args.n_eval_per_family, args.sample_seeds, args.max_new_tokens = 4, 1, [0], 16
        args.n_per_family, args.ablations = 40, False
    methods = list(args.methods or BASELINES) + (list(ABLATIONS) if args.ablations else [])
    if args.timing:
        return timing(args, methods)
    ds = build_dataset(0, n_eval_per_family=args.n_eval_per_family)
    sets = {s: ds[s] for s in SETS}
    os.makedirs(args.results, exist_ok=True)
    t0 = time.perf_counter()
    results = {}
    for ref, path in (("teacher", args.teacher), ("student (init)", args.student)):
        # the cache is keyed by what the scores depend on, so a grid with other evaluation sizes rescoring
        key = f"n{args.n_eval_per_family}_tok{args.max_new_tokens}_s{'-'.join(map(str, args.sample_seeds))}"
        cache = os.path.join(args.runs, "_ref", f"{ref.split()[0]}_{key}.json")
        if not os.path.exists(cache):
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            with open(cache, "w") as f:
                json.dump(score_model(load_model(path)[0], sets, args), f)
        with open(cache) as f:
            results[ref] = [json.load(f)]
    for method in methods:
        results[method] = []
        for seed in args.seeds:
            if args.summarise_only:  # tables from the runs that finished, nothing trained
                path = os.path.join(args.runs, method, f"seed{seed}", "eval.json")
                if os.path.exists(path):
                    with open(path) as f:
                        results[method].append(json.load(f))
                continue
            print(f"[{time.perf_counter() - t0:7.0f}s] {method} seed {seed}", flush=True)
            results[method].append(run_one(args, method, seed, sets))
        if not results[method]:
            del results[method]
    summary = summarise(results, list(sets))
    argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--summarise_only"]
    if "--export_students" in argv:  # the command that trained the runs, not the export step
        i = argv.index("--export_students")
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        argv = argv[:i] + argv[j:]
    cmd = "python -m tiny_models.distill_grid " + " ".join(shlex.quote(a) for a in argv)
    ran = {m: [r["seed"] for r in rs] for m, rs in results.items() if m not in ("teacher", "student (init)")}
    with open(os.path.join(args.results, "results.json"), "w") as f:
        json.dump(
            {
                "command": cmd,
                "steps": args.steps,
                "seeds": args.seeds,
                "sample_seeds": args.sample_seeds,
                "batch_size": args.batch_size,
                "n_eval_per_family": args.n_eval_per_family,
                "overrides": args.override,
                "summary": summary,
                "finished_runs": ran,
                "sizes": {s: len(v) for s, v in sets.items()},
            },
            f,
            indent=1,
        )
    names = list(sets)
    md = [
        f"Command: `{cmd}`",
        "",
        f"{args.steps} steps x {args.batch_size} examples per run from the same student; training seeds "
        f"{args.seeds}; evaluation sets ({', '.join(f'{s}: {len(v)}' for s, v in sets.items())}); "
        "teacher and init student are evaluated once (no training seed).",
        "",
        "Finished runs (training seeds) in these tables: "
        + "; ".join(f"{m}: {', '.join(map(str, sd))}" for m, sd in ran.items())
        + ".",
        "",
        table(summary, names, "greedy", "rougeL", "ROUGE-L (x100), greedy"),
        "",
        table(
            summary,
            names,
            "sampled",
            "rougeL",
            f"ROUGE-L (x100), sampled T=1, sampling seeds {args.sample_seeds}",
        ),
        "",
        table(summary, names, "greedy", "exact_match", "Exact match (x100), greedy"),
        "",
    ]
    with open(os.path.join(args.results, "results.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(args.results, "command.txt"), "w") as f:
        f.write(cmd + "\n")
    plot(summary, os.path.join(args.results, "rouge.png"))
    plot_scrg(summary, os.path.join(args.results, "scrg_frequency.png"))
    if args.export_students:
        export_students(args, results, summary, args.export_students, cmd)
    print("\n".join(md))


if __name__ == "__main__":
    main()
