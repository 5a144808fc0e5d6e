"""Benchmark: causal / sliding-window attention, forward and forward+backward.

Side by side, per (T, window, D): our Triton kernel (``fast.attention``, key blocks outside the window
skipped), PyTorch SDPA (full causal only: ``is_causal=True``, the dense baseline) and FlexAttention with
a sliding-window block mask (where available), and on CPU our blocked torch backend beside the textbook
eager formula (its note gives the ratio eager ms / ours) and SDPA with a boolean mask; on CPU ``peak_mb`` is
the memory autograd saves for the backward (there is no CPU peak counter).

TFLOP/s count only the *allowed* (query, key) pairs: forward 4 * pairs * D FLOPs per head (QK^T and
PV), forward+backward 3.5x that (the backward does 2.5x the forward's matmul work). So a sliding-window
row and a full-causal row are comparable as "useful work per second".

    python benchmarks/attention.py --device cuda          # full sizes, bf16, T = 1K..32K
    python benchmarks/attention.py --device cpu --quick   # tiny, proves the script runs
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

if __package__:  # imported as benchmarks.attention (the tests, from the repository root)
    from benchmarks._timing import fmt_table, median_ms, peak_mb
else:  # run as a script (or by run_all.py): benchmarks/ is sys.path[0]
    from _timing import fmt_table, median_ms, peak_mb

COLS = ["op", "impl", "shape", "median_ms", "tflops", "peak_mb", "note"]
FULL_BUDGET_S = 60.0  # stop adding rows past this (compiles and autotuning included); < 90 s on an H200


def allowed_pairs(T: int, window) -> int:
    """Number of (query, key) pairs with i - w < j <= i."""
    if window is None or window >= T:
        return T * (T + 1) // 2
    return window * (window + 1) // 2 + (T - window) * window


def eager_attention(q, k, v, window):
    """The textbook masked softmax (nanoGPT's manual path) with a sliding-window mask: the CPU baseline."""
    T = q.shape[-2]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    masked = (j > i) if window is None else ((j > i) | (i - j >= window))
    att = (q @ k.transpose(-1, -2)) * (1.0 / q.shape[-1] ** 0.5)
    att = att.masked_fill(masked, float("-inf"))
    return torch.softmax(att, dim=-1) @ v


def saved_mb(fn):
    """Memory autograd keeps from the forward for the backward (distinct storages), in MB: on CPU, where
    there is no allocator peak counter, the part of the peak that an attention implementation decides."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()) / 2**20


def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception:  # pragma: no cover - old torch
        return None
    return create_block_mask, torch.compile(flex_attention)


def run(*, device: str, quick: bool) -> list[dict]:
    from fast.attention import flash_attention as ours
    from fast.utils import is_interpreting

    cuda = str(device).startswith("cuda")
    if quick or not cuda:
        dtype = torch.float32 if not cuda else torch.bfloat16
        B, H = (1, 2) if cuda else (8, 2)  # CPU: the tiny GPT's heads, T and D
        cases = [(256, 32, None), (256, 32, 64)]  # (T, D, window)
        triton_cases = [(128, 16, 32)] if (cuda or is_interpreting()) else []
        warm, rep = (1, 3)
    else:
        dtype = torch.bfloat16
        B, H = 1, 16
        # every T and w at D = 64; D = 128 at two lengths (keeps compiles + autotuning under budget)
        cases = [(1024, 64, None), (1024, 64, 256)]
        cases += [(T, 64, w) for T in (4096, 16384, 32768) for w in (None, 256, 512, 1024)]
        cases += [(T, 128, w) for T in (4096, 32768) for w in (None, 512)]
        triton_cases = cases
        warm, rep = (2, 5)
    flex = _flex() if cuda and not quick else None
    flex_cases = {(16384, 64, 512), (32768, 64, 1024), (32768, 128, 512)}

    t_start = time.perf_counter()
    rows: list[dict] = []

    def over_budget():
        return cuda and not quick and time.perf_counter() - t_start > FULL_BUDGET_S

    def measure(impl, T, D, w, fwd, note=""):
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, do = (
            torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype) for _ in range(4)
        )
        for t in (q, k, v):
            t.requires_grad_(True)
        r = (1, 1) if (impl == "triton" and not cuda) else (warm, rep)  # interpreted: one call
        fwd_only = lambda: fwd(q, k, v)
        fwd_bwd = lambda: torch.autograd.grad(fwd(q, k, v), (q, k, v), do)
        flops = 4.0 * allowed_pairs(T, w) * D * B * H
        shape = f"B{B} H{H} T{T} D{D} " + ("causal" if w is None else f"w{w}")
        for op, fn, mult in (("attn fwd", fwd_only, 1.0), ("attn fwd+bwd", fwd_bwd, 3.5)):
            ms = median_ms(fn, device=device, warmup=r[0], rep=r[1])
            mem = peak_mb(fn, device=device)
            row_note = note
            if not cuda:  # no CPU peak counter: the autograd-saved memory, labelled as such
                mem = saved_mb(fwd_only)
                row_note = (note + "; " if note else "") + "peak_mb = autograd-saved MB"
            rows.append(
                dict(
                    op=op,
                    impl=impl,
                    shape=shape,
                    median_ms=ms,
                    tflops=mult * flops / (ms * 1e-3) / 1e12,
                    peak_mb=mem,
                    note=row_note,
                )
            )
        return rows[-2:]

    # torch backend (CPU training path) and SDPA (full causal) at the small sizes / full grid
    for T, D, w in cases:
        if over_budget():
            rows.append(dict(op="-", impl="-", shape=f"T{T} D{D} w{w}", note="skipped: time budget"))
            continue
        if not cuda:  # our torch backend against the textbook eager formula (ratio = eager / ours)
            eager = measure(
                "eager",
                T,
                D,
                w,
                lambda q, k, v, w=w: eager_attention(q, k, v, w),
                note="textbook masked softmax",
            )
            mine = measure(
                "torch-blocked", T, D, w, lambda q, k, v, w=w: ours(q, k, v, window=w, backend="torch")
            )
            for e, m in zip(eager, mine, strict=True):
                m["note"] = f"{e['median_ms'] / m['median_ms']:.2f}x eager; " + m["note"]
        if w is not None and not cuda:
            mask = torch.ones(T, T, dtype=torch.bool).tril() & ~torch.ones(T, T, dtype=torch.bool).tril(-w)
            measure(
                "sdpa",
                T,
                D,
                w,
                lambda q, k, v, m=mask: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=m
                ),
                note="boolean mask",
            )
        if w is None:
            measure(
                "sdpa",
                T,
                D,
                w,
                lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
            )
        if (T, D, w) in triton_cases:
            measure("triton", T, D, w, lambda q, k, v, w=w: ours(q, k, v, window=w, backend="triton"))
        if flex is not None and (T, D, w) in flex_cases:
            create_block_mask, flex_fn = flex
            mask_mod = lambda b, h, qi, ki, w=w: (qi >= ki) & (qi - ki < w)  # same convention: w keys
            bm = create_block_mask(mask_mod, None, None, T, T, device=device)
            measure(
                "flex",
                T,
                D,
                w,
                lambda q, k, v, bm=bm, fn=flex_fn: fn(q, k, v, block_mask=bm),
                note="torch.compile",
            )
    for T, D, w in triton_cases:  # CPU: the interpreted tiny size (not in `cases`)
        if (T, D, w) not in cases:
            measure(
                "triton",
                T,
                D,
                w,
                lambda q, k, v, w=w: ours(q, k, v, window=w, backend="triton"),
                note="interpreted" if not cuda else "",
            )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(device=args.device, quick=args.quick or not args.device.startswith("cuda"))
    print(fmt_table(rows, COLS))
    print(f"({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
