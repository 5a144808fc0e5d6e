"""Distillation where a teacher has something to teach: a small labelled set L and a large pool U of prompts.

    python -m tiny_models.mgsr_lu --seeds 0 1 2 3 4 --steps 1500 --methods sft kd distillm mgsr sft-full \
        --runs runs/mgsr_lu --results tiny_models/results/mgsr_lu
    python -m tiny_models.mgsr_lu --preset gpu --seeds 0 1 2 3 4 --runs runs/mgsr_lu_gpu --results ...  # CUDA

The student sees ground-truth responses only for ``labelled`` examples per training family (L, about 20); the
other training prompts form an unlabelled pool U (their responses are never read). Terms that need a
ground-truth response (SFT, KD, RKL, DistiLLM's ground-truth branch, MGSR's L_SFT) read L; terms that need
only a prompt (student or teacher samples, SCRG, the replay buffer) draw from U (the ``prompts`` of
``fast.training.distill.train``). Every method starts from one student trained from scratch on L alone
(SFT(L), cached per seed); ``sft`` continues it on L (the floor), ``sft-full`` continues it on the full ground
truth (the ceiling). The split and both index streams are fixed by the seed and shared by every method, so
runs are paired.

Each run is trained in ``<runs>/<method>/seed<k>/`` (resumable: a killed run continues from its last
checkpoint; a finished one is skipped) and its last checkpoint is scored (``eval.json``): ROUGE-L per
prompt, greedy and sampled (T = 1, the mean of ``--samples`` decodings with seeds shared by every method),
on the headline sets -- ``test``, ``longer`` and ``fresh`` (test prompts of another draw of the task
generator, none of them seen in any split of this one) -- and on the near-floor sets ``unseen_templates``
and ``unseen_families``, reported apart. ``--results`` gets ``results.md`` (the paired differences to SFT(L)
and to KD with a bootstrap interval over prompts and the spread over seeds, the batch-source shares, the
threshold and the SCRG revisions), ``curves.png``, ``deltas.png`` and one compact JSON per run in ``runs/``
(its scores and its log every ``LOG_EVERY`` steps plus every validation step). ``--report NAME`` writes
``NAME.md``, ``NAME_summary.json``, ``NAME_curves.png`` and ``NAME_deltas.png`` instead, e.g. the
ablations beside the main tables (the per-run files are shared).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys

import numpy as np
import torch

from fast.training import distill as fd
from fast.training import sft
from fast.training.loop import read_log, setup_process
from fast.training.sft import SFTConfig
from reference.rouge import rouge_l
from tiny_models.distill import as_pairs
from tiny_models.evaluate import generate_responses
from tiny_models.gpt import GPT, PAD, GPTConfig
from tiny_models.model_io import load_model, saver
from tiny_models.stats import paired_difference
from tiny_models.tasks import IGNORE, TRAIN_FAMILIES, build_dataset, decode, example_ids

CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
STUDENT = GPTConfig(n_layer=2, n_head=2, n_embd=96, block_size=160)  # the shipped student's shape
# ``--preset``: "cpu" distils the shipped teacher (4 x 192, 1.8 M parameters) into the shipped student's shape
# (2 x 96) on one core; "gpu" trains a larger teacher first (8 x 512, about 25 M parameters, 6,000 steps of
# 64 on the full ground truth, into <runs>/teacher) and distils it into a 4 x 256 student, on one CUDA device.
# The grid (split, methods, steps, evaluation) is the same.
PRESETS = {
    "cpu": dict(teacher=None, student=STUDENT, device="cpu", threads=1),
    "gpu": dict(
        teacher=dict(n_layer=8, n_head=8, n_embd=512, steps=6000, batch_size=64, lr=1e-3, min_lr=1e-4),
        student=GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=160),
        device="cuda",
        threads=None,
    ),
}


def teacher_path(a) -> str:
    """The preset's teacher: the shipped one, or (gpu) one trained once into ``<runs>/teacher``."""
    spec = PRESETS[a.preset]["teacher"]
    if spec is None:
        return os.path.join(CKPT, "teacher.safetensors")
    from tiny_models.train import TrainConfig, train

    out = os.path.join(a.runs, "teacher")
    path = os.path.join(out, "model.safetensors")
    if not os.path.exists(os.path.join(out, "done")):
        kw = {**spec, "steps": a.teacher_steps or spec["steps"]}
        cfg = TrainConfig(
            out_dir=out,
            block_size=160,
            warmup=100,
            weight_decay=0.1,
            beta2=0.95,
            eval_every=max(kw["steps"] // 10, 1),
            ckpt_every=max(kw["steps"] // 10, 1),
            device=a.device,
            progress=not a.no_progress,
            resume=True,
            **kw,
        )
        train(cfg)
        open(os.path.join(out, "done"), "w").close()
    return path


def labelled_split(examples, per_family: int, seed: int):
    """(L, U): ``per_family`` examples of each training family (a seeded shuffle within the family) and
    the rest."""
    rng = np.random.default_rng([seed, 17])
    by_family = collections.defaultdict(list)
    for i, e in enumerate(examples):
        by_family[e.family].append(i)
    take = set()
    for fam in sorted(by_family):
        idx = by_family[fam]
        take.update(idx[j] for j in rng.permutation(len(idx))[:per_family])
    return [e for i, e in enumerate(examples) if i in take], [
        e for i, e in enumerate(examples) if i not in take
    ]


class _Examples:  # SFT data over a fixed example list (fast.training.sft's data protocol)
    pad_id = PAD

    def __init__(self, examples, valid, block_size):
        self.train = [example_ids(e.prompt, e.response) for e in examples]
        self.valid = [example_ids(e.prompt, e.response) for e in valid]
        self.counts = np.array([sum(t != IGNORE for t in lab[:block_size]) for _, lab in self.train])

    def __len__(self):
        return len(self.train)

    def get(self, idx):
        return [self.train[i] for i in idx]


def base_student(a, seed, L, valid) -> str:
    """SFT(L) from scratch, cached: the shared start of every method of this seed."""
    out = os.path.join(a.runs, "base", f"seed{seed}")
    path = os.path.join(out, "model.safetensors")
    if os.path.exists(os.path.join(out, "done")):
        return path
    torch.manual_seed(seed)
    cfg = SFTConfig(
        out_dir=out,
        block_size=160,
        steps=a.base_steps,
        batch_size=16,
        lr=3e-3,
        min_lr=3e-4,
        warmup=20,
        seed=seed,
        eval_every=100,
        eval_examples=len(valid),
        ckpt_every=a.base_steps,
        progress=not a.no_progress,
        device=a.device,
        resume=True,
    )
    model = GPT(PRESETS[a.preset]["student"])
    sft.train(
        cfg,
        model,
        _Examples(L, valid, 160),
        save_model=saver,
        world_rank_device=(1, 0, torch.device(a.device)),
    )
    open(os.path.join(out, "done"), "w").close()
    return path


# how the baselines here differ from their papers' / DistiLLM's runs; every table names them so
LABELS = {
    "seqkd": "seqkd (CE on teacher samples drawn each step, not a fixed teacher-generated set)",
    "imitkd": "imitkd (fresh student samples each step, no replay buffer)",
    "gkd": "gkd (β 0.5, λ 0.5; fresh student samples, no replay buffer)",
    "minillm": "minillm (a REINFORCE variant: one update per rollout, no PPO clipping)",
    "sft": "sft = SFT(L) continued (the floor)",
    "sft-full": "sft-full (SFT on the full ground truth: the ceiling)",
}
HEADLINE = ("test", "longer", "fresh")
NEAR_FLOOR = ("unseen_templates", "unseen_families")
DECODINGS = ("greedy", "sampled")
LOG_EVERY = 10  # the compact per-run log keeps every 10th step and every validation step
_LOG_SKIP = {"lr", "tokens", "step_s", "time_s"}


def eval_sets(n_per_family: int) -> dict:
    """The scored sets: the headline ``test``, ``longer``, ``fresh`` and the near-floor ``unseen_templates``,
    ``unseen_families``. ``fresh``: the test split of the generator's draw 1 without the prompts of draw 0's
    evaluation sets (the hash split keeps every training prompt out of any draw's test split)."""
    ds = build_dataset(0, n_eval_per_family=n_per_family)
    seen = {e.prompt for k in ("valid", "test") for e in ds[k]}
    fresh = [e for e in build_dataset(1, n_eval_per_family=n_per_family)["test"] if e.prompt not in seen]
    sets = {"test": ds["test"], "longer": ds["longer"], "fresh": fresh}
    sets.update({k: ds[k] for k in NEAR_FLOOR})
    return sets


def score(model, sets: dict, samples: int) -> dict:
    """ROUGE-L F1 x 100 per prompt: ``{"greedy": {set: [...]}, "sampled": {set: [...]}}``; sampled is the mean
    over ``samples`` decodings at T = 1 with the seeds 1000, 1001, ... (the same for every model)."""
    out = {d: {} for d in DECODINGS}
    for name, exs in sets.items():
        refs = [e.response for e in exs]
        greedy = generate_responses(model, exs, max_new_tokens=48)
        out["greedy"][name] = [100 * rouge_l(o, r)[2] for o, r in zip(greedy, refs, strict=True)]
        acc = np.zeros(len(exs))
        for k in range(samples):
            outs = generate_responses(model, exs, temperature=1.0, seed=1000 + k, max_new_tokens=48)
            acc += [100 * rouge_l(o, r)[2] for o, r in zip(outs, refs, strict=True)]
        out["sampled"][name] = (acc / samples).tolist()
    return out


def compact_log(log: list[dict]) -> list[dict]:
    """Every ``LOG_EVERY``-th step, the last one and every validation step, without the timing fields;
    floats to 5 significant digits."""
    last = log[-1]["step"] if log else 0
    keep = [r for r in log if r["step"] % LOG_EVERY == 0 or r["step"] == last or "val_loss" in r]
    return [
        {k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in r.items() if k not in _LOG_SKIP}
        for r in keep
    ]


def adaptive_stats(log: list[dict]) -> dict:
    """Shares of the steps by batch source, the threshold at the end, SCRG revisions, mean kept mass."""
    n = max(len(log), 1)
    out = {"sources": {k: v / n for k, v in collections.Counter(r["source"] for r in log).items()}}
    out["threshold_end"] = log[-1]["threshold"] if log else None
    out["scrg_revised"] = int(sum(r.get("scrg_revised", 0) for r in log))
    kept = [r["kept"] for r in log if "kept" in r and r.get("source") != "gt"]
    out["kept_off_gt"] = statistics.fmean(kept) if kept else None
    return out


def stored(a, method, seed, sets) -> dict | None:
    """A scored run in ``<runs>`` or one committed with the results, when :func:`usable`; else None."""
    done = os.path.join(a.runs, method, f"seed{seed}", "eval.json")
    committed = os.path.join(a.results, "runs", method, f"seed{seed}.json") if a.results else None
    for path in (done, committed):
        if path and os.path.exists(path):
            rec = json.load(open(path))
            if usable(rec, a, sets):
                return rec
    return None


def run(a, method, seed, split, sets) -> dict:
    out = os.path.join(a.runs, method, f"seed{seed}")
    done = os.path.join(out, "eval.json")
    rec = stored(a, method, seed, sets)
    if rec is not None:
        return rec
    if os.path.exists(done):  # scored but not usable: a checkpoint of another setting is not re-scored
        old = json.load(open(done))
        if diff := {k: old.get(k, v) for k, v in SETTING.items() if old.get(k, v) != getattr(a, k, v)}:
            raise ValueError(f"{out} was trained with {diff}; give this setting its own --runs directory")
    if not os.path.exists(os.path.join(out, "model.safetensors")) or _unfinished(out, a.steps):
        _train(a, method, seed, split, out)
    model, _ = load_model(os.path.join(out, "model.safetensors"), device=a.device)
    model.eval()
    log = read_log(out)
    rec = {"method": method, "seed": seed, "steps": a.steps, "samples": a.samples}
    rec.update({k: getattr(a, k) for k in SETTING})
    rec["scores"] = score(model, sets, a.samples)
    rec["log"] = compact_log(log)
    rec.update(adaptive_stats(log))
    with open(done, "w") as f:
        json.dump(rec, f)
    return rec


# the options that change a run besides its method, seed, steps and samples, with the values of records
# written before they were stored
SETTING = {"labelled": 20, "init_threshold": 0.2, "loss_eps": 0.1, "base_steps": 600}


def usable(rec: dict, a, sets) -> bool:
    """A stored run stands for this one when it was scored on the same sets, steps and sampled decodings,
    with the same :data:`SETTING`."""
    return (
        "scores" in rec
        and set(rec["scores"]["greedy"]) == set(sets)
        and rec.get("samples") == a.samples
        and rec.get("steps") == a.steps
        and all(rec.get(k, v) == getattr(a, k, v) for k, v in SETTING.items())
    )


def _unfinished(out, steps) -> bool:
    log = read_log(out) if os.path.exists(os.path.join(out, "log.jsonl")) else []
    return not log or log[-1]["step"] < steps


def _train(a, method, seed, split, out) -> None:
    L, U, valid = split
    teacher, _ = load_model(teacher_path(a), device=a.device)
    student, _ = load_model(base_student(a, seed, L, valid), device=a.device)
    name = "sft" if method == "sft-full" else method
    train_set = as_pairs(L if method != "sft-full" else L + U)
    prompts = [(p, []) for p, _ in as_pairs(U)]  # responses hidden
    cfg = fd.DistillConfig(
        method=name,
        out_dir=out,
        seed=seed,
        steps=a.steps,
        batch_size=16,
        eval_every=a.eval_every,
        eval_examples=len(valid),
        ckpt_every=a.eval_every,
        max_new_tokens=48,
        init_threshold=a.init_threshold,
        loss_eps=a.loss_eps,
        progress=not a.no_progress,
        device=a.device,
        resume=True,
    )
    fd.train(
        cfg, teacher, student, train_set, as_pairs(valid), decode=decode, save_model=saver, prompts=prompts
    )


def paired(x: dict, y: dict, seeds, rng, n_boot: int = 2000) -> dict:
    """The paired difference x - y of per-prompt scores (``{seed: [per prompt]}``, the same prompts for every
    seed): ``mean`` (over prompts of the seed-averaged difference), a 95 % percentile bootstrap interval
    over prompts (``lo``, ``hi``) and ``sd``, the standard deviation over seeds of the per-seed mean
    difference (0 for one seed); ``tiny_models.stats.paired_difference``."""
    d = np.array([np.asarray(x[k]) - np.asarray(y[k]) for k in seeds])  # [seeds, prompts]
    out = paired_difference(d, rng, n_boot)
    del out["seeds"]
    return out


def summarise(results: dict, sets, floor="sft", ref="kd") -> dict:
    """``{decoding: {method: {set: {"mean", "vs_floor", "vs_ref"}}}}`` over the seeds every method shares
    with the floor (``vs_ref`` only when ``ref`` ran); a missing floor run raises KeyError."""
    methods = list(dict.fromkeys(m for m, _ in results))
    out = {}
    for dec in DECODINGS:
        out[dec] = {}
        for m in methods:
            seeds = sorted(k for mm, k in results if mm == m)
            sc = {k: results[(m, k)]["scores"][dec] for k in seeds}
            fl = {k: results[(floor, k)]["scores"][dec] for k in seeds}
            rf = (
                {k: results[(ref, k)]["scores"][dec] for k in seeds}
                if all((ref, k) in results for k in seeds)
                else None
            )
            row = {}
            for s in sets:
                rng = np.random.default_rng(0)
                row[s] = {
                    "mean": statistics.fmean(statistics.fmean(sc[k][s]) for k in seeds),
                    "vs_floor": paired(
                        {k: sc[k][s] for k in seeds}, {k: fl[k][s] for k in seeds}, seeds, rng
                    ),
                }
                if rf is not None:
                    row[s]["vs_ref"] = paired(
                        {k: sc[k][s] for k in seeds}, {k: rf[k][s] for k in seeds}, seeds, rng
                    )
            row["seeds"] = seeds
            out[dec][m] = row
    return out


def _d(p) -> str:
    return f"{p['mean']:+.1f} [{p['lo']:+.1f}, {p['hi']:+.1f}] ±{p['sd']:.1f}"


def table(summary: dict, dec: str, sets, ref: str = "kd") -> str:
    """One Markdown row per method: ROUGE-L, minus SFT(L) and minus ``ref`` (KD unless told; mean [95 % CI
    over prompts] ±sd over seeds) for every set."""
    name = "KD" if ref == "kd" else ref
    cols = [c for s in sets for c in (f"{s}", f"{s} − SFT(L)", f"{s} − {name}")]
    lines = ["| method | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for m, row in summary[dec].items():
        cells = []
        for s in sets:
            r = row[s]
            cells += [f"{r['mean']:.1f}", _d(r["vs_floor"]), _d(r["vs_ref"]) if "vs_ref" in r else "–"]
        lines.append(f"| {LABELS.get(m, m)} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machinery_table(results: dict) -> str:
    """Per method (mean over seeds): batch-source shares, the threshold at the end (methods that sample from
    the student), SCRG revisions per run and the mean kept teacher mass of DAC-KL on student sequences."""
    lines = [
        "| method | ground truth | fresh samples | replay | other | threshold at end | SCRG revisions / run "
        "| kept mass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in dict.fromkeys(mm for mm, _ in results):
        recs = [r for (mm, _), r in results.items() if mm == m]
        share = collections.Counter()
        for r in recs:
            share.update(r["sources"])
        n = len(recs)
        other = sum(v for k, v in share.items() if k not in ("gt", "fresh", "replay")) / n
        # the threshold moves with the validation loss in every run; only the adaptive loop reads it
        adaptive = share["fresh"] + share["replay"] > 0
        th = [r["threshold_end"] for r in recs if r.get("threshold_end") is not None and adaptive]
        kept = [r["kept_off_gt"] for r in recs if r.get("kept_off_gt") is not None]
        lines.append(
            f"| {m} | {share['gt'] / n:.2f} | {share['fresh'] / n:.2f} | {share['replay'] / n:.2f} "
            f"| {other:.2f} | "
            + (f"{statistics.fmean(th):.2f}" if th else "–")
            + f" | {statistics.fmean(r['scrg_revised'] for r in recs):.0f} | "
            + (f"{statistics.fmean(kept):.2e}" if kept else "–")
            + " |"
        )
    return "\n".join(lines)


def plots(results: dict, summary: dict, out_dir: str, prefix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary["greedy"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for m in methods:
        curves = collections.defaultdict(list)
        for (mm, _), r in results.items():
            if mm == m:
                for row in r["log"]:
                    if row.get("val_rougeL") is not None:
                        curves[row["step"]].append((row["val_rougeL"], row.get("val_loss")))
        steps = sorted(curves)
        axes[0].plot(steps, [statistics.fmean(v for v, _ in curves[t]) for t in steps], label=m)
        axes[1].plot(steps, [statistics.fmean(lv for _, lv in curves[t]) for t in steps], label=m)
    axes[0].set(xlabel="step", ylabel="validation greedy ROUGE-L", title="mean over seeds")
    axes[1].set(xlabel="step", ylabel="validation CE (ground truth)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{prefix}curves.png"), dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(DECODINGS), figsize=(10, 3.6), sharey=True)
    others = [m for m in methods if m != "sft"]
    for ax, dec in zip(axes, DECODINGS, strict=True):
        for j, s in enumerate(HEADLINE):
            ps = [summary[dec][m][s]["vs_floor"] for m in others]
            x = np.arange(len(others)) + (j - 1) * 0.27
            ax.bar(x, [p["mean"] for p in ps], width=0.27, label=s)
            ax.errorbar(
                x,
                [p["mean"] for p in ps],
                yerr=[[p["mean"] - p["lo"] for p in ps], [p["hi"] - p["mean"] for p in ps]],
                fmt="none",
                ecolor="k",
                capsize=2,
            )
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(range(len(others)), others, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{dec}: ROUGE-L − SFT(L), 95 % CI over prompts", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{prefix}deltas.png"), dpi=120)
    plt.close(fig)


def write_results(a, results: dict, sets: dict, cmd: str) -> str:
    os.makedirs(os.path.join(a.results, "runs"), exist_ok=True)
    headline = [s for s in HEADLINE if s in sets]
    near = [s for s in NEAR_FLOOR if s in sets]
    summary = summarise(results, list(sets), ref=a.ref)
    parts = [f"Command: `{cmd}`", "Prompts per set: " + ", ".join(f"{s} {len(v)}" for s, v in sets.items())]
    for dec in DECODINGS:
        parts += [f"### {dec} decoding, headline sets", table(summary, dec, headline, a.ref)]
        parts += [f"### {dec} decoding, near-floor sets", table(summary, dec, near, a.ref)]
    parts += ["### The adaptive machinery", machinery_table(results)]
    text = "\n\n".join(parts) + "\n"
    prefix = "" if a.report == "results" else f"{a.report}_"
    with open(os.path.join(a.results, f"{a.report}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.results, f"{prefix}summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for (m, k), r in results.items():
        os.makedirs(os.path.join(a.results, "runs", m), exist_ok=True)
        slim = dict(r)
        slim["scores"] = {
            d: {s: [round(v, 2) for v in vs] for s, vs in r["scores"][d].items()} for d in r["scores"]
        }
        with open(os.path.join(a.results, "runs", m, f"seed{k}.json"), "w") as f:
            json.dump(slim, f, separators=(",", ":"))
    plots(results, summary, a.results, prefix)
    return text


def export_students(a, results: dict, methods, seed: int, cmd: str) -> None:
    """Copy the scored (last) checkpoint of ``methods`` at training ``seed`` to
    ``<results>/students/<method>.safetensors`` with a JSON card whose scores are the run's ``eval.json``
    (the numbers of the tables), and write ``students/README.md``."""
    import shutil

    from fast.training.methods import METHODS

    out = os.path.join(a.results, "students")
    os.makedirs(out, exist_ok=True)
    rows = [
        "| file | method | trains on | loss | "
        + " | ".join(f"{s} (greedy / sampled)" for s in HEADLINE)
        + " |",
        "|---|---|---|---|" + "---|" * len(HEADLINE),
    ]
    for m in methods:
        if (m, seed) not in results:
            raise ValueError(f"--export {m}: no run with training seed {seed} among {sorted(results)}")
        r = results[(m, seed)]
        src = os.path.join(a.runs, m, f"seed{seed}", "model.safetensors")
        if not os.path.exists(src):
            raise ValueError(
                f"--export {m}: {src} is missing (the run's checkpoint is needed, not only its scores)"
            )
        dst = os.path.join(out, f"{m}.safetensors")
        shutil.copyfile(src, dst)
        model, _ = load_model(dst)
        recipe = METHODS["sft" if m == "sft-full" else m]
        means = {d: {s: round(statistics.fmean(v), 2) for s, v in r["scores"][d].items()} for d in DECODINGS}
        card = {
            "method": m,
            "label": LABELS.get(m, m),
            "sequences": recipe.sequences if m != "sft-full" else "the full ground truth (L and U)",
            "loss": recipe.loss,
            "training_seed": seed,
            "steps": r["steps"],
            "labelled_per_family": a.labelled,
            "parameters": sum(p.numel() for p in model.parameters()),
            "file_bytes": os.path.getsize(dst),
            "teacher": os.path.relpath(teacher_path(a), os.path.dirname(CKPT)),
            "rougeL_mean": means,
            "sampled_decodings": r["samples"],
            "command": cmd,
        }
        with open(os.path.join(out, f"{m}.json"), "w") as f:
            json.dump(card, f, indent=1)
        cells = [f"{means['greedy'][s]:.1f} / {means['sampled'][s]:.1f}" for s in HEADLINE]
        rows.append(
            f"| `{m}.safetensors` | {LABELS.get(m, m)} | {card['sequences']} | {recipe.loss} | "
            + " | ".join(cells)
            + " |"
        )
    text = [
        "# Students of the labelled / unlabelled experiment (model cards)",
        "",
        f"The last checkpoint of training seed {seed} of each method ({r['steps']} steps from SFT(L),",
        f"the student trained on {a.labelled} labelled examples per training family), fp32 with the model",
        "config in the safetensors metadata (`tiny_models.model_io.load_model(path)` returns the model).",
        "The scores are the mean ROUGE-L (x100) of the same evaluation as `../results.md`: greedy, and",
        f"sampled at T = 1 (the mean of {r['samples']} decodings with shared seeds); `fresh` holds prompts",
        "of another draw of the task generator. The JSON card next to each file has the rest.",
        "",
        f"Command: `{cmd}`",
        "",
        *rows,
        "",
        "Intended use: teaching and small experiments on the synthetic task families of",
        "`tiny_models/tasks.py`.",
        "",
    ]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(text))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["sft", "kd", "imitkd", "distillm", "mgsr", "sft-full"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--labelled", type=int, default=20, help="labelled examples per training family")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--base_steps", type=int, default=600)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--init_threshold", type=float, default=0.2)
    p.add_argument("--loss_eps", type=float, default=0.1)
    p.add_argument("--n_eval_per_family", type=int, default=100)
    p.add_argument("--samples", type=int, default=3, help="sampled decodings per prompt (T = 1)")
    p.add_argument("--runs", default="runs/mgsr_lu")
    p.add_argument("--results", default=None)
    p.add_argument(
        "--preset", choices=sorted(PRESETS), default="cpu", help="model sizes and device (PRESETS)"
    )
    p.add_argument("--device", default=None, help="override the preset's device")
    p.add_argument("--teacher_steps", type=int, default=None, help="override the gpu preset's teacher steps")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument(
        "--export", nargs="*", default=[], help="methods whose student is exported (with --results)"
    )
    p.add_argument("--export_seed", type=int, default=None, help="training seed of the exported students")
    p.add_argument("--report", default="results", help="the tables' name: <report>.md (module docstring)")
    p.add_argument("--ref", default="kd", help="the second paired comparison of the tables (besides SFT(L))")
    p.add_argument(
        "--only_done",
        action="store_true",
        help="train nothing: tabulate the (method, seed) runs already scored, name the others",
    )
    a = p.parse_args(argv)
    a.device = a.device or PRESETS[a.preset]["device"]
    setup_process(a.device, PRESETS[a.preset]["threads"] or 0)
    ds = build_dataset(0, n_eval_per_family=a.n_eval_per_family)
    sets = eval_sets(a.n_eval_per_family)
    results = {}
    for seed in a.seeds:
        L, U = labelled_split(ds["train"], a.labelled, seed)
        assert {e.family for e in L} == set(TRAIN_FAMILIES)
        for m in a.methods:
            if a.only_done:
                rec = stored(a, m, seed, sets)
                if rec is None:
                    print(f"--only_done: {m} seed {seed} not scored yet, left out", file=sys.stderr)
                else:
                    results[(m, seed)] = rec
                continue
            results[(m, seed)] = run(a, m, seed, (L, U, ds["valid"]), sets)
    if a.results:
        args = argv if argv is not None else sys.argv[1:]
        cut = args.index("--export") if "--export" in args else len(args)  # the command that trained them
        cmd = "python -m tiny_models.mgsr_lu " + " ".join(args[:cut])
        print(write_results(a, results, sets, cmd))
        if a.export:
            seed = a.seeds[0] if a.export_seed is None else a.export_seed
            export_students(a, results, a.export, seed, cmd)
    elif all(("sft", k) in results for _, k in results):
        print(table(summarise(results, list(HEADLINE)), "greedy", list(HEADLINE)))
    else:  # no floor run among these: the greedy means only
        for (m, k), r in results.items():
            means = {s: round(statistics.fmean(r["scores"]["greedy"][s]), 2) for s in HEADLINE}
            print(f"{m} seed {k}: greedy ROUGE-L {means}")


if __name__ == "__main__":
    main()
