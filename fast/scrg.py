"""SCRG (sequence correction and re-generation, MGSR arXiv 2407.10068) on batches of torch models.

The oracle is ``reference/scrg.py``: same definition, same conventions, same [RECON] choices (forward KL
at temperature 1, EOS kept as the last response token, ``max_new_tokens`` counting every response token,
no mismatch -> stop, later rounds only after the previous correction). With ``teacher_token="argmax"`` and
``decode="greedy"`` both return the same token sequences (tested with float64 models; in float32, or where d
values tie mathematically, e.g. a context of one repeated token, rounding may pick another position).
Entry point::

    revised, positions = scrg(prompts, responses, teacher, student, max_new_tokens=64, eos_id=EOS,
                              generator=torch.Generator().manual_seed(0))

One round on the rows still active:

1. one batched teacher-forced forward of the teacher and of the student over the left-padded
   ``prompt + response`` rows; the logits that predict each response token are gathered to ``[B, T, V]``;
2. ``d = fast.divergences.divergence("forward_kl", ..., reduction="none")`` per response position (the torch
   backend on CPU, Triton on CUDA unless ``kl_backend`` says otherwise);
3. teacher tokens at the candidate positions (``i >= start``): argmax, or one uniform per position through
   ``fast.training.sampling.sample_next``;
4. per row ``j = argmax d`` over candidates whose teacher token differs (first index on ties); rows with
   none stop;
5. one batched KV-cache re-generation by the student from the per-row prefixes
   ``prompt + response[:j] + [y_j^t]`` (rows whose corrected token is EOS, or that are at the length limit,
   are not re-generated).

RNG draw order (all from ``generator``, a CPU ``torch.Generator``): round by round; in a round first the
teacher tokens, one uniform per candidate position, rows in batch order and positions increasing within a
row (the reference's order, rows concatenated); then the re-generation, one uniform per step for every row
of the re-generation batch until all of its rows are done (finished rows keep drawing, as in
``fast.training.sampling.generate``). So the result is a deterministic function of the inputs and the
generator
state, but the streams differ from the reference's ``np.random.Generator``: sampled results are equal in
distribution, not token for token.

Models: ``teacher``/``student`` are causal LMs of the protocol in ``fast.training.lm`` (the tiny GPT, or
any transformers causal LM): ``lm_logits(model, idx, valid)`` on left-padded rows, and the same with a KV
cache for re-generation. ``logits_fn(model, idx, valid) -> [B, T, V]`` (optional) replaces the protocol for
a model that does not serve it: ``idx [B, T]`` left-padded token ids, ``valid [B, T]`` bool (False on
padding), each row's positions starting at 0 at its first valid token; re-generation then recomputes the
whole sequence through ``logits_fn`` at every step (correct for any model, quadratic in length). Both models
run in ``eval()`` mode under ``no_grad`` for the call (their mode is restored afterwards).
"""

from __future__ import annotations

import math
import numbers
from typing import Callable

import numpy as np
import torch

from fast.divergences import divergence
from fast.training.lm import device_of, left_pad, lm_logits
from fast.training.sampling import decode as decode_rows
from fast.training.sampling import sample_next

__all__ = ["scrg", "error_scores", "continue_responses", "TEACHER_TOKENS", "DECODES"]

TEACHER_TOKENS = ("sample", "argmax")
DECODES = ("sample", "greedy")
PAD_ID = 0  # filler for left padding: any valid id (masked by ``valid``), so any vocabulary size works


def _vocab_size(model, logits_fn, who):  # -> int, from a one-token forward
    dev = device_of(model)
    out = logits_fn(
        model,
        torch.zeros((1, 1), dtype=torch.long, device=dev),
        torch.ones((1, 1), dtype=torch.bool, device=dev),
    )
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != (1, 1):
        raise ValueError(
            f"logits_fn must return [B, T, V] logits for the {who}, got "
            f"{getattr(out, 'shape', type(out).__name__)}"
        )
    return out.shape[-1]


def _teacher_forced(model, prompts, responses, logits_fn):  # -> [B, T, V]: the logits predicting each token
    """Row b, response token i is predicted by the logits after ``prompt_b + response_b[:i]``."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    idx, valid = left_pad(seqs, device_of(model), PAD_ID)
    logits = logits_fn(model, idx, valid)  # [B, L, V]
    B, L, V = logits.shape
    T = max(len(r) for r in responses)
    n = torch.tensor([len(r) for r in responses], device=logits.device)
    i = torch.arange(T, device=logits.device)
    # left padding puts response token i of row b at column L - n_b + i; the column before predicts it
    cols = (L - n[:, None] - 1 + i[None, :]).clamp(0, L - 1)  # [B, T] (clamped where i >= n_b: unused)
    return logits.gather(1, cols[..., None].expand(B, T, V))


def _detect(
    teacher, student, prompts, seqs, starts, *, teacher_token, generator, temperature, logits_fn, kl_backend
):  # -> d [B, T] (student's device), y_t [B, T] long, cand [B, T] bool
    """One detection step: per-position KL, teacher tokens at positions ``i >= start``, candidate mask."""
    lt = _teacher_forced(teacher, prompts, seqs, logits_fn)
    ls = _teacher_forced(student, prompts, seqs, logits_fn)
    lt = lt.to(ls.device)
    B, T, _ = ls.shape
    i = torch.arange(T, device=ls.device)[None, :]
    n = torch.tensor([len(s) for s in seqs], device=ls.device)[:, None]
    st = torch.tensor(starts, device=ls.device)[:, None]
    live = (i < n) & (i >= st)  # [B, T] positions looked at in this round
    d = divergence("forward_kl", lt, ls, mask=live, reduction="none", backend=kl_backend)  # [B, T], tau 1
    y_t = torch.full((B, T), -1, dtype=torch.long, device=ls.device)
    rows = lt[live]  # [N, V] in row-major order: rows in batch order, positions increasing
    if rows.shape[0]:
        if teacher_token == "argmax":
            y_t[live] = rows.argmax(-1)  # convention: lowest id among ties
        else:
            y_t[live] = sample_next(rows, temperature=temperature, generator=generator).to(ls.device)
    y_s = torch.full((B, T), -1, dtype=torch.long, device=ls.device)
    for b, s in enumerate(seqs):
        if s:
            y_s[b, : len(s)] = torch.tensor(s, dtype=torch.long)
    return d, y_t, live & (y_t != y_s)


@torch.no_grad()
def continue_responses(
    model,
    prompts,
    prefixes,
    *,
    max_new_tokens,
    eos_id,
    decode="sample",
    generator=None,
    temperature=1.0,
    logits_fn=None,
):  # -> list[list[int]]
    """Each ``prefix`` extended by ``model`` until it ends with EOS (kept) or has ``max_new_tokens`` tokens.

    Batched, left-padded, with the KV cache (``logits_fn`` None: the protocol of ``fast.training.lm``). With
    empty
    prefixes this is student sampling in SCRG's response convention (EOS kept). Rows already finished
    are returned unchanged and take no draws.
    """
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    if decode == "sample" and not isinstance(generator, torch.Generator):
        raise ValueError("decode='sample' needs an explicit torch.Generator")
    if len(prompts) != len(prefixes) or any(len(p) == 0 for p in prompts):
        raise ValueError(
            f"need one non-empty prompt per prefix, got {len(prompts)} prompts for {len(prefixes)} prefixes"
        )
    out = [list(p) for p in prefixes]
    rows = [b for b, p in enumerate(out) if len(p) < max_new_tokens and (not p or p[-1] != eos_id)]
    if not rows:
        return out
    temp = 0.0 if decode == "greedy" else temperature  # sample_next: 0 = argmax, lowest id on ties
    new = decode_rows(
        model,
        [list(prompts[b]) + out[b] for b in rows],
        [max_new_tokens - len(out[b]) for b in rows],
        lambda logits: sample_next(logits, temperature=temp, generator=generator),
        eos_id=eos_id,
        pad_id=PAD_ID,
        logits_fn=logits_fn,
    )
    for b, tokens in zip(rows, new, strict=True):
        out[b] += tokens
    return out


def _is_int(x) -> bool:  # Python or NumPy integer, not bool
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _check(
    prompts,
    responses,
    teacher,
    student,
    frequency,
    teacher_token,
    decode,
    max_new_tokens,
    eos_id,
    generator,
    temperature,
    logits_fn,
):  # -> None, raises ValueError
    if not isinstance(prompts, (list, tuple)) or not isinstance(responses, (list, tuple)):
        raise ValueError("prompts and responses must be lists of token-id lists")
    if len(prompts) == 0 or len(prompts) != len(responses):
        raise ValueError(
            f"need one response per prompt and at least one row, got {len(prompts)} prompts and "
            f"{len(responses)} responses"
        )
    empty = [b for b, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"every prompt needs at least one token (e.g. BOS); empty rows: {empty[:5]}")
    if not _is_int(frequency) or frequency < 0:
        raise ValueError(f"frequency must be an integer >= 0, got {frequency!r}")
    if teacher_token not in TEACHER_TOKENS:
        raise ValueError(f"teacher_token must be one of {TEACHER_TOKENS}, got {teacher_token!r}")
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    if (teacher_token == "sample" or decode == "sample") and not isinstance(generator, torch.Generator):
        raise ValueError("sampling (teacher_token or decode 'sample') needs an explicit torch.Generator")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(
            f"the generator must be a CPU torch.Generator (draws move to the model), got {generator.device}"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    for b, r in enumerate(responses):
        if len(r) > max_new_tokens:
            raise ValueError(f"response {b} has {len(r)} tokens, more than max_new_tokens={max_new_tokens}")
        if eos_id in list(r)[:-1]:
            raise ValueError(f"response {b}: eos_id={eos_id} may only be the last token")
    V = _vocab_size(teacher, logits_fn, "teacher")
    Vs = _vocab_size(student, logits_fn, "student")
    if V != Vs:
        raise ValueError(f"vocabulary mismatch: the teacher has {V} logits, the student {Vs}")
    for name, rows in (("prompts", prompts), ("responses", responses), ("eos_id", [[eos_id]])):
        for b, r in enumerate(rows):
            bad = [t for t in r if not _is_int(t) or not 0 <= t < V]
            if bad:
                raise ValueError(f"{name}[{b}] has token ids outside [0, {V}): {bad[:5]}")


class _EvalMode:  # eval() + no_grad for both models, the training flags restored afterwards
    def __init__(self, *models):
        self.models = models

    def __enter__(self):
        self.flags = [m.training for m in self.models]
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        for m in self.models:
            m.eval()

    def __exit__(self, *exc):
        for m, f in zip(self.models, self.flags, strict=True):
            m.train(f)
        torch.set_grad_enabled(self.grad)


def error_scores(
    prompts,
    responses,
    teacher,
    student,
    *,
    teacher_token="argmax",
    generator=None,
    temperature=1.0,
    logits_fn: Callable | None = None,
    kl_backend="auto",
):
    """One detection step on a batch (round 1 of SCRG): ``(d, y_t, candidates)``, each ``[B, T]``.

    ``d[b, i] = KL(p^t || p^s)`` at response position i (0 beyond the row's length), ``y_t`` the teacher
    tokens (-1 beyond the length), ``candidates`` where the teacher token differs from the response.
    """
    fn = logits_fn or lm_logits
    with _EvalMode(teacher, student):
        if teacher_token == "sample" and not isinstance(generator, torch.Generator):
            raise ValueError("teacher_token='sample' needs an explicit torch.Generator")
        if max(len(r) for r in responses) == 0:
            z = torch.zeros((len(responses), 0))
            return z, z.long(), z.bool()
        return _detect(
            teacher,
            student,
            prompts,
            [list(r) for r in responses],
            [0] * len(responses),
            teacher_token=teacher_token,
            generator=generator,
            temperature=temperature,
            logits_fn=fn,
            kl_backend=kl_backend,
        )


def scrg(
    prompts,
    responses,
    teacher,
    student,
    *,
    frequency=1,
    teacher_token="sample",
    decode="sample",
    max_new_tokens,
    eos_id,
    generator=None,
    temperature=1.0,
    logits_fn: Callable | None = None,
    kl_backend="auto",
):  # -> (revised list[list[int]], positions list[list[int]])
    """SCRG on a batch: ``revised[b]`` is row b's revised response, ``positions[b]`` its corrected indices.

    ``prompts``/``responses``: lists of token-id lists (any lengths; responses may be empty, may end with
    ``eos_id``, at most ``max_new_tokens`` long). ``frequency``: rounds (0 = identity). ``teacher_token``:
    "sample" (default, temperature ``temperature``) or "argmax". ``decode``: the student's re-generation,
    "sample" or "greedy". ``generator``: a CPU ``torch.Generator``, required when anything is sampled.
    ``logits_fn``: the model adapter (module docstring). ``kl_backend``: ``fast.divergences`` backend.
    """
    fn = logits_fn or lm_logits
    with _EvalMode(teacher, student):
        _check(
            prompts,
            responses,
            teacher,
            student,
            frequency,
            teacher_token,
            decode,
            max_new_tokens,
            eos_id,
            generator,
            temperature,
            fn,
        )
        seqs = [list(r) for r in responses]
        positions: list[list[int]] = [[] for _ in seqs]
        starts = [0] * len(seqs)
        active = [b for b, s in enumerate(seqs) if s]
        for _ in range(frequency):
            if not active:
                break
            d, y_t, cand = _detect(
                teacher,
                student,
                [prompts[b] for b in active],
                [seqs[b] for b in active],
                [starts[b] for b in active],
                teacher_token=teacher_token,
                generator=generator,
                temperature=temperature,
                logits_fn=fn,
                kl_backend=kl_backend,
            )
            j = torch.where(cand, d, torch.full_like(d, -math.inf)).argmax(-1).tolist()  # first max on ties
            has = cand.any(-1).tolist()
            fixed = [(b, j[r]) for r, b in enumerate(active) if has[r]]  # rows without a candidate stop
            prefixes = [seqs[b][: j[r]] + [int(y_t[r, j[r]])] for r, b in enumerate(active) if has[r]]
            new = continue_responses(
                student,
                [prompts[b] for b, _ in fixed],
                prefixes,
                max_new_tokens=max_new_tokens,
                eos_id=eos_id,
                decode=decode,
                generator=generator,
                temperature=temperature,
                logits_fn=logits_fn,
            )
            for (b, jb), s in zip(fixed, new, strict=True):
                seqs[b] = s
                positions[b].append(jb)
                starts[b] = jb + 1
            active = [b for b, _ in fixed if starts[b] < len(seqs[b])]
        return seqs, positions
