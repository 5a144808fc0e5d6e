"""Sampling a next token, and batched generation through the causal-LM protocol (``fast.training.lm``).

One decoding loop (:func:`decode`) serves plain generation, SCRG's continuations and evaluation: rows are
left-padded, each stops at its first EOS or its own token budget, and a finished row takes a filler token
(its output is final). With the KV cache each step feeds only the new token; ``use_cache=False`` recomputes
the whole sequence every step (the oracle the cached path is tested against).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from fast.training.lm import device_of, left_pad, lm_logits, new_cache


def filter_logits(logits, *, top_k: int | None = None, top_p: float | None = None):  # [B, V] -> [B, V]
    """Top-k then top-p (nucleus) filtering; removed entries become -inf.

    convention: top-k keeps every logit >= the k-th largest (ties at the boundary are all kept, like nanoGPT);
    top-p keeps the smallest prefix of the descending-probability order whose mass reaches p (the first token
    is always kept).
    """
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly better tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_cdf(probs, generator):  # [B, V] probabilities (float64, any total) -> [B]
    """Inverse-CDF sampling: one float64 uniform per row from ``generator`` (a CPU generator)."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.size(0), 1, generator=generator, dtype=torch.float64, device="cpu").to(probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_max(probs.size(-1) - 1)


def sample_next(logits, *, temperature: float, top_k=None, top_p=None, generator=None):  # [B, V] -> [B]
    """Greedy when ``temperature == 0`` (argmax, lowest id on ties), else inverse-CDF sampling.

    Sampling draws one uniform per row from ``generator`` and inverts the CDF, so two runs whose logits
    agree to rounding pick the same token unless the uniform lands within rounding of a CDF step.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits.double() / temperature, top_k=top_k, top_p=top_p)
    return sample_from_cdf(logits.softmax(-1), generator)


@torch.no_grad()
def decode(
    models,
    rows,
    budgets,
    pick: Callable,
    *,
    eos_id: int,
    pad_id: int = 0,
    use_cache: bool = True,
    logits_fn: Callable | None = None,
):
    """Extend each row of ``rows`` (lists of token ids) by at most ``budgets[b]`` tokens.

    ``models``: one model, or several run in lockstep on the same tokens (MiniLLM's teacher-mixed policy);
    ``pick(logits)`` receives the last-position logits ``[B, V]`` (a list of them for several models) and
    returns the next tokens ``[B]``. Returns the new tokens per row, EOS included when a row produced it.
    ``logits_fn(model, idx, valid)`` (optional) replaces the protocol; it runs without a cache.
    """
    many = isinstance(models, (list, tuple))
    models = list(models) if many else [models]
    B = len(rows)
    out: list[list[int]] = [[] for _ in range(B)]
    if B == 0 or max(budgets) <= 0:
        return out
    dev = device_of(models[-1])
    idx, valid = left_pad(rows, dev, pad_id)
    use_cache = use_cache and logits_fn is None
    caches = [new_cache(m) for m in models] if use_cache else [None] * len(models)
    step_idx = idx
    done = [b <= 0 for b in budgets]
    for _ in range(max(budgets)):
        last = [
            (lm_logits(m, step_idx, valid, c) if logits_fn is None else logits_fn(m, step_idx, valid))[:, -1]
            for m, c in zip(models, caches, strict=True)
        ]
        nxt = pick(last if many else last[0])
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
                done[b] = out[b][-1] == eos_id or len(out[b]) >= budgets[b]
        if all(done):
            break
        nxt = torch.where(torch.tensor(done, device=nxt.device), torch.full_like(nxt, pad_id), nxt).to(dev)
        idx = torch.cat([idx, nxt[:, None]], 1)
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
        step_idx = nxt[:, None] if use_cache else idx
    return out


def generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
) -> list[list[int]]:
    """Batched generation from prompts of different lengths; returns the new tokens per row (EOS excluded).

    A row stops at its first EOS. Sampling needs an explicit ``torch.Generator`` (a CPU generator; draws
    are moved to the model device).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    if temperature > 0 and generator is None:
        raise ValueError("sampling (temperature > 0) needs an explicit torch.Generator")

    def pick(logits):
        return sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    outs = decode(
        model,
        prompts,
        [max_new_tokens] * len(prompts),
        pick,
        eos_id=eos_id,
        pad_id=pad_id,
        use_cache=use_cache,
    )
    return [o[:-1] if o and o[-1] == eos_id else o for o in outs]


def mixed_generate(teacher, student, prompts, *, alpha, max_new_tokens, eos_id, generator, pad_id=0):
    """Sample token by token from ``alpha p_teacher + (1 - alpha) q_student`` (MiniLLM's teacher-mixed
    sampling, arXiv 2306.08543). Returns the new tokens (EOS excluded), whether each row ended, and
    ``log p_mix`` of every sampled token (EOS included)."""
    la, lb = math.log(alpha), math.log1p(-alpha)
    lps: list[list[float]] = [[] for _ in prompts]
    alive = [True] * len(prompts)

    def pick(last):
        lp, lq = (x.double().log_softmax(-1) for x in last)
        lmix = torch.logaddexp(lp + la, lq + lb)
        nxt = sample_from_cdf(lmix.exp(), generator)
        chosen = lmix.gather(-1, nxt[:, None])[:, 0].tolist()
        for b, v in enumerate(chosen):
            if alive[b]:
                lps[b].append(v)
        return nxt

    outs = decode(
        [teacher, student],
        prompts,
        [max_new_tokens] * len(prompts),
        _track(pick, alive, eos_id, max_new_tokens),
        eos_id=eos_id,
        pad_id=pad_id,
    )
    ended = [bool(o) and o[-1] == eos_id for o in outs]
    return [o[:-1] if e else o for o, e in zip(outs, ended, strict=True)], ended, lps


def _track(pick, alive, eos_id, budget):
    """Wrap ``pick`` so that ``alive[b]`` is False once row b has ended (EOS or budget) before a step."""
    counts = [0] * len(alive)

    def wrapped(last):
        nxt = pick(last)
        for b, t in enumerate(nxt.tolist()):
            if alive[b]:
                counts[b] += 1
                alive[b] = t != eos_id and counts[b] < budget
        return nxt

    return wrapped
