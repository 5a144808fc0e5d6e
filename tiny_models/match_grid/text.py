"""What a window forgets and what retrieval brings back: byte-level language models on the Shakespeare plays.

    python -m tiny_models.match_grid.text --seq_len 1024 --window 16 --top_k 4 --block_size 16 \
        --steps 1500 --seeds 0 1 2 --out runs/match_text_w16 --results tiny_models/results/match/text/w16

Three models of equal width and depth are trained on the plays per training seed (``tiny_models.train``,
``data="shakespeare"``, every next byte a target; the last 5 % of the text is held out): ``full`` (causal
attention), ``swa`` (a sliding window of ``w`` keys) and ``match`` (the same window plus ``top_k`` retrieved
blocks of ``block_size``, joint mode). They are scored on ``--n_eval`` held-out windows of ``seq_len`` bytes
(the same windows for every seed), with a fourth variant, ``swa → match``: the ``swa`` weights with MATCH
switched on at inference (no training). Reported:

- the cross-entropy (nats per byte) at every position of the context -- a window model cannot see past ``w``
  bytes, so its curve flattens there while full attention's keeps falling if the model uses longer context --
  and the overall loss, averaged over seeds;
- each variant minus SWA on the same held-out windows, overall and at the positions past the window
  (``>= w``), with a 95 % bootstrap interval over windows and the standard deviation over seeds;
- **how much context the full model uses** (the signal check): its loss when its attention is cut, at
  inference, to a sliding window of ``w'`` keys, minus its own loss, at the positions ``>= w'``. Retrieval
  can only bring back what this probe shows full attention reading beyond ``w``; choose ``w`` below the
  span where the probe is still clearly above zero.

``--results`` gets ``results.md`` (the three tables), ``loss_by_position.png`` and ``runs.json`` (per seed
and variant: the config, the training log's validation losses, the mean loss at every position and the
per-window losses the paired tables are computed from; per seed the probe's per-window numbers). A record
in ``runs.json`` stands in for a run of the same config, so seeds accumulate across machines. Training is
resumable (the trainer's checkpoints); finished models are not retrained. Runs live in
``<out>/seed<k>/<variant>``.
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
from tiny_models.stats import paired_difference
from tiny_models.tasks import shakespeare_text
from tiny_models.train import TrainConfig, train

VARIANTS = ("full", "swa", "swa_match_inference", "match")
TRAINED = ("full", "swa", "match")
LABELS = {
    "full": "full attention",
    "swa": "SWA",
    "swa_match_inference": "SWA → MATCH at inference (no training)",
    "match": "SWA + MATCH (trained)",
}
# config fields that do not change what is trained (where it is written, how it reports)
_NOT_SETTING = ("out_dir", "progress")


def train_config(variant: str, a, seed: int = 0) -> TrainConfig:
    att = {"full": ("full", None, ()), "swa": ("sliding", a.window, ())}.get(
        variant, ("match", a.window, (("top_k", a.top_k), ("block_size", a.block_size), ("mode", "joint")))
    )
    return TrainConfig(
        out_dir=os.path.join(a.out, f"seed{seed}", variant),
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
        seed=seed,
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
def window_losses(model: GPT, windows: torch.Tensor, batch: int = 8) -> np.ndarray:
    """Cross-entropy (nats per byte) of every held-out window at every position, ``[n_windows, seq_len]``."""
    model.eval()
    out = []
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch]
        logits = model(w[:, :-1])
        out.append(F.cross_entropy(logits.transpose(1, 2).float(), w[:, 1:], reduction="none").double())
    return torch.cat(out).numpy()


def loss_by_position(model: GPT, windows: torch.Tensor, batch: int = 8) -> np.ndarray:
    """Mean cross-entropy (nats per byte) at every position of the context, ``[seq_len]``."""
    return window_losses(model, windows, batch).mean(0)


def swapped(model: GPT, **attention) -> GPT:
    """The same weights under another attention (no training)."""
    m = GPT(dataclasses.replace(model.cfg, **attention))
    m.load_state_dict(model.state_dict())
    return m.eval()


def trained_model(variant: str, a, seed: int = 0) -> GPT:
    cfg = train_config(variant, a, seed)
    path = os.path.join(cfg.out_dir, "model.safetensors")
    done = os.path.join(cfg.out_dir, "done")
    if not os.path.exists(done):
        train(cfg)
        open(done, "w").close()
    return load_model(path)[0]


def probe_widths(a) -> list[int]:
    """The probe's windows: powers of two from 4 below ``seq_len``, plus ``w`` itself."""
    out, k = {a.window}, 4
    while k < a.seq_len:
        out.add(k)
        k *= 2
    return sorted(x for x in out if 1 <= x < a.seq_len)


def context_use(model: GPT, windows: torch.Tensor, widths, base: np.ndarray | None = None) -> dict:
    """The signal check: ``{w': [per window]}``, the full model's loss with its attention cut at inference
    to a sliding window of ``w'`` keys, minus its own loss, averaged over the positions ``>= w'`` of each
    held-out window (where the cut removes keys). ``base``: the model's own ``window_losses`` (computed when
    not given)."""
    if model.cfg.attention != "full":
        raise ValueError(
            f"the context-use probe cuts a full-attention model, got attention={model.cfg.attention!r}"
        )
    base = window_losses(model, windows) if base is None else base
    out = {}
    for w in widths:
        cut = window_losses(swapped(model, attention="sliding", window=int(w)), windows)
        out[int(w)] = (cut[:, w:] - base[:, w:]).mean(1)
    return out


def spans(T: int, w: int) -> list[tuple[int, int]]:
    """Position spans of the table: inside the first window, then doubling beyond it."""
    out, lo, hi = [], 0, min(w, T)
    while lo < T:
        out.append((lo, hi))
        lo, hi = hi, min(T, 2 * hi)
    return out


def setting(variant: str, a, seed: int) -> dict:
    """What a record's numbers depend on: the trained model's config (``swa``'s for the inference variant,
    plus the attention it is scored under), JSON-normalised."""
    cfg = train_config("swa" if variant == "swa_match_inference" else variant, a, seed)
    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_SETTING}
    if variant == "swa_match_inference":
        out |= {
            "inference_attention": "match",
            "inference_attn_kwargs": train_config("match", a, seed).attn_kwargs,
        }
    return json.loads(json.dumps(out))


def record(variant: str, a, seed: int, losses: np.ndarray) -> dict:
    """One (seed, variant) record: config, validation losses of its training log, the mean loss at every
    position, and per held-out window the mean loss overall and at the positions ``>= w``."""
    cfg = train_config("swa" if variant == "swa_match_inference" else variant, a, seed)
    log = os.path.join(cfg.out_dir, "log.jsonl")
    val = [json.loads(x) for x in open(log)] if os.path.exists(log) else []
    return {
        "seed": seed,
        "variant": variant,
        "config": setting(variant, a, seed),
        "n_eval": int(losses.shape[0]),
        "val_loss": [(r["step"], r["val_loss"]) for r in val if "val_loss" in r],
        "loss_by_position": [round(float(x), 4) for x in losses.mean(0)],
        "window_loss": [round(float(x), 5) for x in losses.mean(1)],
        "window_loss_beyond": [round(float(x), 5) for x in losses[:, a.window :].mean(1)],
    }


def usable(rec: dict | None, variant: str, a, seed: int) -> bool:
    """A committed record stands in for a run of the same config, scored on the same held-out windows."""
    if rec is None:
        return False
    return rec.get("config") == setting(variant, a, seed) and rec.get("n_eval") == a.n_eval


def run_seed(seed: int, a, windows: torch.Tensor, prior: dict) -> dict:
    """Every variant of one training seed (trained or read from ``prior``) and the context-use probe."""
    recs = {v: prior.get(("rec", seed, v)) for v in VARIANTS}
    recs = {v: r for v, r in recs.items() if usable(r, v, a, seed)}
    probe = prior.get(("probe", seed))
    widths = probe_widths(a)
    probe_ok = (
        probe is not None and "full" in recs and sorted(int(k) for k in probe) == widths
    )  # the probe belongs to the full model its record describes
    models = {}
    for v in TRAINED:
        if (
            v not in recs
            or (v == "swa" and "swa_match_inference" not in recs)
            or (v == "full" and not probe_ok)
        ):
            models[v] = trained_model(v, a, seed)
    if "swa_match_inference" not in recs:
        m = train_config("match", a, seed).attn_kwargs
        models["swa_match_inference"] = swapped(models["swa"], attention="match", attn_kwargs=m)
    losses = {v: window_losses(models[v], windows) for v in VARIANTS if v not in recs}
    for v, lo in losses.items():
        recs[v] = record(v, a, seed, lo)
    if not probe_ok:
        base = losses["full"] if "full" in losses else window_losses(models["full"], windows)
        probe = {
            str(k): [round(float(x), 5) for x in d]
            for k, d in context_use(models["full"], windows, widths, base).items()
        }
    return {"records": recs, "probe": probe}


def curve_table(results: dict, T: int, w: int) -> str:
    """Mean loss over seeds, overall (± sd over seeds) and per span of positions."""
    sp = spans(T, w)
    seeds = sorted(results)
    head = "| variant | overall | " + " | ".join(f"positions {lo}-{hi - 1}" for lo, hi in sp) + " |"
    lines = [head, "|---|---|" + "---|" * len(sp)]
    for v in VARIANTS:
        c = np.array([results[k]["records"][v]["loss_by_position"] for k in seeds])  # [seeds, T]
        overall = c.mean(1)
        sd = f" ± {overall.std(ddof=1):.3f}" if len(seeds) > 1 else ""
        cells = [f"{c[:, lo:hi].mean():.3f}" for lo, hi in sp]
        lines.append(f"| {LABELS[v]} | {overall.mean():.3f}{sd} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(p: dict) -> str:
    sd = f" ± {p['sd']:.3f}" if p["seeds"] > 1 else ""
    return f"{p['mean']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}]{sd}"


def paired_vs_swa(results: dict) -> dict:
    """``{variant: {"overall": paired, "beyond": paired}}``: variant minus SWA per held-out window."""
    seeds = sorted(results)
    rng = np.random.default_rng(0)
    out = {}
    for v in ("full", "swa_match_inference", "match"):
        out[v] = {}
        for key, name in (("window_loss", "overall"), ("window_loss_beyond", "beyond")):
            d = [np.subtract(results[k]["records"][v][key], results[k]["records"]["swa"][key]) for k in seeds]
            out[v][name] = paired_difference(np.array(d), rng)
    return out


def paired_table(results: dict, w: int) -> str:
    p = paired_vs_swa(results)
    lines = [f"| variant − SWA | overall | positions ≥ {w} (past the window) |", "|---|---|---|"]
    for v, d in p.items():
        lines.append(f"| {LABELS[v]} | {_fmt(d['overall'])} | {_fmt(d['beyond'])} |")
    return "\n".join(lines)


def probe_table(results: dict) -> str:
    seeds = sorted(results)
    rng = np.random.default_rng(0)
    widths = sorted(int(k) for k in results[seeds[0]]["probe"])
    lines = [
        "| full attention cut to a window of | extra loss at the positions it cuts (nats / byte) |",
        "|---|---|",
    ]
    for w in widths:
        d = np.array([results[k]["probe"][str(w)] for k in seeds])
        lines.append(f"| {w} | {_fmt(paired_difference(d, rng))} |")
    return "\n".join(lines)


def plot(curves: dict, w: int, path: str) -> None:
    """Left: the loss at every position (smoothed, log position axis). Right: the trained variants minus SWA,
    the differences the left panel's scale hides (the untrained inference variant is in the tables)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(np.asarray(c)) for c in curves.values())
    k = max(1, n // 64)  # smooth over k positions

    def smooth(c):
        return np.convolve(np.asarray(c), np.ones(k) / k, mode="valid")

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 3.8))
    for v, c in curves.items():
        sm = smooth(c)
        ax0.plot(np.arange(len(sm)) + k // 2 + 1, sm, label=LABELS[v])
    for v in ("full", "match"):
        if v in curves and "swa" in curves:
            sm = smooth(np.asarray(curves[v]) - np.asarray(curves["swa"]))
            ax1.plot(np.arange(len(sm)) + k // 2 + 1, sm, label=f"{LABELS[v]} − SWA")
    ax1.axhline(0, color="k", lw=0.6)
    for ax in (ax0, ax1):
        ax.axvline(w + 1, color="k", lw=0.6, ls="--")  # the first position whose window misses a key
        ax.set_xscale("log")
        ax.set_xlim(1, n)
        ax.set_xlabel("position in the context (1-based, log scale)")
        ax.legend(fontsize=8)
    ax0.set_ylabel("held-out loss (nats / byte)")
    ax1.set_ylabel("difference to SWA (nats / byte)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_prior(results_dir: str | None) -> dict:
    """Records committed in ``<results>/runs.json`` keyed ("rec", seed, variant) and ("probe", seed)."""
    path = os.path.join(results_dir, "runs.json") if results_dir else None
    if not path or not os.path.exists(path):
        return {}
    data = json.load(open(path))
    if "seeds" not in data:  # an older layout (one seed, no per-window losses): nothing stands in
        return {}
    out = {}
    for k, s in data["seeds"].items():
        for v, r in s["records"].items():
            out[("rec", int(k), v)] = r
        if s.get("probe") is not None:
            out[("probe", int(k))] = s["probe"]
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--top_k", type=int, default=4)
    p.add_argument("--block_size", type=int, default=16)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_head", type=int, default=2)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--text_chars", type=int, default=2_000_000)
    p.add_argument("--n_eval", type=int, default=64)
    p.add_argument("--out", default="runs/match_text")
    p.add_argument("--results", default=None)
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    if not 1 <= a.window < a.seq_len:
        raise ValueError(f"--window must be in [1, seq_len = {a.seq_len}), got {a.window}")
    torch.set_num_threads(1)
    windows = heldout_windows(a)
    prior = read_prior(a.results)
    results = {k: run_seed(k, a, windows, prior) for k in a.seeds}
    mean_curves = {
        v: np.mean([results[k]["records"][v]["loss_by_position"] for k in a.seeds], axis=0) for v in VARIANTS
    }
    text = "\n\n".join(
        [curve_table(results, a.seq_len, a.window), paired_table(results, a.window), probe_table(results)]
    )
    print(text)
    if a.results:
        os.makedirs(a.results, exist_ok=True)
        args = " ".join(sys.argv[1:] if argv is None else argv)
        with open(os.path.join(a.results, "results.md"), "w") as f:
            f.write(
                f"Command: `python -m tiny_models.match_grid.text {args}`\n\nSeeds: {a.seeds}\n\n{text}\n"
            )
        plot(mean_curves, a.window, os.path.join(a.results, "loss_by_position.png"))
        runs = {"seeds": {str(k): results[k] for k in a.seeds}}
        with open(os.path.join(a.results, "runs.json"), "w") as f:
            json.dump(runs, f)
    return {"curves": mean_curves, "results": results}


if __name__ == "__main__":
    main()
