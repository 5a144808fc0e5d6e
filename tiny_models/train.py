"""Train a tiny GPT on the instruction tasks or the Shakespeare plays (``fast.training.sft``). CLI, function.

    python -m tiny_models.train --out_dir runs/x --n_layer 2 --n_embd 96 --n_head 2 --steps 400
    torchrun --standalone --nproc_per_node 2 -m tiny_models.train --out_dir runs/x ...   # DDP (gloo on CPU)

A second SFT stage starts from earlier weights with ``--init_from path/model.safetensors`` (fresh AdamW state
and schedule; the model config must match). Resume, logs and the loss normalisation are the SFT trainer's
(``fast/training/sft.py``).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from fast.training import sft
from fast.training.cli import add_config_flags
from fast.training.loop import setup_process
from fast.training.sft import SFTConfig
from tiny_models.gpt import GPT, PAD, GPTConfig
from tiny_models.model_io import load_model, saver
from tiny_models.tasks import IGNORE, build_dataset, example_ids, shakespeare_text


@dataclass(frozen=True)
class TrainConfig(SFTConfig):
    # model
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    attention: str = "full"
    window: int | None = None
    attn_kwargs: tuple = ()  # MATCH options, (name, value) pairs; command line: "top_k=8,block_size=32"
    # data: "instruct" (tiny_models.tasks) or "shakespeare" (LM on the plays)
    data: str = "instruct"
    data_seed: int = 0
    n_per_family: int = 2000
    text_chars: int = 2_000_000
    init_from: str | None = (
        None  # start from these weights (fresh optimizer and schedule): a second SFT stage
    )

    def model_config(self) -> GPTConfig:
        return GPTConfig(
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            block_size=self.block_size,
            attention=self.attention,
            window=self.window,
            attn_kwargs=parse_kv(self.attn_kwargs),
        )


def parse_kv(kv) -> tuple:
    """``(name, value)`` pairs from a tuple of pairs or a ``"name=value,name=value"`` string (ints parsed)."""
    if not isinstance(kv, str):
        return tuple(tuple(p) for p in kv)
    if kv.strip() in ("", "()", "none"):
        return ()
    out = []
    for item in filter(None, (x.strip() for x in kv.split(","))):
        name, _, value = item.partition("=")
        if not name or not value:
            raise ValueError(f"attn_kwargs: expected name=value, got {item!r}")
        out.append((name, int(value) if value.lstrip("-").isdigit() else value))
    return tuple(out)


class InstructData:
    """SFT examples of tiny_models.tasks: loss on the response tokens only (labels -100 on the prompt)."""

    pad_id = PAD

    def __init__(self, cfg: TrainConfig):
        ds = build_dataset(cfg.data_seed, n_per_family=cfg.n_per_family)
        self.train = [example_ids(e.prompt, e.response) for e in ds["train"]]
        self.valid = [example_ids(e.prompt, e.response) for e in ds["valid"]][: cfg.eval_examples]
        self.block_size = cfg.block_size
        self.counts = np.array([sum(t != IGNORE for t in lab[: cfg.block_size]) for _, lab in self.train])

    def __len__(self):
        return len(self.train)

    def get(self, idx):  # [n] -> list of (inputs, labels)
        return [self.train[i] for i in idx]


class TextData:
    """Language modelling on windows of the Shakespeare plays (every position is a target)."""

    pad_id = PAD

    def __init__(self, cfg: TrainConfig):
        ids = np.frombuffer(shakespeare_text(cfg.text_chars).encode("utf-8"), dtype=np.uint8).astype(np.int64)
        n_val = max(len(ids) // 20, cfg.block_size + 2)
        self.ids, val = ids[:-n_val], ids[-n_val:]
        self.block_size = cfg.block_size
        r = np.random.default_rng(0)
        starts = r.integers(0, len(val) - cfg.block_size - 1, size=min(cfg.eval_examples, 64))
        self.valid = [self._window(val, s) for s in starts]
        self.counts = None

    def _window(self, ids, s):
        w = ids[s : s + self.block_size + 1].tolist()
        return w[:-1], w[1:]

    def __len__(self):
        return len(self.ids) - self.block_size - 1

    def get(self, idx):
        return [self._window(self.ids, i) for i in idx]

    def n_tokens(self, idx):
        return len(idx) * self.block_size


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns {"losses": [...], "val": [...], "elapsed_s", "step", "num_params",
    "model"}. ``losses`` are only the steps run in this call. Under torchrun every rank calls this."""
    world_rank_device = setup_process(cfg.device, cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    data = InstructData(cfg) if cfg.data == "instruct" else TextData(cfg)
    model = GPT(cfg.model_config())
    if cfg.init_from:  # on resume the trainer's checkpoint overrides these weights
        init, _ = load_model(cfg.init_from, config=cfg.model_config())
        model.load_state_dict(init.state_dict())
    out = sft.train(cfg, model, data, save_model=saver, world_rank_device=world_rank_device)
    return {**out, "num_params": model.num_params()}


def parse_config(cls, argv=None, *, description: str = "", extra=None) -> dict:
    """The fields of a dataclass config from ``--field value`` flags (``fast.training.cli``);
    ``extra(parser)`` adds flags of its own."""
    p = argparse.ArgumentParser(description=description)
    if extra is not None:
        extra(p)
    add_config_flags(p, cls)
    return vars(p.parse_args(argv))


def main(argv=None) -> None:
    cfg = TrainConfig(**parse_config(TrainConfig, argv, description=__doc__.split("\n")[0]))
    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        last = out["val"][-1][1] if out["val"] else float("nan")
        print(
            json.dumps(
                {
                    "step": out["step"],
                    "final_loss": out["losses"][-1] if out["losses"] else None,
                    "val_loss": last,
                    "elapsed_s": round(out["elapsed_s"], 1),
                    "num_params": out["num_params"],
                }
            )
        )


if __name__ == "__main__":
    main()
