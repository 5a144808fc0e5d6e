"""Tiny GPTs on the recall tasks of ``tiny_models/recall.py`` with full, sliding-window and MATCH attention.

Three entry points (functions, and subcommands of ``python -m tiny_models.match_grid``):

* ``train`` -- one run (:func:`train_run`): a 2-layer tiny GPT (``tiny_models/gpt.py``) on fresh, seeded
  batches of one task; AdamW, linear warmup + cosine decay, loss = cross-entropy on labelled positions
  only (the output layer is computed only there); evaluation on a fixed held-out set, early stop at 99 %.
* ``plugin`` -- :func:`plugin_eval`: one trained model evaluated with its attention swapped at inference
  (full -> SWA -> SWA + MATCH at several top-k), no retraining.
* ``grid`` -- :func:`run_grid`: every (attention, seed[, num_kv_pairs]) run of a preset, resumable (one
  directory per run with ``result.json`` and ``model.safetensors``; finished runs are skipped), then
  ``table`` / ``plot`` summarise the directory.

Data per training step ``s`` of a run with seed ``r`` come from ``seed = 1_000_003 * r + s`` (fresh
examples every step, reproducible); the held-out set uses seed ``10**9 + r`` (never a training seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from tiny_models.gpt import GPT, GPTConfig, apply_rope, rope_cos_sin
from tiny_models.recall import IGNORE, TASKS, key_distance

# ----------------------------------------------------------------------------------------------------
# one run

# RunConfig fields holding (name, value) pairs: tuples in the config, name=value words on the command line
_KV_FIELDS = ("task_kwargs", "attn_kwargs", "train_task_kwargs", "early_task_kwargs")


@dataclass(frozen=True)
class RunConfig:
    # defaults: the recipe under which full attention solves MQAR at T=128, 8 pairs (README of results/match)
    task: str = "mqar"
    seq_len: int = 128
    num_kv_pairs: int = 8  # mqar only
    vocab_size: int = 64
    task_kwargs: tuple = ()  # extra (name, value) pairs for the task generator
    # model
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    attention: str = "full"
    window: int | None = None
    attn_kwargs: tuple = ()
    prev_mix: bool = True  # add a learned map of the previous token's embedding (see RecallGPT)
    prev_taps: int = 1  # with prev_mix: how many previous tokens are mixed in (1 to 3; see RecallGPT)
    train_targets: str = "recall"  # MAD, Shakespeare: "lm" trains on every next token (evaluation: recall)
    train_task_kwargs: tuple = ()  # generator (name, value) pairs for training batches only, e.g. test=False
    key_curriculum: int = 0  # MAD fuzzy: training keys grow from 1 to k_motif_size tokens over these steps
    early_task_kwargs: tuple = ()  # generator (name, value) pairs for the first early_steps training batches
    early_steps: int = 0  # e.g. num_facts=1 (Shakespeare): one fact per example before the test form
    # optimisation
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    seed: int = 0
    # evaluation
    eval_every: int = 50
    eval_n: int = 256
    early_stop: float | None = 0.99  # stop once held-out accuracy exceeds this (Zoology stops at 0.99)

    def model_config(self) -> GPTConfig:
        return GPTConfig(
            vocab_size=self.vocab_size,
            block_size=self.seq_len,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            attention=self.attention,
            window=self.window,
            attn_kwargs=tuple(tuple(p) for p in self.attn_kwargs),
        )

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        for k in _KV_FIELDS:
            d[k] = tuple(tuple(p) for p in d.get(k, ()))
        return cls(**d)


class RecallGPT(GPT):
    """The tiny GPT of ``tiny_models/gpt.py`` with an optional previous-token mix at the input.

    ``prev_mix=True`` [RECON]: the input of the first block is ``wte(x_t) + W_prev wte(x_{t-1})`` (``W_prev``
    starts at zero, so training starts from the plain model). It is the cheapest form of the short
    convolution that Zoology/Based put in front of every sequence mixer on MQAR (kernel 3, arXiv
    2402.18668), attention included: it hands the "which key precedes this value" feature to the first
    attention layer, so recall no longer needs a previous-token head composed with an induction head.
    Alternative: no mix (``prev_mix=False``), the plain two-layer induction circuit, which learns MQAR far
    more slowly from scratch. The mix looks one token back only, so it never reaches beyond any window.

    ``prev_taps=2``: ``wte(x_t) + W_prev wte(x_{t-1}) + W_prev2 wte(x_{t-2})``, the full kernel-3 short
    convolution of Zoology/Based (``W_prev2`` also starts at zero); ``prev_taps=3`` adds
    ``W_prev3 wte(x_{t-3})`` (kernel 4). A key of MAD fuzzy recall is a motif of 3 tokens: with three taps
    the first value token after it sees the whole motif, so one attention hop from the repeated key can
    find it.
    """

    def __init__(self, cfg: GPTConfig, prev_mix: bool = False, prev_taps: int = 1):
        super().__init__(cfg)
        if prev_taps not in (1, 2, 3):
            raise ValueError(f"prev_taps must be 1, 2 or 3, got {prev_taps}")
        lin = lambda on: nn.Linear(cfg.n_embd, cfg.n_embd, bias=False) if on else None  # noqa: E731
        self.prev = lin(prev_mix)
        self.prev2 = lin(prev_mix and prev_taps >= 2)
        self.prev3 = lin(prev_mix and prev_taps >= 3)
        for m in (self.prev, self.prev2, self.prev3):
            if m is not None:
                nn.init.zeros_(m.weight)

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, C]
        e = self.wte(x)
        if self.prev is None:
            return e
        out = e + self.prev(F.pad(e, (0, 0, 1, 0))[:, :-1])
        if self.prev2 is not None:
            out = out + self.prev2(F.pad(e, (0, 0, 2, 0))[:, :-2])
        if self.prev3 is not None:
            out = out + self.prev3(F.pad(e, (0, 0, 3, 0))[:, :-3])
        return out

    @property
    def prev_taps(self) -> int:
        return sum(m is not None for m in (self.prev, self.prev2, self.prev3))

    def forward(self, idx, **kw):  # logits at every position (KV cache / generation are not supported)
        if kw.get("cache") is not None or kw.get("pos") is not None:
            raise ValueError("RecallGPT runs whole sequences only (no cache, default positions)")
        return logits_at(self, idx, torch.ones_like(idx, dtype=torch.bool)).view(*idx.shape, -1)


def new_model(cfg: RunConfig) -> RecallGPT:
    return RecallGPT(cfg.model_config(), prev_mix=cfg.prev_mix, prev_taps=cfg.prev_taps)


def make_batch(cfg: RunConfig, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples of the run's task, ``[n, seq_len]`` inputs and labels."""
    kw = dict(cfg.task_kwargs)
    if cfg.task == "mqar":
        return TASKS["mqar"](
            n, seq_len=cfg.seq_len, num_kv_pairs=cfg.num_kv_pairs, vocab_size=cfg.vocab_size, seed=seed, **kw
        )
    if cfg.task == "shakespeare":
        return TASKS["shakespeare"](n, seq_len=cfg.seq_len, seed=seed, **kw)
    if cfg.task in TASKS:
        return TASKS[cfg.task](n, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=seed, **kw)
    raise ValueError(f"unknown task {cfg.task!r}; known: {sorted(TASKS)}")


def logits_at(model: GPT, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[M, V]`` at the ``M`` positions where ``mask [B, T]`` is True (the head runs there only).

    Same computation as ``GPT.forward`` (RoPE positions ``0..T-1``, no cache), sliced before the tied head.
    """
    B, T = x.shape
    cfg = model.cfg
    h = model.embed(x) if isinstance(model, RecallGPT) else model.wte(x)
    cos, sin = rope_cos_sin(
        torch.arange(T, device=x.device).expand(B, T), cfg.head_dim, cfg.rope_base, h.dtype
    )
    for block in model.h:
        h = block(h, cos, sin, None, None)
    return F.linear(model.ln_f(h)[mask], model.wte.weight)


@torch.no_grad()
def layer_qk(model: GPT, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE queries and keys ``[B, H, T, D]`` of block ``layer`` (what attention and retrieval score)."""
    B, T = x.shape
    cfg = model.cfg
    h = model.embed(x) if isinstance(model, RecallGPT) else model.wte(x)
    cos, sin = rope_cos_sin(torch.arange(T).expand(B, T), cfg.head_dim, cfg.rope_base, h.dtype)
    for block in model.h[:layer]:
        h = block(h, cos, sin, None, None)
    attn = model.h[layer].attn
    q, k, _ = attn.c_attn(model.h[layer].ln_1(h)).split(cfg.n_embd, dim=2)
    q, k = (t.view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2) for t in (q, k))
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine to ``min_lr_frac * lr`` at ``steps``."""
    if step <= cfg.warmup:
        return cfg.lr * step / max(cfg.warmup, 1)
    frac = min((step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1), 1.0)
    lo = cfg.lr * cfg.min_lr_frac
    return lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * frac))


@torch.no_grad()
def evaluate(model: GPT, x: torch.Tensor, y: torch.Tensor, *, batch: int = 256) -> dict:
    """Accuracy over labelled positions, plus per-position correctness and key distances (for binning)."""
    model.eval()
    correct, dists = [], []
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        mask = yb != IGNORE
        correct.append(logits_at(model, xb, mask).argmax(-1) == yb[mask])
        dists.append(key_distance(xb, yb)[mask])
    c, d = torch.cat(correct), torch.cat(dists)
    return {"acc": float(c.float().mean()), "correct": c, "dist": d}


def heldout(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return make_batch(cfg, cfg.eval_n, 10**9 + cfg.seed)


def training_config(cfg: RunConfig, step: int | None = None) -> RunConfig:
    """The config whose batches train the model: ``cfg`` with ``train_task_kwargs`` added to its generator
    options (e.g. ``test=False``: MAD's training keys of 1 to ``k_motif_size`` tokens), and for
    ``train_targets="lm"`` (MAD and Shakespeare tasks) the same examples labelled with every next token (MAD's
    training targets; byte-level language modelling for Shakespeare). Held-out accuracy always uses ``cfg``
    itself: the recall targets of the test form.

    ``key_curriculum = S > 0`` (tasks with key motifs, i.e. MAD fuzzy recall): the batch of training ``step``
    (1-based) has keys of exactly ``1 + (step - 1) * k // S`` tokens while ``step <= S`` (``k`` =
    ``k_motif_size``, 3 by default), so training starts on single-token keys (plain in-context recall with
    multi-token values, which the recipe learns within ~150 steps) and moves to 2- then 3-token keys in equal
    stages; after step ``S`` the keys have ``k`` tokens, the test form. [RECON: a curriculum is our choice,
    not MAD's, which trains on keys of 1-3 tokens mixed from the start.]

    ``early_steps = S > 0`` with ``early_task_kwargs``: the batches of steps ``1..S`` add those generator
    options (after ``train_task_kwargs``), e.g. ``num_facts=1 num_queries=1`` for the Shakespeare task: one
    fact per example, so the answer is the digits after the only other ``=`` (a copy, no key to match),
    before the test form needs the key. [RECON: our choice, as for the key curriculum.]
    """
    if cfg.train_targets not in ("recall", "lm"):
        raise ValueError(f"train_targets must be 'recall' or 'lm', got {cfg.train_targets!r}")
    extra = tuple(tuple(p) for p in cfg.train_task_kwargs)
    if cfg.train_targets == "lm":
        if not (cfg.task.startswith("mad_") or cfg.task == "shakespeare"):
            raise ValueError(
                f"train_targets='lm' is defined for the MAD and Shakespeare tasks only, got task={cfg.task!r}"
            )
        extra += (("targets", "lm"),)
    if cfg.key_curriculum < 0:
        raise ValueError(f"key_curriculum must be >= 0, got {cfg.key_curriculum}")
    if cfg.key_curriculum > 0:
        k = dict(cfg.task_kwargs).get("k_motif_size", 3 if cfg.task == "mad_fuzzy" else 1)
        if k < 2:
            raise ValueError(
                f"key_curriculum needs keys of several tokens (MAD fuzzy recall), got task={cfg.task!r} "
                f"with k_motif_size={k}"
            )
        if dict(extra).get("test", True) is False:
            raise ValueError("key_curriculum sets the key size itself; it cannot be combined with test=False")
        if step is not None and step <= cfg.key_curriculum:
            extra += (("k_motif_size", 1 + (step - 1) * k // cfg.key_curriculum),)
    if cfg.early_steps < 0:
        raise ValueError(f"early_steps must be >= 0, got {cfg.early_steps}")
    if bool(cfg.early_steps) != bool(cfg.early_task_kwargs):
        raise ValueError(
            f"early_steps={cfg.early_steps} and early_task_kwargs={cfg.early_task_kwargs!r} go together"
        )
    if step is not None and step <= cfg.early_steps:
        extra += tuple(tuple(p) for p in cfg.early_task_kwargs)
    if not extra:
        return cfg
    kw = dict(cfg.task_kwargs)
    kw.update(dict(extra))  # training-only options win over the shared ones
    return dataclasses.replace(cfg, task_kwargs=tuple(kw.items()))


def train_run(cfg: RunConfig, *, progress: bool = True, log=None) -> dict:
    """Train one model; returns a dict: model, acc, curve [(step, acc)], steps, time_s, num_params, eval."""
    from tqdm.auto import tqdm

    training_config(cfg)  # bad training options fail before the model is built
    torch.manual_seed(cfg.seed)
    model = new_model(cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    xe, ye = heldout(cfg)
    curve: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc=run_name(cfg), disable=not progress, leave=False, mininterval=2)
    step = 0
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x, y = make_batch(training_config(cfg, step), cfg.batch_size, 1_000_003 * cfg.seed + step)
        model.train()
        mask = y != IGNORE
        loss = F.cross_entropy(logits_at(model, x, mask), y[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = evaluate(model, xe, ye)["acc"]
            curve.append((step, acc))
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
            if log is not None:
                print(
                    json.dumps(
                        {
                            "step": step,
                            "loss": round(loss.item(), 4),
                            "acc": round(acc, 4),
                            "time_s": round(time.perf_counter() - t0, 1),
                        }
                    ),
                    file=log,
                    flush=True,
                )
            if cfg.early_stop is not None and acc > cfg.early_stop:
                break
    bar.close()
    res = evaluate(model, xe, ye)
    return {
        "model": model.eval(),
        "acc": res["acc"],
        "curve": curve,
        "steps": step,
        "time_s": time.perf_counter() - t0,
        "num_params": model.num_params(),
        "eval": res,
    }


def run_name(cfg: RunConfig) -> str:
    att = cfg.attention if cfg.window is None else f"{cfg.attention}{cfg.window}"
    kw = "".join(f"_{k}{v}" for k, v in cfg.attn_kwargs)
    return f"{cfg.task}_T{cfg.seq_len}_P{cfg.num_kv_pairs}_{att}{kw}_s{cfg.seed}"


CKPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "match")
DEMO_SEED = 777_777_777  # fresh examples (demo, notebook): no run trains (1_000_003 r + s) or evaluates on it


def save_run(model: RecallGPT, cfg: RunConfig, path: str, **meta) -> None:
    """fp32 weights + the run config (JSON) in the safetensors metadata."""
    from safetensors.torch import save_file

    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    meta = {"run_config": json.dumps(dataclasses.asdict(cfg)), **{k: json.dumps(v) for k, v in meta.items()}}
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata=meta)
    os.replace(tmp, path)


def load_run(path: str) -> tuple[RecallGPT, RunConfig]:
    """(model, run config) of a checkpoint written by :func:`save_run` (the grid, ``train --save``)."""
    from safetensors import safe_open

    _try_register_match()
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if "run_config" not in meta:
        raise ValueError(f"checkpoint {path} has no run_config in its metadata (not written by save_run?)")
    cfg = RunConfig.from_dict(json.loads(meta["run_config"]))
    model = new_model(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg


# ----------------------------------------------------------------------------------------------------
# attention accounting


def attended_fraction(seq_len: int, attention: str, window: int | None, attn_kwargs=()) -> float:
    """Mean over queries of keys attended / keys full causal attention attends (``t + 1`` at position t).

    Window ``w`` (NSA convention: w keys including the query itself); MATCH adds ``top_k`` tokens, or
    ``top_k`` blocks of ``block_size`` tokens, from the out-of-window past (capped by how many exist).
    """
    kw = dict(attn_kwargs)
    num = den = 0
    for t in range(seq_len):
        full = t + 1
        if attention == "full" or window is None:
            seen = full
        else:
            seen = min(full, window)
            if attention == "match":
                seen += min(kw.get("top_k", 0) * kw.get("block_size", 1), full - seen)
        num += seen
        den += full
    return num / den


# ----------------------------------------------------------------------------------------------------
# plug-in evaluation


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


def plugin_pairs(model, cfg: RunConfig, pairs, *, window: int, top_ks, block_size: int, n: int,
                 plot: str | None = None) -> str:
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
    lines = [f"| w = {window}: model | attended fraction | " + " | ".join(f"{P} pairs" for P in pairs) + " |",
             "|---|---|" + "---|" * len(pairs)]
    for v, row in acc.items():
        cells = " | ".join(f"{100 * row[P]:.1f}" for P in pairs)
        lines.append(f"| {v} | {attended[v]:.3f} | {cells} |")
    lines += ["", f"accuracy % on {n} fresh examples per column (seed {DEMO_SEED}), T = {cfg.seq_len}; "
              f"the model was trained with {cfg.num_kv_pairs} pairs"]
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


# ----------------------------------------------------------------------------------------------------
# grid


# per-task settings of a grid (MAD's baseline vocabularies; bytes for Shakespeare)
TASK_DEFAULTS = {
    "mqar": {},
    "mad_in_context": {"vocab_size": 16},
    "mad_noisy": {"vocab_size": 32},
    "mad_fuzzy": {"vocab_size": 16},
    "shakespeare": {"vocab_size": 256},
}


@dataclass(frozen=True)
class GridSpec:
    tasks: tuple = ("mqar",)
    seq_len: int = 128
    pairs: tuple = (8,)  # MQAR only; the other tasks run once per seed
    window: int = 8
    top_ks: tuple = (1, 4)
    block_size: int = 4
    seeds: tuple = (0, 1, 2)
    steps: int = 600
    base: dict = field(default_factory=dict)  # extra RunConfig fields shared by every run


def grid_runs(spec: GridSpec) -> list[RunConfig]:
    """Equal width and depth everywhere: full; SWA w; SWA w + top_k*B (the same attended budget as the
    largest MATCH budget); SWA + MATCH with token and block retrieval, joint and gated, each top_k."""
    w = spec.window
    kmax = max(spec.top_ks)
    atts: list[tuple[str, int | None, tuple]] = [
        ("full", None, ()),
        ("sliding", w, ()),
        ("sliding", w + kmax * spec.block_size, ()),
    ]
    for bs in (1, spec.block_size):
        for mode in ("joint", "gated"):
            for k in spec.top_ks:
                atts.append(("match", w, (("top_k", k), ("block_size", bs), ("mode", mode))))
    runs = []
    for task in spec.tasks:
        for p in spec.pairs if task == "mqar" else spec.pairs[:1]:
            for s in spec.seeds:  # seeds before attentions: a partial grid still covers every model
                for att, win, kw in atts:
                    fields = dict(
                        task=task,
                        seq_len=spec.seq_len,
                        num_kv_pairs=p,
                        steps=spec.steps,
                        attention=att,
                        window=win,
                        attn_kwargs=kw,
                        seed=s,
                    )
                    runs.append(RunConfig(**{**fields, **TASK_DEFAULTS[task], **spec.base}))
    return runs


def run_grid(spec: GridSpec, out_dir: str, *, progress: bool = True) -> list[dict]:
    """Run every grid run not finished in ``out_dir`` (``<run>/result.json`` marks a finished run)."""
    os.makedirs(out_dir, exist_ok=True)
    results = []
    runs = grid_runs(spec)
    for i, cfg in enumerate(runs):
        d = os.path.join(out_dir, run_name(cfg))
        done = os.path.join(d, "result.json")
        if os.path.exists(done):
            results.append(json.load(open(done)))
            continue
        if cfg.attention not in _registered():
            print(
                f"[{i + 1}/{len(runs)}] skip {run_name(cfg)}: attention {cfg.attention!r} not registered",
                flush=True,
            )
            continue
        os.makedirs(d, exist_ok=True)
        print(f"[{i + 1}/{len(runs)}] {run_name(cfg)}", flush=True)
        try:
            with open(os.path.join(d, "log.jsonl"), "w") as log:
                out = train_run(cfg, progress=progress, log=log)
        except Exception as e:  # one broken configuration must not stop the rest of the grid
            print(f"  FAILED {run_name(cfg)}: {type(e).__name__}: {e}", flush=True)
            continue
        ev = out["eval"]
        rec = {
            "name": run_name(cfg),
            "config": dataclasses.asdict(cfg),
            "acc": out["acc"],
            "steps": out["steps"],
            "time_s": round(out["time_s"], 1),
            "num_params": out["num_params"],
            "attended": attended_fraction(cfg.seq_len, cfg.attention, cfg.window, cfg.attn_kwargs),
            "curve": out["curve"],
            "by_distance": by_distance(ev["correct"], ev["dist"]),
        }
        save_run(out["model"], cfg, os.path.join(d, "model.safetensors"), acc=out["acc"], steps=out["steps"])
        with open(done + ".tmp", "w") as f:
            json.dump(rec, f)
        os.replace(done + ".tmp", done)
        results.append(rec)
    return results


def finished_runs(out_dir: str) -> list[dict]:
    """The ``result.json`` of every finished run in a grid directory, in name order."""
    names = sorted(d for d in os.listdir(out_dir) if os.path.exists(os.path.join(out_dir, d, "result.json")))
    return [json.load(open(os.path.join(out_dir, d, "result.json"))) for d in names]


def _registered() -> set[str]:
    from tiny_models.gpt import ATTENTION

    _try_register_match()
    return set(ATTENTION)


def _try_register_match() -> None:
    """Make attention="match" available: the model's own registration when present, else a joint-mode wrapper.

    The wrapper calls ``fast.match.match_attention`` (``match_attention_kv`` for padding / a longer key
    sequence); gated mode then takes a fixed ``gate_logit`` from the attention options (no learned gate).
    """
    from tiny_models.gpt import ATTENTION, register_attention

    if "match" in ATTENTION:
        return
    try:
        import fast.match  # noqa: F401
    except ImportError:
        return
    if "match" not in ATTENTION:
        register_attention("match", _match_wrapper)


MATCH_CHUNK = 16  # query rows per step of fast.match's torch backend in these experiments


def use_match_chunk(chunk: int = MATCH_CHUNK) -> None:
    """Route attention="match" through ``fast.match.match_attention_kv(..., chunk=chunk)``.

    Same function, checks and results as the model's own registration; only the number of query rows per
    step of the torch backend changes. At T = 128 the default (128 rows, the whole sequence) makes the
    window part a dense ``[T, T]`` product with the values broadcast per query row; 16-row chunks keep every
    intermediate at ``[16, 16 + w - 1]``, which is several times faster on a CPU.
    """
    _try_register_match()
    from tiny_models.gpt import register_attention

    def chunked(
        q, k, v, *, window, key_valid=None, scale=None, top_k, block_size=1, mode="joint", gate_logit=None
    ):  # [B, H, Tq, D] x3 -> [B, H, Tq, D]
        from fast.match import match_attention_kv

        return match_attention_kv(
            q,
            k,
            v,
            window=window,
            top_k=top_k,
            block_size=block_size,
            mode=mode,
            gate_logit=gate_logit,
            scale=scale,
            key_valid=key_valid,
            chunk=chunk,
        )

    register_attention("match", chunked, overwrite=True)


def _match_wrapper(
    q, k, v, *, window, key_valid=None, scale=None, top_k, block_size=1, mode="joint", gate_logit=None
):  # [B, H, Tq, D] x3 -> [B, H, Tq, D]
    from fast.match import match_attention, match_attention_kv

    g = (
        None
        if mode == "joint"
        else torch.full((), 0.0 if gate_logit is None else float(gate_logit), dtype=q.dtype, device=q.device)
    )
    kw = dict(window=window, top_k=top_k, block_size=block_size, mode=mode, gate_logit=g, scale=scale)
    if key_valid is None and q.shape[2] == k.shape[2]:
        return match_attention(q, k, v, **kw)
    return match_attention_kv(q, k, v, key_valid=key_valid, **kw)


DIST_BINS = (0, 8, 16, 32, 64, 128, 256, 512, 1 << 30)


def by_distance(correct: torch.Tensor, dist: torch.Tensor, bins=DIST_BINS) -> list[dict]:
    """Accuracy per key-query distance bin ``[lo, hi)``."""
    out = []
    for lo, hi in zip(bins[:-1], bins[1:], strict=True):
        m = (dist >= lo) & (dist < hi)
        if bool(m.any()):
            out.append({"lo": lo, "hi": hi, "n": int(m.sum()), "acc": float(correct[m].float().mean())})
    return out


# ----------------------------------------------------------------------------------------------------
# CLI


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
                "steps_mean": sum(r["steps"] for r in rs) / len(rs),
                "time_s_mean": sum(r["time_s"] for r in rs) / len(rs),
                "by_distance": _merge_dist([r["by_distance"] for r in rs]),
            }
        )
    rows.sort(key=lambda r: (r["task"], r["pairs"], _order(r["config"])))
    for r in rows:
        r.pop("config")
    return rows


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
    lines = [
        "| task | model | T | pairs | seeds | accuracy % (mean ± std) | attended fraction | steps (mean) "
        "| time/run (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pairs = r["pairs"] if r["task"] == "mqar" else "–"
        acc = f"{100 * r['acc_mean']:.1f}" + (f" ± {100 * r['acc_std']:.1f}" if r["n_seeds"] > 1 else "")
        lines.append(
            f"| {r['task']} | {r['model']} | {r['seq_len']} | {pairs} | {r['n_seeds']} | "
            f"{acc} | "
            f"{r['attended']:.3f} | "
            f"{r['steps_mean']:.0f} | {r['time_s_mean']:.0f} |"
        )
    return "\n".join(lines)


def _parse_kv(items) -> tuple:
    out = []
    for it in items or []:
        k, v = it.split("=", 1)
        if v.lower() in ("true", "false"):
            out.append((k, v.lower() == "true"))
            continue
        try:
            v = int(v)
        except ValueError:
            try:
                v = float(v)
            except ValueError:
                pass
        out.append((k, v))
    return tuple(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="one run; prints the accuracy curve")
    for f in dataclasses.fields(RunConfig):
        if f.name in _KV_FIELDS:
            t.add_argument(f"--{f.name}", nargs="*", default=[], help="name=value pairs")
        elif isinstance(f.default, bool):
            t.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        elif f.name in ("window", "early_stop"):
            t.add_argument(
                f"--{f.name}", type=lambda s: None if s.lower() == "none" else float(s), default=f.default
            )
        else:
            t.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    t.add_argument("--save", default=None, help="write the trained model here (safetensors)")
    g = sub.add_parser("grid", help="run (or resume) the grid, then write table + plot")
    g.add_argument("--out", default="runs/match_grid")
    g.add_argument("--tasks", nargs="+", default=list(GridSpec.tasks), choices=sorted(TASK_DEFAULTS))
    g.add_argument("--seq_len", type=int, default=GridSpec.seq_len)
    g.add_argument("--pairs", type=int, nargs="+", default=list(GridSpec.pairs))
    g.add_argument("--window", type=int, default=GridSpec.window)
    g.add_argument("--top_ks", type=int, nargs="+", default=list(GridSpec.top_ks))
    g.add_argument("--block_size", type=int, default=GridSpec.block_size)
    g.add_argument("--seeds", type=int, nargs="+", default=list(GridSpec.seeds))
    g.add_argument("--steps", type=int, default=GridSpec.steps)
    g.add_argument("--set", nargs="*", default=[], help="extra RunConfig fields, name=value")
    g.add_argument("--results", default="tiny_models/results/match", help="table/plot destination")
    g.add_argument("--no_progress", action="store_true")
    tb = sub.add_parser("table", help="table + plot from the finished runs of a grid directory (no training)")
    tb.add_argument("--out", default="runs/match_grid")
    tb.add_argument("--results", default="tiny_models/results/match")
    pl = sub.add_parser("plugin", help="a trained model with its attention swapped at inference")
    pl.add_argument("checkpoint")
    pl.add_argument("--windows", type=int, nargs="+", default=[8, 16])
    pl.add_argument("--top_ks", type=int, nargs="+", default=[1, 2, 4])
    pl.add_argument("--block_size", type=int, default=4)
    pl.add_argument("--n", type=int, default=512)
    pl.add_argument("--out", default=None, help="write the markdown table here")
    pl.add_argument("--pairs", type=int, nargs="+", default=None,
                    help="instead: accuracy vs number of key-value pairs (MQAR), first window only")
    pl.add_argument("--plot", default=None, help="with --pairs: write the accuracy-vs-pairs plot here")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    use_match_chunk()
    if a.cmd == "train":
        d = {f.name: getattr(a, f.name) for f in dataclasses.fields(RunConfig)}
        d.update({k: _parse_kv(getattr(a, k)) for k in _KV_FIELDS})
        d["window"] = None if d["window"] is None else int(d["window"])
        cfg = RunConfig(**d)
        out = train_run(cfg, log=sys.stdout)
        print(
            json.dumps(
                {
                    "name": run_name(cfg),
                    "acc": out["acc"],
                    "steps": out["steps"],
                    "time_s": round(out["time_s"], 1),
                    "num_params": out["num_params"],
                }
            )
        )
        if a.save:
            save_run(out["model"], cfg, a.save, acc=out["acc"], steps=out["steps"])
    elif a.cmd == "table":
        write_results(finished_runs(a.out), a.results)
    elif a.cmd == "plugin":
        model, cfg = load_run(a.checkpoint)
        if a.pairs:
            table = plugin_pairs(model, cfg, a.pairs, window=a.windows[0], top_ks=a.top_ks,
                                 block_size=a.block_size, n=a.n, plot=a.plot)
        else:
            x, y = make_batch(cfg, a.n, DEMO_SEED)
            table = plugin_table(model, x, y, windows=a.windows, top_ks=a.top_ks, block_size=a.block_size)
        print(table)
        if a.out:
            with open(a.out, "w") as f:
                f.write(table + "\n")
    elif a.cmd == "grid":
        spec = GridSpec(
            tasks=tuple(a.tasks),
            seq_len=a.seq_len,
            pairs=tuple(a.pairs),
            window=a.window,
            top_ks=tuple(a.top_ks),
            block_size=a.block_size,
            seeds=tuple(a.seeds),
            steps=a.steps,
            base=dict(_parse_kv(a.set)),
        )
        results = run_grid(spec, a.out, progress=not a.no_progress)
        write_results(results, a.results)


def write_results(results: list[dict], dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
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


if __name__ == "__main__":
    main()
