"""Benchmark: MATCH (sliding window + top-k block retrieval, arXiv 2606.29844) vs sliding window vs full
attention.

Per (T, D), forward and forward+backward, side by side:

* ``full``  PyTorch SDPA, full causal (the dense baseline);
* ``swa``   the sliding-window attention of ``fast/attention.py`` (Triton on CUDA, blocked torch on CPU),
  w = 512;
* ``match`` ``fast/match.py`` (Triton on CUDA, torch backend on CPU): w = 512 plus 8 retrieved blocks of 64
  keys (mean-key selection), joint mode.

On CUDA, ``select`` rows time the Triton selection alone, the exact fp32 pass against the tensor-core band
(``fast.match_triton.SELECT_TENSOR_CORES``). Each ``match`` row's note gives ``MATCH/SWA`` (target on an
H200, bf16, T = 32K: <= 2) and ``full/MATCH``
(target >= 8), and the block-major path's balance on these inputs: the longest list of queries that selected
one block, and the most entries one program processes after the lists are cut into work items. On CPU the
script also fits the exponent a of time ~ T^a over the measured lengths (``fit`` rows): the torch backend's
selection scores every (query, block) pair, O(T^2 D / B), the attention is O(T (w + K B) D), so a sits
between 1 and 2. Peak memory (``peak_mb``) is measured on CUDA only.

    python benchmarks/match.py --device cuda          # bf16, T = 1K..32K, D = 64 and 128
    python benchmarks/match.py --device cpu           # fp32, T = 1K..8K, D = 64 (minutes)
    python benchmarks/match.py --device cpu --quick   # tiny, proves the script runs
    python benchmarks/match.py --cost                  # the cost model at B1 H16 T32K D64 (no timing)
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

if __package__:  # imported as benchmarks.match (the tests, from the repository root)
    from benchmarks._timing import fmt_table, median_ms, peak_mb
    from benchmarks.match_cost import print_report
else:  # run as a script (or by run_all.py): benchmarks/ is sys.path[0]
    from _timing import fmt_table, median_ms, peak_mb
    from match_cost import print_report

COLS = ["op", "impl", "shape", "median_ms", "peak_mb", "note"]
FULL_BUDGET_S = 240.0  # CUDA: stop adding lengths past this (compiles included)
WINDOW, TOP_K, BLOCK = 512, 8, 64  # w = 512 plus 8 retrieved blocks of 64 keys


def fit_exponent(ts, ms) -> float:
    """Least-squares slope of log(ms) over log(T)."""
    x = [math.log(t) for t in ts]
    y = [math.log(m) for m in ms]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum((a - mx) ** 2 for a in x)


def work_balance(B, H, T, D, w, K, bs, device, dtype, backend) -> tuple[int, int]:
    """(the longest list of queries that selected one block, the most listed entries one block-major
    program processes) on the benchmark's random inputs: the work items cut the first into the second."""
    from fast.match import retrieve
    from fast.match_triton import WORK_ITEM, reverse_index, work_items

    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    idx = retrieve(q, k, window=w, top_k=K, block_size=bs, backend=backend)
    _, starts = reverse_index(idx, T, bs)
    items = work_items(starts, idx.numel(), WORK_ITEM)
    return int((starts[1:] - starts[:-1]).max()), int((items[2] - items[1]).max())


def select_rows(rows, B, H, T, D, w, K, bs, device, dtype, shape, warm, rep) -> None:
    """Median time of the Triton selection with ``SELECT_TENSOR_CORES`` off and on, and their ratio."""
    import fast.match_triton as mt

    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    ms = {}
    for tc in (False, True):
        with mt.select_tensor_cores(tc):
            f = lambda: mt.retrieve_triton(q, k, window=w, top_k=K, block_size=bs, scale=D**-0.5)
            ms[tc] = median_ms(f, device=device, warmup=warm, rep=rep)
        rows.append(dict(op="select", impl="band" if tc else "exact fp32", shape=shape, median_ms=ms[tc]))
    rows.append(dict(op="select", impl="ratios", shape=shape, note=f"exact/band={ms[False] / ms[True]:.2f}"))


def run(*, device: str, quick: bool) -> list[dict]:
    from fast.attention import flash_attention
    from fast.match import match_attention
    from fast.utils import is_interpreting

    cuda = str(device).startswith("cuda")
    backend = "triton" if cuda else "torch"
    w, K, bs = WINDOW, TOP_K, BLOCK
    if cuda and not quick:
        dtype, B, H = torch.bfloat16, 1, 16
        cases = [(T, 64) for T in (1024, 2048, 4096, 8192, 16384, 32768)] + [(T, 128) for T in (4096, 32768)]
        warm, rep = 2, 5
    elif cuda:
        dtype, B, H = torch.bfloat16, 1, 4
        cases = [(2048, 64), (4096, 64)]
        warm, rep = 1, 3
    elif quick:
        dtype, B, H = torch.float32, 1, 2
        w, K, bs = 64, 4, 16  # same shape of problem, scaled down
        cases = [(256, 32), (512, 32)]
        warm, rep = 1, 2
    else:
        dtype, B, H = torch.float32, 1, 2
        cases = [(T, 64) for T in (1024, 2048, 4096, 8192)]
        warm, rep = 1, 3
    cfg = f"w{w} K{K}x{bs}"

    impls = {
        "full": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
        "swa": lambda q, k, v: flash_attention(q, k, v, window=w, backend=backend),
        "match": lambda q, k, v: match_attention(q, k, v, window=w, top_k=K, block_size=bs, backend=backend),
    }
    t_start = time.perf_counter()
    rows: list[dict] = []
    times: dict = {}  # (impl, op, T, D) -> ms

    def measure(name, fn, T, D, shape, note=""):
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v, do = (
            torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype) for _ in range(4)
        )
        for t in (q, k, v):
            t.requires_grad_(True)
        r = (0, 1) if note == "interpreted" else (warm, rep)
        fwd = lambda: fn(q, k, v)
        fwd_bwd = lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)
        for op, f in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            with torch.no_grad() if op == "fwd" else torch.enable_grad():
                ms = median_ms(f, device=device, warmup=r[0], rep=r[1])
                mem = peak_mb(f, device=device)
            times[(name, op, T, D)] = ms
            rows.append(dict(op=f"match {op}", impl=name, shape=shape, median_ms=ms, peak_mb=mem, note=note))

    for T, D in cases:
        shape = f"B{B} H{H} T{T} D{D} {cfg}"
        if cuda and not quick and time.perf_counter() - t_start > FULL_BUDGET_S:
            rows.append(dict(op="-", impl="-", shape=shape, note="skipped: time budget"))
            continue
        for name, fn in impls.items():
            measure(name, fn, T, D, shape)
        if cuda:  # the selection alone: the exact fp32 pass against the tensor-core band
            select_rows(rows, B, H, T, D, w, K, bs, device, dtype, shape, warm, rep)
        longest, item = work_balance(B, H, T, D, w, K, bs, device, dtype, backend)
        for op in ("fwd", "fwd+bwd"):
            m, s, f = (times[(n, op, T, D)] for n in ("match", "swa", "full"))
            rows.append(
                dict(
                    op=f"match {op}",
                    impl="ratios",
                    shape=shape,
                    note=f"MATCH/SWA={m / s:.2f} full/MATCH={f / m:.2f} "
                    f"longest block list {longest}, most per program {item}",
                )
            )
    if not cuda:
        measured = [(T, D) for T, D in cases if ("match", "fwd", T, D) in times]
        for name in impls:
            for op in ("fwd", "fwd+bwd"):
                ts = [T for T, _ in measured]
                a = fit_exponent(ts, [times[(name, op, T, D)] for T, D in measured])
                rows.append(
                    dict(
                        op=f"match {op}",
                        impl=f"fit {name}",
                        shape=f"T {ts[0]}..{ts[-1]}",
                        note=f"time ~ T^{a:.2f}",
                    )
                )
        if is_interpreting():  # the Triton path once, interpreted (proves it runs; the time means nothing)
            T, D = 128, 16
            tiny = lambda q, k, v: match_attention(
                q, k, v, window=32, top_k=2, block_size=16, backend="triton"
            )
            measure("match-triton", tiny, T, D, f"B{B} H{H} T{T} D{D} w32 K2x16", note="interpreted")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--cost",
        action="store_true",
        help="print the cost model of the T = 32K shape (benchmarks/match_cost.py) instead of timing",
    )
    args = ap.parse_args(argv)
    if args.cost:
        print_report(1, 16, 16, 32768, 64, WINDOW, TOP_K, BLOCK)
        return 0
    t0 = time.perf_counter()
    rows = run(device=args.device, quick=args.quick)
    print(fmt_table(rows, COLS))
    print(f"({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
