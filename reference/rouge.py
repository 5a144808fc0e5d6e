"""ROUGE-L (sentence level) in plain Python/NumPy, matching the ``rouge-score`` package's ``rougeL``.

convention: tokenisation is rouge-score's default (``use_stemmer=False``): lowercase, replace every run of
characters outside ``[a-z0-9]`` by a space, split on whitespace, drop empty tokens. So punctuation and
non-ASCII letters are separators, and "Tom's" is two tokens.
convention: an empty candidate or reference (after tokenisation) scores (0, 0, 0); F1 is 0 when P + R = 0.
convention: ``rougeL`` is the plain LCS over the whole text (not ``rougeLsum``'s per-sentence union LCS).
"""

from __future__ import annotations

import re

import numpy as np

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_SPACES = re.compile(r"\s+")
_VALID = re.compile(r"^[a-z0-9]+$")


def tokenize(text):  # str -> [n] list of str
    tokens = _SPACES.split(_NON_ALNUM.sub(" ", text.lower()))
    return [t for t in tokens if _VALID.match(t)]


def lcs_length(a, b):  # [n], [m] -> int
    """Longest common subsequence length by the classic DP, one NumPy row at a time."""
    if not a or not b:
        return 0
    prev = np.zeros(len(b) + 1, dtype=np.int64)  # [m + 1] LCS of a[:i] with b[:j]
    bb = np.array(b, dtype=object)
    for x in a:
        match = bb == x  # [m]
        cur = np.zeros_like(prev)
        for j in range(1, len(b) + 1):  # cur[j] depends on cur[j - 1]: sequential in j
            cur[j] = prev[j - 1] + 1 if match[j - 1] else max(prev[j], cur[j - 1])
        prev = cur
    return int(prev[-1])


def rouge_l(candidate, reference):  # str, str -> (precision, recall, f1)
    c, r = tokenize(candidate), tokenize(reference)
    if not c or not r:
        return 0.0, 0.0, 0.0
    lcs = lcs_length(c, r)
    p, rec = lcs / len(c), lcs / len(r)
    f1 = 2 * p * rec / (p + rec) if p + rec > 0 else 0.0
    return p, rec, f1
