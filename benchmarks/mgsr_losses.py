"""Benchmark: DAC-KL and the span-correlation loss, Triton kernels vs their torch backends (forward +
backward through the student logits and the bounds), side by side.

Full size (CUDA): N = 4096 tokens, V = 32000, bf16 and fp32 logits; the span loss on B = 8 sequences of
T = 512 (4096 rows) with 4-token spans tiling every sequence (3 pairs per span). ``--quick``: tiny sizes
so the script is exercised on CPU (Triton runs interpreted there, so only at a toy size).

    python benchmarks/mgsr_losses.py --device cuda
    python benchmarks/mgsr_losses.py --device cpu --quick
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fast.* (which defines @triton.jit kernels)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._timing import cli, median_ms, peak_mb  # noqa: E402
from fast.dac_kl import dac_kl  # noqa: E402
from fast.span import span_loss, spans_to_tensor  # noqa: E402
from fast.utils import is_interpreting  # noqa: E402


def _dac_case(N, V, dtype, device, bounds):
    g = torch.Generator(device="cpu").manual_seed(0)
    t = (3 * torch.randn(N, V, generator=g)).to(device=device, dtype=dtype)
    s = (3 * torch.randn(N, V, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    u = (0.6 + 0.35 * torch.rand(N, generator=g)).to(device).requires_grad_()
    l = (u.detach() * torch.rand(N, generator=g).to(device)).requires_grad_()

    def make(impl):
        def fn():
            s.grad = u.grad = l.grad = None
            loss, _, _ = dac_kl(t, s, u, l, backend=impl, validate=False, bounds=bounds)
            loss.sum().backward()
        return fn
    return make, N * V * t.element_size() * 2  # read t and s once: the minimum traffic of one pass


def _span_case(B, T, V, dtype, device, width=4):
    g = torch.Generator(device="cpu").manual_seed(1)
    t = (3 * torch.randn(B, T, V, generator=g)).to(device=device, dtype=dtype)
    s = (3 * torch.randn(B, T, V, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    spans = spans_to_tensor([[(a, a + width) for a in range(0, T - width + 1, width)]] * B, device)

    def make(impl):
        def fn():
            s.grad = None
            span_loss(t, s, spans, backend=impl, validate=False).backward()
        return fn
    return make, B * T * V * t.element_size() * 2


def run(*, device: str, quick: bool) -> list[dict]:
    cuda = str(device).startswith("cuda")
    rows = []
    if quick:
        dac_shapes, span_shapes, dtypes = [(2, 64)], [(1, 5, 64)], [torch.float32]
        warmup, rep = (1, 3) if cuda else (0, 1)  # interpreted Triton: one call is enough to exercise it
    else:
        dac_shapes, span_shapes, dtypes = [(4096, 32000)], [(8, 512, 32000)], [torch.bfloat16, torch.float32]
        warmup, rep = 2, 5
    impls = ["torch", "triton"] if (cuda or is_interpreting()) else ["torch"]
    if not cuda and not quick:
        impls = ["torch"]  # the interpreter at 4096 x 32000 would take hours
    for dtype in dtypes:
        for N, V in dac_shapes:
            for bounds in ("value", "mass"):
                make, nbytes = _dac_case(N, V, dtype, device, bounds)
                for impl in impls:
                    fn = make(impl)
                    ms = median_ms(fn, device=device, warmup=warmup, rep=rep)
                    rows.append(dict(op=f"dac_kl fwd+bwd ({bounds})", impl=impl,
                                     shape=f"N={N} V={V} {str(dtype)[6:]}", median_ms=ms,
                                     gbps=nbytes / ms / 1e6, peak_mb=peak_mb(fn, device=device)))
        for B, T, V in span_shapes:
            make, nbytes = _span_case(B, T, V, dtype, device)
            for impl in impls:
                fn = make(impl)
                ms = median_ms(fn, device=device, warmup=warmup, rep=rep)
                rows.append(dict(op="span fwd+bwd", impl=impl, shape=f"B={B} T={T} V={V} {str(dtype)[6:]}",
                                 median_ms=ms, gbps=nbytes / ms / 1e6, peak_mb=peak_mb(fn, device=device)))
            if cuda:
                torch.cuda.empty_cache()
    return rows


def main():
    cli(run, ["op", "impl", "shape", "median_ms", "gbps", "peak_mb"], __doc__.split("\n")[0])


if __name__ == "__main__":
    main()
