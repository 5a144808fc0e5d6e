"""What the steps of the retrieval ladder share: the host-side checks, the candidates and the output, and the
device helper that writes a row's top-k list in order.

MATCH's retrieval (``reference/match.py`` ``retrieve``): for each query ``i`` and head, the ``top_k``
out-of-window candidates with the highest scores ``scale * q_i . c_n``, in descending score order, ties to
the lower index, -1 in the slots beyond the candidate count. The candidates are the keys (``block_size`` 1)
or the block means of the keys (blocks ``[n B, (n + 1) B)``); candidate ``n`` is out of the window of query
``i`` iff ``n B <= i - window``. Since ``block_size <= window``, a candidate block is always a full block, so
only the ``T // B`` full blocks are summarised. Shapes: ``q, k [B, H, T, D]`` (one key head per query head);
the launchers return ``idx [B, H, T, top_k]`` int64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fast.utils import check_float, empty


@dataclass
class SelectLaunch:
    q: torch.Tensor  # [B, H, T, D] contiguous, the input dtype
    cand: torch.Tensor  # [B, H, N, D] contiguous fp32: the keys or their full blocks' means
    idx: torch.Tensor  # [B, H, T, top_k] int64 out
    B: int
    H: int
    T: int
    N: int  # candidates per head: T (tokens) or T // block_size (blocks)
    D: int
    W: int
    BS: int
    top_k: int
    scale: float
    block_d: int


def _check_int(name, x, lo):
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {x!r}")


def prepare_select(q, k, window, top_k, block_size, scale) -> SelectLaunch:
    """Validate, build the candidates (fp32 block means on the host, as ``reference/match.py`` defines them),
    allocate the output (``fast.utils.empty``: poisoned under the tests)."""
    for name, t in (("q", q), ("k", k)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(t.shape)}")
    if q.shape != k.shape or q.dtype != k.dtype or q.dtype == torch.float64:
        raise ValueError(
            f"q, k must share one shape and one dtype among fp32/fp16/bf16: {q.shape}, {k.shape}"
        )
    _check_int("window", window, 1)
    _check_int("top_k", top_k, 0)
    _check_int("block_size", block_size, 1)
    if block_size > window:
        raise ValueError(f"block_size={block_size} must be <= window={window}")
    B, H, T, D = q.shape
    if min(B, H, T, D) < 1 or D > 128:
        raise ValueError(f"need non-empty dimensions and D <= 128, got {tuple(q.shape)}")
    N = T // block_size
    kf = k.float()
    if block_size == 1:
        cand = kf.contiguous()
    else:
        cand = kf[:, :, : N * block_size].reshape(B, H, N, block_size, D).mean(dim=3).contiguous()
    return SelectLaunch(
        q=q.contiguous(),
        cand=cand,
        idx=empty((B, H, T, top_k), dtype=torch.int64, device=q.device),
        B=B,
        H=H,
        T=T,
        N=N,
        D=D,
        W=window,
        BS=block_size,
        top_k=top_k,
        scale=1.0 / math.sqrt(D) if scale is None else float(scale),
        block_d=max(16, triton.next_power_of_2(D)),
    )


def nothing_to_select(a: SelectLaunch) -> bool:
    """No slot or no candidate at all (T < block_size): the answer is all -1 without a launch."""
    if a.top_k == 0 or a.N == 0:
        a.idx.fill_(-1)
        return True
    return False


def kp(top_k: int) -> int:
    """The register list's width: a power of two >= 2 (its slots past top_k are padding)."""
    return max(2, triton.next_power_of_2(top_k))


@triton.jit
def write_sorted(top_v, top_i, out_ptrs, row_ok, TOP_K: tl.constexpr):
    """Write a [rows, KP] list in (score desc, index asc) order, TOP_K passes of (max, lowest index among the
    max); -inf entries are empty slots and come out as -1. ``out_ptrs`` [rows]: each row's first slot."""
    for r in range(0, TOP_K):
        best = tl.max(top_v, axis=1)
        have = best > float("-inf")
        best_i = tl.min(
            tl.where((top_v == best[:, None]) & have[:, None], top_i, 9223372036854775807), axis=1
        )
        tl.store(out_ptrs + r, tl.where(have, best_i, -1), mask=row_ok)
        top_v = tl.where(have[:, None] & (top_i == best_i[:, None]), float("-inf"), top_v)
