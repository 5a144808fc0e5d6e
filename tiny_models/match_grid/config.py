"""Run and grid configuration of the recall experiments, and the task batches of a run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from tiny_models.gpt import GPTConfig
from tiny_models.recall import TASKS

# RunConfig fields holding (name, value) pairs: tuples in the config, name=value words on the command line
_KV_FIELDS = ("task_kwargs", "attn_kwargs", "train_task_kwargs", "early_task_kwargs")


@dataclass(frozen=True)
class RunConfig:
    # defaults: the recipe under which full attention solves MQAR at T=128, 8 pairs (README of results/match)
    task: str = "mqar"
    seq_len: int = 128
    num_kv_pairs: int = 8  # mqar only
    vocab_size: int = 64
    task_kwargs: tuple = ()  # extra (name, value) pairs for the task generator
    # model
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    attention: str = "full"
    window: int | None = None
    attn_kwargs: tuple = ()
    prev_mix: bool = True  # add a learned map of the previous token's embedding (see RecallGPT)
    prev_taps: int = 1  # with prev_mix: how many previous tokens are mixed in (1 to 3; see RecallGPT)
    train_targets: str = "recall"  # MAD, Shakespeare: "lm" trains on every next token (evaluation: recall)
    train_task_kwargs: tuple = ()  # generator (name, value) pairs for training batches only, e.g. test=False
    key_curriculum: int = 0  # MAD fuzzy: training keys grow from 1 to k_motif_size tokens over these steps
    early_task_kwargs: tuple = ()  # generator (name, value) pairs for the first early_steps training batches
    early_steps: int = 0  # e.g. num_facts=1 (Shakespeare): one fact per example before the test form
    # optimisation
    steps: int = 800
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    seed: int = 0
    # evaluation
    eval_every: int = 50
    eval_n: int = 256
    early_stop: float | None = 0.99  # stop once held-out accuracy exceeds this (Zoology stops at 0.99)

    @property
    def min_lr(self) -> float:  # the cosine schedule's floor (fast.training.schedule.lr_at)
        return self.lr * self.min_lr_frac

    def model_config(self) -> GPTConfig:
        return GPTConfig(
            vocab_size=self.vocab_size,
            block_size=self.seq_len,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_embd=self.n_embd,
            attention=self.attention,
            window=self.window,
            attn_kwargs=tuple(tuple(p) for p in self.attn_kwargs),
        )

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        for k in _KV_FIELDS:
            d[k] = tuple(tuple(p) for p in d.get(k, ()))
        return cls(**d)


# per-task settings of a grid (MAD's baseline vocabularies; bytes for Shakespeare)
TASK_DEFAULTS = {
    "mqar": {},
    "mad_in_context": {"vocab_size": 16},
    "mad_noisy": {"vocab_size": 32},
    "mad_fuzzy": {"vocab_size": 16},
    "shakespeare": {"vocab_size": 256},
}


@dataclass(frozen=True)
class GridSpec:
    tasks: tuple = ("mqar",)
    seq_len: int = 128
    pairs: tuple = (8,)  # MQAR only; the other tasks run once per seed
    window: int = 8
    top_ks: tuple = (1, 4)
    block_size: int = 4
    seeds: tuple = (0, 1, 2)
    steps: int = 600
    base: dict = field(default_factory=dict)  # extra RunConfig fields shared by every run


DEMO_SEED = 777_777_777  # fresh examples (demo, notebook): no run trains (1_000_003 r + s) or evaluates on it


def run_name(cfg: RunConfig) -> str:
    att = cfg.attention if cfg.window is None else f"{cfg.attention}{cfg.window}"
    kw = "".join(f"_{k}{v}" for k, v in cfg.attn_kwargs)
    return f"{cfg.task}_T{cfg.seq_len}_P{cfg.num_kv_pairs}_{att}{kw}_s{cfg.seed}"


def make_batch(cfg: RunConfig, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples of the run's task, ``[n, seq_len]`` inputs and labels."""
    kw = dict(cfg.task_kwargs)
    if cfg.task == "mqar":
        return TASKS["mqar"](
            n, seq_len=cfg.seq_len, num_kv_pairs=cfg.num_kv_pairs, vocab_size=cfg.vocab_size, seed=seed, **kw
        )
    if cfg.task == "shakespeare":
        return TASKS["shakespeare"](n, seq_len=cfg.seq_len, seed=seed, **kw)
    if cfg.task in TASKS:
        return TASKS[cfg.task](n, seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, seed=seed, **kw)
    raise ValueError(f"unknown task {cfg.task!r}; known: {sorted(TASKS)}")


def heldout(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return make_batch(cfg, cfg.eval_n, 10**9 + cfg.seed)


def training_config(cfg: RunConfig, step: int | None = None) -> RunConfig:
    """The config whose batches train the model: ``cfg`` with ``train_task_kwargs`` added to its generator
    options (e.g. ``test=False``: MAD's training keys of 1 to ``k_motif_size`` tokens), and for
    ``train_targets="lm"`` (MAD and Shakespeare tasks) the same examples labelled with every next token (MAD's
    training targets; byte-level language modelling for Shakespeare). Held-out accuracy always uses ``cfg``
    itself: the recall targets of the test form.

    ``key_curriculum = S > 0`` (tasks with key motifs, i.e. MAD fuzzy recall): the batch of training ``step``
    (1-based) has keys of exactly ``1 + (step - 1) * k // S`` tokens while ``step <= S`` (``k`` =
    ``k_motif_size``, 3 by default), so training starts on single-token keys (plain in-context recall with
    multi-token values, which the recipe learns within ~150 steps) and moves to 2- then 3-token keys in equal
    stages; after step ``S`` the keys have ``k`` tokens, the test form. [RECON: a curriculum is our choice,
    not MAD's, which trains on keys of 1-3 tokens mixed from the start.]

    ``early_steps = S > 0`` with ``early_task_kwargs``: the batches of steps ``1..S`` add those generator
    options (after ``train_task_kwargs``), e.g. ``num_facts=1 num_queries=1`` for the Shakespeare task: one
    fact per example, so the answer is the digits after the only other ``=`` (a copy, no key to match),
    before the test form needs the key. [RECON: our choice, as for the key curriculum.]
    """
    if cfg.train_targets not in ("recall", "lm"):
        raise ValueError(f"train_targets must be 'recall' or 'lm', got {cfg.train_targets!r}")
    extra = tuple(tuple(p) for p in cfg.train_task_kwargs)
    if cfg.train_targets == "lm":
        if not (cfg.task.startswith("mad_") or cfg.task == "shakespeare"):
            raise ValueError(
                f"train_targets='lm' is defined for the MAD and Shakespeare tasks only, got task={cfg.task!r}"
            )
        extra += (("targets", "lm"),)
    if cfg.key_curriculum < 0:
        raise ValueError(f"key_curriculum must be >= 0, got {cfg.key_curriculum}")
    if cfg.key_curriculum > 0:
        k = dict(cfg.task_kwargs).get("k_motif_size", 3 if cfg.task == "mad_fuzzy" else 1)
        if k < 2:
            raise ValueError(
                f"key_curriculum needs keys of several tokens (MAD fuzzy recall), got task={cfg.task!r} "
                f"with k_motif_size={k}"
            )
        if dict(extra).get("test", True) is False:
            raise ValueError("key_curriculum sets the key size itself; it cannot be combined with test=False")
        if step is not None and step <= cfg.key_curriculum:
            extra += (("k_motif_size", 1 + (step - 1) * k // cfg.key_curriculum),)
    if cfg.early_steps < 0:
        raise ValueError(f"early_steps must be >= 0, got {cfg.early_steps}")
    if bool(cfg.early_steps) != bool(cfg.early_task_kwargs):
        raise ValueError(
            f"early_steps={cfg.early_steps} and early_task_kwargs={cfg.early_task_kwargs!r} go together"
        )
    if step is not None and step <= cfg.early_steps:
        extra += tuple(tuple(p) for p in cfg.early_task_kwargs)
    if not extra:
        return cfg
    kw = dict(cfg.task_kwargs)
    kw.update(dict(extra))  # training-only options win over the shared ones
    return dataclasses.replace(cfg, task_kwargs=tuple(kw.items()))
