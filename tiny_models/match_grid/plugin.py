"""Plug-in evaluation: one trained model with its attention swapped at inference (no retraining)."""

from __future__ import annotations

import dataclasses

import torch

from tiny_models.gpt import GPT
from tiny_models.match_grid.config import DEMO_SEED, RunConfig, make_batch
from tiny_models.match_grid.model import RecallGPT
from tiny_models.match_grid.reports import by_distance
from tiny_models.match_grid.run import evaluate
from tiny_models.recall import IGNORE


def attended_fraction(seq_len: int, attention: str, window: int | None, attn_kwargs=()) -> float:
    """Mean over queries of keys attended / keys full causal attention attends (``t + 1`` at position t).

    Window ``w`` (NSA convention: w keys including the query itself); MATCH adds ``top_k`` tokens, or
    ``top_k`` blocks of ``block_size`` tokens, from the out-of-window past (capped by how many exist). For
    blocks this is an upper bound: a selected block that straddles the window's edge delivers only its keys
    ``j <= t - w`` (fewer than ``block_size``), and which blocks are selected depends on the data.
    """
    seen = attention_cost(seq_len, attention, window, attn_kwargs)["attn_flops"]  # 4 flops per pair at D = 1
    return seen / (2 * seq_len * (seq_len + 1))  # full causal: seq_len (seq_len + 1) / 2 pairs


def attention_cost(
    seq_len: int, attention: str, window: int | None, attn_kwargs=(), head_dim: int = 1
) -> dict:
    """Per head and layer over one sequence of ``seq_len`` queries (multiply-adds counted as 2 FLOPs):

    * ``attn_flops``: ``4 D`` per attended (query, key) pair (``q.k`` and ``p v``), forward; for block
      retrieval an upper bound (every selected block counted whole, see ``attended_fraction``);
    * ``select_flops``: MATCH's scoring, ``2 D`` per (query, candidate): every out-of-window key for token
      retrieval (an O(T^2) ``q k^T``), every out-of-window block summary for block retrieval, plus the
      summaries themselves (``D`` per key);
    * ``extra_bytes``: what MATCH keeps per query beyond attention's: the selection (int64) and, in the
      Triton path, one fp32 log-sum-exp per slot (``12 top_k`` bytes).
    ``attended_fraction`` is these attended pairs over full causal attention's."""
    kw = dict(attn_kwargs)
    K, bs = kw.get("top_k", 0), kw.get("block_size", 1)
    pairs = select = 0
    for t in range(seq_len):
        full = t + 1
        if attention == "full" or window is None:
            seen = full
        else:
            seen = min(full, window)
            if attention == "match":
                seen += min(K * bs, full - seen)
                if t >= window:  # candidates: keys j <= t - w, or the blocks that start there
                    select += (t - window + 1) if bs == 1 else (t - window) // bs + 1
        pairs += seen
    D = head_dim
    match = attention == "match" and K > 0
    return {
        "attn_flops": 4 * D * pairs,
        "select_flops": (2 * D * select + (D * seq_len if bs > 1 else 0)) if match else 0,
        "extra_bytes": 12 * K * seq_len if match else 0,
    }


def swapped(model: RecallGPT, *, attention: str, window: int | None, attn_kwargs=()) -> RecallGPT:
    """A copy of ``model`` with the same weights and another attention (no retraining)."""
    cfg = dataclasses.replace(model.cfg, attention=attention, window=window, attn_kwargs=tuple(attn_kwargs))
    m = RecallGPT(cfg, prev_mix=model.prev is not None, prev_taps=max(model.prev_taps, 1))
    m.load_state_dict(model.state_dict())
    return m.eval()


def plugin_variants(
    window: int, top_ks=(1, 2, 4), block_size: int = 4
) -> list[tuple[str, str, int | None, tuple]]:
    """(label, attention, window, attn_kwargs) of the plug-in comparison."""
    out = [("full", "full", None, ()), (f"SWA w={window}", "sliding", window, ())]
    for k in top_ks:
        out.append(
            (
                f"SWA w={window} + {k * block_size} (window {window + k * block_size})",
                "sliding",
                window + k * block_size,
                (),
            )
        )
        for mode in ("joint",):
            out.append(
                (f"MATCH token top_k={k}", "match", window, (("top_k", k), ("block_size", 1), ("mode", mode)))
            )
            out.append(
                (
                    f"MATCH block top_k={k} B={block_size}",
                    "match",
                    window,
                    (("top_k", k), ("block_size", block_size), ("mode", mode)),
                )
            )
    return out


def plugin_eval(model: GPT, x: torch.Tensor, y: torch.Tensor, variants) -> list[dict]:
    rows = []
    T = x.shape[1]
    for label, att, w, kw in variants:
        try:
            m = swapped(model, attention=att, window=w, attn_kwargs=kw)
        except ValueError as e:  # e.g. "match" not registered in this checkout
            rows.append({"variant": label, "error": str(e)})
            continue
        res = evaluate(m, x, y)
        rows.append(
            {
                "variant": label,
                "acc": res["acc"],
                "attended": attended_fraction(T, att, w, kw),
                "correct": res["correct"],
                "dist": res["dist"],
            }
        )
    return rows


def plugin_table(model, x, y, *, windows, top_ks, block_size) -> str:
    """Markdown: accuracy overall and per key-query distance bin of every plug-in variant, per window."""
    lines = []
    for w in windows:
        rows = plugin_eval(model, x, y, plugin_variants(w, top_ks=tuple(top_ks), block_size=block_size))
        ok = [r for r in rows if "error" not in r]
        bins = by_distance(ok[0]["correct"], ok[0]["dist"])
        head = " | ".join(f"d in [{b['lo']}, {min(b['hi'], x.shape[1])})" for b in bins)
        lines += [
            f"| w = {w}: model | attended fraction | accuracy % | {head} |",
            "|---|---|---|" + "---|" * len(bins),
        ]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['variant']} | – | unavailable: {r['error']} |" + " |" * len(bins))
                continue
            accs = " | ".join(f"{100 * b['acc']:.1f}" for b in by_distance(r["correct"], r["dist"]))
            lines.append(f"| {r['variant']} | {r['attended']:.3f} | {100 * r['acc']:.1f} | {accs} |")
        lines.append("")
    n_lab = int((y != IGNORE).sum())
    lines.append(
        f"{len(x)} examples, {n_lab} queried values; bins hold {', '.join(str(b['n']) for b in bins)} of them"
    )
    return "\n".join(lines)


def plugin_pairs(
    model, cfg: RunConfig, pairs, *, window: int, top_ks, block_size: int, n: int, plot: str | None = None
) -> str:
    """Accuracy against the number of key-value pairs of every plug-in variant (one window): the trained
    model evaluated on fresh MQAR examples with ``num_kv_pairs`` = each of ``pairs`` (same length), its
    attention swapped at inference. Markdown table; with ``plot``, accuracy vs pairs as a PNG."""
    if cfg.task != "mqar":
        raise ValueError(f"a pairs sweep needs an MQAR checkpoint, got task {cfg.task!r}")
    variants = plugin_variants(window, top_ks=tuple(top_ks), block_size=block_size)
    acc: dict[str, dict[int, float]] = {}
    attended = {}
    for P in pairs:
        x, y = make_batch(dataclasses.replace(cfg, num_kv_pairs=P), n, DEMO_SEED)
        for r in plugin_eval(model, x, y, variants):
            if "error" not in r:
                acc.setdefault(r["variant"], {})[P] = r["acc"]
                attended[r["variant"]] = r["attended"]
    lines = [
        f"| w = {window}: model | attended fraction | " + " | ".join(f"{P} pairs" for P in pairs) + " |",
        "|---|---|" + "---|" * len(pairs),
    ]
    for v, row in acc.items():
        cells = " | ".join(f"{100 * row[P]:.1f}" for P in pairs)
        lines.append(f"| {v} | {attended[v]:.3f} | {cells} |")
    lines += [
        "",
        f"accuracy % on {n} fresh examples per column (seed {DEMO_SEED}), T = {cfg.seq_len}; "
        f"the model was trained with {cfg.num_kv_pairs} pairs",
    ]
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for v, row in acc.items():
            style = "-" if v == "full" else "--" if v.startswith("SWA") else "-."
            ax.plot(list(pairs), [100 * row[P] for P in pairs], style, marker="o", ms=3, label=v)
        ax.axvline(cfg.num_kv_pairs, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("key-value pairs in the sequence")
        ax.set_ylabel("recall accuracy %")
        ax.set_title(f"MQAR T={cfg.seq_len}, one trained model, attention swapped at inference", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        plt.close(fig)
    return "\n".join(lines)
