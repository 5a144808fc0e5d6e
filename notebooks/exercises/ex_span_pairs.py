"""Exercise: the span loss's pair distances, in PyTorch.

Oracle: ``reference/span.py`` (``pair_distances``). For every adjacent pair ``(k, k+1)`` inside a span
(spans are half-open ``(start, end)`` token ranges, sorted, >= 2 tokens, non-overlapping), with
``p = softmax(t)`` (teacher) and ``q = softmax(s)`` (student) row by row::

    d_k = || q_k * q_{k+1} - p_k * p_{k+1} ||_2        (squared=True: the squared norm)

Grade: ``python notebooks/exercises/grade.py span_pairs``.
"""

import torch  # noqa: F401  (you will need it)


def pair_distances(t, s, spans, squared=False):  # [T, V], [T, V], list of (start, end) -> [P]
    """One distance per adjacent in-span pair, in span order then position order; an empty tensor if no
    span has a pair. Vectorised: no Python loop over pairs' vocabulary entries."""
    # YOUR CODE
    # 1. the pair starts k: every position a .. b-2 of every span (a, b), in order
    # 2. p, q = softmax rows; e = q[k] * q[k+1] - p[k] * p[k+1]
    # 3. squared norm per pair, its square root unless squared
    raise NotImplementedError("pair_distances: write the body (notebooks/exercises/README.md)")
