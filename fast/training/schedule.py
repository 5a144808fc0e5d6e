"""The learning-rate schedule of every trainer: linear warmup, then cosine decay."""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then cosine from ``lr`` to ``min_lr`` at ``steps``
    (and ``min_lr`` beyond). Steps count from 1; step 0 has rate 0 when there is a warmup."""
    if step <= warmup:
        return lr * step / max(warmup, 1)
    frac = (step - warmup) / max(steps - warmup, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def lr_at(step: int, cfg) -> float:
    """:func:`warmup_cosine` with a run config's ``lr``, ``min_lr``, ``warmup`` and ``steps``."""
    return warmup_cosine(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup, steps=cfg.steps)
