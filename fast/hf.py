"""MATCH and sliding-window attention as transformers attention implementations.

    import fast.hf  # registers "match" and "swa"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="match")
    model.config.match_window, model.config.match_top_k = 512, 8  # or set them in config.json

Importing this module registers both names with transformers' attention-function registry
(``AttentionInterface``) and its attention-mask registry (``AttentionMaskInterface``: the 2-D padding mask,
as for FlashAttention, since the window and the retrieval are computed here). Prefill, chunked prefill and
KV-cache decoding all work: one query against a cache runs ``fast.match.match_decode``, equal query and
key lengths without padding run ``fast.match.match_attention`` (the Triton kernels on CUDA), everything else
``fast.match.match_attention_kv``. ``"swa"`` runs ``fast.attention.attention_kv``.

Settings, read from the model config at every call (defaults in :data:`DEFAULTS`):

* ``match_window`` -- the window ``w``: a query sees the ``w`` keys ending at itself (itself included).
  transformers' own ``sliding_window = w`` (Mistral's mask, ``kv_idx > q_idx - w``) counts the same ``w``
  keys, so ``"swa"`` with ``match_window = w`` equals eager attention with ``sliding_window = w``;
* ``match_top_k`` -- retrieved tokens (``match_block_size = 1``) or blocks per query (MATCH only);
* ``match_block_size`` -- keys per retrieved block (MATCH only);
* ``match_mode`` -- ``"joint"`` (one softmax over window + retrieved keys) or ``"gated"`` (two softmaxes
  mixed by ``sigmoid(match_gate_logit)``; a pretrained model has no learned gate, so the gate is the fixed
  logit ``match_gate_logit``, default 0).

MATCH retrieves from the whole context, so the model's own sliding-window cache must be off: a config with
``sliding_window`` in use (Mistral, or Qwen2 with ``use_sliding_window``) keeps only the last keys in its
cache and is refused with a ``ValueError``; set ``config.sliding_window = None`` first. Families served:
the decoder-only models whose attention calls the registry with ``(query [B, H, T, D], key, value [B, H_kv,
S, D])`` and rotary positions applied before it -- Llama, Qwen2, Qwen3 and Mistral are tested; GQA is
supported. Other model types are refused by :func:`check_model` with a clear error.
"""

from __future__ import annotations

import math

import torch

from fast.attention import attention_kv
from fast.match import match_attention, match_attention_kv, match_decode

DEFAULTS = {
    "match_window": 512,
    "match_top_k": 8,
    "match_block_size": 64,
    "match_mode": "joint",
    "match_gate_logit": 0.0,
}
SERVED = ("llama", "qwen2", "qwen3", "mistral")
MODES = ("joint", "gated")


def settings(config, *, retrieval: bool = True) -> dict:
    """The MATCH settings of a model config (attribute, else default), validated: ``ValueError`` names the
    attribute and its value."""
    out = {k: getattr(config, k, v) for k, v in DEFAULTS.items()}
    checks = [("match_window", 1)] + ([("match_top_k", 0), ("match_block_size", 1)] if retrieval else [])
    for name, lo in checks:
        v = out[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"config.{name} must be an integer >= {lo}, got {v!r}")
    if retrieval and out["match_mode"] not in MODES:
        raise ValueError(f"config.match_mode must be one of {MODES}, got {out['match_mode']!r}")
    g = out["match_gate_logit"]
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
        raise ValueError(f"config.match_gate_logit must be a finite number, got {g!r}")
    return out


def check_model(config) -> None:
    """Refuse a model the registry cannot serve: an untested family, or a sliding-window KV cache (which
    drops the keys MATCH retrieves)."""
    kind = getattr(config, "model_type", None)
    if kind not in SERVED:
        raise ValueError(
            f"attention 'match'/'swa' serves model types {SERVED}, got {kind!r}: its attention layer may not "
            "call the registry with rotary-embedded [B, H, T, D] queries and keys"
        )
    window = getattr(config, "sliding_window", None)
    in_use = window is not None and (kind == "mistral" or getattr(config, "use_sliding_window", False))
    if in_use:
        raise ValueError(
            f"config.sliding_window={window} makes the KV cache keep only the last {window} keys, which "
            "MATCH retrieves from: set config.sliding_window = None (the window is config.match_window)"
        )


def _key_valid(attention_mask, key):  # 2-D bool [B, S'] (S' >= S) or None -> [B, S] or None
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            "expected the 2-D padding mask of the 'match'/'swa' mask function, got "
            f"{tuple(attention_mask.shape)}"
        )
    return attention_mask[:, -key.shape[2] :].bool()


def match_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: ``(attn_output [B, T, H, D], None)``."""
    config = module.config
    check_model(config)
    s = settings(config)
    key_valid = _key_valid(attention_mask, key)
    tq, tk = query.shape[2], key.shape[2]
    gate = None
    if s["match_mode"] == "gated":
        gate = torch.full((), float(s["match_gate_logit"]), dtype=query.dtype, device=query.device)
    kw = dict(
        window=s["match_window"],
        top_k=s["match_top_k"],
        block_size=s["match_block_size"],
        mode=s["match_mode"],
        gate_logit=gate,
        scale=scaling,
    )
    if tq == 1 and tk > 1:
        out = match_decode(query, key, value, key_valid=key_valid, **kw)
    elif tq == tk and key_valid is None:
        out = match_attention(query, key, value, **kw)
    else:
        out = match_attention_kv(query, key, value, key_valid=key_valid, **kw)
    return out.transpose(1, 2).contiguous(), None


def swa_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Sliding-window attention of ``config.match_window`` keys (itself included): ``(out [B, T, H, D],
    None)``."""
    s = settings(module.config, retrieval=False)
    out = attention_kv(
        query, key, value, window=s["match_window"], key_valid=_key_valid(attention_mask, key), scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"match"`` and ``"swa"`` (done on import; calling it again is harmless)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register("match", match_attention_forward)
    AttentionInterface.register("swa", swa_attention_forward)
    AttentionMaskInterface.register("match", flash_attention_mask)
    AttentionMaskInterface.register("swa", flash_attention_mask)


register()
