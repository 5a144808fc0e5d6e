"""Exercise: the span loss's pair distances, in PyTorch.

Oracle: ``reference/span.py`` (``pair_distances``). For every adjacent pair ``(k, k+1)`` inside a span
(spans are half-open ``(start, end)`` token ranges, sorted, >= 2 tokens, non-overlapping), with
``p = softmax(t)`` (teacher) and ``q = softmax(s)`` (student) row by row::

    d_k = || q_k * q_{k+1} - p_k * p_{k+1} ||_2        (squared=True: the squared norm)

Grade: ``python notebooks/exercises/grade.py span_pairs``.
"""

import torch


def pair_distances(t, s, spans, squared=False):  # [T, V], [T, V], list of (start, end) -> [P]
    """One distance per adjacent in-span pair, in span order then position order; an empty tensor if no
    span has a pair. Vectorised: no Python loop over pairs' vocabulary entries."""
    k = torch.tensor([i for a, b in sorted(spans) for i in range(a, b - 1)], dtype=torch.long)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    e = q[k] * q[k + 1] - p[k] * p[k + 1]  # [P, V]
    d2 = (e * e).sum(-1)
    return d2 if squared else d2.sqrt()
