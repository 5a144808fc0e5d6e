"""Distil the tiny teacher into the tiny student: MGSR (arXiv 2407.10068) and its baselines. CLI and function.

    python fast/distill.py --method mgsr --out_dir runs/mgsr --steps 200
    python fast/distill.py --list                                   # the registry, one line per method
    torchrun --standalone --nproc_per_node 2 fast/distill.py --method kd --out_dir runs/kd ...   # DDP (gloo)

Every method is one entry of :data:`METHODS`: a *recipe* that says which sequences a step trains on and
with which loss, plus the option values that define it (the ablations are the MGSR recipe with other
options). No method is chosen by matching parts of its name.

=============  ===========================================================  ============================
method         sequences of a step                                          loss
=============  ===========================================================  ============================
sft            ground truth                                                 CE
kd             ground truth                                                 forward KL (teacher || student)
seqkd          teacher samples (T = 1)                                      CE
rkl            ground truth                                                 reverse KL
imitkd         student samples (T = 1)                                      forward KL
gkd            student samples with prob. ``gkd_lambda``, else ground truth generalised JSD(beta)
minillm        samples of the teacher-mixed policy ``a p + (1 - a) q``       reverse KL by policy gradient
distillm       adaptive off-policy: ground truth / fresh student / replay   skew forward KL (alpha = 0.1)
mgsr           distillm's loop, SCRG on fresh student samples               CE(gt) + DAC-KL + span
=============  ===========================================================  ============================

Shared by all: a frozen teacher, the student initialised from ``--student``, AdamW + warmup/cosine (the
schedule of ``fast.train``), validation ROUGE-L (greedy) every ``eval_every`` steps with the best student
kept as ``best.safetensors``, ``log.jsonl`` / ``log.csv``, tqdm, and exact resume.

Why the run is exactly resumable: every random draw of step ``s`` (which examples, the adaptive sampler's
coin, every generation) comes from generators seeded by ``(seed, s, rank)``; the rest of the state -- student
weights, both AdamW states (the student's and the DAC-KL bounds sub-network's), the bounds sub-network, the
replay buffer, DistiLLM's adaptive threshold and last validation loss, the best validation ROUGE-L -- is in
the checkpoint. A killed and resumed run reproduces the uninterrupted run bit for bit (tested).

Loss normalisation (as in ``fast.train``): each token-level term is ``sum over the step's tokens / number of
tokens of the whole step`` (all ranks; counts are all-reduced), the span term ``sum over pairs / pairs of the
step``; each rank backpropagates its share times the world size because DDP averages gradients. So two ranks
with ``batch_size`` b each equal one process with 2b on the ground-truth methods (tested for ``kd``). Methods
that generate draw from per-rank generators, so their DDP runs are valid but not equal to one process.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python fast/distill.py` / torchrun: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fast.dac_kl import DACKL  # noqa: E402
from fast.divergences import PARAMS as DIV_PARAMS  # noqa: E402
from fast.divergences import divergence  # noqa: E402
from fast.span import span_loss, spans_to_tensor  # noqa: E402
from fast.train import (  # noqa: E402
    CheckpointError,
    _load,
    _log,
    _save,
    _truncate_logs,
    load_model,
    lr_at,
    read_log,
    save_model,
    setup_process,
    step_indices,
)
from reference.span import extract_spans  # noqa: E402  (rule-based chunker, NumPy, no torch)
from tiny_models.gpt import EOS, GPT, PAD, generate  # noqa: E402
from tiny_models.tasks import IGNORE, build_dataset, collate, example_ids, prompt_ids  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN_LOSSES = ("dac_kl", *DIV_PARAMS)  # MGSR's token term: DAC-KL, or one of the seven divergences


@dataclass(frozen=True)
class DistillConfig:
    method: str = "mgsr"
    out_dir: str = "runs/distill"
    teacher: str = os.path.join(ROOT, "tiny_models/checkpoints/teacher.safetensors")
    student: str = os.path.join(ROOT, "tiny_models/checkpoints/student.safetensors")
    # data (tiny_models.tasks)
    data_seed: int = 0
    n_per_family: int = 2000
    block_size: int = 160
    max_new_tokens: int = 48  # student / teacher generations during training (and validation decoding)
    # optimisation: DistiLLM's GPT-2 settings [REF 2402.03898]
    # (AdamW, wd 1e-2, clip 1, cosine, warmup 0, lr 5e-4)
    steps: int = 200
    batch_size: int = 16  # examples per rank per step
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
    dac_bounds: str = "value"  # value | mass (quantile semantics of (u, l))
    dac_k: int = 64
    dac_hidden: int = 256
    dac_lr: float | None = None  # None: the student's lr
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


RESUME_FREE = {"out_dir", "stop_after", "resume", "threads", "progress", "device", "ckpt_every", "backend"}


# ----------------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Method:
    name: str
    sequences: str  # which sequences a step trains on (for docs / --list)
    loss: str  # with which loss
    build: Callable  # (Distiller, step, examples) -> Plan
    objective: Callable  # (Distiller, Plan) -> (loss, parts)
    options: tuple = ()  # (field, value) pairs this method sets on the config


@dataclass
class Plan:
    """The sequences of one step. ``gt``: the ground-truth (inputs, labels); ``seqs``: the distillation
    sequences (``None``: the ground truth); ``source``: gt | student | teacher | mixed | fresh | replay."""

    gt: list
    seqs: list | None
    source: str
    extra: dict = dataclasses.field(default_factory=dict)


def _seed(*parts) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def _gen(cfg, step, rank, salt) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(cfg.seed, step, rank, salt))


# sequences -------------------------------------------------------------------------------------------


def _gt(d, step, examples):
    return Plan(gt=[example_ids(e.prompt, e.response) for e in examples], seqs=None, source="gt")


def _with(d, examples, responses, ended):
    """(inputs, labels) of prompt + response (+ EOS when the generation ended) for every example."""
    out = []
    for e, r, done in zip(examples, responses, ended, strict=True):
        p = prompt_ids(e.prompt)
        full = p + list(r) + ([EOS] if done else [])
        inputs, targets = full[:-1], full[1:]
        out.append((inputs, [IGNORE if t < len(p) - 1 else targets[t] for t in range(len(targets))]))
    return out


def generate_responses(model, prompts, *, max_new_tokens, temperature, generator):
    """New tokens (EOS excluded) of ``model`` for each prompt, and whether each one ended with EOS.
    Module-level so tests can spy on which model generates."""
    if isinstance(model, GPT):
        outs = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        generator=generator)
    else:  # any model whose forward returns logits: one row at a time, no cache
        outs = [_generate_one(model, p, max_new_tokens, temperature, generator) for p in prompts]
    return outs, [len(o) < max_new_tokens for o in outs]


@torch.no_grad()
def _generate_one(model, prompt, max_new_tokens, temperature, generator):
    from tiny_models.gpt import sample_next

    dev = _device_of(model)
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        logits = logits_of(model, torch.tensor([ids], device=dev))[:, -1]
        nxt = int(sample_next(logits, temperature=temperature, generator=generator)[0])
        if nxt == EOS:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def _student_samples(d, step, examples, salt=1):
    prompts = [prompt_ids(e.prompt) for e in examples]
    r, ended = generate_responses(d.student, prompts, max_new_tokens=d.cfg.max_new_tokens,
                                  temperature=d.cfg.gen_temperature,
                                  generator=_gen(d.cfg, step, d.rank, salt))
    return r, ended


def _seqkd_build(d, step, examples):
    prompts = [prompt_ids(e.prompt) for e in examples]
    r, ended = generate_responses(d.teacher, prompts, max_new_tokens=d.cfg.max_new_tokens,
                                  temperature=d.cfg.gen_temperature, generator=_gen(d.cfg, step, d.rank, 1))
    return Plan(gt=_gt(d, step, examples).gt, seqs=_with(d, examples, r, ended), source="teacher")


def _student_build(d, step, examples):
    r, ended = _student_samples(d, step, examples)
    return Plan(gt=_gt(d, step, examples).gt, seqs=_with(d, examples, r, ended), source="student")


def _gkd_build(d, step, examples):
    if d.coin(step) < d.cfg.gkd_lambda:
        return _student_build(d, step, examples)
    return _gt(d, step, examples)


def _adaptive_build(d, step, examples, revise=False):
    """DistiLLM's adaptive off-policy sampler (finetune.py of its public code, re-implemented): with
    ``r ~ U(0, 1)``: fresh student samples when ``r < samp_threshold`` (or ``r < threshold`` while the buffer
    is not full), pushed into the replay buffer; a replay-buffer batch when ``r < threshold``; else the
    ground truth. MGSR (``revise``): SCRG revises the fresh samples before they are trained on and stored."""
    cfg, th = d.cfg, d.threshold
    frac = step / max(cfg.steps, 1)
    samp = {"constant": th * 0.5, "increasing": th * frac, "decreasing": th * (1 - frac)}[cfg.replay_ratio]
    r = d.coin(step)
    plan = _gt(d, step, examples)
    if r < samp or (r < th and len(d.buffer) < cfg.capacity):
        resp, ended = _student_samples(d, step, examples)
        if revise and cfg.scrg_frequency > 0:
            resp, ended, pos = d.revise(step, examples, resp, ended)
            plan.extra["scrg_positions"] = pos
        plan.seqs, plan.source = _with(d, examples, resp, ended), "fresh"
        d.buffer.extend(plan.seqs)
    elif r < th:
        rng = np.random.default_rng([cfg.seed, step, d.rank, 3])
        idx = rng.choice(len(d.buffer), size=min(len(examples), len(d.buffer)), replace=False)
        plan.seqs, plan.source = [d.buffer[int(i)] for i in idx], "replay"
    return plan


def _mgsr_build(d, step, examples):
    return _adaptive_build(d, step, examples, revise=True)


@torch.no_grad()
def _mixed_generate(teacher, student, prompts, *, alpha, max_new_tokens, generator):
    """Sample token by token from ``alpha p_teacher + (1 - alpha) q_student`` (MiniLLM's teacher-mixed
    sampling). Returns the new tokens (EOS excluded), whether each row ended, and ``log p_mix`` of every
    sampled token (EOS included). Batched with KV caches for ``tiny_models.gpt.GPT`` (left padding, as in
    ``generate``); any other model runs one row at a time without a cache."""
    if not (isinstance(teacher, GPT) and isinstance(student, GPT)):
        raise ValueError("batched teacher-mixed sampling needs tiny_models.gpt.GPT models")
    dev = _device_of(student)
    B, L = len(prompts), max(len(p) for p in prompts)
    idx = torch.full((B, L), PAD, dtype=torch.long, device=dev)
    valid = torch.zeros((B, L), dtype=torch.bool, device=dev)
    for b, p in enumerate(prompts):
        idx[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[b, L - len(p):] = True
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    caches = [[dict() for _ in range(m.cfg.n_layer)] for m in (teacher, student)]
    out, lps = [[] for _ in range(B)], [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    step_idx, step_pos = idx, pos
    la, lb = math.log(alpha), math.log1p(-alpha)
    for _ in range(max_new_tokens):
        lp = teacher(step_idx, pos=step_pos, key_valid=valid, cache=caches[0])[:, -1].double().log_softmax(-1)
        lq = student(step_idx, pos=step_pos, key_valid=valid, cache=caches[1])[:, -1].double().log_softmax(-1)
        lmix = torch.logaddexp(lp + la, lq + lb)
        cdf = lmix.exp().cumsum(-1)
        u = torch.rand(B, 1, generator=generator, dtype=torch.float64).to(dev) * cdf[:, -1:]
        nxt = torch.searchsorted(cdf, u).squeeze(-1).clamp_max(cdf.shape[-1] - 1)
        chosen = lmix.gather(-1, nxt[:, None])[:, 0]
        for b in range(B):
            if not done[b]:
                lps[b].append(float(chosen[b]))
                if int(nxt[b]) != EOS:
                    out[b].append(int(nxt[b]))
        done = done | (nxt == EOS)
        if bool(done.all()):
            break
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        new_pos = pos[:, -1:] + 1
        pos = torch.cat([pos, new_pos], 1)
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
        step_idx, step_pos = nxt[:, None], new_pos
    return out, [len(lp_) > len(o) for o, lp_ in zip(out, lps, strict=True)], lps


def _mixed_generate_rows(teacher, student, prompt, *, alpha, max_new_tokens, generator):
    ids, out, lps = list(prompt), [], []
    dev = _device_of(student)
    for _ in range(max_new_tokens):
        x = torch.tensor([ids], device=dev)
        lp = logits_of(teacher, x)[0, -1].double().log_softmax(-1)
        lq = logits_of(student, x)[0, -1].double().log_softmax(-1)
        lmix = torch.logaddexp(lp + math.log(alpha), lq + math.log1p(-alpha))
        cdf = lmix.exp().cumsum(-1)
        u = torch.rand(1, generator=generator, dtype=torch.float64).to(dev) * cdf[-1]
        nxt = int(torch.searchsorted(cdf, u).clamp_max(len(cdf) - 1))
        lps.append(float(lmix[nxt]))
        if nxt == EOS:
            return out, True, lps
        out.append(nxt)
        ids.append(nxt)
    return out, False, lps


def _minillm_build(d, step, examples):
    cfg = d.cfg
    prompts = [prompt_ids(e.prompt) for e in examples]
    g = _gen(cfg, step, d.rank, 1)
    if isinstance(d.teacher, GPT) and isinstance(d.student, GPT):
        resp, ended, mixlp = _mixed_generate(d.teacher, d.student, prompts, alpha=cfg.minillm_alpha,
                                             max_new_tokens=cfg.max_new_tokens, generator=g)
    else:
        rows = [_mixed_generate_rows(d.teacher, d.student, p, alpha=cfg.minillm_alpha,
                                     max_new_tokens=cfg.max_new_tokens, generator=g) for p in prompts]
        resp, ended, mixlp = (list(x) for x in zip(*rows, strict=True))
    plan = Plan(gt=_gt(d, step, examples).gt, seqs=_with(d, examples, resp, ended), source="mixed")
    plan.extra["mix_logp"] = mixlp
    plan.extra["rollout"] = _minillm_rollout(d, plan.seqs, mixlp)
    return plan


# losses ----------------------------------------------------------------------------------------------


def _ce_sft(d, plan):
    logits, y, (n,) = d.forward(plan.gt)
    s = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum")
    return s / n, {"ce": s.detach() / n}


def _ce_seqs(d, plan):
    logits, y, (n,) = d.forward(plan.seqs if plan.seqs is not None else plan.gt)
    s = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum")
    return s / n, {"ce": s.detach() / n}


def _div_objective(name, **params):
    def objective(d, plan):
        seqs = plan.seqs if plan.seqs is not None else plan.gt
        logits, y, (n,) = d.forward(seqs)
        t = d.teacher_logits(seqs, logits.shape[1])
        p = {k: getattr(d.cfg, v) for k, v in params.items()}
        s = divergence(name, t, logits, mask=y != IGNORE, reduction="sum", backend=d.cfg.backend, **p)
        return s / n, {name: s.detach() / n}

    return objective


def _distillm_objective(d, plan):
    return _div_objective(d.cfg.distillm_loss, alpha="skew_alpha")(d, plan)


@torch.no_grad()
def _minillm_rollout(d, seqs, mixlp):
    """Rewards, importance weights and advantages of the sampled tokens, computed once at sampling time
    with the rollout policy (as PPO does); the objective treats them as constants."""
    x, y = collate(seqs, block_size=d.cfg.block_size)
    x, y = x.to(d.device), y.to(d.device)
    mask = y != IGNORE
    yy = y.clamp_min(0)[..., None]
    lq_y = logits_of(d.student, x).float().log_softmax(-1).gather(-1, yy)[..., 0]
    lp_y = logits_of(d.teacher, x).float().log_softmax(-1).gather(-1, yy)[..., 0]
    mix = torch.zeros_like(lq_y)
    for b, lps in enumerate(mixlp):
        pos = mask[b].nonzero().flatten()
        mix[b, pos[: len(lps)]] = torch.tensor(lps[: len(pos)], dtype=mix.dtype, device=mix.device)
    zero = torch.zeros_like(lq_y)
    r = torch.where(mask, lp_y - lq_y, zero)
    w = torch.where(mask, (lq_y - mix).exp().clamp(max=d.cfg.minillm_w_max), zero)
    # R_t = mean of r over the later response tokens (0 at the last one): suffix sums / suffix counts
    later = torch.flip(torch.cumsum(torch.flip(r, [1]), 1), [1]) - r
    cnt = torch.flip(torch.cumsum(torch.flip(mask.float(), [1]), 1), [1]) - mask.float()
    ret = torch.where(cnt > 0, later / cnt.clamp_min(1), zero)
    n = mask.sum().clamp_min(1)
    adv = torch.where(mask, ret - (ret * mask).sum() / n, zero)
    return {"w": w, "adv": adv, "reward": r.sum() / n}


def _minillm_objective(d, plan):
    """Reverse KL by policy gradient (MiniLLM, arXiv 2306.08543; re-implemented, [RECON] one update per
    rollout, no PPO ratio clipping). Per response token t of a teacher-mixed sample: reward
    ``r_t = log p(y_t) - log q(y_t)``, importance weight ``w_t = min(q(y_t) / p_mix(y_t), w_max)``,
    length-normalised return ``R_t = mean_{t' > t} r_t'`` and advantage ``A_t = R_t - mean(R)`` (all from the
    rollout, constants here). Single-step term ``w_t KL(q_t || p_t)`` (the exact expectation of ``-r_t``
    under ``q``); long-term term ``-w_t A_t log q(y_t)``. Both averaged over the step's response tokens."""
    logits, y, (n,) = d.forward(plan.seqs)
    t = d.teacher_logits(plan.seqs, logits.shape[1])
    mask = y != IGNORE
    ro = plan.extra["rollout"]
    lq_y = logits.float().log_softmax(-1).gather(-1, y.clamp_min(0)[..., None])[..., 0]
    rkl = divergence("reverse_kl", t, logits, mask=mask, reduction="none", backend=d.cfg.backend)
    single = (ro["w"] * rkl).sum()
    long = -(ro["w"] * ro["adv"] * torch.where(mask, lq_y, torch.zeros_like(lq_y))).sum()
    return (single + long) / n, {"single": single.detach() / n, "long": long.detach() / n,
                                 "reward": ro["reward"]}


def response_spans(labels, mode="phrase"):
    """Spans (``[start, end)`` positions of the logits) of one row: chunks of the response text. Position
    ``t`` predicts ``labels[t]``; prompt / pad positions (-100) and special tokens act as separators."""
    lab = [int(v) for v in labels]
    resp = [i for i, v in enumerate(lab) if v != IGNORE]
    if not resp:
        return []
    text = bytes(v if 0 <= v < 256 else 32 for v in lab)  # specials / ignored -> a space (a separator)
    offsets = np.stack([np.arange(len(lab)), np.arange(len(lab)) + 1], 1)
    return extract_spans(offsets=offsets, text=text, mode=mode, first=resp[0])


def _mgsr_objective(d, plan):
    """``w_sft CE(ground truth) + w_token L_token(seqs) + w_span L_span(seqs)``; ``seqs`` is the adaptive
    sampler's choice (ground truth, or SCRG-revised student samples fresh or from the replay buffer)."""
    cfg = d.cfg
    two = plan.seqs is not None
    seqs = plan.seqs if two else plan.gt
    logits_all, y_all, counts = d.forward(plan.gt, seqs) if two else d.forward(plan.gt)
    B = len(plan.gt)
    n_gt = counts[0]
    lg, yg = logits_all[:B], y_all[:B]
    sft = F.cross_entropy(lg.flatten(0, 1).float(), yg.flatten(), ignore_index=IGNORE, reduction="sum")
    ls, ys, n = (logits_all[B:], y_all[B:], counts[1]) if two else (lg, yg, n_gt)
    t = d.teacher_logits(seqs, ls.shape[1])
    mask = ys != IGNORE
    parts = {"sft": sft.detach() / n_gt}
    if cfg.token_loss == "dac_kl":
        tok_mean, info = d.dac(t, ls, mask)
        tok = tok_mean * mask.sum()
        parts.update(upper=info["upper"].mean() if info["upper"].numel() else torch.zeros(()),
                     lower=info["lower"].mean() if info["lower"].numel() else torch.zeros(()),
                     kept=info["kept"].mean() if info["kept"].numel() else torch.zeros(()))
    else:
        p = {k: v for k, v in (("alpha", cfg.skew_alpha), ("beta", 0.5)) if k in DIV_PARAMS[cfg.token_loss]}
        tok = divergence(cfg.token_loss, t, ls, mask=mask, reduction="sum", backend=cfg.backend, **p)
    parts["token"] = tok.detach() / n
    loss = cfg.w_sft * sft / n_gt + cfg.w_token * tok / n
    if cfg.w_span:
        spans = [response_spans(row, cfg.span_mode) for row in ys.tolist()]
        pairs = sum(e - s - 1 for row in spans for s, e in row)
        n_pairs = d.global_count(pairs)
        if n_pairs > 0 and pairs > 0:
            sp = span_loss(t, ls, spans_to_tensor(spans, ls.device), squared=cfg.span_squared,
                           backend=cfg.backend) * pairs
        else:
            sp = ls.sum() * 0.0
        parts["span"] = sp.detach() / max(n_pairs, 1)
        loss = loss + cfg.w_span * sp / max(n_pairs, 1)
    return loss, parts


_FKL = _div_objective("forward_kl")
_RKL = _div_objective("reverse_kl")
_JSD = _div_objective("js_divergence", beta="gkd_beta")

_MGSR_SEQ = "distillm's adaptive loop; fresh student samples revised by SCRG"
_MGSR_LOSS = "CE(gt) + {} + span"
_BASE = [
    Method("sft", "ground truth", "CE", _gt, _ce_sft),
    Method("kd", "ground truth", "forward KL", _gt, _FKL),
    Method("seqkd", "teacher samples (T=1)", "CE", _seqkd_build, _ce_seqs),
    Method("rkl", "ground truth", "reverse KL", _gt, _RKL),
    Method("imitkd", "student samples (T=1)", "forward KL", _student_build, _FKL),
    Method("gkd", "student samples w.p. gkd_lambda, else ground truth", "JSD(gkd_beta)", _gkd_build, _JSD),
    Method("minillm", "teacher-mixed policy samples", "reverse KL by policy gradient", _minillm_build,
           _minillm_objective),
    Method("distillm", "adaptive off-policy: ground truth / fresh student / replay buffer",
           "skew forward KL (alpha 0.1)", lambda d, s, e: _adaptive_build(d, s, e), _distillm_objective),
    Method("mgsr", _MGSR_SEQ, _MGSR_LOSS.format("DAC-KL"), _mgsr_build, _mgsr_objective),
]
_ABLATIONS = [
    Method("mgsr-no-scrg", "distillm's adaptive loop, raw student samples", _MGSR_LOSS.format("DAC-KL"),
           _mgsr_build, _mgsr_objective, (("scrg_frequency", 0),)),
    Method("mgsr-no-dackl", _MGSR_SEQ, _MGSR_LOSS.format("forward KL"), _mgsr_build, _mgsr_objective,
           (("token_loss", "forward_kl"),)),
    Method("mgsr-no-span", _MGSR_SEQ, "CE(gt) + DAC-KL", _mgsr_build, _mgsr_objective, (("w_span", 0.0),)),
    *[Method(f"mgsr-scrg{f}", _MGSR_SEQ + f" (frequency {f})", _MGSR_LOSS.format("DAC-KL"), _mgsr_build,
             _mgsr_objective, (("scrg_frequency", f),)) for f in (0, 1, 3, 5)],
    *[Method(f"mgsr-{name}", _MGSR_SEQ, _MGSR_LOSS.format(name), _mgsr_build, _mgsr_objective,
             (("token_loss", name),)) for name in DIV_PARAMS],
]
METHODS: dict[str, Method] = {m.name: m for m in _BASE + _ABLATIONS}
BASELINES = tuple(m.name for m in _BASE)


def resolve(cfg: DistillConfig) -> DistillConfig:
    """The config with the method's options applied; unknown method / bad option -> ValueError."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; known: {sorted(METHODS)}")
    cfg = dataclasses.replace(cfg, **dict(METHODS[cfg.method].options))
    if cfg.token_loss not in TOKEN_LOSSES:
        raise ValueError(f"token_loss must be one of {TOKEN_LOSSES}, got {cfg.token_loss!r}")
    if cfg.distillm_loss not in ("skew_forward_kl", "skew_reverse_kl"):
        raise ValueError(f"distillm_loss must be skew_forward_kl or skew_reverse_kl, "
                         f"got {cfg.distillm_loss!r}")
    if cfg.replay_ratio not in ("decreasing", "increasing", "constant"):
        raise ValueError(f"replay_ratio must be decreasing/increasing/constant, got {cfg.replay_ratio!r}")
    if cfg.scrg_frequency < 0:
        raise ValueError(f"scrg_frequency must be >= 0, got {cfg.scrg_frequency}")
    if cfg.scrg_teacher_token not in ("sample", "argmax"):
        raise ValueError(f"scrg_teacher_token must be 'sample' or 'argmax', got {cfg.scrg_teacher_token!r}")
    if not 0.0 < cfg.minillm_alpha < 1.0:
        raise ValueError(f"minillm_alpha must lie in (0, 1), got {cfg.minillm_alpha}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    return cfg


# ----------------------------------------------------------------------------------------------------
# the trainer


def logits_of(model, x):
    """Logits ``[B, T, V]`` of any model whose forward returns logits (a tensor or an object with .logits)."""
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def hf_logits(model, idx, valid):
    """SCRG's adapter for a transformers causal LM on left-padded rows (positions restart at each row's
    first valid token)."""
    return model(input_ids=idx, attention_mask=valid.long(),
                 position_ids=(valid.long().cumsum(1) - 1).clamp_min(0)).logits


def _device_of(model):
    return next(model.parameters()).device


def vocab_size(model) -> int:
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "vocab_size", None):
        return int(cfg.vocab_size)
    with torch.no_grad():
        return int(logits_of(model, torch.zeros(1, 1, dtype=torch.long, device=_device_of(model))).shape[-1])


class Distiller:
    """One method's training state on a (teacher, student) pair: the student's and the bounds sub-network's
    AdamW, the replay buffer, DistiLLM's adaptive threshold. ``step(step, examples)`` runs one update;
    ``plan`` / ``objective`` are its two halves (which sequences, which loss)."""

    def __init__(self, cfg: DistillConfig, teacher, student, *, world: int = 1, rank: int = 0, ddp=None):
        self.cfg = cfg = resolve(cfg)
        self.method = METHODS[cfg.method]
        vt, vs = vocab_size(teacher), vocab_size(student)
        if vt != vs:
            raise ValueError(f"teacher and student vocabularies differ: teacher {vt}, student {vs}")
        self.teacher, self.student, self.world, self.rank = teacher, student, world, rank
        self.ddp = ddp if ddp is not None else student
        self.device = _device_of(student)
        for p in teacher.parameters():
            p.requires_grad_(False)
        teacher.eval()
        decay = [p for p in student.parameters() if p.dim() >= 2]
        no_decay = [p for p in student.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.dac = self.dac_opt = None
        if self.method.objective is _mgsr_objective and cfg.token_loss == "dac_kl":
            g = torch.Generator().manual_seed(_seed(cfg.seed, 0, 0, 7))
            self.dac = DACKL(k=cfg.dac_k, hidden=cfg.dac_hidden, backend=cfg.backend, generator=g,
                             bounds=cfg.dac_bounds).to(self.device)
            self.dac_opt = torch.optim.AdamW(self.dac.parameters(), lr=cfg.dac_lr or cfg.lr,
                                             betas=(cfg.beta1, cfg.beta2), weight_decay=0.0)
        self.buffer: collections.deque = collections.deque(maxlen=cfg.capacity)
        self.threshold = cfg.init_threshold
        self.prev_val: float | None = None
        self.best_rouge = -1.0

    # helpers used by the recipes
    def coin(self, step) -> float:
        """The adaptive sampler's / GKD's ``r ~ U(0, 1)`` of this step (the same on every rank)."""
        return float(np.random.default_rng([self.cfg.seed, step, 2]).uniform())

    def global_count(self, n) -> int:
        if self.world == 1:
            return int(n)
        t = torch.tensor([float(n)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return int(t.item())

    def forward(self, *groups):
        """One student forward over the concatenated groups of (inputs, labels): ``(logits, labels, counts)``
        with each group's *global* target-token count (one forward so DDP sees one graph)."""
        rows = [ex for g in groups for ex in g]
        x, y = collate(rows, block_size=self.cfg.block_size)
        x, y = x.to(self.device), y.to(self.device)
        counts, lo = [], 0
        for g in groups:
            counts.append(max(self.global_count(int((y[lo : lo + len(g)] != IGNORE).sum())), 1))
            lo += len(g)
        return logits_of(self.ddp, x), y, tuple(counts)

    @torch.no_grad()
    def teacher_logits(self, seqs, T):
        x, _ = collate(seqs, block_size=self.cfg.block_size)
        x = F.pad(x, (0, max(T - x.shape[1], 0)), value=PAD)[:, :T]  # right padding: earlier logits unchanged
        return logits_of(self.teacher, x.to(self.device)).float()

    def revise(self, step, examples, responses, ended):
        """SCRG on fresh student samples (imported here: MGSR without SCRG runs without ``fast.scrg``).
        Responses go in and come out with EOS as their last token when they ended (SCRG's convention)."""
        from fast.scrg import scrg

        prompts = [prompt_ids(e.prompt) for e in examples]
        with_eos = [list(r) + ([EOS] if done else []) for r, done in zip(responses, ended, strict=True)]
        kw = {}
        if not (isinstance(self.teacher, GPT) and isinstance(self.student, GPT)):
            kw["logits_fn"] = hf_logits
        revised, positions = scrg(prompts, with_eos, self.teacher, self.student,
                                  frequency=self.cfg.scrg_frequency,
                                  teacher_token=self.cfg.scrg_teacher_token,
                                  decode="sample", max_new_tokens=self.cfg.max_new_tokens, eos_id=EOS,
                                  generator=_gen(self.cfg, step, self.rank, 4), **kw)
        out, done = [], []
        for r in revised:
            r = list(r)
            end = bool(r) and r[-1] == EOS
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

    def step(self, step: int, examples) -> dict:
        cfg = self.cfg
        lr = lr_at(step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.dac_opt is not None:
            for g in self.dac_opt.param_groups:
                g["lr"] = lr * (cfg.dac_lr or cfg.lr) / cfg.lr if cfg.lr else 0.0
        plan = self.plan(step, examples)
        self.student.train()
        loss, parts = self.objective(plan)
        (loss * self.world).backward()
        if self.dac is not None and self.world > 1:
            for p in self.dac.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.world
        gnorm = (torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.clip) if cfg.clip > 0
                 else torch.tensor(0.0))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.dac_opt is not None:
            self.dac_opt.step()
            self.dac_opt.zero_grad(set_to_none=True)
        tot = torch.stack([loss.detach().double().reshape(())]
                          + [v.double().reshape(()) for v in parts.values()])
        if self.world > 1:
            torch.distributed.all_reduce(tot)
        rec = {"step": step, "loss": float(tot[0]), "lr": lr, "grad_norm": float(gnorm),
               "source": plan.source,
               "threshold": self.threshold, "buffer": len(self.buffer)}
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
            sd = opt.state_dict()
            # clones: a loaded optimizer must never share (and so double-update) these moments
            tensors.update({f"{pre}.{i}.{k}": v.clone() for i, st in sd["state"].items()
                            for k, v in st.items()})
            meta[f"{pre}.param_groups"] = json.dumps(sd["param_groups"])
        if self.dac is not None:
            tensors.update({f"dac.{k}": v.clone() for k, v in self.dac.state_dict().items()})
        flat = [t for inp, lab in self.buffer for t in (inp, lab)]
        tensors["buffer.len"] = torch.tensor([len(t) for t in flat], dtype=torch.int64)
        tensors["buffer.ids"] = torch.tensor([v for t in flat for v in t], dtype=torch.int64)
        meta.update(threshold=repr(self.threshold), prev_val=repr(self.prev_val),
                    best_rouge=repr(self.best_rouge))
        return tensors, meta

    def load_state_tensors(self, tensors: dict, meta: dict) -> None:
        for pre, opt in (("opt", self.opt), ("dacopt", self.dac_opt)):
            if opt is None:
                continue
            state: dict[int, dict] = {}
            for k, v in tensors.items():
                if k.startswith(pre + "."):
                    _, i, name = k.split(".", 2)
                    state.setdefault(int(i), {})[name] = v
            opt.load_state_dict({"state": state, "param_groups": json.loads(meta[f"{pre}.param_groups"])})
        if self.dac is not None:
            self.dac.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("dac.")})
        lens, ids = tensors["buffer.len"].tolist(), tensors["buffer.ids"].tolist()
        self.buffer.clear()
        pos, flat = 0, []
        for n in lens:
            flat.append(ids[pos : pos + n])
            pos += n
        self.buffer.extend(zip(flat[0::2], flat[1::2], strict=True))
        self.threshold = float(meta["threshold"])
        self.prev_val = None if meta["prev_val"] == "None" else float(meta["prev_val"])
        self.best_rouge = float(meta["best_rouge"])


# ----------------------------------------------------------------------------------------------------
# the run


def _state_path(out_dir, rank):
    return os.path.join(out_dir, "state.safetensors" if rank == 0 else f"state.rank{rank}.safetensors")


def save_state(d: Distiller, step: int, elapsed: float, path: str) -> None:
    tensors, meta = d.state_tensors()
    meta.update(step=str(step), elapsed_s=str(elapsed), distill_config=json.dumps(dataclasses.asdict(d.cfg)))
    _save(tensors, meta, path)


def load_state(d: Distiller, path: str) -> tuple[int, float]:
    tensors, meta = _load(path)
    saved, now = json.loads(meta["distill_config"]), dataclasses.asdict(d.cfg)
    diff = {k: (saved.get(k), now[k]) for k in now if k not in RESUME_FREE and saved.get(k) != now[k]}
    if diff:
        raise CheckpointError(f"cannot resume from {path}: the run config differs (saved, now): {diff}")
    d.load_state_tensors(tensors, meta)
    return int(meta["step"]), float(meta["elapsed_s"])


def validation_subset(valid, n):
    """``n`` validation examples spread evenly over the set (it is grouped by task family, so its first ``n``
    would cover only the first families)."""
    if n >= len(valid):
        return list(valid)
    return [valid[(2 * j + 1) * len(valid) // (2 * n)] for j in range(n)]


@torch.no_grad()
def validate(d: Distiller, valid, *, rouge: bool) -> dict:
    """Validation CE of the student on the ground truth (DistiLLM's signal), and greedy ROUGE-L (x100)."""
    from tiny_models.evaluate import generate_responses as gen_text
    from tiny_models.evaluate import score

    d.student.eval()
    x, y = collate([example_ids(e.prompt, e.response) for e in valid], block_size=d.cfg.block_size)
    logits = logits_of(d.student, x.to(d.device))
    out = {"val_loss": float(F.cross_entropy(logits.flatten(0, 1).float(), y.to(d.device).flatten(),
                                             ignore_index=IGNORE))}
    if rouge:
        s = score(gen_text(d.student, valid, max_new_tokens=d.cfg.max_new_tokens), valid)
        out["val_rougeL"] = s["rougeL"]
    d.student.train()
    return out


LOG_COLS = ["step", "loss", "lr", "grad_norm", "source", "threshold", "buffer", "sft", "ce", "token", "span",
            "kept", "upper", "lower", "step_s", "time_s", "val_loss", "val_rougeL"]


def train(cfg: DistillConfig, *, teacher=None, student=None) -> dict:
    """Run (or resume) one method; returns ``{"losses", "records", "step", "elapsed_s", "model", "best"}``
    (``losses``/``records``: the steps run in this call). ``teacher``/``student`` (optional): models to use
    instead of the checkpoint files (the student is trained in place). Under torchrun every rank calls this;
    rank 0 writes the model, logs and best checkpoint, every rank its own state (its replay buffer)."""
    cfg = resolve(cfg)
    world, rank, device = setup_process(cfg.device, cfg.threads)
    if teacher is None:
        teacher, _ = load_model(cfg.teacher, device=device)
    if student is None:
        student, _ = load_model(cfg.student, device=device)
    teacher, student = teacher.to(device), student.to(device)
    ds = build_dataset(cfg.data_seed, n_per_family=cfg.n_per_family)
    train_set, valid = ds["train"], validation_subset(ds["valid"], cfg.eval_examples)
    os.makedirs(cfg.out_dir, exist_ok=True)
    model_path = os.path.join(cfg.out_dir, "model.safetensors")
    best_path = os.path.join(cfg.out_dir, "best.safetensors")
    ddp = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    d = Distiller(cfg, teacher, student, world=world, rank=rank, ddp=ddp)
    start, elapsed = 0, 0.0
    if cfg.resume and os.path.exists(_state_path(cfg.out_dir, rank)):
        loaded, _ = load_model(model_path, config=getattr(student, "cfg", None), device=device)
        student.load_state_dict(loaded.state_dict())
        start, elapsed = load_state(d, _state_path(cfg.out_dir, rank))
    elif rank == 0:
        for name in ("log.jsonl", "log.csv"):
            if os.path.exists(os.path.join(cfg.out_dir, name)):
                os.remove(os.path.join(cfg.out_dir, name))
    if rank == 0:
        _truncate_logs(cfg.out_dir, start, cols=LOG_COLS)
    if start == 0 and cfg.eval_every > 0:  # DistiLLM evaluates once before training (the first prev loss)
        d.after_eval(validate(d, valid, rouge=False)["val_loss"])
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    from tqdm.auto import tqdm

    bar = tqdm(range(start + 1, end + 1), desc=cfg.method, disable=not cfg.progress or rank != 0, leave=False)
    losses, records = [], []
    t0 = time.perf_counter()
    for step in bar:
        idx = step_indices(cfg.seed, step, len(train_set), cfg.batch_size * world)
        mine = idx[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
        ts = time.perf_counter()
        rec = d.step(step, [train_set[i] for i in mine])
        rec["step_s"] = round(time.perf_counter() - ts, 4)  # this update alone (no validation)
        rec["time_s"] = round(elapsed + time.perf_counter() - t0, 3)
        if cfg.eval_every > 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
            v = validate(d, valid, rouge=rank == 0)
            d.after_eval(v["val_loss"])
            rec.update(v)
            if rank == 0 and v["val_rougeL"] > d.best_rouge:
                d.best_rouge = v["val_rougeL"]
                save_model(student, best_path, step=step, method=cfg.method, val_rougeL=v["val_rougeL"])
            if world > 1:
                b = torch.tensor([d.best_rouge], dtype=torch.float64)
                torch.distributed.broadcast(b, 0)
                d.best_rouge = float(b)
        losses.append(rec["loss"])
        records.append(rec)
        if rank == 0:
            _log(cfg.out_dir, rec, cols=LOG_COLS)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", src=rec["source"])
        if step % cfg.ckpt_every == 0 or step == end:
            now = elapsed + time.perf_counter() - t0
            if rank == 0:
                save_model(student, model_path, step=step, method=cfg.method,
                           distill_config=dataclasses.asdict(cfg))
            save_state(d, step, now, _state_path(cfg.out_dir, rank))
    bar.close()
    if world > 1:
        torch.distributed.barrier()
    return {"losses": losses, "records": records, "step": end,
            "elapsed_s": elapsed + time.perf_counter() - t0,
            "model": student, "best": best_path if os.path.exists(best_path) else None, "distiller": d}


def describe() -> str:
    """The registry as a Markdown table (method | sequences | loss | options)."""
    rows = ["| method | sequences | loss | options |", "|---|---|---|---|"]
    for m in METHODS.values():
        opts = ", ".join(f"{k}={v}" for k, v in m.options) or "-"
        rows.append(f"| {m.name} | {m.sequences} | {m.loss} | {opts} |")
    return "\n".join(rows)


def _parse(argv=None) -> DistillConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--list", action="store_true", help="print the method registry and exit")
    for f in dataclasses.fields(DistillConfig):
        typ = str(f.type)
        if typ == "bool":
            p.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default)
        elif "None" in typ:
            base = int if "int" in typ else (float if "float" in typ else str)
            p.add_argument(f"--{f.name}", type=lambda s, b=base: None if s.lower() == "none" else b(s),
                           default=f.default)
        else:
            p.add_argument(f"--{f.name}", type={"int": int, "float": float}.get(typ, str), default=f.default)
    a = vars(p.parse_args(argv))
    if a.pop("list"):
        print(describe())
        raise SystemExit(0)
    return DistillConfig(**a)


def main(argv=None) -> None:
    cfg = _parse(argv)
    out = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        recs = read_log(cfg.out_dir)
        vals = [r["val_rougeL"] for r in recs if "val_rougeL" in r]
        print(json.dumps({"method": cfg.method, "step": out["step"],
                          "final_loss": out["losses"][-1] if out["losses"] else None,
                          "best_val_rougeL": max(vals) if vals else None,
                          "elapsed_s": round(out["elapsed_s"], 1)}))


if __name__ == "__main__":
    main()
