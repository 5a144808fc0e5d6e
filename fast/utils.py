"""Small shared helpers for ``fast``: backend choice, output allocation (poisoned in tests), input checks.

Output poisoning: when the environment variable ``MGSR_POISON_OUTPUTS=1`` is set (``tests/conftest.py``
sets it), :func:`empty` returns NaN-filled tensors (integer tensors get their dtype's minimum), so a
kernel lane that never writes its output shows up as NaN instead of stale memory or zeros.
"""

from __future__ import annotations

import math
import os
import pathlib
import time

import torch
import triton.language as tl

# log2(e) and ln 2 for every kernel: each computes exp and log in base 2 (exp(x) = exp2(x LOG2E), one MUFU
# instruction; ln(x) = log2(x) LN2). Triton constants, because a kernel may read a module global only when
# it is a tl.constexpr; host code reads ``LOG2E.value``.
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))

BACKENDS = ("auto", "torch", "triton")


def poison_enabled() -> bool:
    return os.environ.get("MGSR_POISON_OUTPUTS", "0") == "1"


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN/min-filled when poisoning is on (tests)."""
    if poison_enabled():
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        if dtype == torch.bool:
            return torch.ones(shape, dtype=dtype, device=device)
        return torch.full(shape, torch.iinfo(dtype).min, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def triton_usable(t: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, ref: torch.Tensor) -> str:
    """'auto' -> 'triton' for CUDA tensors, 'torch' otherwise; validate explicit choices."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if ref.is_cuda else "torch"
    if backend == "triton" and not triton_usable(ref):
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported "
            f"(got a tensor on {ref.device})"
        )
    return backend


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a float tensor (fp16/bf16/fp32/fp64), got {t.dtype}")


def is_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fuse_fma_in_interpreter() -> None:
    """Make the Triton interpreter round ``tl.fma(x, y, z)`` once, as a GPU's FFMA does.

    The interpreter (triton 3.x) evaluates ``tl.fma`` as ``x * y + z`` in the inputs' precision: the
    product is rounded before the add. Kernels here use ``tl.fma`` where that rounding matters, e.g.
    ``exp2(fma(s, scale * log2(e), -m))`` with scores ``s`` of order 1e4: rounded first, ``s * c`` loses
    ~1e-3 before the near-cancelling subtraction; fused, the difference is exact. Under the interpreter the
    fp32/fp16 product and sum are therefore computed in float64 and rounded once to the input dtype (the
    float64 product of two fp32 numbers is exact; the double rounding of the sum can differ from a true fused
    result by one ulp in rare midpoint cases). A no-op unless ``TRITON_INTERPRET=1``; compiled kernels never
    use the interpreter's builder."""
    if not is_interpreting():
        return
    import numpy as np
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or getattr(builder, "_mgsr_fused_fma", False):
        return

    def create_fma(self, x, y, z):
        dt = z.data.dtype
        if dt == np.float64:
            r = x.data * y.data + z.data
        else:
            r = (x.data.astype(np.float64) * y.data.astype(np.float64) + z.data.astype(np.float64)).astype(dt)
        return interpreter.TensorHandle(r, z.dtype.scalar)

    builder.create_fma = create_fma
    builder._mgsr_fused_fma = True


# ---- timing in the notebooks (benchmarks/ holds the real benchmark scripts)


def median_ms(fn, reps: int = 5) -> float:
    """Wall-clock median of ``reps`` calls of ``fn`` in ms, after one warm-up call (synchronised on CUDA)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def committed_rows(path, *starts) -> list[str]:
    """The rows of a committed markdown results table whose first cell starts with one of ``starts``."""
    lines = pathlib.Path(path).read_text().splitlines()
    return [ln for ln in lines if ln.startswith("| ") and ln.split("|")[1].strip().startswith(starts)]
