"""Paired differences with a bootstrap interval, shared by the experiment drivers."""

from __future__ import annotations

import numpy as np


def paired_difference(d, rng=None, n_boot: int = 2000) -> dict:
    """Summary of paired differences ``d`` of shape ``[seeds, items]`` (one row per training seed, the same
    held-out items in every row): ``mean`` (over items of the seed-averaged difference), a 95 % percentile
    bootstrap interval over items (``lo``, ``hi``: the spread over held-out items, not over training runs),
    ``sd``, the standard deviation over seeds of the per-seed mean (0 for one seed), and ``seeds``."""
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise ValueError(f"paired differences must be [seeds >= 1, items >= 1], got shape {d.shape}")
    rng = np.random.default_rng(0) if rng is None else rng
    per_item = d.mean(0)
    boot = per_item[rng.integers(0, len(per_item), (n_boot, len(per_item)))].mean(1)
    per_seed = d.mean(1)
    return {
        "mean": float(per_item.mean()),
        "lo": float(np.percentile(boot, 2.5)),
        "hi": float(np.percentile(boot, 97.5)),
        "sd": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0,
        "seeds": len(per_seed),
    }
