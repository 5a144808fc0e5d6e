"""SCRG, sequence correction and re-generation (the sequence level of MGSR, arXiv 2407.10068): NumPy oracle.

The student samples a response; SCRG finds the token where the student departs most from the teacher,
replaces it with the teacher's token and lets the student write the rest again. One round, for a prompt
``x`` and a response ``y = (y_0, ..., y_{T-1})`` (0-based), all teacher-forced on the *student's* sequence::

    p_i^t = softmax(teacher(x + y[:i]))      p_i^s = softmax(student(x + y[:i]))      i = 0 .. T-1
    d_i   = KL(p_i^t || p_i^s)                                   "semantic cognitive difference"
    y_i^t ~ p_i^t            (teacher_token="sample"; or argmax p_i^t with "argmax")
    j     = argmax { d_i : i >= start, y_i^t != y_i }            error position (Eq. 3, reconstructed)
    y'    = y[:j] + [y_j^t] + student continuation of x + y[:j] + [y_j^t]       (Eq. 4 + re-generation)

``frequency = F`` runs F rounds; round r only looks at positions after the previous correction
(``start = j_prev + 1``; ``start = 0`` in round 1), so a correction is never undone. ``scrg`` returns the
revised response and the list of corrected positions (0-based response indices, strictly increasing).

Choices the paper leaves open ([RECON]: ours, with the alternative named):

* [RECON] ``d_i`` is the forward KL(p^t || p^s) at temperature 1 (``reference.divergences.forward_kl``),
  whatever the sampling ``temperature``. Alternatives: reverse KL or JSD; d at the sampling temperature.
* [RECON] the teacher token is sampled at temperature 1 by default (a public review says "sampled");
  ``teacher_token="argmax"`` is the deterministic alternative.
* [RECON] no position where the teacher token differs from the student's -> no correction, and SCRG stops
  there (later rounds are not tried, even with a sampled teacher token). Alternatives: fall back to
  ``argmax d_i`` over all positions; redraw the teacher tokens in the remaining rounds.
* [RECON] ``frequency > 1`` looks only after the previous correction. Alternative: re-detect over the whole
  revised sequence (which can undo an earlier correction).
* [RECON] **EOS is part of the response.** A response the student ended reads ``[..., eos_id]``; one without
  a final EOS was cut by the length limit. The final EOS is a position like any other: the teacher may
  disagree with stopping there (its token then replaces the EOS and the student continues). EOS may only
  be the last token. Alternative: ``tiny_models.gpt.generate``'s convention, EOS dropped from the output;
  then the stop decision is never examined and "stopped" cannot be told from "cut".
* [RECON] **``max_new_tokens`` counts every response token, EOS included**, kept and re-generated together:
  ``len(revised) <= max_new_tokens`` (the number of decoding steps of ``tiny_models.gpt.generate``). An
  input response longer than that is a ``ValueError``. Alternative: a fresh budget of ``max_new_tokens``
  tokens for the re-generated suffix alone (revised responses could then grow with every round).
* convention: a corrected token that is EOS ends the response there (no re-generation); a correction at
  the last allowed position (``j + 1 == max_new_tokens``) is not continued either.
* convention: ``frequency = 0`` is the identity (the input is validated all the same).
* convention: the re-generated suffix is decoded by the student like the original sample: ``decode="sample"``
  (temperature ``temperature``, no top-k/top-p) or ``"greedy"``.
* convention (ties): the error position is the *lowest* index among equal maximal ``d_i``; argmax teacher
  tokens and greedy decoding take the *lowest* token id among equal maximal logits (``np.argmax``,
  ``torch.argmax``). Ties that hold only mathematically are broken by rounding: in a context made of one
  repeated token (prompt ``[a]``, response ``[a, a, ...]``) every position has the same hidden state, so the
  d_i are equal up to the last bits and an implementation with other rounding (``fast.scrg``) may pick another
  of them.
* convention (sampling): inverse CDF, exactly as ``fast.training.sampling.sample_next``: one uniform ``u`` in
  [0, 1) per token, ``p = softmax(logits / temperature)`` in float64, the token is the first index whose
  cumulative probability reaches ``u * cdf[-1]``.

RNG draw order (``rng`` is a ``np.random.Generator``, or any object whose ``random()`` returns a float in
[0, 1); one ``rng.random()`` per sampled token, nothing else):
round by round; in a round first the teacher tokens at positions ``start, start+1, ..., T-1`` in increasing
order (only with ``teacher_token="sample"``), then, if there is a correction that is re-generated, the
student's re-generated tokens in order (only with ``decode="sample"``). A round without a correction ends
SCRG, so nothing more is drawn. ``fast.scrg`` keeps the same order per row (rows one after another for the
teacher tokens; one uniform per regenerating row per step for the suffixes), from a ``torch.Generator``.

``teacher`` and ``student`` are callables ``f(tokens) -> [V]`` next-token logits after ``tokens`` (a list of
ids, never empty); e.g. ``lambda ids: reference.gpt.gpt(ids, params, **cfg)[-1]``.
"""

from __future__ import annotations

import numpy as np

from reference.divergences import forward_kl
from reference.nn import softmax

TEACHER_TOKENS = ("sample", "argmax")
DECODES = ("sample", "greedy")


def sample_token(logits, u, temperature):  # [V], float in [0, 1), float > 0 -> int
    """Inverse-CDF sampling from softmax(logits / temperature) with the uniform ``u``."""
    cdf = np.cumsum(softmax(np.asarray(logits, dtype=np.float64) / temperature))
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="left"), len(cdf) - 1))


def next_token(logits, mode, rng, temperature):  # [V] -> int; mode "argmax"/"greedy" or "sample"
    if mode == "sample":
        return sample_token(logits, rng.random(), temperature)  # one draw
    return int(np.argmax(logits))  # convention: lowest id among ties


def _logits(f, tokens, who, vocab=None):  # callable, list[int] -> [V] float64
    out = np.asarray(f(list(tokens)), dtype=np.float64)
    if out.ndim != 1 or out.shape[0] < 1:
        raise ValueError(f"{who} must return next-token logits of shape [V], got shape {out.shape}")
    if vocab is not None and out.shape[0] != vocab:
        raise ValueError(f"{who} returned {out.shape[0]} logits, expected the vocabulary size {vocab}")
    if np.isnan(out).any() or np.isposinf(out).any():
        raise ValueError(f"{who} returned NaN or +inf logits after {len(tokens)} tokens")
    return out


def error_scores(
    prompt, response, teacher, student, *, start=0, teacher_token="sample", rng=None, temperature=1.0
):  # -> d [T] float64, y_t [T] int64
    """One detection step, teacher-forced on ``prompt + response``.

    Returns ``d`` (``d[i] = KL(p_i^t || p_i^s)``) and the teacher tokens ``y_t``, for ``i >= start``;
    entries before ``start`` are ``nan`` and ``-1`` (not computed, nothing drawn for them).
    """
    T = len(response)
    d = np.full(T, np.nan)
    y_t = np.full(T, -1, dtype=np.int64)
    for i in range(start, T):  # the teacher tokens are drawn in this order (one uniform each)
        prefix = list(prompt) + list(response[:i])
        lt = _logits(teacher, prefix, "teacher")
        ls = _logits(student, prefix, "student", vocab=lt.shape[0])
        d[i] = forward_kl(lt, ls)
        y_t[i] = next_token(lt, teacher_token, rng, temperature)
    return d, y_t


def error_position(d, y_t, response, *, start=0):  # [T], [T], list[int] -> int | None
    """``argmax d[i]`` over ``i >= start`` with ``y_t[i] != response[i]``; lowest index on ties; else None."""
    j = None
    for i in range(start, len(response)):
        if y_t[i] != response[i] and (j is None or d[i] > d[j]):  # strict ">": the earlier index wins ties
            j = i
    return j


def continue_response(
    model, prompt, prefix, *, max_new_tokens, eos_id, decode="sample", rng=None, temperature=1.0
):  # -> list[int]
    """``prefix`` extended by ``model`` until it ends with EOS (kept) or has ``max_new_tokens`` tokens."""
    out = list(prefix)
    while len(out) < max_new_tokens and (not out or out[-1] != eos_id):
        out.append(next_token(_logits(model, list(prompt) + out, "student"), decode, rng, temperature))
    return out


def _check(
    prompt,
    response,
    teacher,
    student,
    frequency,
    teacher_token,
    decode,
    max_new_tokens,
    eos_id,
    rng,
    temperature,
):  # -> None, raises ValueError
    if len(prompt) == 0:
        raise ValueError("the prompt needs at least one token (e.g. BOS)")
    if isinstance(frequency, bool) or not isinstance(frequency, (int, np.integer)) or frequency < 0:
        raise ValueError(f"frequency must be an integer >= 0, got {frequency!r}")
    if teacher_token not in TEACHER_TOKENS:
        raise ValueError(f"teacher_token must be one of {TEACHER_TOKENS}, got {teacher_token!r}")
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
    if (teacher_token == "sample" or decode == "sample") and not callable(getattr(rng, "random", None)):
        raise ValueError(
            "sampling (teacher_token or decode 'sample') needs an explicit rng, e.g. np.random.default_rng(0)"
        )
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, (int, np.integer))
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if len(response) > max_new_tokens:
        raise ValueError(f"the response has {len(response)} tokens, more than {max_new_tokens=}")
    if eos_id in list(response)[:-1]:
        at = list(response).index(eos_id)
        raise ValueError(f"eos_id={eos_id} may only be the last response token, found at index {at}")
    V = _logits(teacher, [0], "teacher").shape[0]  # a one-token probe: id 0 exists in any vocabulary
    Vs = _logits(student, [0], "student").shape[0]
    if V != Vs:
        raise ValueError(f"vocabulary mismatch: the teacher has {V} logits, the student {Vs}")
    for name, ids in (("prompt", prompt), ("response", response), ("eos_id", [eos_id])):
        bad = [t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= t < V]
        if bad:
            raise ValueError(f"{name} has token ids outside [0, {V}): {bad[:5]}")


def scrg(
    prompt,
    response,
    teacher,
    student,
    *,
    frequency=1,
    teacher_token="sample",
    decode="sample",
    max_new_tokens,
    eos_id,
    rng=None,
    temperature=1.0,
):  # -> (revised list[int], positions list[int])
    """SCRG on one student response; see the module docstring for every convention and the RNG order."""
    _check(
        prompt,
        response,
        teacher,
        student,
        frequency,
        teacher_token,
        decode,
        max_new_tokens,
        eos_id,
        rng,
        temperature,
    )
    seq, positions, start = list(response), [], 0
    for _ in range(frequency):
        d, y_t = error_scores(
            prompt,
            seq,
            teacher,
            student,
            start=start,
            teacher_token=teacher_token,
            rng=rng,
            temperature=temperature,
        )
        j = error_position(d, y_t, seq, start=start)
        if j is None:  # [RECON] the teacher agrees everywhere after the previous correction: stop
            break
        seq = continue_response(
            student,
            prompt,
            seq[:j] + [int(y_t[j])],
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            decode=decode,
            rng=rng,
            temperature=temperature,
        )
        positions.append(j)
        start = j + 1
    return seq, positions
