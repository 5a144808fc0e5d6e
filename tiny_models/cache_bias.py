"""What a sparse offline teacher costs: KD from the full teacher against KD from a top-k cache and from a
random-sampling cache with the same number of stored entries per token (``fast.teacher_cache``).

    python -m tiny_models.cache_bias --seeds 0 1 2 --steps 300 --k 8 --out tiny_models/results/teacher_cache

Every run starts from the shipped student and sees the same batches for a given seed (the trainer draws a
step's examples from ``(seed, step)``), so the three variants are paired by seed. Scored on the held-out
``test`` set: the student's forward KL to the teacher's *full* distribution on the ground-truth tokens, its
expected calibration error (top-1 confidence against accuracy, 15 equal-width bins) on the same tokens, and
greedy ROUGE-L. The training pool is the instruction tasks with ``n_per_family`` examples per family (the
caches cover it). Per-run logs, ``results.json`` and ``README.md`` land in ``--out``; finished runs are
skipped (``<runs>/<variant>/seed<k>/eval.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import numpy as np
import torch

from fast.teacher_cache import write_cache
from fast.training.data import IGNORE
from fast.training.loop import read_log
from tiny_models.distill import DistillConfig, train
from tiny_models.evaluate import generate_responses
from tiny_models.gpt import PAD
from tiny_models.model_io import load_model
from tiny_models.tasks import build_dataset, collate, example_ids

VARIANTS = ("full", "topk", "sampled")
CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")


@torch.no_grad()
def token_metrics(student, teacher, examples, *, bins: int = 15, batch: int = 64) -> dict:
    """Mean forward KL(teacher || student) and the student's ECE over the ground-truth response tokens."""
    kl_sum, n, conf, hit = 0.0, 0, [], []
    for i in range(0, len(examples), batch):
        x, y = collate([example_ids(e.prompt, e.response) for e in examples[i : i + batch]], block_size=160)
        m = y != IGNORE
        lq = student(x).double().log_softmax(-1)[m]
        lp = teacher(x).double().log_softmax(-1)[m]
        kl_sum += float((lp.exp() * (lp - lq)).sum())
        n += int(m.sum())
        c, pred = lq.exp().max(-1)
        conf.append(c)
        hit.append((pred == y[m]).double())
    conf, hit = torch.cat(conf).numpy(), torch.cat(hit).numpy()
    which = np.minimum((conf * bins).astype(int), bins - 1)
    ece = sum(
        abs(conf[which == b].mean() - hit[which == b].mean()) * (which == b).mean()
        for b in range(bins)
        if (which == b).any()
    )
    return {"kl": kl_sum / n, "ece": float(ece), "accuracy": float(hit.mean()), "tokens": n}


def rouge_per_prompt(model, examples) -> list[float]:
    from reference.rouge import rouge_l

    outs = generate_responses(model, examples, max_new_tokens=48)
    return [100 * rouge_l(o, e.response)[2] for o, e in zip(outs, examples, strict=True)]


def run(a, variant: str, seed: int, caches: dict, test) -> dict:
    out_dir = os.path.join(a.runs, variant, f"seed{seed}")
    done = os.path.join(out_dir, "eval.json")
    if os.path.exists(done):
        return json.load(open(done))
    cfg = DistillConfig(
        method="kd",
        out_dir=out_dir,
        seed=seed,
        steps=a.steps,
        batch_size=a.batch_size,
        eval_every=0,
        ckpt_every=a.steps,
        n_per_family=a.n_per_family,
        threads=1,
        device="cpu",
        progress=not a.no_progress,
        resume=True,
        teacher_cache=caches.get(variant),
        fused=variant == "full",
    )
    out = train(cfg)
    teacher, _ = load_model(os.path.join(CKPT, "teacher.safetensors"))
    res = {
        "variant": variant,
        "seed": seed,
        "steps": a.steps,
        "k": a.k,
        **token_metrics(out["model"].eval(), teacher, test),
        "rouge": rouge_per_prompt(out["model"].eval(), test),
        "log": [{k: r[k] for k in ("step", "loss", "step_s")} for r in read_log(out_dir)],
    }
    res["rougeL"] = statistics.fmean(res["rouge"])
    with open(done, "w") as f:
        json.dump(res, f)
    return res


def paired(results, metric, variant):
    """Per-seed differences ``variant - full`` of ``metric``: (mean, sd over seeds, the per-seed values)."""
    diffs = [
        results[(variant, s)][metric] - results[("full", s)][metric] for s in sorted({s for _, s in results})
    ]
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0), diffs


def bootstrap_rouge(results, variant, reps=2000, seed=0):
    """95 % interval of the mean per-prompt ROUGE-L difference (variant - full), prompts pooled over seeds
    and resampled (paired by prompt and seed)."""
    d = np.concatenate(
        [
            np.array(results[(variant, s)]["rouge"]) - np.array(results[("full", s)]["rouge"])
            for s in sorted({s for _, s in results})
        ]
    )
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (reps, len(d)))].mean(1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def report(results, a, summaries) -> str:
    seeds = sorted({s for _, s in results})
    lines = [
        "# What a sparse offline teacher costs (tiny models)",
        "",
        f"KD of the shipped student from the shipped teacher, {a.steps} steps x {a.batch_size}, seeds "
        f"{seeds}, training pool {a.n_per_family} examples per family; the two caches store k = {a.k} "
        "entries per token (`fast/teacher_cache.py`). Scored on the held-out `test` set.",
        "",
        f"Command: `python -m tiny_models.cache_bias --seeds {' '.join(map(str, seeds))} --steps {a.steps} "
        f"--k {a.k} --n_per_family {a.n_per_family}`",
        "",
        "| variant | forward KL to the full teacher (nats/token) | ECE | token accuracy | greedy ROUGE-L |",
        "|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        rows = [results[(v, s)] for s in seeds]
        cells = []
        for m in ("kl", "ece", "accuracy", "rougeL"):
            vals = [r[m] for r in rows]
            cells.append(
                f"{statistics.fmean(vals):.4f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.4f}"
            )
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired differences against the full teacher (mean ± sd over seeds; ROUGE-L: per-prompt "
        "bootstrap 95 % interval, prompts pooled over seeds):",
        "",
        "| variant | Δ KL | Δ ECE | Δ ROUGE-L [95 % CI] |",
        "|---|---|---|---|",
    ]
    for v in VARIANTS[1:]:
        kl, ece = paired(results, "kl", v), paired(results, "ece", v)
        m, lo, hi = bootstrap_rouge(results, v)
        lines.append(
            f"| {v} | {kl[0]:+.4f} ± {kl[1]:.4f} | {ece[0]:+.4f} ± {ece[1]:.4f} | "
            f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}] |"
        )
    lines += [
        "",
        "Storage per labelled token: top-k 8k + 4 bytes, sampled 8k bytes; "
        + "; ".join(
            f"{v}: {s['bytes'] / 2**20:.1f} MiB for {s['rows']} tokens" for v, s in summaries.items()
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--n_per_family", type=int, default=500)
    p.add_argument("--runs", default="runs/cache_bias")
    p.add_argument("--out", default="tiny_models/results/teacher_cache")
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    ds = build_dataset(0, n_per_family=a.n_per_family)
    seqs = [example_ids(e.prompt, e.response) for e in ds["train"]]
    teacher, _ = load_model(os.path.join(CKPT, "teacher.safetensors"))
    caches, summaries = {}, {}
    for kind in ("topk", "sampled"):
        prefix = os.path.join(a.runs, "cache", kind)
        if not os.path.exists(prefix + "-00000.safetensors"):
            summaries[kind] = write_cache(
                prefix, teacher, seqs, kind=kind, k=a.k, pad_id=PAD, block_size=160, batch_size=64
            )
            json.dump(summaries[kind], open(prefix + ".json", "w"))
        summaries[kind] = json.load(open(prefix + ".json"))
        caches[kind] = prefix
    test = ds["test"]
    results = {(v, s): run(a, v, s, caches, test) for s in a.seeds for v in VARIANTS}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({f"{v}/seed{s}": r for (v, s), r in results.items()}, f)
    text = report(results, a, summaries)
    with open(os.path.join(a.out, "README.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
