"""The causal-LM protocol: what the trainers, SCRG and generation need from a model.

Two calls, and nothing else:

* ``lm_logits(model, idx, valid, cache=None) -> [B, T, V]``: next-token logits for token ids ``idx [B, T]``
  whose rows are *left*-padded; ``valid [B, Tk]`` is False at padding keys. Each row's positions start at
  0 at its first valid token, so a row's logits do not depend on the other rows. With a ``cache`` (from
  ``new_cache(model)``), ``idx`` holds only the new tokens and ``valid`` covers every key so far
  (cached + new); the cache is filled in place.
* ``new_cache(model)``: an empty KV cache.

A model serves the protocol either with methods of the same names (``model.lm_logits(idx, valid, cache)``
and ``model.new_cache()``: the tiny GPT has them), or as a transformers causal LM (``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values``). Training on right-padded batches needs only
``logits_of(model, x)``: a plain forward (causal, so padding after a row's end changes nothing before it).
"""

from __future__ import annotations

import torch


def device_of(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def left_pad(rows, device, pad_id: int = 0):  # list of list[int] -> idx [B, L] long, valid [B, L] bool
    """Left-pad token rows with ``pad_id`` (any valid id: padding is masked by ``valid``)."""
    L = max(len(r) for r in rows)
    idx = torch.full((len(rows), L), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), L), dtype=torch.bool)
    for b, r in enumerate(rows):
        if r:
            idx[b, L - len(r) :] = torch.tensor(r, dtype=torch.long)
            valid[b, L - len(r) :] = True
    return idx.to(device), valid.to(device)


def positions(valid: torch.Tensor) -> torch.Tensor:  # [B, Tk] bool -> [B, Tk] long
    """Each row's positions: 0 at its first valid key (and at the padding before it)."""
    return (valid.long().cumsum(1) - 1).clamp_min(0)


def new_cache(model):
    return model.new_cache() if hasattr(model, "new_cache") else {}


def lm_logits(model, idx, valid=None, cache=None):  # [B, T] long, [B, Tk] bool -> [B, T, V]
    if valid is None:
        valid = torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
    if hasattr(model, "lm_logits"):
        return model.lm_logits(idx, valid, cache)
    pos = positions(valid)[:, -idx.shape[1] :]
    kw = dict(input_ids=idx, attention_mask=valid.long(), position_ids=pos)
    if cache is not None:
        kw.update(past_key_values=cache.get("past"), use_cache=True)
    out = model(**kw)
    if cache is not None:
        cache["past"] = out.past_key_values
    return out.logits if hasattr(out, "logits") else out


def logits_of(model, x):  # [B, T] right-padded -> [B, T, V]
    """Logits of a plain forward (a tensor, or an output object with ``.logits``)."""
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def vocab_size(model) -> int:
    """The model's output width: its config's ``vocab_size``, else a one-token forward."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "vocab_size", None):
        return int(cfg.vocab_size)
    with torch.no_grad():
        return int(logits_of(model, torch.zeros(1, 1, dtype=torch.long, device=device_of(model))).shape[-1])


def special_ids(model, eos_id: int | None = None, pad_id: int | None = None) -> tuple[int, int]:
    """(EOS id, padding id) of a model: the given values, else the model's ``eos_id`` / ``pad_id`` attributes
    (the tiny GPT), else its config's ``eos_token_id`` / ``pad_token_id`` (transformers; padding defaults to
    0, any valid id: padding is masked)."""
    cfg = getattr(model, "config", None)
    if eos_id is None:
        eos_id = getattr(model, "eos_id", None)
        if eos_id is None and cfg is not None:
            eos_id = getattr(cfg, "eos_token_id", None)
        if isinstance(eos_id, (list, tuple)):
            eos_id = eos_id[0]
    if eos_id is None:
        raise ValueError(
            "the model names no EOS id (no eos_id attribute, no config.eos_token_id): pass eos_id"
        )
    if pad_id is None:
        pad_id = getattr(model, "pad_id", None)
        if pad_id is None and cfg is not None:
            pad_id = getattr(cfg, "pad_token_id", None)
    return int(eos_id), int(pad_id if pad_id is not None else 0)


# ----------------------------------------------------------------------------------------------------
# final hidden states and the output head (the fused losses of fast.fused start from them)


def head_weight(model):  # -> [V, H] or None
    """The output head's weight when the logits are exactly ``hidden @ weight.T``: a model's own
    ``lm_head_weight()`` (the tiny GPT), or a transformers model's output embedding without bias, logit
    scaling or soft-capping; None otherwise (the losses then take materialised logits)."""
    if hasattr(model, "lm_head_weight"):
        return model.lm_head_weight()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    cfg = getattr(model, "config", None)
    if head is None or getattr(head, "bias", None) is not None or not isinstance(head, torch.nn.Linear):
        return None
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return None
    return head.weight


def lm_hidden(model, x):  # [B, T] right-padded -> [B, T, H]
    """The final hidden states of a plain forward (the input of the output head)."""
    if hasattr(model, "lm_hidden"):
        return model.lm_hidden(x)
    return model.get_decoder()(input_ids=x).last_hidden_state
