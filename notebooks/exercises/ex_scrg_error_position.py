"""Exercise: SCRG's error position for a batch of responses, in PyTorch.

Oracle: ``reference/scrg.py`` (``error_position``), one row at a time: the position ``j >= start`` with the
largest ``d_j`` among those where the teacher's token differs from the student's (``y_t[j] != response[j]``);
**ties: the lowest index wins**; no such position: none (here ``-1``).

Grade: ``python notebooks/exercises/grade.py scrg_error_position``.
"""

import torch  # noqa: F401  (you will need it)


def error_position(d, y_t, response, lengths, start):  # [B, T], [B, T], [B, T], [B], [B] -> [B] int64
    """``d`` float64, NaN before ``start`` (not computed); positions ``>= lengths[b]`` are padding and hold
    anything (even large ``d`` and differing tokens). Returns ``j`` per row, ``-1`` where there is none."""
    # YOUR CODE
    # 1. candidates: teacher token differs, position >= start, position < length
    # 2. argmax of d over the candidates (NaN and padding must not win), lowest index on ties
    # 3. -1 where a row has no candidate
    raise NotImplementedError("error_position: write the body (notebooks/exercises/README.md)")
