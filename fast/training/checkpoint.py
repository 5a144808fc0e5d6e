"""Checkpoint files: safetensors with JSON metadata and a sha256 of the tensors, written atomically.

One format serves every trainer. A model file holds fp32 weights plus string metadata (the model config as
JSON for the tiny GPT, the step, the run config); a state file holds the optimizer moments, RNG states and
whatever else a run needs to continue exactly. Loading checks the checksum, so a truncated or garbled file
is an error, not a silently different model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match the model / run it is loaded into."""


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str) -> None:
    """Write atomically (tmp file + rename), so a run killed mid-write leaves the previous checkpoint."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**meta, "sha256": tensors_sha256(tensors)}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_tensors(path: str, *, checksum: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a checkpoint. The checksum is required, or with ``checksum=False`` checked only
    where the file has one (files written before checksums were added)."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {e}") from e
    if checksum and "sha256" not in meta:
        raise CheckpointError(
            f"checkpoint {path} has no sha256 in its metadata (not written by fast.training?)"
        )
    if "sha256" in meta and tensors_sha256(tensors) != meta["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: the tensor sha256 does not match its metadata")
    return tensors, meta


def save_weights(model: torch.nn.Module, path: str, meta: dict[str, str]) -> None:
    """fp32 weights of ``model`` and string metadata. Tied weights (one tensor under two names, e.g. an
    embedding shared with the output head) are stored under each name, as ``load_state_dict`` expects."""
    seen, tensors = set(), {}
    for k, v in model.state_dict().items():
        v = v.float()
        tensors[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    save_tensors(tensors, meta, path)


def load_weights(model: torch.nn.Module, path: str) -> dict[str, str]:
    """Load a weights file into ``model`` (strict) and return its metadata."""
    tensors, meta = load_tensors(path)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit {type(model).__name__}: {e}") from e
    return meta


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], str]:
    """The optimizer's moments as ``{prefix}.{param index}.{name}`` tensors (cloned: a loaded optimizer must
    never share, and so double-update, them) and its param groups as JSON."""
    sd = opt.state_dict()
    tensors = {f"{prefix}.{i}.{k}": v.clone() for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, json.dumps(sd["param_groups"])


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict, prefix: str, param_groups: str) -> None:
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith(prefix + "."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(param_groups)})


def check_same_run(saved: dict, cfg, free: set, path: str) -> None:
    """A run resumes only under the config it was started with, up to the fields in ``free``."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as saved: tuples read back as lists
    diff = {k: (saved.get(k), now[k]) for k in now if k not in free and saved.get(k) != now[k]}
    if diff:
        raise CheckpointError(f"cannot resume from {path}: the run config differs (saved, now): {diff}")
