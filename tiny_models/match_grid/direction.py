"""The paper's direction (arXiv 2606.29844): retrieval switched on in a model trained with a sliding window.

    python -m tiny_models.match_grid.direction --tasks mqar mad_in_context mad_noisy mad_fuzzy \
        --seeds 0 1 2 --out runs/match_direction --results tiny_models/results/match/direction
    # long context (Zoology-like MQAR; hours per seed on a CPU, minutes on one GPU):
    python -m tiny_models.match_grid.direction --tasks mqar --seq_len 1024 --pairs 32 --vocab 1024 \
        --window 64 --top_k 8 --block_size 16 --seeds 0 1 2 --device cuda --results ...

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
``<out>/<setting>_s<seed>/<variant + window, top_k, block>.json`` (resumable: finished variants of the same
config are skipped; trained weights are saved for the variants that reuse them); ``--results`` gets
``results.md`` (mean ± std over seeds, and each variant's paired difference to SWA on the same held-out
examples with a bootstrap interval), ``runs.json`` (every variant's record: config, seed, curve, accuracy by
distance, per-example counts), ``direction.png`` and ``curves.png`` (the training curves). Records in an
existing ``runs.json`` stand in for runs of the same
task, seed and config, so seeds accumulate.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys

import numpy as np
import torch

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
        if getattr(a, "vocab", None):
            base["vocab_size"] = a.vocab
    return {
        "full": RunConfig(attention="full", **base),
        "swa": RunConfig(attention="sliding", window=a.window, **base),
        "match": RunConfig(attention="match", window=a.window, attn_kwargs=kw, **base),
    }


def score(model, cfg: RunConfig, window: int) -> dict:
    """Held-out accuracy overall, inside the window (key-query distance < w), beyond it, and by distance;
    per example (row of the held-out set), the labelled positions answered right (``ex_correct``) and their
    number (``ex_n``), for paired intervals."""
    x, y = heldout(cfg)
    ev = evaluate(model, x, y)
    c, d, row = ev["correct"], ev["dist"], ev["row"]
    inside, beyond = d < window, d >= window
    n_ex = int(row.max()) + 1 if len(row) else 0
    return {
        "acc": ev["acc"],
        "acc_inside": float(c[inside].float().mean()) if bool(inside.any()) else None,
        "acc_beyond": float(c[beyond].float().mean()) if bool(beyond.any()) else None,
        "frac_beyond": float(beyond.float().mean()),
        "by_distance": by_distance(c, d),
        "ex_correct": torch.bincount(row, weights=c.double(), minlength=n_ex).long().tolist(),
        "ex_n": torch.bincount(row, minlength=n_ex).tolist(),
    }


def paired(records: list[dict], variant: str, ref: str = "swa", n_boot: int = 2000, seed: int = 0):
    """``variant`` minus ``ref`` on the same held-out examples, per (task, seed) pair of records: ``mean``
    (over seeds of the per-seed mean of per-example accuracy differences), a 95 % percentile bootstrap
    interval (``lo``, ``hi``) that resamples examples within each seed (the spread over held-out examples,
    not over training runs) and ``sd``, the standard deviation over seeds of the per-seed mean (0 for
    one seed); ``None`` when no seed has both records."""
    by = {(r["seed"], r["variant"]): r for r in records}
    diffs = []
    for k in sorted({r["seed"] for r in records}):
        a, b = by.get((k, variant)), by.get((k, ref))
        if a is None or b is None or "ex_correct" not in a or "ex_correct" not in b:
            continue
        if a["ex_n"] != b["ex_n"]:
            raise ValueError(f"seed {k}: {variant} and {ref} were scored on different held-out sets")
        n = np.maximum(np.asarray(a["ex_n"], dtype=float), 1.0)
        diffs.append((np.asarray(a["ex_correct"]) - np.asarray(b["ex_correct"])) / n)
    if not diffs:
        return None
    rng = np.random.default_rng(seed)
    boot = np.mean([d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1) for d in diffs], axis=0)
    per_seed = [float(d.mean()) for d in diffs]
    return {
        "mean": float(np.mean(per_seed)),
        "lo": float(np.percentile(boot, 2.5)),
        "hi": float(np.percentile(boot, 97.5)),
        "sd": float(np.std(per_seed, ddof=1)) if len(diffs) > 1 else 0.0,
        "seeds": len(diffs),
    }


def run_task_seed(task: str, seed: int, a, prior: list[dict] = ()) -> dict:
    """Every variant of one (task, seed); resumable. Returns {variant: record}. ``prior``: records committed
    with the results (``runs.json``), which stand in for a variant of the same task, seed and config."""
    cfgs = configs(task, seed, a)
    d = os.path.join(a.out, setting(dataclasses.asdict(cfgs["full"])).replace(" ", "_") + f"_s{seed}")
    os.makedirs(d, exist_ok=True)
    out = {}

    def cfg_of(v):  # the config a variant's record carries
        if v in ("full", "swa"):
            return cfgs[v]
        if v == "swa_match_finetune":
            return dataclasses.replace(cfgs["match"], steps=max(1, round(a.ft_frac * a.steps)), warmup=0)
        return cfgs["match"]

    def stem(v):  # the file name of a variant: what it depends on beyond the directory's setting
        if v == "full":
            return v
        if v == "swa":
            return f"swa_w{a.window}"
        return f"{v}_w{a.window}_k{a.top_k}_b{a.block_size}"

    def done(v, committed=True):
        want = json.loads(json.dumps(dataclasses.asdict(cfg_of(v))))
        p = os.path.join(d, f"{stem(v)}.json")
        if os.path.exists(p) and (r := json.load(open(p)))["config"] == want:
            return r
        for r in prior if committed else ():  # a record committed with the results, for the same settings
            if (r["task"], r["seed"], r["variant"]) == (task, seed, v) and "ex_correct" in r:
                if r["config"] == want:
                    return r
        return None

    def record(v, cfg, model, trained=None, **extra):
        rec = {"variant": v, "task": task, "seed": seed, "config": dataclasses.asdict(cfg), **extra}
        rec["cost"] = attention_cost(
            cfg.seq_len, cfg.attention, cfg.window, cfg.attn_kwargs, head_dim=cfg.n_embd // cfg.n_head
        )
        rec.update(score(model, cfg, a.window))
        if trained is not None:
            rec.update(steps=trained["steps"], curve=trained["curve"], time_s=round(trained["time_s"], 1))
            save_run(copy.deepcopy(model).cpu(), cfg, os.path.join(d, f"{stem(v)}.safetensors"))
        with open(os.path.join(d, f"{stem(v)}.json.tmp"), "w") as f:
            json.dump(rec, f)
        os.replace(os.path.join(d, f"{stem(v)}.json.tmp"), os.path.join(d, f"{stem(v)}.json"))
        return rec

    def trained(v):  # the saved weights of a trained variant (train it first if needed)
        if done(v, committed=False) is None or not os.path.exists(os.path.join(d, f"{stem(v)}.safetensors")):
            run(v, committed=False)  # a committed record has no weights: train again (the same run)
        return load_run(os.path.join(d, f"{stem(v)}.safetensors"))[0].to(a.device)

    def run(v, committed=True):
        if (rec := done(v, committed)) is not None:
            out[v] = rec
            return
        match_cfg = cfgs["match"]
        if v in ("full", "swa"):
            t = train_run(cfgs[v], progress=not a.no_progress, device=a.device)
            out[v] = record(v, cfgs[v], t["model"], t)
        elif v == "match_scratch":
            t = train_run(match_cfg, progress=not a.no_progress, device=a.device)
            out[v] = record(v, match_cfg, t["model"], t)
        elif v in ("swa_match_inference", "full_match_probe"):
            src = trained("swa" if v == "swa_match_inference" else "full")
            m = swapped(src, attention="match", window=a.window, attn_kwargs=match_cfg.attn_kwargs).to(
                a.device
            )
            out[v] = record(v, match_cfg, m)
        else:  # swa_match_finetune
            ft = cfg_of(v)
            t = train_run(ft, progress=not a.no_progress, init=trained("swa").state_dict(), device=a.device)
            out[v] = record(v, ft, t["model"], t, init="swa")

    for v in VARIANTS:
        run(v)
    return out


def table(records: list[dict]) -> str:
    """Mean ± std over seeds per (task, variant): accuracy overall, inside the window, beyond it."""
    lines = [
        "| task | variant | seeds | accuracy | inside the window | beyond the window "
        "| − SWA, paired [95 % CI over examples] ± sd over seeds |",
        "|---|---|---|---|---|---|---|",
    ]

    def key(r):
        return setting(r["config"]) if "config" in r else r["task"]

    def pd(rs):
        v = rs[0]["variant"]
        if v in ("swa", "full"):
            return "–"
        w = rs[0].get("config", {}).get("window")
        ref = [
            r
            for r in records
            if key(r) == key(rs[0]) and r["variant"] == "swa" and r.get("config", {}).get("window") == w
        ]
        d = paired(rs + ref, v)
        if d is None:
            return "–"
        sd = f" ± {100 * d['sd']:.1f}" if d["seeds"] > 1 else ""
        return f"{100 * d['mean']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]{sd}"

    def ms(vals):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "–"
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{100 * statistics.fmean(vals):.1f} ± {100 * sd:.1f}"

    for group in dict.fromkeys(key(r) for r in records):
        for v in VARIANTS:
            for lab in dict.fromkeys(
                model_label(r) for r in records if key(r) == group and r["variant"] == v
            ):
                rs = [r for r in records if key(r) == group and r["variant"] == v and model_label(r) == lab]
                cells = [ms([r[k] for r in rs]) for k in ("acc", "acc_inside", "acc_beyond")] + [pd(rs)]
                lines.append(f"| {group} | {lab} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    """One panel per row group: accuracy beyond the window (bars: the mean over seeds, dots: each seed)
    per variant, the paired difference to SWA with its interval in the label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(  # one per setting and window (full attention, which has none, goes in each)
        dict.fromkeys(
            (setting(r["config"]), r["config"]["window"])
            for r in records
            if "config" in r and r["config"]["window"] is not None
        )
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (group, w) in zip(axes[0], panels, strict=True):
        rs = [
            r
            for r in records
            if "config" in r and setting(r["config"]) == group and r["config"]["window"] in (w, None)
        ]
        names, means = [], []
        for v in VARIANTS:
            vals = [r["acc_beyond"] for r in rs if r["variant"] == v and r["acc_beyond"] is not None]
            if not vals:
                continue
            d = paired(rs, v) if v not in ("swa", "full") else None
            ci = "" if d is None else f"\n{100 * d['mean']:+.0f} [{100 * d['lo']:+.0f}, {100 * d['hi']:+.0f}]"
            names.append(LABELS[v].replace(" (", "\n(") + ci)
            means.append(100 * statistics.fmean(vals))
            ax.scatter([len(names) - 1] * len(vals), [100 * x for x in vals], color="k", s=8, zorder=3)
        ax.bar(range(len(names)), means, color="tab:blue", alpha=0.6)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 105)
        ax.set_title(f"{group} w={w}", fontsize=9)
        ax.set_ylabel("accuracy beyond the window (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(records: list[dict], path: str) -> None:
    """Held-out accuracy against the training step of every trained variant (one line per seed, one panel
    per row group): a run stopped by the step budget while still rising shows as a line that ends high
    and steep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(setting(r["config"]) for r in records if "config" in r))
    colours = {"full": "k", "swa": "tab:red", "match_scratch": "tab:blue", "swa_match_finetune": "tab:green"}
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=True):
        for r in records:
            if "config" not in r or setting(r["config"]) != group or not r.get("curve"):
                continue
            st, acc = zip(*r["curve"], strict=True)
            first = r["variant"] not in {x.get_label() for x in ax.lines}
            ax.plot(
                st,
                [100 * a for a in acc],
                color=colours.get(r["variant"], "grey"),
                lw=1,
                label=r["variant"] if first else "_",
            )
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_label(r: dict) -> str:
    """A variant with its window and retrieval (full attention: the variant alone)."""
    cfg = r.get("config")
    if cfg is None or r["variant"] == "full":
        return LABELS[r["variant"]]
    kw = dict(tuple(p) for p in cfg["attn_kwargs"])
    extra = f", top_k {kw['top_k']}, B {kw['block_size']}" if kw else ""
    return f"{LABELS[r['variant']]} (w {cfg['window']}{extra})"


def best_lr_table(records: list[dict]) -> str | None:
    """Per setting (without the learning rate) and trained model (variant, window, retrieval), the learning
    rate with the highest mean accuracy over seeds, and every rate's mean (Zoology reports each model at its
    best rate). ``None`` when no setting was run at more than one rate."""
    groups: dict = {}
    for r in records:
        if "config" not in r or r["variant"] not in ("full", "swa", "match_scratch"):
            continue
        base = setting(r["config"]).rsplit(" lr=", 1)[0]
        groups.setdefault((base, model_label(r)), {}).setdefault(r["config"]["lr"], []).append(r["acc"])
    if not any(len(by_lr) > 1 for by_lr in groups.values()):
        return None
    lines = [
        "| setting | model | best lr | accuracy at the best lr | mean accuracy per lr |",
        "|---|---|---|---|---|",
    ]
    for (base, v), by_lr in groups.items():
        means = {lr: statistics.fmean(accs) for lr, accs in sorted(by_lr.items())}
        best = max(means, key=means.get)
        n = len(by_lr[best])
        per = ", ".join(f"{lr:g}: {100 * m:.1f}" for lr, m in means.items())
        lines.append(f"| {base} | {v} | {best:g} | {100 * means[best]:.1f} ({n} seeds) | {per} |")
    return "\n".join(lines)


def setting(cfg: dict) -> str:
    """The row group of a record: the task, its length, (MQAR) its pairs and vocabulary, and the learning
    rate (the fine-tune of (b) is grouped with its pre-training's). Inside a group,
    rows are labelled with the window and the retrieval, and a variant is paired with SWA of its window."""
    out = f"{cfg['task']} T={cfg['seq_len']}"
    if cfg["task"] == "mqar":
        out += f" P={cfg['num_kv_pairs']} V={cfg['vocab_size']}"
    return out + f" lr={cfg['lr']:g}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["mqar", "mad_in_context", "mad_noisy", "mad_fuzzy"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--pairs", type=int, default=8, help="MQAR key-value pairs")
    p.add_argument("--vocab", type=int, default=None, help="MQAR vocabulary (default: the task's, 64)")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--top_k", type=int, default=4)
    p.add_argument("--block_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ft_frac", type=float, default=0.1, help="fine-tune steps as a fraction of --steps")
    p.add_argument("--out", default="runs/match_direction")
    p.add_argument("--results", default=None)
    p.add_argument("--device", default="cpu", help="where the models train and are scored (cuda: Triton)")
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    use_match_chunk()
    prior = []
    if a.results and os.path.exists(os.path.join(a.results, "runs.json")):
        prior = json.load(open(os.path.join(a.results, "runs.json")))
    records = []
    for task in a.tasks:
        for seed in a.seeds:
            records += list(run_task_seed(task, seed, a, prior).values())
    here = {(r["task"], r["seed"], r["variant"], json.dumps(r["config"], sort_keys=True)) for r in records}
    records += [  # committed records of other settings or seeds stay in runs.json and the table
        r
        for r in prior
        if "ex_correct" in r
        and (r["task"], r["seed"], r["variant"], json.dumps(r["config"], sort_keys=True)) not in here
    ]
    text = table(records)
    if (sweep := best_lr_table(records)) is not None:
        text += "\n\nThe best learning rate of each trained model (mean accuracy over seeds):\n\n" + sweep
    print(text)
    if a.results:
        os.makedirs(a.results, exist_ok=True)
        words = [w for w in (sys.argv[1:] if argv is None else argv) if w != "--no_progress"]  # no effect
        cmd = "python -m tiny_models.match_grid.direction " + " ".join(words)
        path = os.path.join(a.results, "commands.txt")
        cmds = open(path).read().splitlines() if os.path.exists(path) else []
        if cmd not in cmds:
            with open(path, "a") as f:
                f.write(cmd + "\n")
            cmds.append(cmd)
        with open(os.path.join(a.results, "results.md"), "w") as f:
            listed = "\n".join(f"    {c}" for c in cmds)
            f.write(f"Commands (every run of these records, `commands.txt`):\n\n{listed}\n\n{text}\n")
        with open(os.path.join(a.results, "runs.json"), "w") as f:
            json.dump(records, f)
        plot(records, os.path.join(a.results, "direction.png"))
        plot_curves(records, os.path.join(a.results, "curves.png"))


if __name__ == "__main__":
    main()
