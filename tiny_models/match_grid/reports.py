"""Summaries of finished runs: accuracy by key-query distance, tables over seeds, plots."""

from __future__ import annotations

import json
import os

import torch

DIST_BINS = (0, 8, 16, 32, 64, 128, 256, 512, 1 << 30)


def by_distance(correct: torch.Tensor, dist: torch.Tensor, bins=DIST_BINS) -> list[dict]:
    """Accuracy per key-query distance bin ``[lo, hi)``."""
    out = []
    for lo, hi in zip(bins[:-1], bins[1:], strict=True):
        m = (dist >= lo) & (dist < hi)
        if bool(m.any()):
            out.append({"lo": lo, "hi": hi, "n": int(m.sum()), "acc": float(correct[m].float().mean())})
    return out


def _label(cfg: dict) -> str:
    if cfg["attention"] == "full":
        return "full"
    if cfg["attention"] == "sliding":
        return f"SWA w={cfg['window']}"
    kw = dict(tuple(p) for p in cfg["attn_kwargs"])
    kind = "token" if kw.get("block_size", 1) == 1 else f"block B={kw['block_size']}"
    return f"SWA w={cfg['window']} + MATCH {kind} {kw.get('mode', 'joint')} top_k={kw['top_k']}"


def summarise(results: list[dict]) -> list[dict]:
    """Mean ± std of accuracy per (model, num_kv_pairs) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["config"]["task"], _label(r["config"]), r["config"]["num_kv_pairs"], r["config"]["seq_len"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (task, label, p, T), rs in groups.items():
        a = torch.tensor([r["acc"] for r in rs], dtype=torch.float64)
        rows.append(
            {
                "config": rs[0]["config"],
                "task": task,
                "model": label,
                "pairs": p,
                "seq_len": T,
                "n_seeds": len(rs),
                "acc_mean": float(a.mean()),
                "acc_std": float(a.std()) if len(rs) > 1 else 0.0,
                "attended": rs[0]["attended"],
                "cost": _cost(rs[0]["config"]),
                "steps_mean": sum(r["steps"] for r in rs) / len(rs),
                "time_s_mean": sum(r["time_s"] for r in rs) / len(rs),
                "by_distance": _merge_dist([r["by_distance"] for r in rs]),
            }
        )
    rows.sort(key=lambda r: (r["task"], r["pairs"], _order(r["config"])))
    for r in rows:
        r.pop("config")
    return rows


def _cost(cfg: dict) -> dict:
    """``attention_cost`` of a run's attention, per head and layer over one sequence."""
    from tiny_models.match_grid.plugin import attention_cost

    kw = tuple(tuple(p) for p in cfg["attn_kwargs"])
    hd = cfg["n_embd"] // cfg["n_head"]
    return attention_cost(cfg["seq_len"], cfg["attention"], cfg["window"], kw, head_dim=hd)


def _order(cfg: dict) -> tuple:
    """Table order: full, SWA by window, then MATCH token / block, joint / gated, by top_k."""
    kw = dict(tuple(p) for p in cfg["attn_kwargs"])
    rank = {"full": 0, "sliding": 1, "match": 2}[cfg["attention"]]
    return (rank, cfg["window"] or 0, kw.get("block_size", 1), kw.get("mode", ""), kw.get("top_k", 0))


def _merge_dist(lists) -> list[dict]:
    acc: dict[tuple, list[float]] = {}
    n: dict[tuple, int] = {}
    for lst in lists:
        for b in lst:
            acc.setdefault((b["lo"], b["hi"]), []).append(b["acc"])
            n[(b["lo"], b["hi"])] = b["n"]
    return [{"lo": k[0], "hi": k[1], "n": n[k], "acc": sum(v) / len(v)} for k, v in sorted(acc.items())]


def markdown_table(rows: list[dict]) -> str:
    """One row per model; the cost columns are per head and layer over one sequence (``attention_cost``):
    attention and selection MFLOP (forward) and MATCH's extra memory in KB."""
    lines = [
        "| task | model | T | pairs | seeds | accuracy % (mean ± std) | attended fraction "
        "| attention MFLOP | selection MFLOP | extra KB | steps (mean) | time/run (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["cost"]
        pairs = r["pairs"] if r["task"] == "mqar" else "–"
        acc = f"{100 * r['acc_mean']:.1f}" + (f" ± {100 * r['acc_std']:.1f}" if r["n_seeds"] > 1 else "")
        lines.append(
            f"| {r['task']} | {r['model']} | {r['seq_len']} | {pairs} | {r['n_seeds']} | "
            f"{acc} | "
            f"{r['attended']:.3f} | "
            f"{c['attn_flops'] / 1e6:.2f} | {c['select_flops'] / 1e6:.2f} | {c['extra_bytes'] / 1024:.1f} | "
            f"{r['steps_mean']:.0f} | {r['time_s_mean']:.0f} |"
        )
    return "\n".join(lines)


def write_results(results: list[dict], dest: str) -> None:
    """``grid.md`` and ``grid.json`` (the table: mean ± std over seeds per model), ``grid.png``, and
    ``grid_runs.json``: every run's own record (name, config with its seed, accuracy, steps, time, attended
    fraction, validation curve, accuracy by key-query distance), so each table row can be traced to its
    runs."""
    os.makedirs(dest, exist_ok=True)
    keep = ("name", "config", "acc", "steps", "time_s", "num_params", "attended", "curve", "by_distance")
    with open(os.path.join(dest, "grid_runs.json"), "w") as f:
        json.dump([{k: r[k] for k in keep if k in r} for r in sorted(results, key=lambda r: r["name"])], f)
    rows = summarise(results)
    with open(os.path.join(dest, "grid.md"), "w") as f:
        f.write(markdown_table(rows) + "\n")
    with open(os.path.join(dest, "grid.json"), "w") as f:
        json.dump(rows, f, indent=1)
    plot_grid(rows, os.path.join(dest, "grid.png"))
    print(markdown_table(rows))


def plot_grid(rows: list[dict], path: str) -> None:
    """Left: accuracy (mean ± std over seeds) per model, against the number of pairs when several were run.
    Right: accuracy against key-query distance (mean over seeds), one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    pairs = sorted({r["pairs"] for r in rows})
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.3]})
    colors = plt.cm.tab20.colors
    for i, m in enumerate(models):
        rs = sorted((r for r in rows if r["model"] == m), key=lambda r: r["pairs"])
        c = colors[i % len(colors)]
        style = "--" if m.startswith("SWA") and "MATCH" not in m else "-"
        if len(pairs) > 1:
            ax0.errorbar(
                [r["pairs"] for r in rs],
                [100 * r["acc_mean"] for r in rs],
                yerr=[100 * r["acc_std"] for r in rs],
                marker="o",
                ls=style,
                color=c,
                label=m,
                capsize=3,
            )
        else:
            ax0.barh(i, 100 * rs[0]["acc_mean"], xerr=100 * rs[0]["acc_std"], color=c, capsize=3)
        for r in rs[-1:]:
            bd = r["by_distance"]
            xs = [b["lo"] + 0.5 * (min(b["hi"], r["seq_len"]) - b["lo"]) for b in bd]
            ax1.plot(xs, [100 * b["acc"] for b in bd], marker="o", ls=style, color=c, label=m)
    if len(pairs) > 1:
        ax0.set_xlabel("key-value pairs")
        ax0.set_ylabel("accuracy (%)")
        ax0.set_xscale("log", base=2)
    else:
        ax0.set_yticks(range(len(models)), models, fontsize=7)
        ax0.invert_yaxis()
        ax0.set_xlabel(f"accuracy (%), mean ± std over seeds (T={rows[0]['seq_len']}, {pairs[0]} pairs)")
        ax0.set_xlim(0, 100)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("key-query distance (tokens, bin centre)")
    ax1.set_ylabel("accuracy (%)")
    ax1.set_ylim(-3, 103)
    ax1.legend(fontsize=6, loc="lower left")
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
