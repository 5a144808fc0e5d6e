"""Checkpoint I/O of the tiny GPT: ``fast.training.checkpoint``'s format with the model config as metadata.

A model file holds fp32 weights (the tied output head once, as ``wte.weight``), the ``GPTConfig`` as JSON
under ``config``, a sha256 of the tensors, and any other metadata JSON-encoded (step, run config, ...).
"""

from __future__ import annotations

import dataclasses
import json

import torch

from fast.training.checkpoint import CheckpointError, load_tensors, save_weights
from tiny_models.gpt import GPT, GPTConfig


def save_model(model: GPT, path: str, **meta) -> None:
    """fp32 weights + config JSON metadata (other keyword values are stored JSON-encoded)."""
    save_weights(model, path, {"config": model.cfg.to_json(), **{k: json.dumps(v) for k, v in meta.items()}})


def saver(model: GPT, path: str, meta: dict) -> None:
    """:func:`save_model` in the form the trainers of ``fast.training`` call it."""
    save_model(model, path, **meta)


def load_model(path: str, *, config: GPTConfig | None = None, device="cpu", dtype=torch.float32):
    """(model, metadata) from ``model.safetensors``. ``config`` (optional) must equal the stored one."""
    tensors, meta = load_tensors(path)
    if "config" not in meta:
        raise CheckpointError(f"checkpoint {path} has no model config in its metadata")
    stored = GPTConfig.from_json(meta["config"])
    if config is not None and config != stored:
        diff = {
            f.name: (getattr(stored, f.name), getattr(config, f.name))
            for f in dataclasses.fields(GPTConfig)
            if getattr(stored, f.name) != getattr(config, f.name)
        }
        raise CheckpointError(
            f"checkpoint {path} was saved with a different model config (stored, wanted): {diff}"
        )
    model = GPT(stored)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit GPT({stored}): {e}") from e
    extra = {k: json.loads(v) for k, v in meta.items() if k not in ("config", "sha256")}
    return model.to(device=device, dtype=dtype).eval(), extra
