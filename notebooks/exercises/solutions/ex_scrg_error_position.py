"""Exercise: SCRG's error position for a batch of responses, in PyTorch.

Oracle: ``reference/scrg.py`` (``error_position``), one row at a time: the position ``j >= start`` with the
largest ``d_j`` among those where the teacher's token differs from the student's (``y_t[j] != response[j]``);
**ties: the lowest index wins**; no such position: none (here ``-1``).

Grade: ``python notebooks/exercises/grade.py scrg_error_position``.
"""

import torch


def error_position(d, y_t, response, lengths, start):  # [B, T], [B, T], [B, T], [B], [B] -> [B] int64
    """``d`` float64, NaN before ``start`` (not computed); positions ``>= lengths[b]`` are padding and hold
    anything (even large ``d`` and differing tokens). Returns ``j`` per row, ``-1`` where there is none."""
    T = d.shape[1]
    pos = torch.arange(T)[None, :]
    cand = (y_t != response) & (pos >= start[:, None]) & (pos < lengths[:, None])
    score = torch.where(cand, d, torch.full_like(d, float("-inf")))  # NaN never reaches argmax
    j = score.argmax(-1)  # the first maximal index: the lowest position wins ties
    return torch.where(cand.any(-1), j, torch.full_like(j, -1))
