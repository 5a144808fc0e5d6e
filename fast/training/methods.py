"""The distillation registry: MGSR (arXiv 2407.10068) and its baselines, each a recipe of which sequences a
step trains on and with which loss.

Every method is one entry of :data:`METHODS`: a *recipe* that says which sequences a step trains on and
with which loss, plus the option values that define it (the ablations are the MGSR recipe with other
options). No method is chosen by matching parts of its name. A recipe is two functions of the
``fast.training.distill.Distiller`` ``d`` that runs it: ``build(d, step, examples) -> Plan`` and
``objective(d, plan) -> (loss, parts)``. Examples are ``(prompt ids, response ids)`` pairs.

=============  ===========================================================  ============================
method         sequences of a step                                          loss
=============  ===========================================================  ============================
sft            ground truth                                                 CE
kd             ground truth                                                 forward KL (teacher || student)
seqkd          teacher samples (T = 1)                                      CE
seqkd-fixed    a fixed teacher-generated set (each prompt's sample made once) forward KL (DistiLLM's SeqKD)
rkl            ground truth                                                 reverse KL
imitkd         student samples (T = 1)                                      forward KL
gkd            student samples with prob. ``gkd_lambda``, else ground truth generalised JSD(beta)
minillm        samples of the teacher-mixed policy ``a p + (1 - a) q``       reverse KL, REINFORCE (no PPO)
distillm       adaptive off-policy: ground truth / fresh student / replay   skew forward KL (alpha = 0.1)
mgsr           distillm's loop, SCRG on fresh student samples               CE(gt) + DAC-KL + span
=============  ===========================================================  ============================

Loss normalisation: each token-level term is ``sum over the step's tokens / number of tokens of the whole
step`` (all ranks; counts are all-reduced), the span term ``sum over pairs / pairs of the step``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fast.divergences import PARAMS as DIV_PARAMS
from fast.divergences import divergence
from fast.fused import fused_distill_loss
from fast.span import span_loss, spans_to_tensor
from fast.training.data import IGNORE, sft_example
from fast.training.lm import logits_of
from fast.training.sampling import decode, mixed_generate, sample_next
from reference.span import extract_spans  # rule-based chunker, NumPy, no torch

TOKEN_LOSSES = ("dac_kl", *DIV_PARAMS)  # MGSR's token term: DAC-KL, or one of the seven divergences


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


def _gen(cfg, step, rank, salt, micro=0) -> torch.Generator:
    """The generator of one draw site of a step; micro-batch ``m > 0`` of an accumulated step has its own."""
    parts = (cfg.seed, step, rank, salt) + ((micro,) if micro else ())
    return torch.Generator().manual_seed(_seed(*parts))


# sequences -------------------------------------------------------------------------------------------


def _gt(d, step, examples):
    return Plan(gt=[sft_example(p, r, d.eos_id) for p, r in examples], seqs=None, source="gt")


def _with(d, examples, responses, ended):
    """(inputs, labels) of prompt + response (+ EOS when the generation ended) for every example."""
    return [
        sft_example(p, r, d.eos_id if done else None)
        for (p, _), r, done in zip(examples, responses, ended, strict=True)
    ]


def generate_responses(model, prompts, *, max_new_tokens, temperature, generator, eos_id):
    """New tokens (EOS excluded) of ``model`` for each prompt, and whether each one ended with EOS.
    Module-level so tests can spy on which model generates."""
    outs = decode(
        model,
        prompts,
        [max_new_tokens] * len(prompts),
        lambda logits: sample_next(logits, temperature=temperature, generator=generator),
        eos_id=eos_id,
    )
    ended = [bool(o) and o[-1] == eos_id for o in outs]
    return [o[:-1] if e else o for o, e in zip(outs, ended, strict=True)], ended


def _student_samples(d, step, examples, salt=1):
    r, ended = generate_responses(
        d.student,
        [p for p, _ in examples],
        max_new_tokens=d.cfg.max_new_tokens,
        temperature=d.cfg.gen_temperature,
        generator=_gen(d.cfg, step, d.rank, salt, d.micro),
        eos_id=d.eos_id,
    )
    return r, ended


def _seqkd_build(d, step, examples):
    pe = d.prompt_batch(examples)
    r, ended = generate_responses(
        d.teacher,
        [p for p, _ in pe],
        max_new_tokens=d.cfg.max_new_tokens,
        temperature=d.cfg.gen_temperature,
        generator=_gen(d.cfg, step, d.rank, 1, d.micro),
        eos_id=d.eos_id,
    )
    return Plan(gt=_gt(d, step, examples).gt, seqs=_with(d, pe, r, ended), source="teacher")


def _seqkd_fixed_build(d, step, examples):
    """SeqKD as DistiLLM runs it: one fixed teacher-generated set over the prompts. A prompt's teacher
    response (T = ``gen_temperature``) is generated the first time the prompt is drawn and reused every
    later time (``d.teacher_set``, saved with the training state, so a resumed run trains on the same set);
    the loss is forward KL on it (``_FKL``). Generating lazily gives the same set as generating it all
    first, for the prompts a run draws."""
    pe = d.prompt_batch(examples)
    keys = [tuple(int(t) for t in p) for p, _ in pe]
    new = list(dict.fromkeys(k for k in keys if k not in d.teacher_set))
    if new:
        r, ended = generate_responses(
            d.teacher,
            [list(k) for k in new],
            max_new_tokens=d.cfg.max_new_tokens,
            temperature=d.cfg.gen_temperature,
            generator=_gen(d.cfg, step, d.rank, 1, d.micro),
            eos_id=d.eos_id,
        )
        d.teacher_set.update({k: (list(rr), e) for k, rr, e in zip(new, r, ended, strict=True)})
    resp, ended = zip(*(d.teacher_set[k] for k in keys), strict=True)
    plan = Plan(gt=_gt(d, step, examples).gt, seqs=_with(d, pe, list(resp), list(ended)), source="teacher")
    plan.extra["teacher_set"] = len(d.teacher_set)
    return plan


def _student_build(d, step, examples):
    pe = d.prompt_batch(examples)
    r, ended = _student_samples(d, step, pe)
    return Plan(gt=_gt(d, step, examples).gt, seqs=_with(d, pe, r, ended), source="student")


def _gkd_build(d, step, examples):
    if d.coin(step) < d.cfg.gkd_lambda:
        return _student_build(d, step, examples)
    return _gt(d, step, examples)


def _adaptive_build(d, step, examples, revise=False):
    """DistiLLM's adaptive off-policy sampler (finetune.py of its public code, re-implemented): with
    ``r ~ U(0, 1)``: fresh student samples when ``r < samp_threshold`` (or ``r < threshold`` while the buffer
    is not full), pushed into the replay buffer; a replay-buffer batch when ``r < threshold``; else the
    ground truth. MGSR (``revise``): SCRG revises the fresh samples before they are trained on and stored.
    The ground truth comes from ``examples``, the samples' prompts from the step's prompt batch."""
    cfg, th = d.cfg, d.threshold
    pe = d.prompt_batch(examples)
    frac = step / max(cfg.steps, 1)
    samp = {"constant": th * 0.5, "increasing": th * frac, "decreasing": th * (1 - frac)}[cfg.replay_ratio]
    r = d.coin(step)
    plan = _gt(d, step, examples)
    if r < samp or (r < th and len(d.buffer) < cfg.capacity):
        resp, ended = _student_samples(d, step, pe)
        if revise and cfg.scrg_frequency > 0:
            resp, ended, pos = d.revise(step, pe, resp, ended)
            plan.extra["scrg_positions"] = pos
        plan.seqs, plan.source = _with(d, pe, resp, ended), "fresh"
        d.buffer.extend(plan.seqs)
    elif r < th:
        rng = np.random.default_rng([cfg.seed, step, d.rank, 3] + ([d.micro] if d.micro else []))
        idx = rng.choice(len(d.buffer), size=min(len(pe), len(d.buffer)), replace=False)
        plan.seqs, plan.source = [d.buffer[int(i)] for i in idx], "replay"
    return plan


def _mgsr_build(d, step, examples):
    return _adaptive_build(d, step, examples, revise=True)


def _minillm_build(d, step, examples):
    cfg = d.cfg
    pe = d.prompt_batch(examples)
    resp, ended, mixlp = mixed_generate(
        d.teacher,
        d.student,
        [p for p, _ in pe],
        alpha=cfg.minillm_alpha,
        max_new_tokens=cfg.max_new_tokens,
        eos_id=d.eos_id,
        generator=_gen(cfg, step, d.rank, 1, d.micro),
    )
    plan = Plan(gt=_gt(d, step, examples).gt, seqs=_with(d, pe, resp, ended), source="mixed")
    plan.extra["mix_logp"] = mixlp
    plan.extra["rollout"] = _minillm_rollout(d, plan.seqs, mixlp)
    return plan


# losses ----------------------------------------------------------------------------------------------


def _fused_rows(
    h, y
):  # [B, T, H], [B, T] -> labelled rows [n, H], their labels [n], row of each (b, t) [B, T]
    m = y != IGNORE
    return h[m], y[m], (torch.cumsum(m.flatten(), 0) - 1).view(m.shape)


def _fused_ce(d, seqs):
    h, W, y, _ = d.forward_hidden(seqs)
    rows, labels, _ = _fused_rows(h, y)
    loss, _ = fused_distill_loss(rows, W, None, None, objective="ce", labels=labels, backend=d.cfg.backend)
    return loss, {"ce": loss.detach()}


def _ce_sft(d, plan):
    if d.fused:
        return _fused_ce(d, plan.gt)
    logits, y, (n,) = d.forward(plan.gt)
    s = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum")
    return s / n, {"ce": s.detach() / n}


def _ce_seqs(d, plan):
    if d.fused:
        return _fused_ce(d, plan.seqs if plan.seqs is not None else plan.gt)
    logits, y, (n,) = d.forward(plan.seqs if plan.seqs is not None else plan.gt)
    s = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum")
    return s / n, {"ce": s.detach() / n}


def _div_objective(name, **params):
    def objective(d, plan):
        seqs = plan.seqs if plan.seqs is not None else plan.gt
        if d.cache is not None:
            return _cached_kd(d, seqs)
        if d.fused:
            h, W, y, _ = d.forward_hidden(seqs)
            ht, Wt = d.teacher_hidden(seqs, h.shape[1])
            m = y != IGNORE
            p = {k: getattr(d.cfg, v) for k, v in params.items()}
            loss, _ = fused_distill_loss(h[m], W, ht[m], Wt, objective=name, backend=d.cfg.backend, **p)
            return loss, {name: loss.detach()}
        logits, y, (n,) = d.forward(seqs)
        t = d.teacher_logits(seqs, logits.shape[1])
        p = {k: getattr(d.cfg, v) for k, v in params.items()}
        s = divergence(name, t, logits, mask=y != IGNORE, reduction="sum", backend=d.cfg.backend, **p)
        return s / n, {name: s.detach() / n}

    return objective


def _cached_kd(d, seqs):
    """Forward KL from the offline teacher (``fast.teacher_cache``): its sparse entries at every labelled
    position of the step's (fixed) sequences, the student's logits there."""
    from fast.teacher_cache import sparse_kd_loss

    logits, y, (n,) = d.forward(seqs)
    entries = [d.cache.rows(inputs, labels) for inputs, labels in seqs]
    ids, vals, rest = (torch.cat([e[i] for e in entries]).to(logits.device) for i in range(3))
    rows = logits[y != IGNORE]
    if len(rows) != len(ids):
        raise ValueError(
            f"the teacher cache holds {len(ids)} positions for this batch, the batch has {len(rows)} "
            "(was the cache written with another block_size?)"
        )
    loss = sparse_kd_loss(rows, ids, vals, rest, d.cache.kind).sum() / n
    return loss, {"forward_kl": loss.detach()}


def _distillm_objective(d, plan):
    return _div_objective(d.cfg.distillm_loss, alpha="skew_alpha")(d, plan)


@torch.no_grad()
def _minillm_rollout(d, seqs, mixlp):
    """Rewards, importance weights and advantages of the sampled tokens, computed once at sampling time
    with the rollout policy (as PPO does); the objective treats them as constants."""
    x, y = d.collate(seqs)
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
    return (single + long) / n, {
        "single": single.detach() / n,
        "long": long.detach() / n,
        "reward": ro["reward"],
    }


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
    if d.fused:
        return _mgsr_fused(d, plan, two, seqs)
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
        parts.update(
            upper=info["upper"].mean() if info["upper"].numel() else torch.zeros(()),
            lower=info["lower"].mean() if info["lower"].numel() else torch.zeros(()),
            kept=info["kept"].mean() if info["kept"].numel() else torch.zeros(()),
            share=info["share"].mean() if info["share"].numel() else torch.zeros(()),
        )
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
            sp = (
                span_loss(
                    t, ls, spans_to_tensor(spans, ls.device), squared=cfg.span_squared, backend=cfg.backend
                )
                * pairs
            )
        else:
            sp = ls.sum() * 0.0
        parts["span"] = sp.detach() / max(n_pairs, 1)
        loss = loss + cfg.w_span * sp / max(n_pairs, 1)
    return loss, parts


def _mgsr_fused(d, plan, two, seqs):
    """:func:`_mgsr_objective` through ``fast.fused``: the same terms and normalisation, the logits chunk by
    chunk."""
    cfg = d.cfg
    h_all, W, y_all, _ = d.forward_hidden(plan.gt, seqs) if two else d.forward_hidden(plan.gt)
    B = len(plan.gt)
    hs, ys = (h_all[B:], y_all[B:]) if two else (h_all, y_all)
    ht, Wt = d.teacher_hidden(seqs, hs.shape[1])
    rows, labels, at = _fused_rows(hs, ys)
    spans = None
    if cfg.w_span:
        spans = [
            (int(at[b, s]), int(at[b, e - 1]) + 1)
            for b, row in enumerate(ys.tolist())
            for s, e in response_spans(row, cfg.span_mode)
        ]
        spans = torch.tensor(spans, dtype=torch.int64).reshape(-1, 2)
    kw = dict(
        objective="mgsr",
        mask=None,
        spans=spans,
        dac=d.dac,
        token_loss=cfg.token_loss,
        backend=cfg.backend,
        alpha=cfg.skew_alpha,
        beta=0.5,
        span_squared=cfg.span_squared,
    )
    if two:
        g_rows, g_labels, _ = _fused_rows(h_all[:B], y_all[:B])
        sft, _ = fused_distill_loss(
            g_rows, W, None, None, objective="ce", labels=g_labels, backend=cfg.backend
        )
        rest, parts = fused_distill_loss(
            rows, W, ht[ys != IGNORE], Wt, weights=(0.0, cfg.w_token, cfg.w_span), **kw
        )
        loss = cfg.w_sft * sft + rest
        parts["sft"] = sft.detach()
    else:
        loss, parts = fused_distill_loss(
            rows, W, ht[ys != IGNORE], Wt, labels=labels, weights=(cfg.w_sft, cfg.w_token, cfg.w_span), **kw
        )
    if not cfg.w_span:
        parts.pop("span", None)
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
    Method(
        "minillm",
        "teacher-mixed policy samples",
        "reverse KL by REINFORCE (a variant of MiniLLM: no PPO epochs or clipping)",
        _minillm_build,
        _minillm_objective,
    ),
    Method(
        "distillm",
        "adaptive off-policy: ground truth / fresh student / replay buffer",
        "skew forward KL (alpha 0.1)",
        lambda d, s, e: _adaptive_build(d, s, e),
        _distillm_objective,
    ),
    Method("mgsr", _MGSR_SEQ, _MGSR_LOSS.format("DAC-KL"), _mgsr_build, _mgsr_objective),
]
_ABLATIONS = [
    Method(
        "mgsr-no-scrg",
        "distillm's adaptive loop, raw student samples",
        _MGSR_LOSS.format("DAC-KL"),
        _mgsr_build,
        _mgsr_objective,
        (("scrg_frequency", 0),),
    ),
    Method(
        "mgsr-no-dackl",
        _MGSR_SEQ,
        _MGSR_LOSS.format("forward KL"),
        _mgsr_build,
        _mgsr_objective,
        (("token_loss", "forward_kl"),),
    ),
    Method("mgsr-no-span", _MGSR_SEQ, "CE(gt) + DAC-KL", _mgsr_build, _mgsr_objective, (("w_span", 0.0),)),
    Method("mgsr-no-sft", _MGSR_SEQ, "DAC-KL + span", _mgsr_build, _mgsr_objective, (("w_sft", 0.0),)),
    Method(
        "mgsr-fixed-clip",
        _MGSR_SEQ,
        _MGSR_LOSS.format("DAC-KL at fixed levels (0.75, 0.375), the sub-network's at zero output"),
        _mgsr_build,
        _mgsr_objective,
        (("dac_fixed", (0.75, 0.375)),),
    ),
    *[
        Method(
            f"mgsr-scrg{f}",
            _MGSR_SEQ + f" (frequency {f})",
            _MGSR_LOSS.format("DAC-KL"),
            _mgsr_build,
            _mgsr_objective,
            (("scrg_frequency", f),),
        )
        for f in (0, 1, 3, 5)
    ],
    *[
        Method(
            f"mgsr-{name}",
            _MGSR_SEQ,
            _MGSR_LOSS.format(name),
            _mgsr_build,
            _mgsr_objective,
            (("token_loss", name),),
        )
        for name in DIV_PARAMS
    ],
]
# baselines as their reference implementations run them, beside the simpler forms above
_VARIANTS = [
    Method(
        "seqkd-fixed",
        "a fixed teacher-generated set (each prompt's teacher sample, T=1, made once)",
        "forward KL",
        _seqkd_fixed_build,
        _FKL,
    ),
]
METHODS: dict[str, Method] = {m.name: m for m in _BASE + _VARIANTS + _ABLATIONS}
BASELINES = tuple(m.name for m in _BASE)


def resolve(cfg):
    """The config with the method's options applied; unknown method / bad option -> ValueError."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; known: {sorted(METHODS)}")
    cfg = dataclasses.replace(cfg, **dict(METHODS[cfg.method].options))
    if cfg.token_loss not in TOKEN_LOSSES:
        raise ValueError(f"token_loss must be one of {TOKEN_LOSSES}, got {cfg.token_loss!r}")
    if cfg.distillm_loss not in ("skew_forward_kl", "skew_reverse_kl"):
        raise ValueError(
            f"distillm_loss must be skew_forward_kl or skew_reverse_kl, got {cfg.distillm_loss!r}"
        )
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
    if not 1 <= cfg.grad_accum <= cfg.batch_size:
        raise ValueError(f"grad_accum must lie in [1, batch_size={cfg.batch_size}], got {cfg.grad_accum}")
    return cfg


def describe() -> str:
    """The registry as a Markdown table (method | sequences | loss | options)."""
    rows = ["| method | sequences | loss | options |", "|---|---|---|---|"]
    for m in METHODS.values():
        opts = ", ".join(f"{k}={v}" for k, v in m.options) or "-"
        rows.append(f"| {m.name} | {m.sequences} | {m.loss} | {opts} |")
    return "\n".join(rows)
