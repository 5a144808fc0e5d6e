"""What a window forgets and what retrieval brings back: byte-level language models on the Shakespeare plays.

    python -m tiny_models.match_grid.text --seq_len 1024 --window 128 --top_k 8 --block_size 32 \
        --steps 2000 --out runs/match_text --results tiny_models/results/match/text

Three models of equal width and depth are trained on the plays (``tiny_models.train``, ``data="shakespeare"``,
every next byte a target; the last 5 % of the text is held out): ``full`` (causal attention), ``swa`` (a
sliding window of ``w`` keys) and ``match`` (the same window plus ``top_k`` retrieved blocks of
``block_size``, joint mode). Scored on ``--n_eval`` held-out windows of ``seq_len`` bytes, with a fourth
variant, ``swa → match``: the ``swa`` weights with MATCH switched on at inference (no training). For each the
cross-entropy (nats per byte) as a function of the position in the context -- a window model cannot see past
``w`` bytes, so its curve flattens there while full attention's keeps falling -- and the overall loss.
``--results`` gets ``results.md`` (overall loss and the loss per span of positions), ``loss_by_position.png``
and ``runs.json`` (per variant: the config, the training log's validation losses, the per-position curve).
Training is resumable (the SFT trainer's checkpoints); finished models are not retrained.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from tiny_models.gpt import GPT
from tiny_models.model_io import load_model
from tiny_models.tasks import shakespeare_text
from tiny_models.train import TrainConfig, train

VARIANTS = ("full", "swa", "swa_match_inference", "match")
LABELS = {
    "full": "full attention",
    "swa": "SWA",
    "swa_match_inference": "SWA → MATCH at inference (no training)",
    "match": "SWA + MATCH (trained)",
}


def train_config(variant: str, a) -> TrainConfig:
    att = {"full": ("full", None, ()), "swa": ("sliding", a.window, ())}.get(
        variant, ("match", a.window, (("top_k", a.top_k), ("block_size", a.block_size), ("mode", "joint")))
    )
    return TrainConfig(
        out_dir=os.path.join(a.out, variant),
        n_layer=a.n_layer,
        n_head=a.n_head,
        n_embd=a.n_embd,
        block_size=a.seq_len,
        attention=att[0],
        window=att[1],
        attn_kwargs=att[2],
        data="shakespeare",
        text_chars=a.text_chars,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        min_lr=a.lr / 10,
        warmup=min(100, a.steps // 10),
        weight_decay=0.1,
        beta2=0.95,
        seed=a.seed,
        eval_every=max(a.steps // 10, 1),
        eval_examples=32,
        ckpt_every=max(a.steps // 10, 1),
        progress=not a.no_progress,
        device="cpu",
        threads=1,
        resume=True,
    )


def heldout_windows(a) -> torch.Tensor:
    """``[n_eval, seq_len + 1]`` byte windows of the held-out text (the last 5 % of the plays, as training
    holds out), at seeded starts."""
    ids = np.frombuffer(shakespeare_text(a.text_chars).encode("utf-8"), dtype=np.uint8).astype(np.int64)
    val = ids[-max(len(ids) // 20, a.seq_len + 2) :]
    starts = np.random.default_rng(12345).integers(0, len(val) - a.seq_len - 1, size=a.n_eval)
    return torch.from_numpy(np.stack([val[s : s + a.seq_len + 1] for s in starts]))


@torch.no_grad()
def loss_by_position(model: GPT, windows: torch.Tensor, batch: int = 8) -> np.ndarray:
    """Mean cross-entropy (nats per byte) at every position of the context, ``[seq_len]``."""
    model.eval()
    tot = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = model(w[:, :-1])
        ce = F.cross_entropy(logits.transpose(1, 2).float(), w[:, 1:], reduction="none")  # [b, T]
        tot += ce.double().sum(0)
    return (tot / len(windows)).numpy()


def swapped(model: GPT, **attention) -> GPT:
    """The same weights under another attention (no training)."""
    m = GPT(dataclasses.replace(model.cfg, **attention))
    m.load_state_dict(model.state_dict())
    return m.eval()


def trained_model(variant: str, a) -> GPT:
    cfg = train_config(variant, a)
    path = os.path.join(cfg.out_dir, "model.safetensors")
    done = os.path.join(cfg.out_dir, "done")
    if not os.path.exists(done):
        train(cfg)
        open(done, "w").close()
    return load_model(path)[0]


def spans(T: int, w: int) -> list[tuple[int, int]]:
    """Position spans of the table: inside the first window, then doubling beyond it."""
    out, lo, hi = [], 0, min(w, T)
    while lo < T:
        out.append((lo, hi))
        lo, hi = hi, min(T, 2 * hi)
    return out


def table(curves: dict, T: int, w: int) -> str:
    sp = spans(T, w)
    head = "| variant | overall | " + " | ".join(f"positions {lo}-{hi - 1}" for lo, hi in sp) + " |"
    lines = [head, "|---|---|" + "---|" * len(sp)]
    for v, c in curves.items():
        c = np.asarray(c)
        cells = [f"{c[lo:hi].mean():.3f}" for lo, hi in sp]
        lines.append(f"| {LABELS[v]} | {c.mean():.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict, w: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for v, c in curves.items():
        c = np.asarray(c)
        k = max(1, len(c) // 64)  # smooth over k positions
        sm = np.convolve(c, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(sm)) + k // 2 + 1, sm, label=LABELS[v])
    ax.axvline(w + 1, color="k", lw=0.6, ls="--")  # the first position whose window misses a key
    n = max(len(np.asarray(c)) for c in curves.values())
    ax.set(xlabel="position in the context (1-based, log scale)", ylabel="held-out loss (nats / byte)")
    ax.set_xscale("log")
    ax.set_xlim(1, n)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--top_k", type=int, default=8)
    p.add_argument("--block_size", type=int, default=32)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_head", type=int, default=2)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text_chars", type=int, default=2_000_000)
    p.add_argument("--n_eval", type=int, default=64)
    p.add_argument("--out", default="runs/match_text")
    p.add_argument("--results", default=None)
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    windows = heldout_windows(a)
    models = {v: trained_model(v, a) for v in ("full", "swa", "match")}
    match_att = dict(attention="match", attn_kwargs=models["match"].cfg.attn_kwargs)
    models["swa_match_inference"] = swapped(models["swa"], **match_att)
    curves = {v: loss_by_position(models[v], windows) for v in VARIANTS}
    text = table(curves, a.seq_len, a.window)
    print(text)
    if a.results:
        os.makedirs(a.results, exist_ok=True)
        args = " ".join(sys.argv[1:] if argv is None else argv)
        with open(os.path.join(a.results, "results.md"), "w") as f:
            f.write(f"Command: `python -m tiny_models.match_grid.text {args}`\n\n{text}\n")
        plot(curves, a.window, os.path.join(a.results, "loss_by_position.png"))
        runs = {}
        for v in VARIANTS:
            cfg = train_config("swa" if v == "swa_match_inference" else v, a)
            log = os.path.join(cfg.out_dir, "log.jsonl")
            val = [json.loads(x) for x in open(log)] if os.path.exists(log) else []
            runs[v] = {
                "config": dataclasses.asdict(cfg)
                | ({"inference_attention": "match"} if v == "swa_match_inference" else {}),
                "val_loss": [(r["step"], r["val_loss"]) for r in val if "val_loss" in r],
                "loss_by_position": [round(float(x), 4) for x in curves[v]],
            }
        with open(os.path.join(a.results, "runs.json"), "w") as f:
            json.dump(runs, f)
    return curves


if __name__ == "__main__":
    main()
