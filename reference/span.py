"""Span-level correlation consistency of MGSR (arXiv 2407.10068), NumPy float64.

The paper names the idea (span priors; probability correlations within spans kept consistent between teacher
and student) but its equations were not available; the choices below are [RECON] (docs/papers.md).

Two parts:

**Span priors** (which token ranges count as a span). The paper uses an external chunker (noun/verb
phrases). This module has a *deterministic rule-based* stand-in, [RECON] (the alternative: an NLTK or spaCy
part-of-speech chunker, a dependency this project does not take), working on byte offsets of sub-word tokens:

* ``mode="word"``: the sub-word tokens of one word (a word = a maximal run of letters/digits/apostrophes;
  every non-ASCII byte counts as a letter, so UTF-8 words stay whole);
* ``mode="phrase"`` (default): a phrase chunker that splits the text at punctuation and at a small stop-word
  list (determiners, pronouns, prepositions, conjunctions, auxiliaries); each maximal run of content words
  is a chunk (a crude NP/VP stand-in: "quick brown fox jumps" is one chunk);
* ``mode="window"``: fixed windows of ``size`` tokens (the ablation).

A chunk's span is the half-open range of tokens whose bytes overlap it. Only spans of >= 2 tokens are kept
(a 1-token span has no adjacent pair). Spans are sorted and never overlap (a token in two chunks, e.g.
"don't" split oddly, goes to the first one).

**Loss** ([RECON]). For each adjacent in-span pair ``(k, k+1)``: ``r_k = p_k * p_{k+1}`` (Hadamard product of
the full softmax distributions at temperature 1, not the DAC-KL-clipped ones) for the teacher and the student;
the loss is ``mean_pairs ||r^t_k - r^s_k||_2`` (``squared=True``: the squared norm, the alternative reading of
"L2 distance"). No pairs -> 0. The teacher side is a constant.
"""

import numpy as np

from reference.nn import log_softmax

# convention: a small closed-class list; it decides where the phrase chunker splits.
STOP_WORDS = frozenset(
    """
a an the this that these those my your his her its our their some any no every each
i you he she it we they me him us them who whom which what whose
of in on at by for with from to into onto over under about above below between through during
before after without within against among across along around near off out up down upon
and or but nor so yet if then than because while although though as
is am are was were be been being do does did have has had will would shall should can could may might must
not there here very too also just
""".split()
)


def _is_word_byte(b):  # int -> bool
    return (48 <= b <= 57) or (65 <= b <= 90) or (97 <= b <= 122) or b == 39 or b >= 128


def offsets_from_tokens(tokens):  # list[str] of T -> (bytes, [T, 2] int)
    """Byte offsets of token strings whose concatenation is the text. SentencePiece '▁' and GPT-2 byte-level
    'Ġ' / 'Ċ' markers are read as a space / newline (convention: common tokenizer display forms)."""
    text, offs, pos = b"", [], 0
    for tok in tokens:
        b = tok.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\n").encode("utf-8")
        offs.append((pos, pos + len(b)))
        text += b
        pos += len(b)
    return text, np.asarray(offs, dtype=np.int64).reshape(-1, 2)


def words(text):  # bytes -> list of (start, end) byte ranges
    out, i, n = [], 0, len(text)
    while i < n:
        if _is_word_byte(text[i]):
            j = i
            while j < n and _is_word_byte(text[j]):
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def phrases(text):  # bytes -> list of (start, end) byte ranges
    """Maximal runs of content words, broken by any punctuation byte or a stop word."""
    chunks, cur = [], None
    prev_end = 0
    for a, b in words(text):
        gap = text[prev_end:a]
        w = text[a:b].decode("utf-8", errors="replace").lower()
        punct = any(not chr(c).isspace() for c in gap) if cur is not None else False
        if w in STOP_WORDS or punct:
            if cur is not None:
                chunks.append(cur)
            cur = None if w in STOP_WORDS else (a, b)
        else:
            cur = (a, b) if cur is None else (cur[0], b)
        prev_end = b
    if cur is not None:
        chunks.append(cur)
    return chunks


def token_span(offsets, a, b):  # [T, 2], int, int -> (start, end) token range (may be empty)
    """Tokens whose byte range overlaps [a, b) (ignoring a token's leading/trailing whitespace-only part
    is implicit: overlap is tested against the word bytes only)."""
    hit = np.nonzero((offsets[:, 0] < b) & (offsets[:, 1] > a))[0]
    return (int(hit[0]), int(hit[-1]) + 1) if len(hit) else (0, 0)


def window_spans(T, size, first=0):  # int, int, int -> list of (start, end)
    """Fixed windows [first, first+size), [first+size, ...) over T tokens; a last window of >= 2 kept."""
    if size < 2:
        raise ValueError(f"window size must be >= 2, got {size}")
    return [(a, min(a + size, T)) for a in range(first, T, size) if min(a + size, T) - a >= 2]


def extract_spans(tokens=None, *, offsets=None, text=None, mode="phrase", size=4, first=0):  # [T] -> [S, 2]
    """Spans (half-open token ranges of >= 2 tokens, sorted, non-overlapping) of one sequence.

    Give either ``tokens`` (strings; their concatenation is the text) or ``offsets`` ([T, 2] byte offsets)
    plus ``text`` (str or bytes). ``first``: tokens before it (e.g. the prompt) are never part of a span."""
    if tokens is not None:
        text, offsets = offsets_from_tokens(tokens)
    else:
        if offsets is None or text is None:
            raise ValueError("give tokens, or offsets and text")
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        text = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    T = len(offsets)
    if mode == "window":
        return window_spans(T, size, first)
    if mode == "word":
        ranges = words(text)
    elif mode == "phrase":
        ranges = phrases(text)
    else:
        raise ValueError(f"mode must be 'word', 'phrase' or 'window', got {mode!r}")
    spans, taken = [], first
    for a, b in ranges:
        s, e = token_span(offsets, a, b)
        s = max(s, taken)  # convention: a token shared by two chunks belongs to the first
        if e - s >= 2:
            spans.append((s, e))
            taken = e
    return spans


def check_spans(spans, T):  # list of (start, end), int -> None
    prev = 0
    for a, b in sorted(spans):
        if not (0 <= a and a < b and b <= T):
            raise ValueError(f"span ({a}, {b}) out of range for a sequence of T={T} tokens")
        if b - a < 2:
            raise ValueError(f"span ({a}, {b}) has fewer than 2 tokens (no adjacent pair)")
        if a < prev:
            raise ValueError(f"span ({a}, {b}) overlaps the previous span ending at {prev}")
        prev = b


def pairs(spans):  # list of (start, end) -> [P] int (k of every adjacent pair (k, k+1))
    return np.asarray([k for a, b in sorted(spans) for k in range(a, b - 1)], dtype=np.int64)


def pair_distances(t, s, spans, squared=False):  # [T, V], [T, V], list -> [P]
    """``||p^t_k p^t_{k+1} - p^s_k p^s_{k+1}||_2`` (or its square) for every adjacent in-span pair."""
    t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
    if t.ndim != 2 or t.shape != s.shape:
        raise ValueError(f"teacher/student logits must both be [T, V], got {t.shape} and {s.shape}")
    check_spans(spans, t.shape[0])
    k = pairs(spans)
    p, q = np.exp(log_softmax(t)), np.exp(log_softmax(s))  # [T, V]
    e = q[k] * q[k + 1] - p[k] * p[k + 1]  # [P, V] r^s - r^t
    d2 = np.sum(e * e, -1)
    return d2 if squared else np.sqrt(d2)


def span_loss(t, s, spans, squared=False):  # [T, V], [T, V], list -> float
    """Mean over adjacent in-span pairs of the (squared) L2 distance of the Hadamard products; 0 if none."""
    d = pair_distances(t, s, spans, squared)
    return float(d.mean()) if len(d) else 0.0


def span_loss_grad(t, s, spans, squared=False):  # [T, V], [T, V], list -> [T, V]
    """Hand-derived ``d span_loss / d s``. With ``e_k = r^s_k - r^t_k`` and ``D_k = ||e_k||``:
    ``dD_k/dr^s_k = e_k / D_k`` (0 when ``D_k = 0``, convention: the zero subgradient) or ``2 e_k`` squared;
    ``dr^s_k/dq_k = q_{k+1}``, ``dr^s_k/dq_{k+1} = q_k``; then the softmax backward per position,
    ``ds = q * (gq - <gq, q>)``."""
    t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
    check_spans(spans, t.shape[0])
    k = pairs(spans)
    if len(k) == 0:
        return np.zeros_like(s)
    p, q = np.exp(log_softmax(t)), np.exp(log_softmax(s))
    e = q[k] * q[k + 1] - p[k] * p[k + 1]  # [P, V]
    if squared:
        ge = 2.0 * e
    else:
        D = np.sqrt(np.sum(e * e, -1, keepdims=True))
        ge = np.where(D > 0, e / np.where(D > 0, D, 1.0), 0.0)
    ge = ge / len(k)
    gq = np.zeros_like(q)  # [T, V]
    np.add.at(gq, k, ge * q[k + 1])
    np.add.at(gq, k + 1, ge * q[k])
    return q * (gq - np.sum(gq * q, -1, keepdims=True))
