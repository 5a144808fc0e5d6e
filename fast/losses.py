"""MGSR token + span distillation terms in one call, for the distillation trainer.

``L = w_dac * L_DAC-KLD + w_span * L_span`` (the paper sums the terms with weight 1: docs/papers.md; SFT
and SCRG live elsewhere). Both terms are computed teacher-forced on the same sequence; the teacher logits are
treated as constants. The DAC-KL term is the mean over response tokens (``mask``); the span term is the mean
over all adjacent in-span pairs of the batch (0 if there are none).
"""
from __future__ import annotations

import torch

from fast.dac_kl import DACKL
from fast.span import span_loss


def mgsr_token_span_loss(t_logits, s_logits, *, dac: DACKL, spans=None, mask=None, w_dac: float = 1.0,
                         w_span: float = 1.0, squared: bool = False, backend: str | None = None,
                         validate: bool = True):
    """``t_logits, s_logits``: ``[B, T, V]``; ``dac``: a :class:`fast.dac_kl.DACKL` (owns the bounds
    sub-network, so its parameters receive gradients too); ``spans``: int ``[B, S, 2]`` padded with -1
    (``None``: no span term); ``mask``: ``[B, T]`` response-token mask for DAC-KL (``None``: every token).
    ``backend``: overrides ``dac.backend`` and is used for the span kernel (``None``: ``dac.backend``).

    Returns ``(loss, parts)`` with ``parts = {"dac": ..., "span": ..., "upper", "lower", "kept"}`` (detached
    per-token diagnostics for logging)."""
    if t_logits.dim() != 3 or t_logits.shape != s_logits.shape:
        raise ValueError(f"logits must both be [B, T, V], got {tuple(t_logits.shape)} "
                         f"and {tuple(s_logits.shape)}")
    if mask is not None and mask.shape != t_logits.shape[:2]:
        raise ValueError(f"mask must be [B, T]={tuple(t_logits.shape[:2])}, got {tuple(mask.shape)}")
    be = dac.backend if backend is None else backend
    old = dac.backend
    dac.backend = be
    try:
        l_dac, info = dac(t_logits, s_logits, mask)
    finally:
        dac.backend = old
    if spans is None or w_span == 0:
        l_span = torch.zeros((), dtype=l_dac.dtype, device=l_dac.device)
    else:
        l_span = span_loss(t_logits, s_logits, spans, squared=squared, backend=be, validate=validate)
    loss = w_dac * l_dac + w_span * l_span
    diag = {k: info[k] for k in ("upper", "lower", "kept")}
    return loss, dict(dac=l_dac.detach(), span=l_span.detach(), **diag)
