"""The distillation trainer: one method of ``fast.training.methods.METHODS`` on a (teacher, student) pair of
causal LMs (``fast.training.lm``) and a dataset of (prompt ids, response ids).

Shared by all methods: a frozen teacher, AdamW + warmup/cosine (``fast.training.schedule``), validation
every ``eval_every`` steps with the best student (greedy ROUGE-L) kept as ``best.safetensors``,
``log.jsonl`` / ``log.csv``, tqdm, and exact resume.

Why the run is exactly resumable: every random draw of step ``s`` (which examples, the adaptive sampler's
coin, every generation) comes from generators seeded by ``(seed, s, rank)``; the rest of the state -- student
weights, both AdamW states (the student's and the DAC-KL bounds sub-network's), the bounds sub-network, the
replay buffer, DistiLLM's adaptive threshold and last validation loss, the best validation ROUGE-L -- is in
the checkpoint. A killed and resumed run reproduces the uninterrupted run bit for bit (tested).

Loss normalisation (as in ``fast.training.sft``): each token-level term is ``sum over the step's tokens /
number of tokens of the whole step`` (all ranks; counts are all-reduced), the span term ``sum over pairs /
pairs of the step``; each rank backpropagates its share times the world size because DDP averages
gradients. So two ranks with ``batch_size`` b each equal one process with 2b on the ground-truth methods
(tested for ``kd``). Methods that generate draw from per-rank generators, so their DDP runs are valid but
not equal to one process.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fast.dac_kl import DACKL
from fast.training.checkpoint import (
    check_same_run,
    load_optimizer,
    load_tensors,
    load_weights,
    optimizer_tensors,
    save_tensors,
)
from fast.training.data import IGNORE, collate, sft_example
from fast.training.evaluate import generate_texts, score_texts
from fast.training.lm import device_of, head_weight, lm_hidden, logits_of, special_ids, vocab_size
from fast.training.loop import adamw, run_loop, setup_process, start_logs, step_indices, write_log
from fast.training.methods import METHODS, Plan, _gen, _mgsr_objective, _seed, resolve
from fast.training.schedule import lr_at


@dataclass(frozen=True)
class DistillConfig:
    method: str = "mgsr"
    out_dir: str = "runs/distill"
    block_size: int = 160
    max_new_tokens: int = 48  # student / teacher generations during training (and validation decoding)
    # optimisation: DistiLLM's GPT-2 settings [REF 2402.03898]
    # (AdamW, wd 1e-2, clip 1, cosine, warmup 0, lr 5e-4)
    steps: int = 200
    batch_size: int = 16  # examples per rank per step
    grad_accum: int = 1  # micro-batches per step (the batch_size examples split in this many)
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup: int = 0
    weight_decay: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    clip: float = 1.0
    seed: int = 1
    # generation (DistiLLM / SCRG sampler: T 1, top_k 0, top_p 1)
    gen_temperature: float = 1.0
    # baselines
    skew_alpha: float = 0.1  # DistiLLM's skew KL
    distillm_loss: str = "skew_forward_kl"  # or skew_reverse_kl (DistiLLM's SRKL)
    gkd_lambda: float = 0.5  # on-policy fraction (DistiLLM's gkd script: mixed-alpha 0.5)
    gkd_beta: float = 0.5  # JSD(beta) [RECON]
    minillm_alpha: float = 0.2  # teacher-mix weight of MiniLLM's sampling policy (arXiv 2306.08543)
    minillm_w_max: float = 5.0  # clip of the per-token importance weight q / p_mix [RECON]
    # DistiLLM's adaptive off-policy schedule [REF]: its OpenLLaMA2 script's 0.2 / 0.2 [RECON]
    # (its GPT-2 script: init_threshold 0.0 / loss_eps 0.1)
    init_threshold: float = 0.2
    loss_eps: float = 0.2
    capacity: int = 1000
    replay_ratio: str = "decreasing"  # decreasing | increasing | constant
    # MGSR (weights 1/1/1 as stated; SCRG frequency 1)
    w_sft: float = 1.0
    w_token: float = 1.0
    w_span: float = 1.0
    token_loss: str = "dac_kl"  # dac_kl or a divergence name (the Table 3c ablation)
    scrg_frequency: int = 1  # 0 = no SCRG
    scrg_teacher_token: str = "sample"  # sample | argmax
    span_mode: str = "phrase"  # phrase | word | window (reference.span.extract_spans)
    span_squared: bool = False
    # quantile semantics of (u, l): nontarget (shares of the teacher's non-target mass) | value | mass; with
    # value or mass the band keeps about 1e-5 / 3e-2 of the shipped tiny teacher's mass (docs/mgsr.md)
    dac_bounds: str = "nontarget"
    dac_k: int = 64
    dac_hidden: int = 256
    dac_lr: float | None = None  # None: the student's lr
    # (upper, lower): constant levels instead of the sub-network (the paper's fixed-clipping ablation)
    dac_fixed: tuple | None = None
    # bookkeeping
    eval_every: int = 50  # validation CE (adaptive schedule) + greedy ROUGE-L (checkpoint selection)
    eval_examples: int = 64
    ckpt_every: int = 50
    stop_after: int | None = None
    resume: bool = False
    threads: int | None = None
    progress: bool = True
    device: str = "auto"
    backend: str = "auto"  # loss backend: auto (triton on CUDA), torch, triton
    # the losses from the final hidden states and the output head, chunk by chunk (fast.fused), where both
    # models expose them, in one process, for every method but MiniLLM; False: materialised logits
    fused: bool = True
    # an offline teacher (fast.teacher_cache, path prefix of the shards) for kd: its sparse log-probs on the
    # ground truth replace the teacher's forward
    teacher_cache: str | None = None


RESUME_FREE = {
    "out_dir",
    "stop_after",
    "resume",
    "threads",
    "progress",
    "device",
    "ckpt_every",
    "backend",
    "fused",
}


def _pack(tensors: dict, name: str, seqs: list) -> None:
    """Token sequences of different lengths as two int64 tensors, ``<name>.len`` and ``<name>.ids``."""
    tensors[f"{name}.len"] = torch.tensor([len(t) for t in seqs], dtype=torch.int64)
    tensors[f"{name}.ids"] = torch.tensor([v for t in seqs for v in t], dtype=torch.int64)


def _unpack(tensors: dict, name: str) -> list[list[int]]:
    """The sequences :func:`_pack` stored under ``name``."""
    lens, ids = tensors[f"{name}.len"].tolist(), tensors[f"{name}.ids"].tolist()
    starts = np.cumsum([0, *lens]).tolist()
    return [ids[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


class Distiller:
    """One method's training state on a (teacher, student) pair: the student's and the bounds sub-network's
    AdamW, the replay buffer, DistiLLM's adaptive threshold. ``step(step, examples)`` runs one update;
    ``plan`` / ``objective`` are its two halves (which sequences, which loss)."""

    def __init__(
        self,
        cfg: DistillConfig,
        teacher,
        student,
        *,
        world: int = 1,
        rank: int = 0,
        ddp=None,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ):
        self.cfg = cfg = resolve(cfg)
        self.eos_id, self.pad_id = special_ids(student, eos_id, pad_id)
        self.method = METHODS[cfg.method]
        vt, vs = vocab_size(teacher), vocab_size(student)
        if vt != vs:
            raise ValueError(f"teacher and student vocabularies differ: teacher {vt}, student {vs}")
        self.teacher, self.student, self.world, self.rank = teacher, student, world, rank
        self.ddp = ddp if ddp is not None else student
        self.device = device_of(student)
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        self.opt = adamw(student, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        self.dac = self.dac_opt = None
        if self.method.objective is _mgsr_objective and cfg.token_loss == "dac_kl":
            g = torch.Generator().manual_seed(_seed(cfg.seed, 0, 0, 7))
            self.dac = DACKL(
                k=cfg.dac_k,
                hidden=cfg.dac_hidden,
                backend=cfg.backend,
                generator=g,
                bounds=cfg.dac_bounds,
                fixed_bounds=None if cfg.dac_fixed is None else tuple(cfg.dac_fixed),
            ).to(self.device)
            if cfg.dac_fixed is None:  # fixed levels: nothing to train
                self.dac_opt = torch.optim.AdamW(
                    self.dac.parameters(),
                    lr=cfg.dac_lr or cfg.lr,
                    betas=(cfg.beta1, cfg.beta2),
                    weight_decay=0.0,
                )
        self.buffer: collections.deque = collections.deque(maxlen=cfg.capacity)
        self.teacher_set: dict = {}  # seqkd-fixed: prompt ids -> (teacher response, ended with EOS)
        self.threshold = cfg.init_threshold
        self.prev_val: float | None = None
        self.best_rouge = -1.0
        self.micro = 0  # the micro-batch of an accumulated step (its own generators when > 0)
        self._prompts = None  # the step's prompt batch (prompt_batch), when it differs from its examples
        self.cache = None
        if cfg.teacher_cache:
            if cfg.method != "kd":
                raise ValueError(
                    "teacher_cache serves method 'kd' (forward KL on the fixed ground truth); "
                    f"{cfg.method!r} needs the whole teacher distribution or sequences that change "
                    "(DAC-KL, the span term, reverse KL, JSD, TV and the skew KLs cannot be computed from a "
                    "sparse teacher)"
                )
            from fast.teacher_cache import TeacherCache

            self.cache = TeacherCache(cfg.teacher_cache)
        self.fused = self.cache is None and (
            bool(cfg.fused)
            and world == 1
            and head_weight(teacher) is not None
            and head_weight(student) is not None
        )

    # helpers used by the recipes
    def prompt_batch(self, examples):
        """The prompts a step samples from: its own prompt batch (an unlabelled pool, ``step(..., prompts)``)
        or, without one, its ground-truth examples. (prompt ids, response ids) pairs; the responses unused."""
        return self._prompts if self._prompts is not None else examples

    def coin(self, step) -> float:
        """The adaptive sampler's / GKD's ``r ~ U(0, 1)`` of this step (the same on every rank)."""
        return float(np.random.default_rng([self.cfg.seed, step, 2]).uniform())

    def global_count(self, n) -> int:
        if self.world == 1:
            return int(n)
        t = torch.tensor([float(n)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return int(t.item())

    def collate(self, rows):
        return collate(rows, pad_id=self.pad_id, block_size=self.cfg.block_size)

    def forward(self, *groups):
        """One student forward over the concatenated groups of (inputs, labels): ``(logits, labels, counts)``
        with each group's *global* target-token count (one forward so DDP sees one graph)."""
        rows = [ex for g in groups for ex in g]
        x, y = self.collate(rows)
        x, y = x.to(self.device), y.to(self.device)
        counts, lo = [], 0
        for g in groups:
            counts.append(max(self.global_count(int((y[lo : lo + len(g)] != IGNORE).sum())), 1))
            lo += len(g)
        return logits_of(self.ddp, x), y, tuple(counts)

    def forward_hidden(self, *groups):
        """:meth:`forward` for the fused losses: ``(final hidden states [B, T, H], output weight [V, H],
        labels, counts)``."""
        rows = [ex for g in groups for ex in g]
        x, y = self.collate(rows)
        x, y = x.to(self.device), y.to(self.device)
        counts, lo = [], 0
        for g in groups:
            counts.append(max(int((y[lo : lo + len(g)] != IGNORE).sum()), 1))
            lo += len(g)
        return lm_hidden(self.student, x), head_weight(self.student), y, tuple(counts)

    @torch.no_grad()
    def teacher_hidden(self, seqs, T):  # -> ([B, T, H_t], [V, H_t])
        x, _ = self.collate(seqs)
        x = F.pad(x, (0, max(T - x.shape[1], 0)), value=self.pad_id)[:, :T]
        return lm_hidden(self.teacher, x.to(self.device)), head_weight(self.teacher)

    @torch.no_grad()
    def teacher_logits(self, seqs, T):
        x, _ = self.collate(seqs)
        x = F.pad(x, (0, max(T - x.shape[1], 0)), value=self.pad_id)[
            :, :T
        ]  # right padding: earlier logits unchanged
        return logits_of(self.teacher, x.to(self.device)).float()

    def revise(self, step, examples, responses, ended):
        """SCRG on fresh student samples (imported here: MGSR without SCRG runs without ``fast.scrg``).
        Responses go in and come out with EOS as their last token when they ended (SCRG's convention)."""
        from fast.scrg import scrg

        prompts = [p for p, _ in examples]
        eos = self.eos_id
        with_eos = [list(r) + ([eos] if done else []) for r, done in zip(responses, ended, strict=True)]
        revised, positions = scrg(
            prompts,
            with_eos,
            self.teacher,
            self.student,
            frequency=self.cfg.scrg_frequency,
            teacher_token=self.cfg.scrg_teacher_token,
            decode="sample",
            temperature=self.cfg.gen_temperature,  # the samples' own temperature
            max_new_tokens=self.cfg.max_new_tokens,
            eos_id=eos,
            generator=_gen(self.cfg, step, self.rank, 4, self.micro),
        )
        out, done = [], []
        for r in revised:
            r = list(r)
            end = bool(r) and r[-1] == eos
            out.append(r[:-1] if end else r)
            done.append(end)
        return out, done, positions

    # one step
    def plan(self, step, examples) -> Plan:
        if not examples:
            raise ValueError("empty batch: a step needs at least one example")
        return self.method.build(self, step, examples)

    def objective(self, plan: Plan):
        return self.method.objective(self, plan)

    def step(self, step: int, examples, prompts=None) -> dict:
        """One update on the ground-truth ``examples`` and, for the terms that need only prompts (samples of
        the student or the teacher, SCRG, the replay buffer), the prompt batch ``prompts`` (default: the
        examples' own prompts)."""
        cfg = self.cfg
        lr = lr_at(step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.dac_opt is not None:
            for g in self.dac_opt.param_groups:
                g["lr"] = lr * (cfg.dac_lr or cfg.lr) / cfg.lr if cfg.lr else 0.0
        if not examples:
            raise ValueError("empty batch: a step needs at least one example")
        if len(examples) < cfg.grad_accum:
            raise ValueError(
                f"a step of {len(examples)} examples cannot be split into grad_accum={cfg.grad_accum}"
            )
        # gradient accumulation: the step's examples in grad_accum contiguous micro-batches, each normalised
        # by its own token (or pair) count, their losses averaged (one batch when the counts are equal)
        bounds = np.linspace(0, len(examples), cfg.grad_accum + 1).round().astype(int)
        p_bounds = (
            None if prompts is None else np.linspace(0, len(prompts), cfg.grad_accum + 1).round().astype(int)
        )
        loss, parts, sources, revised = 0.0, {}, [], 0
        for m in range(cfg.grad_accum):
            self.micro = m
            self._prompts = None if prompts is None else prompts[p_bounds[m] : p_bounds[m + 1]]
            plan = self.plan(step, examples[bounds[m] : bounds[m + 1]])
            revised += sum(1 for pos in plan.extra.get("scrg_positions", ()) if pos)
            self.student.train()
            loss_m, parts_m = self.objective(plan)
            (loss_m * (self.world / cfg.grad_accum)).backward()
            loss = loss + loss_m.detach() / cfg.grad_accum
            for k, v in parts_m.items():
                parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
            sources.append(plan.source)
        self.micro, self._prompts = 0, None
        if self.dac is not None and self.world > 1:
            for p in self.dac.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.world
        gnorm = (
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.clip)
            if cfg.clip > 0
            else torch.tensor(0.0)
        )
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.dac_opt is not None:
            self.dac_opt.step()
            self.dac_opt.zero_grad(set_to_none=True)
        tot = torch.stack(
            [loss.detach().double().reshape(())] + [v.double().reshape(()) for v in parts.values()]
        )
        if self.world > 1:
            torch.distributed.all_reduce(tot)
        rec = {
            "step": step,
            "loss": float(tot[0]),
            "lr": lr,
            "grad_norm": float(gnorm),
            "source": "+".join(dict.fromkeys(sources)),
            "scrg_revised": revised,
            "threshold": self.threshold,
            "buffer": len(self.buffer),
        }
        rec.update({k: float(v) for k, v in zip(parts, tot[1:].tolist(), strict=True)})
        return rec

    def after_eval(self, val_loss: float) -> None:
        """DistiLLM's threshold update: +0.1 (capped at 1) when the validation loss rose by ``loss_eps``."""
        if self.prev_val is None:
            self.prev_val = val_loss
        elif val_loss >= self.prev_val + self.cfg.loss_eps:
            self.threshold = min(self.threshold + 0.1, 1.0)
            self.prev_val = val_loss

    # state
    def state_tensors(self) -> tuple[dict, dict]:
        tensors, meta = {}, {}
        for pre, opt in (("opt", self.opt), ("dacopt", self.dac_opt)):
            if opt is None:
                continue
            t, meta[f"{pre}.param_groups"] = optimizer_tensors(opt, pre)
            tensors.update(t)
        if self.dac is not None:
            tensors.update({f"dac.{k}": v.clone() for k, v in self.dac.state_dict().items()})
        _pack(tensors, "buffer", [t for inp, lab in self.buffer for t in (inp, lab)])
        if self.teacher_set:
            _pack(tensors, "tset", [t for k, (r, _) in self.teacher_set.items() for t in (k, r)])
            tensors["tset.ended"] = torch.tensor([e for _, e in self.teacher_set.values()], dtype=torch.int64)
        meta.update(
            threshold=repr(self.threshold), prev_val=repr(self.prev_val), best_rouge=repr(self.best_rouge)
        )
        return tensors, meta

    def load_state_tensors(self, tensors: dict, meta: dict) -> None:
        for pre, opt in (("opt", self.opt), ("dacopt", self.dac_opt)):
            if opt is None:
                continue
            load_optimizer(opt, tensors, pre, meta[f"{pre}.param_groups"])
        if self.dac is not None:
            self.dac.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("dac.")})
        flat = _unpack(tensors, "buffer")
        self.buffer.clear()
        self.buffer.extend(zip(flat[0::2], flat[1::2], strict=True))
        self.teacher_set = {}
        if "tset.len" in tensors:
            flat, ended = _unpack(tensors, "tset"), [bool(e) for e in tensors["tset.ended"].tolist()]
            self.teacher_set = {
                tuple(k): (r, e) for k, r, e in zip(flat[0::2], flat[1::2], ended, strict=True)
            }
        self.threshold = float(meta["threshold"])
        self.prev_val = None if meta["prev_val"] == "None" else float(meta["prev_val"])
        self.best_rouge = float(meta["best_rouge"])


def _state_path(out_dir, rank):
    return os.path.join(out_dir, "state.safetensors" if rank == 0 else f"state.rank{rank}.safetensors")


def save_state(d: Distiller, step: int, elapsed: float, path: str) -> None:
    tensors, meta = d.state_tensors()
    meta.update(step=str(step), elapsed_s=str(elapsed), distill_config=json.dumps(dataclasses.asdict(d.cfg)))
    save_tensors(tensors, meta, path)


def load_state(d: Distiller, path: str) -> tuple[int, float]:
    tensors, meta = load_tensors(path)
    check_same_run(json.loads(meta["distill_config"]), d.cfg, RESUME_FREE, path)
    d.load_state_tensors(tensors, meta)
    return int(meta["step"]), float(meta["elapsed_s"])


def validation_subset(valid, n):
    """``n`` validation examples spread evenly over the set (it is grouped by task family, so its first ``n``
    would cover only the first families)."""
    if n >= len(valid):
        return list(valid)
    return [valid[(2 * j + 1) * len(valid) // (2 * n)] for j in range(n)]


@torch.no_grad()
def validate(d: Distiller, valid, *, decode=None) -> dict:
    """Validation CE of the student on the ground truth (DistiLLM's signal), and, given ``decode`` (token ids
    -> text), greedy ROUGE-L (x100) of its responses against the decoded references."""
    d.student.eval()
    x, y = d.collate([sft_example(p, r, d.eos_id) for p, r in valid])
    logits = logits_of(d.student, x.to(d.device))
    out = {
        "val_loss": float(
            F.cross_entropy(logits.flatten(0, 1).float(), y.to(d.device).flatten(), ignore_index=IGNORE)
        )
    }
    if decode is not None:
        texts = generate_texts(
            d.student,
            [p for p, _ in valid],
            decode,
            eos_id=d.eos_id,
            pad_id=d.pad_id,
            max_new_tokens=d.cfg.max_new_tokens,
        )
        out["val_rougeL"] = score_texts(texts, [decode(r) for _, r in valid])["rougeL"]
    d.student.train()
    return out


LOG_COLS = [
    "step",
    "loss",
    "lr",
    "grad_norm",
    "source",
    "threshold",
    "buffer",
    "scrg_revised",
    "sft",
    "ce",
    "token",
    "span",
    "kept",
    "upper",
    "lower",
    "step_s",
    "time_s",
    "val_loss",
    "val_rougeL",
]


def train(
    cfg: DistillConfig,
    teacher,
    student,
    train_set,
    valid,
    *,
    decode=None,
    save_model: Callable[[torch.nn.Module, str, dict], None],
    eos_id: int | None = None,
    pad_id: int | None = None,
    prompts=None,
) -> dict:
    """Run (or resume) one method of the registry; returns ``{"losses", "records", "step", "elapsed_s",
    "model", "best", "distiller"}`` (``losses``/``records``: the steps run in this call).

    ``teacher``/``student``: causal LMs (``fast.training.lm``); the student is trained in place.
    ``train_set``/``valid``: lists of (prompt ids, response ids); ``valid`` is scored every ``eval_every``
    steps (validation CE drives DistiLLM's threshold; with ``decode``, greedy ROUGE-L selects the best
    student, kept as ``best.safetensors``). ``save_model(model, path, meta)`` writes a weights file. Under
    torchrun every rank calls this; rank 0 writes the model, logs and best checkpoint, every rank its own
    state (its replay buffer). ``prompts`` (optional): an unlabelled pool of (prompt ids, anything) pairs;
    the terms that need only prompts (samples, SCRG, the replay buffer) draw from it, on a stream of its
    own seeded by ``(seed, step)``, while the ground-truth terms read ``train_set``.
    """
    cfg = resolve(cfg)
    world, rank, device = setup_process(cfg.device, cfg.threads)
    teacher, student = teacher.to(device), student.to(device)
    valid = validation_subset(valid, cfg.eval_examples)
    os.makedirs(cfg.out_dir, exist_ok=True)
    model_path = os.path.join(cfg.out_dir, "model.safetensors")
    best_path = os.path.join(cfg.out_dir, "best.safetensors")
    ddp = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    d = Distiller(cfg, teacher, student, world=world, rank=rank, ddp=ddp, eos_id=eos_id, pad_id=pad_id)
    start, elapsed = 0, 0.0
    if cfg.resume and os.path.exists(_state_path(cfg.out_dir, rank)):
        load_weights(student, model_path)
        start, elapsed = load_state(d, _state_path(cfg.out_dir, rank))
    if rank == 0:
        start_logs(cfg.out_dir, start, LOG_COLS)
    if start == 0 and cfg.eval_every > 0:  # DistiLLM evaluates once before training (the first prev loss)
        d.after_eval(validate(d, valid)["val_loss"])
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)

    def step_fn(step):
        idx = step_indices(cfg.seed, step, len(train_set), cfg.batch_size * world)
        mine = idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        batch = None
        if prompts is not None:  # the pool's own stream: the same prompts for every method at a step
            pidx = np.random.default_rng([cfg.seed, step, 7]).integers(
                0, len(prompts), cfg.batch_size * world
            )
            batch = [prompts[i] for i in pidx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]]
        return d.step(step, [train_set[i] for i in mine], batch)

    def eval_fn(step):
        v = validate(d, valid, decode=decode if rank == 0 else None)
        d.after_eval(v["val_loss"])
        if rank == 0 and v.get("val_rougeL", -1.0) > d.best_rouge:
            d.best_rouge = v["val_rougeL"]
            save_model(
                student, best_path, {"step": step, "method": cfg.method, "val_rougeL": v["val_rougeL"]}
            )
        if world > 1:
            b = torch.tensor([d.best_rouge], dtype=torch.float64)
            torch.distributed.broadcast(b, 0)
            d.best_rouge = float(b)
        return v

    def ckpt_fn(step, now):
        if rank == 0:
            save_model(
                student,
                model_path,
                {"step": step, "method": cfg.method, "distill_config": dataclasses.asdict(cfg)},
            )
        save_state(d, step, now, _state_path(cfg.out_dir, rank))

    records, _, elapsed = run_loop(
        step_fn,
        start=start,
        end=end,
        total=cfg.steps,
        eval_every=cfg.eval_every,
        eval_fn=eval_fn,
        ckpt_every=cfg.ckpt_every,
        ckpt_fn=ckpt_fn,
        elapsed=elapsed,
        log_fn=(lambda rec: write_log(cfg.out_dir, rec, LOG_COLS)) if rank == 0 else None,
        postfix=lambda rec: {"loss": f"{rec['loss']:.3f}", "src": rec["source"]},
        progress=cfg.progress and rank == 0,
        desc=cfg.method,
    )
    if world > 1:
        torch.distributed.barrier()
    return {
        "losses": [r["loss"] for r in records],
        "records": records,
        "step": end,
        "elapsed_s": elapsed,
        "model": student,
        "best": best_path if os.path.exists(best_path) else None,
        "distiller": d,
    }
