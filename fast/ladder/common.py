"""What every step of the ladder shares: the host-side checks and allocation, and three tiny device helpers
(the mask predicate, the dot product and the tile load), so each step's file shows only its kernel.

Shapes: ``q, k, v [B, H, T, D]`` (one kv head per query head: the ladder is about the loop, not GQA), fp32,
fp16 or bf16; the launchers return ``(out [B, H, T, D] in the input dtype, lse [B, H, T] fp32, natural log)``.
Mask convention of ``reference/attention.py``: ``window=w`` means query ``i`` sees keys ``i - w < j <= i``
(causal) or ``|i - j| < w`` (not causal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fast.utils import check_float, empty, is_interpreting


@dataclass
class Launch:
    """Everything a step's launcher needs besides its own grid and constexprs."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    B: int
    H: int
    T: int
    D: int
    W: int  # the window, T without one (then the window test is always true)
    scale: float
    causal: bool
    has_window: bool
    lowp: bool  # fp16/bf16 dots on tensor cores (compiled only); fp32 "ieee" dots otherwise
    block_d: int
    block_m: int
    block_n: int


def prepare(q, k, v, causal, window, block=None) -> Launch:
    """Validate, make contiguous, allocate the outputs (``fast.utils.empty``: NaN-filled under the tests)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must share one shape [B, H, T, D], got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype == torch.float64:
        raise ValueError(
            f"q, k, v must share one dtype among fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    B, H, T, D = q.shape
    if min(B, H, T, D) < 1 or D > 128:
        raise ValueError(f"need non-empty dimensions and D <= 128, got {tuple(q.shape)}")
    W = T if window is None else min(window, T)
    lowp = q.dtype in (torch.float16, torch.bfloat16) and not is_interpreting()
    if block is None:  # small tiles in the interpreter (speed), the usual 64 x 64 compiled
        block = 16 if is_interpreting() else 64
    return Launch(
        q=q.contiguous(),
        k=k.contiguous(),
        v=v.contiguous(),
        out=empty((B, H, T, D), dtype=q.dtype, device=q.device),
        lse=empty((B, H, T), dtype=torch.float32, device=q.device),
        B=B,
        H=H,
        T=T,
        D=D,
        W=W,
        scale=1.0 / math.sqrt(D),
        causal=bool(causal),
        has_window=W < T,
        lowp=lowp,
        block_d=max(16, triton.next_power_of_2(D)),
        block_m=block,
        block_n=block,
    )


@triton.jit
def allowed(qi, kj, T, W, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """The (query qi, key kj) pairs that may attend, qi and kj broadcast to a tile; keys past T never."""
    if IS_CAUSAL:
        ok = kj <= qi
    else:
        ok = (kj - qi) < W  # the symmetric band; W = T without a window (always true for real keys)
    if HAS_WINDOW:
        ok = ok & ((qi - kj) < W)
    return ok & (kj < T)


@triton.jit
def dot(a, b, LOWP: tl.constexpr):
    """``a @ b`` accumulated in fp32: tensor cores on fp16/bf16 operands, exact fp32 ("ieee", not TF32)."""
    if LOWP:
        r = tl.dot(a, b)
    else:
        r = tl.dot(a, b, input_precision="ieee")
    return r


@triton.jit
def load_rows(ptrs, rows, T, d_ok, CHECK_ROWS: tl.constexpr, LOWP: tl.constexpr):
    """A [rows, BLOCK_D] tile; rows past T (only where CHECK_ROWS) and the padded head dim read as 0."""
    if CHECK_ROWS:
        x = tl.load(ptrs, mask=(rows < T)[:, None] & d_ok[None, :], other=0.0)
    else:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    if not LOWP:
        x = x.to(tl.float32)
    return x
