"""Distillation where a teacher has something to teach: a small labelled set L and a large pool U of prompts.

    python -m tiny_models.mgsr_lu --seeds 0 --steps 400 --methods sft kd imitkd distillm mgsr sft-full

The student sees ground-truth responses only for ``labelled`` examples per training family (L, about 20); the
other training prompts form an unlabelled pool U (their responses are never read). Terms that need a
ground-truth response (SFT, KD, RKL, DistiLLM's ground-truth branch, MGSR's L_SFT) read L; terms that need
only a prompt (student or teacher samples, SCRG, the replay buffer) draw from U (the ``prompts`` of
``fast.training.distill.train``). Every method starts from one student trained from scratch on L alone
(SFT(L), cached per seed); ``sft`` continues it on L (the floor), ``sft-full`` continues it on the full ground
truth (the ceiling). The split and both index streams are fixed by the seed and shared by every method, so
runs are paired.

Each run leaves ``<runs>/<method>/seed<k>/eval.json`` (skipped when present): greedy ROUGE-L per prompt of the
``test`` and ``longer`` sets, the run's per-step log (step, loss, source, threshold) and its batch-source
shares. ``--results`` gets ``results.json`` and a table of paired differences to SFT(L) with a per-prompt
bootstrap interval. This is the experiment's first stage (is there a signal at all?); the full grid adds
seeds, methods and sampled decoding.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics

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
from tiny_models.tasks import IGNORE, TRAIN_FAMILIES, build_dataset, decode, example_ids

CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
STUDENT = GPTConfig(n_layer=2, n_head=2, n_embd=96, block_size=160)  # the shipped student's shape


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
        device="cpu",
        resume=True,
    )
    model = GPT(STUDENT)
    sft.train(
        cfg, model, _Examples(L, valid, 160), save_model=saver, world_rank_device=(1, 0, torch.device("cpu"))
    )
    open(os.path.join(out, "done"), "w").close()
    return path


def run(a, method, seed, split, sets) -> dict:
    out = os.path.join(a.runs, method, f"seed{seed}")
    done = os.path.join(out, "eval.json")
    if os.path.exists(done):
        return json.load(open(done))
    L, U, valid = split
    teacher, _ = load_model(os.path.join(CKPT, "teacher.safetensors"))
    student, _ = load_model(base_student(a, seed, L, valid))
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
        device="cpu",
        resume=True,
    )
    res = fd.train(
        cfg, teacher, student, train_set, as_pairs(valid), decode=decode, save_model=saver, prompts=prompts
    )
    model = res["model"].eval()
    rec = {"method": method, "seed": seed, "steps": a.steps}
    for s, exs in sets.items():
        outs = generate_responses(model, exs, max_new_tokens=48)
        rec[s] = [100 * rouge_l(o, e.response)[2] for o, e in zip(outs, exs, strict=True)]
    log = read_log(out)
    rec["log"] = [
        {k: r.get(k) for k in ("step", "loss", "source", "threshold", "scrg_revised", "val_rougeL")}
        for r in log
    ]
    n = len(log)
    rec["sources"] = {k: v / n for k, v in collections.Counter(r["source"] for r in log).items()}
    with open(done, "w") as f:
        json.dump(rec, f)
    return rec


def table(results, sets, floor="sft") -> str:
    seeds = sorted({r["seed"] for r in results.values()})
    methods = list(dict.fromkeys(m for m, _ in results))
    lines = [
        "| method | "
        + " | ".join(f"{s} ROUGE-L" for s in sets)
        + " | "
        + " | ".join(f"{s} - SFT(L) [95 % CI]" for s in sets)
        + " | batch sources |",
        "|---|" + "---|" * (2 * len(sets) + 1),
    ]
    rng = np.random.default_rng(0)
    for m in methods:
        cells, diffs = [], []
        for s in sets:
            cells.append(f"{statistics.fmean(statistics.fmean(results[(m, k)][s]) for k in seeds):.1f}")
            d = np.concatenate(
                [np.array(results[(m, k)][s]) - np.array(results[(floor, k)][s]) for k in seeds]
            )
            boot = d[rng.integers(0, len(d), (2000, len(d)))].mean(1)
            diffs.append(
                f"{d.mean():+.1f} [{np.percentile(boot, 2.5):+.1f}, {np.percentile(boot, 97.5):+.1f}]"
            )
        src = collections.Counter()
        for k in seeds:
            src.update(results[(m, k)]["sources"])
        shares = ", ".join(f"{k} {v / len(seeds):.2f}" for k, v in sorted(src.items()))
        lines.append(f"| {m} | " + " | ".join(cells) + " | " + " | ".join(diffs) + f" | {shares} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["sft", "kd", "imitkd", "distillm", "mgsr", "sft-full"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--labelled", type=int, default=20, help="labelled examples per training family")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--base_steps", type=int, default=600)
    p.add_argument("--eval_every", type=int, default=100)
    p.add_argument("--init_threshold", type=float, default=0.2)
    p.add_argument("--loss_eps", type=float, default=0.1)
    p.add_argument("--n_eval_per_family", type=int, default=30)
    p.add_argument("--runs", default="runs/mgsr_lu")
    p.add_argument("--results", default=None)
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    setup_process("cpu", 1)
    ds = build_dataset(0, n_eval_per_family=a.n_eval_per_family)
    sets = {s: ds[s] for s in ("test", "longer")}
    results = {}
    for seed in a.seeds:
        L, U = labelled_split(ds["train"], a.labelled, seed)
        assert {e.family for e in L} == set(TRAIN_FAMILIES)
        for m in a.methods:
            results[(m, seed)] = run(a, m, seed, (L, U, ds["valid"]), sets)
    text = table(results, list(sets))
    print(text)
    if a.results:
        os.makedirs(a.results, exist_ok=True)
        with open(os.path.join(a.results, "results.json"), "w") as f:
            json.dump({f"{m}/seed{s}": r for (m, s), r in results.items()}, f)
        with open(os.path.join(a.results, "pilot.md"), "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
