"""The recall model (the tiny GPT with a previous-token mix), its head-at-labels forward, and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from fast.training.checkpoint import load_tensors, save_weights
from tiny_models.gpt import GPT, GPTConfig, apply_rope, rope_cos_sin
from tiny_models.match_grid.config import RunConfig


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


CKPT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "match")


def save_run(model: RecallGPT, cfg: RunConfig, path: str, **meta) -> None:
    """fp32 weights + the run config (JSON) in the safetensors metadata (``fast.training.checkpoint``)."""
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    meta = {"run_config": json.dumps(dataclasses.asdict(cfg)), **{k: json.dumps(v) for k, v in meta.items()}}
    save_weights(model, path, meta)


def load_run(path: str) -> tuple[RecallGPT, RunConfig]:
    """(model, run config) of a checkpoint written by :func:`save_run` (the grid, ``train --save``)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    sd, meta = load_tensors(path, checksum=False)  # files written before checksums were added have none
    if "run_config" not in meta:
        raise ValueError(f"checkpoint {path} has no run_config in its metadata (not written by save_run?)")
    cfg = RunConfig.from_dict(json.loads(meta["run_config"]))
    model = new_model(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg


MATCH_CHUNK = 16  # query rows per step of fast.match's torch backend in these experiments


def use_match_chunk(chunk: int = MATCH_CHUNK) -> None:
    """Route attention="match" through ``fast.match.match_attention_kv(..., chunk=chunk)``.

    Same function, checks and results as the model's own registration; only the number of query rows per
    step of the torch backend changes. At T = 128 the default (128 rows, the whole sequence) makes the
    window part a dense ``[T, T]`` product with the values broadcast per query row; 16-row chunks keep every
    intermediate at ``[16, 16 + w - 1]``, which is several times faster on a CPU.
    """
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
