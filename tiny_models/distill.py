"""Distil the tiny teacher into the tiny student with any method of the registry. CLI and function.

    python -m tiny_models.distill --method mgsr --out_dir runs/mgsr --steps 200
    python -m tiny_models.distill --list                                   # the registry, one line per method
    torchrun --standalone --nproc_per_node 2 -m tiny_models.distill --method kd --out_dir runs/kd ...   # DDP

The methods (``fast/training/methods.py``) and the trainer (``fast/training/distill.py``) know no tiny GPT
and no task: this module loads the two checkpoints, builds the instruction tasks of ``tiny_models.tasks``
as (prompt ids, response ids) pairs, and decodes generations to text for the validation ROUGE-L.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from fast.training import distill as _distill
from fast.training.distill import Distiller, validation_subset  # noqa: F401  (re-exported for the tiny models)
from fast.training.loop import read_log, setup_process
from fast.training.methods import BASELINES, METHODS, describe, resolve  # noqa: F401  (re-exported)
from tiny_models.model_io import load_model, saver
from tiny_models.tasks import build_dataset, decode, encode, prompt_ids
from tiny_models.train import parse_config

CHECKPOINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")


@dataclass(frozen=True)
class DistillConfig(_distill.DistillConfig):
    teacher: str = os.path.join(CHECKPOINTS, "teacher.safetensors")
    student: str = os.path.join(CHECKPOINTS, "student.safetensors")
    # data (tiny_models.tasks)
    data_seed: int = 0
    n_per_family: int = 2000


def as_pairs(examples) -> list[tuple[list[int], list[int]]]:
    """``tiny_models.tasks.Example``s as the trainer's (prompt ids, response ids) pairs."""
    return [(prompt_ids(e.prompt), encode(e.response)) for e in examples]


def train(cfg: DistillConfig, *, teacher=None, student=None) -> dict:
    """Run (or resume) one method; ``teacher``/``student`` (optional): models to use instead of the checkpoint
    files (the student is trained in place). Returns ``fast.training.distill.train``'s dict."""
    cfg = resolve(cfg)
    _, _, device = setup_process(cfg.device, cfg.threads)
    if teacher is None:
        teacher, _ = load_model(cfg.teacher, device=device)
    if student is None:
        student, _ = load_model(cfg.student, device=device)
    ds = build_dataset(cfg.data_seed, n_per_family=cfg.n_per_family)
    return _distill.train(
        cfg, teacher, student, as_pairs(ds["train"]), as_pairs(ds["valid"]), decode=decode, save_model=saver
    )


def main(argv=None) -> None:
    def flags(p):
        p.add_argument("--list", action="store_true", help="print the method registry and exit")

    a = parse_config(DistillConfig, argv, description=__doc__.split("\n")[0], extra=flags)
    if a.pop("list"):
        print(describe())
        raise SystemExit(0)
    cfg = DistillConfig(**a)
    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        recs = read_log(cfg.out_dir)
        vals = [r["val_rougeL"] for r in recs if "val_rougeL" in r]
        print(
            json.dumps(
                {
                    "method": cfg.method,
                    "step": out["step"],
                    "final_loss": out["losses"][-1] if out["losses"] else None,
                    "best_val_rougeL": max(vals) if vals else None,
                    "elapsed_s": round(out["elapsed_s"], 1),
                }
            )
        )


if __name__ == "__main__":
    main()
