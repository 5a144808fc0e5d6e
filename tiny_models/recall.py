"""Seeded generators of associative-recall tasks: MQAR, the three MAD recall tasks, Shakespeare recall.

Every generator returns ``(inputs, labels)``, two ``LongTensor [n, T]``: ``labels[b, t]`` is the token the
model must predict *after* reading ``inputs[b, : t + 1]``, or ``-100`` (ignored). A task's accuracy is the
fraction of labelled positions where ``argmax logits == label`` (:func:`recall_accuracy`). All randomness
comes from ``np.random.default_rng(seed)``: the same arguments give the same tensors on every machine.

* :func:`mqar` -- multi-query associative recall of Zoology (Arora et al., arXiv 2312.04927): key-value
  pairs at the start, then every key queried once at a power-law distributed gap.
* :func:`mad_recall` -- the in-context, noisy and fuzzy recall tasks of MAD (Poli et al., arXiv 2403.17844):
  a stream of key-value pairs with repeated keys; every value whose key was seen before is a target.
* :func:`shakespeare_recall` -- byte-level natural text: short facts ``" QZK is 481."`` planted early in a
  Shakespeare passage and queried again at its end.

These are written from the task definitions, not from the reference implementations' code; the choices that
differ from them are marked [RECON] with the alternative named.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

IGNORE = -100
FILLER = 0  # MQAR filler token (also the "no key" token: keys never use it)


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _sample_without_replacement(rng, pool: np.ndarray, n: int, k: int, p: np.ndarray | None = None):
    """``[n, k]`` draws without replacement from ``pool`` (each row independent), weighted by ``p`` if given.

    Weighted draws use the Gumbel top-k trick: the k largest ``log p + Gumbel`` keys are a sample of the
    successive-draws-without-replacement distribution (Plackett-Luce), vectorised over rows.
    """
    keys = rng.gumbel(size=(n, len(pool)))
    if p is not None:
        keys = keys + np.log(p)[None, :]
    order = np.argsort(-keys, axis=1, kind="stable")[:, :k]
    return pool[order]


# ----------------------------------------------------------------------------------------------------
# MQAR


def mqar(
    n: int,
    *,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    power_a: float = 0.01,
    seed: int,
    random_filler: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall (Zoology, arXiv 2312.04927): ``(inputs, labels)``, ``[n, seq_len]``.

    Layout of one example with ``P = num_kv_pairs`` (V = ``vocab_size``)::

        k1 v1 k2 v2 ... kP vP | query region of seq_len - 2P positions

    * keys are P distinct tokens from ``{1, ..., V/2 - 1}`` (token 0 is the filler), values P distinct tokens
      from ``{V/2, ..., V - 1}``; the pairing is fresh in every example;
    * every key is queried exactly once in the query region, at even offset ``2 g`` from its start; the P gaps
      ``g`` are drawn without replacement from ``{0, ..., S - 1}``, ``S = (seq_len - 2P) // 2``, with
      ``p(g) ∝ a x^(a - 1)`` at ``x = g + 1`` and ``a = power_a`` (a = 0.01 strongly favours small gaps,
      i.e. early queries; a = 1 is uniform);
    * ``labels`` is the paired value at each query key's position (the model emits the value as the next
      token) and -100 everywhere else, including the context pairs. The value is *not* written after the
      query in ``inputs`` (the position after a query holds filler), exactly as in Zoology.

    Filler [RECON]: every non-query position of the query region is token 0 by default, disjoint from the
    keys, so the only copies of a key are its context slot and its query. Zoology's
    ``random_non_queries=True`` (``random_filler=True`` here) instead fills them with random tokens from the
    whole vocabulary; that plants spurious copies of keys (and values) between the context and the queries,
    which makes the task much harder to learn from scratch and makes "the earlier copy of the query key"
    ambiguous. Zoology's figure configs use the zero filler too.

    Raises ``ValueError`` unless ``seq_len`` is even, ``4 P <= seq_len`` (every key fits in the query region
    on an even offset), and ``P <= V/2 - 1`` keys and values exist.
    """
    _check_int("n", n, 1)
    _check_int("seq_len", seq_len, 4)
    _check_int("num_kv_pairs", num_kv_pairs, 1)
    _check_int("vocab_size", vocab_size, 4)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (queries sit at even offsets), got {seq_len}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"num_kv_pairs={num_kv_pairs} needs seq_len >= 4 * num_kv_pairs = {4 * num_kv_pairs}, "
            f"got {seq_len}"
        )
    half = vocab_size // 2
    if num_kv_pairs > half - 1:
        raise ValueError(
            f"vocab_size={vocab_size} has {half - 1} keys (1..{half - 1}); "
            f"num_kv_pairs={num_kv_pairs} is too many"
        )
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a}")
    rng = np.random.default_rng(seed)
    P, T = num_kv_pairs, seq_len
    keys = _sample_without_replacement(rng, np.arange(1, half), n, P)  # [n, P]
    values = _sample_without_replacement(rng, np.arange(half, vocab_size), n, P)  # [n, P]
    space = (T - 2 * P) // 2
    x = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * x ** (power_a - 1)
    gaps = _sample_without_replacement(rng, np.arange(space), n, P, p / p.sum())  # [n, P]

    inputs = np.full((n, T), FILLER, dtype=np.int64)
    if random_filler:
        inputs[:, 2 * P :] = rng.integers(0, vocab_size, size=(n, T - 2 * P))
    inputs[:, 0 : 2 * P : 2] = keys
    inputs[:, 1 : 2 * P : 2] = values
    qpos = 2 * P + 2 * gaps  # [n, P] query positions
    rows = np.arange(n)[:, None]
    inputs[rows, qpos] = keys
    labels = np.full((n, T), IGNORE, dtype=np.int64)
    labels[rows, qpos] = values
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def key_distance(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[n, T]``: distance from each labelled position to the nearest earlier copy of its token, or -1.

    For MQAR (zero filler) the earlier copy is the key's context slot, so a model whose attention sees the
    ``d`` most recent keys (a window ``w >= d``; the value sits at distance ``d - 1``) can answer. Positions
    without a label, or whose token never occurred before, get -1.
    """
    if inputs.shape != labels.shape or inputs.dim() != 2:
        raise ValueError(f"inputs {tuple(inputs.shape)} and labels {tuple(labels.shape)} must both be [n, T]")
    T = inputs.shape[1]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    same = (inputs[:, :, None] == inputs[:, None, :]) & (j < i)  # [n, T, T]
    last = torch.where(same, j.expand_as(same), torch.full_like(same, -1, dtype=torch.long)).amax(-1)
    dist = torch.where(last >= 0, torch.arange(T)[None, :] - last, torch.full_like(last, -1))
    return torch.where(labels != IGNORE, dist, torch.full_like(dist, -1))


# ----------------------------------------------------------------------------------------------------
# MAD recall tasks


def mad_recall(
    n: int,
    *,
    seq_len: int = 128,
    vocab_size: int = 16,
    seed: int,
    noise_vocab_size: int = 0,
    frac_noise: float = 0.0,
    k_motif_size: int = 1,
    v_motif_size: int = 1,
    test: bool = True,
    targets: str = "recall",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MAD recall tasks (Poli et al., arXiv 2403.17844), multi-query: ``(inputs, labels)``, ``[n, T]``.

    Use :func:`mad_in_context_recall`, :func:`mad_noisy_recall` and :func:`mad_fuzzy_recall` for the three
    tasks with MAD's baseline settings. One example:

    * vocabulary: tokens ``0 .. m - 1`` are keys, ``m .. 2m - 1`` values, with ``2m = vocab_size -
      noise_vocab_size`` (minus one pad token when motifs are longer than one token); the noise tokens follow
      the values, and the pad token (fuzzy only) is ``vocab_size - 1``;
    * a key is a motif of ``1 .. k_motif_size`` tokens (all ``k_motif_size`` when ``test``) and a value a
      motif of ``1 .. v_motif_size`` tokens; tokens inside a motif are distinct. Each example has its own
      key -> value map, built as keys appear (a new key gets a random value motif; values may repeat
      across keys);
    * the sequence is a stream of ``key value`` pairs with keys drawn uniformly with replacement, so keys
      recur; with probability ``frac_noise`` a pair is replaced by as many random noise tokens;
    * ``targets="recall"`` (MAD's test targets): the label at each position is the next value token of a pair
      whose key already occurred earlier in the example, -100 elsewhere (first occurrences are unpredictable).
      ``targets="lm"`` (MAD's training targets): ``labels`` is the input shifted by one (every next token).

    [RECON] differences from MAD's generator: no separate final probe pair (with multi-query targets every
    repeated key is already a probe); at least one repeated pair is guaranteed by making the last pair repeat
    an earlier key; a fuzzy example that does not fill ``seq_len`` exactly is left-padded with the pad token
    (MAD pads the same way). Motif boundaries are unambiguous because a key motif is a maximal run of key
    tokens and a value motif a maximal run of value tokens.
    """
    _check_int("n", n, 1)
    _check_int("seq_len", seq_len, 4)
    _check_int("k_motif_size", k_motif_size, 1)
    _check_int("v_motif_size", v_motif_size, 1)
    _check_int("noise_vocab_size", noise_vocab_size, 0)
    if targets not in ("recall", "lm"):
        raise ValueError(f"targets must be 'recall' or 'lm', got {targets!r}")
    if not 0.0 <= frac_noise < 1.0:
        raise ValueError(f"frac_noise must be in [0, 1), got {frac_noise}")
    if frac_noise > 0 and noise_vocab_size == 0:
        raise ValueError("frac_noise > 0 needs noise_vocab_size > 0")
    motifs = k_motif_size > 1 or v_motif_size > 1
    m = (vocab_size - noise_vocab_size - (1 if motifs else 0)) // 2
    if m < max(k_motif_size, v_motif_size, 2):
        raise ValueError(
            f"vocab_size={vocab_size} (noise {noise_vocab_size}) leaves {m} key and {m} value tokens; "
            f"need at least max(2, k_motif_size={k_motif_size}, v_motif_size={v_motif_size})"
        )
    pair_max = k_motif_size + v_motif_size
    if seq_len < 4 * pair_max:
        raise ValueError(
            f"seq_len={seq_len} is too short for two pairs of motif sizes ({k_motif_size}, {v_motif_size})"
        )
    if not motifs and seq_len % 2:
        raise ValueError(f"seq_len must be even for single-token pairs, got {seq_len}")
    rng = np.random.default_rng(seed)
    pad = vocab_size - 1
    noise0 = 2 * m
    inputs = np.full((n, seq_len + 1), pad, dtype=np.int64)
    recall_t = np.full((n, seq_len + 1), IGNORE, dtype=np.int64)  # target of position t (before the shift)
    key_sizes = [k_motif_size] if test else list(range(1, k_motif_size + 1))
    # single-token pairs fill seq_len tokens exactly, then one ignored pad closes the shift; motif pairs fill
    # up to seq_len + 1 tokens and are left-padded
    budget = seq_len + 1 if motifs else seq_len
    is_tok = np.zeros((n, seq_len + 1), dtype=bool)  # a real (non-pad) token
    for b in range(n):
        seq: list[int] = []
        tgt: list[int] = []
        kv: dict[tuple, tuple] = {}
        order: list[tuple] = []
        while True:
            ks = int(rng.choice(key_sizes))
            vs = int(rng.integers(1, v_motif_size + 1))
            if len(seq) + ks + vs + pair_max > budget:  # keep room for the final repeated pair
                break
            if frac_noise > 0 and rng.random() < frac_noise:
                seq += rng.integers(noise0, noise0 + noise_vocab_size, size=ks + vs).tolist()
                tgt += [IGNORE] * (ks + vs)
                continue
            key = tuple(rng.choice(m, size=ks, replace=False).tolist())
            seen = key in kv
            val = kv[key] if seen else tuple((m + rng.choice(m, size=vs, replace=False)).tolist())
            if len(seq) + len(key) + len(val) + pair_max > budget:  # a repeated key keeps its own value size
                break
            if not seen:
                kv[key] = val
                order.append(key)
            seq += list(key) + list(val)
            tgt += [IGNORE] * len(key) + (list(val) if seen else [IGNORE] * len(val))
        if order:
            key = order[int(rng.integers(len(order)))]
        else:  # nothing fitted (all noise): plant one pair and repeat it
            key = tuple(rng.choice(m, size=key_sizes[0], replace=False).tolist())
            kv[key] = tuple((m + rng.choice(m, size=1, replace=False)).tolist())
            seq, tgt = list(key) + list(kv[key]), [IGNORE] * (len(key) + 1)
        seq += list(key) + list(kv[key])
        tgt += [IGNORE] * len(key) + list(kv[key])
        if not motifs:
            seq, tgt = seq + [pad], tgt + [IGNORE]
        inputs[b, seq_len + 1 - len(seq) :] = seq
        recall_t[b, seq_len + 1 - len(seq) :] = tgt
        is_tok[b, seq_len + 1 - len(seq) :] = True
        if not motifs:
            is_tok[b, -1] = False
    x = inputs[:, :-1]
    y = recall_t[:, 1:]
    if targets == "lm":  # every next real token; none on padding
        y = np.where(is_tok[:, :-1] & is_tok[:, 1:], inputs[:, 1:], IGNORE)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def mad_in_context_recall(n: int, *, seed: int, seq_len: int = 128, vocab_size: int = 16, **kw):
    """MAD in-context recall, baseline: vocab 16 (8 keys, 8 values), seq_len 128, single-token pairs."""
    return mad_recall(n, seq_len=seq_len, vocab_size=vocab_size, seed=seed, **kw)


def mad_noisy_recall(
    n: int,
    *,
    seed: int,
    seq_len: int = 128,
    vocab_size: int = 32,
    noise_vocab_size: int = 16,
    frac_noise: float = 0.2,
    **kw,
):
    """MAD noisy in-context recall, baseline: vocab 32 incl. 16 noise tokens, 20 % of pairs are noise."""
    return mad_recall(
        n,
        seq_len=seq_len,
        vocab_size=vocab_size,
        seed=seed,
        noise_vocab_size=noise_vocab_size,
        frac_noise=frac_noise,
        **kw,
    )


def mad_fuzzy_recall(
    n: int,
    *,
    seed: int,
    seq_len: int = 128,
    vocab_size: int = 16,
    k_motif_size: int = 3,
    v_motif_size: int = 3,
    **kw,
):
    """MAD fuzzy in-context recall, baseline: vocab 16 (7 keys, 7 values, 1 pad), motifs of 1-3 tokens."""
    return mad_recall(
        n,
        seq_len=seq_len,
        vocab_size=vocab_size,
        seed=seed,
        k_motif_size=k_motif_size,
        v_motif_size=v_motif_size,
        **kw,
    )


# ----------------------------------------------------------------------------------------------------
# natural language: facts planted in a Shakespeare passage

_KEY_LETTERS = "BCDFGHJKLMNPQRSTVWXZ"  # uppercase consonants: three of them in a row are rare in the plays


@functools.lru_cache(maxsize=1)
def _default_text() -> str:
    from tiny_models.tasks import shakespeare_text

    return shakespeare_text(300_000)


def fact_text(key: str, value: str, link: str = " is ") -> str:
    """One fact (and its query) as text: ``" QZK is 481."`` (``" QZK=481."`` for ``link="="``)."""
    return f" {key}{link}{value}."


def shakespeare_recall(
    n: int,
    *,
    seq_len: int = 256,
    num_facts: int = 2,
    seed: int,
    text: str | None = None,
    min_distance: int = 0,
    targets: str = "recall",
    link: str = " is ",
    num_queries: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-level long-range recall on Shakespeare: ``(inputs, labels)``, ``[n, seq_len]``, tokens 0..255.

    An example is a random window of the plays with ``num_facts`` facts ``" KEY is VAL."`` inserted at random
    places in its first part (KEY: 3 distinct uppercase consonants, VAL: 3 digits, both fresh per example),
    and ending with ``num_queries`` of them (all by default) repeated once, in shuffled order. The labels are
    the three digits of each repeated fact (at the positions just before them); everything else is -100.
    The passage text itself is unlabelled, so the task measures recall only (``targets="lm"`` labels every
    next byte instead, for training: byte-level language modelling of the same examples, recall targets
    included);
    ``min_distance`` keeps every fact at least that many bytes before the first query. ``text`` defaults to
    the first 300,000 characters of
    :func:`tiny_models.tasks.shakespeare_text`.

    ``link`` is the text between key and value. With the default ``" is "`` the position that predicts the
    first digit is 4-6 bytes after the key, so recall needs a head that first gathers the key from there (a
    two-hop circuit); with ``link="="`` (``" QZK=481."``) the key ends right before that position, as in MQAR.
    The link must be plain printable ASCII without digits or uppercase consonants.

    ``num_queries`` (default: ``num_facts``) facts are queried, distinct and chosen at random. When every fact
    is queried, the last query can be answered without reading its key, by elimination (the fact not asked
    yet); with fewer queries than facts it cannot.
    """
    _check_int("n", n, 1)
    _check_int("num_facts", num_facts, 1)
    if num_queries is None:
        num_queries = num_facts
    _check_int("num_queries", num_queries, 1)
    if num_queries > num_facts:
        raise ValueError(f"num_queries={num_queries} exceeds num_facts={num_facts}")
    _check_int("min_distance", min_distance, 0)
    if targets not in ("recall", "lm"):
        raise ValueError(f"targets must be 'recall' or 'lm', got {targets!r}")
    if not link or any(not 32 <= ord(c) < 127 or c.isdigit() or c in _KEY_LETTERS for c in link):
        raise ValueError(f"link must be non-empty printable ASCII, no digits or key letters; got {link!r}")
    flen = len(fact_text("AAA", "000", link))
    body = seq_len - num_queries * flen  # bytes before the queries: passage + facts
    if body - num_facts * flen - min_distance < 1:
        raise ValueError(
            f"seq_len={seq_len} too short for {num_facts} facts of {flen} bytes, their queries and "
            f"min_distance={min_distance}"
        )
    if text is None:
        text = _default_text()
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if len(data) < seq_len + 1:
        raise ValueError(f"text has {len(data)} bytes, need more than seq_len={seq_len}")
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(_KEY_LETTERS.encode(), dtype=np.uint8)
    inputs = np.zeros((n, seq_len), dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    passage_len = body - num_facts * flen
    for b in range(n):
        keys: list[str] = []
        while len(keys) < num_facts:  # distinct keys within an example
            k = bytes(rng.choice(letters, size=3, replace=False).tolist()).decode()
            if k not in keys:
                keys.append(k)
        vals = ["".join(str(d) for d in rng.integers(0, 10, size=3)) for _ in keys]
        start = int(rng.integers(0, len(data) - passage_len))
        passage = data[start : start + passage_len].tolist()
        cut = sorted(rng.integers(0, passage_len - min_distance + 1, size=num_facts).tolist())
        seq: list[int] = []
        prev = 0
        for c, k, v in zip(cut, keys, vals, strict=True):
            seq += passage[prev:c] + list(fact_text(k, v, link).encode())
            prev = c
        seq += passage[prev:]
        for f in rng.permutation(num_facts)[:num_queries]:
            q0 = len(seq)
            seq += list(fact_text(keys[f], vals[f], link).encode())
            for d in range(3):  # digits sit at offsets flen - 4 .. flen - 2 of the fact
                labels[b, q0 + flen - 5 + d] = ord(vals[f][d])
        inputs[b] = seq
    if targets == "lm":  # every next byte; the last position has none
        labels[:, :-1] = inputs[:, 1:]
        labels[:, -1] = IGNORE
    return torch.from_numpy(inputs), torch.from_numpy(labels)


# ----------------------------------------------------------------------------------------------------
# metric


def recall_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of labelled positions (label != -100) with ``argmax logits == label``.

    ``logits [n, T, V]``, ``labels [n, T]``.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [n, T]")
    mask = labels != IGNORE
    if not bool(mask.any()):
        raise ValueError("no labelled position (every label is -100)")
    return float((logits.argmax(-1)[mask] == labels[mask]).float().mean())


TASKS = {
    "mqar": mqar,
    "mad_in_context": mad_in_context_recall,
    "mad_noisy": mad_noisy_recall,
    "mad_fuzzy": mad_fuzzy_recall,
    "shakespeare": shakespeare_recall,
}
