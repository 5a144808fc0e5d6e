"""Fused (chunked lm-head + loss, ``fast.fused``) against unfused (materialised ``[N, V]`` logits)
distillation losses: peak memory above the inputs and time of one forward + backward, side by side in one
run.

    python benchmarks/fused_loss.py --device cpu                       # N = 2048, H = 896, V = 151,936
    python benchmarks/fused_loss.py --device cuda --N 1024 2048 8192 --H 896 4096 --dtype bf16

CPU: the peak resident set of the process during the call minus before it (each case in a fresh
subprocess, after its inputs are built) and the median thread CPU time of one thread. CUDA:
``torch.cuda.max_memory_allocated`` above the inputs and the median of CUDA-event timings. The inputs are the
final hidden states of a student and a teacher ``[N, H]`` and their output weights ``[V, H]`` (the student's
with a gradient); the objectives are ``ce``, ``forward_kl``, ``js_divergence`` and ``mgsr`` (CE + DAC-KL +
span, spans of 8 rows), the unfused path running the same losses on ``h @ W.T``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from fast.dac_kl import DACKL
from fast.divergences import divergence
from fast.fused import default_chunk_rows, default_loss_rows, fused_distill_loss
from fast.span import span_loss

if __package__:  # imported as benchmarks.fused_loss (the tests, from the repository root)
    from benchmarks._cpu import peak_rss_in_subprocess, rss_growth_mb
else:  # run as a script: benchmarks/ is the first entry of sys.path
    from _cpu import peak_rss_in_subprocess, rss_growth_mb

OBJECTIVES = ("ce", "forward_kl", "js_divergence", "mgsr")


def _inputs(N, H, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g).to(dtype).to(device).requires_grad_()
    ws = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(dtype).to(device).requires_grad_()
    ht = torch.randn(N, H, generator=g).to(dtype).to(device)
    wt = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(dtype).to(device)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    spans = torch.tensor([[a, min(a + 8, N)] for a in range(0, N - 1, 8)]).to(device)
    dac = DACKL(k=64, hidden=256, backend="auto", generator=torch.Generator().manual_seed(1)).to(device)
    return hs, ws, ht, wt, labels, spans, dac


def step(impl, objective, inp):
    """One forward + backward (gradients into hs, ws and the DAC-KL sub-network)."""
    hs, ws, ht, wt, labels, spans, dac = inp
    if impl == "fused":
        teacher = (None, None) if objective == "ce" else (ht, wt)
        loss, _ = fused_distill_loss(
            hs, ws, *teacher, objective=objective, labels=labels, spans=spans, dac=dac
        )
    else:
        s = (hs @ ws.T).float()
        with torch.no_grad():
            t = None if objective == "ce" else (ht @ wt.T).float()  # cross-entropy reads no teacher
        if objective == "ce":
            loss = torch.nn.functional.cross_entropy(s, labels)
        elif objective == "mgsr":
            tok, _ = dac(t, s)
            loss = torch.nn.functional.cross_entropy(s, labels) + tok + span_loss(t, s, spans)
        else:
            loss = divergence(objective, t, s)
    loss.backward()
    for p in (hs, ws, *dac.parameters()):
        p.grad = None
    return float(loss.detach())


def peak_cpu(impl, objective, N, H, V):
    torch.set_num_threads(1)
    inp = _inputs(N, H, V, torch.float32, "cpu")
    return rss_growth_mb(lambda: step(impl, objective, inp))


def time_cpu(impl, objective, N, H, V, rep):
    torch.set_num_threads(1)
    inp = _inputs(N, H, V, torch.float32, "cpu")
    step(impl, objective, inp)  # warm-up
    ts = []
    for _ in range(rep):
        t0 = time.thread_time()
        step(impl, objective, inp)
        ts.append(time.thread_time() - t0)
    return statistics.median(ts)


def gpu_case(impl, objective, N, H, V, dtype, rep):
    inp = _inputs(N, H, V, dtype, "cuda")
    step(impl, objective, inp)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(impl, objective, inp)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = []
    for _ in range(rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step(impl, objective, inp)
        b.record()
        torch.cuda.synchronize()
        ms.append(a.elapsed_time(b))
    return peak, statistics.median(ms)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--N", type=int, nargs="+", default=[2048])
    ap.add_argument("--H", type=int, nargs="+", default=[896])
    ap.add_argument("--V", type=int, default=151_936)
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rep", type=int, default=3)
    ap.add_argument(
        "--impls",
        nargs="+",
        default=["unfused", "fused"],
        choices=["unfused", "fused"],
        help="leave one out where it cannot run (e.g. unfused MGSR beyond the machine's memory)",
    )
    ap.add_argument(
        "--peak-rss", nargs=5, metavar=("IMPL", "OBJECTIVE", "N", "H", "V"), help=argparse.SUPPRESS
    )
    ap.add_argument(
        "--cpu-time", nargs=6, metavar=("IMPL", "OBJECTIVE", "N", "H", "V", "REP"), help=argparse.SUPPRESS
    )
    a = ap.parse_args(argv)
    if a.peak_rss:  # one measurement in this fresh process: print the peak resident growth last
        impl, obj, N, H, V = a.peak_rss
        print(peak_cpu(impl, obj, int(N), int(H), int(V)))
        return
    if a.cpu_time:  # likewise the median thread CPU time
        impl, obj, N, H, V, rep = a.cpu_time
        print(time_cpu(impl, obj, int(N), int(H), int(V), int(rep)))
        return
    rows = []
    hdr = "| objective | N | H | chunk / piece rows | unfused peak (MiB) | fused peak (MiB) |"
    hdr += " fused / unfused peak | unfused time | fused time | fused / unfused time |"
    print(f"V = {a.V}, device {a.device}" + (f", {a.dtype}" if a.device == "cuda" else ", fp32, one thread"))
    print(hdr)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for H in a.H:
        for N in a.N:
            for obj in a.objectives:
                C = default_chunk_rows(N, a.V, obj)
                C = f"{C} / {default_loss_rows(C, a.V, obj)}"
                if a.device == "cpu":  # each case in a fresh process: a case killed for memory is reported
                    here = os.path.abspath(__file__)
                    peaks, times = [], []
                    for impl in ("unfused", "fused"):
                        if impl not in a.impls:
                            peaks.append(None)
                            times.append(None)
                            continue
                        try:
                            peaks.append(peak_rss_in_subprocess(here, impl, obj, N, H, a.V))
                            times.append(_time_in_subprocess(here, impl, obj, N, H, a.V, a.rep))
                        except subprocess.CalledProcessError as err:
                            peaks.append(f"failed (exit {err.returncode}: out of memory?)")
                            times.append(None)
                    unit = "s (CPU)"
                else:
                    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
                    res = [gpu_case(impl, obj, N, H, a.V, dt, a.rep) for impl in ("unfused", "fused")]
                    peaks, times, unit = [r[0] for r in res], [r[1] for r in res], "ms"
                rows.append((obj, N, H, C, *peaks, *times))
                print(
                    f"| {obj} | {N} | {H} | {C} | {_fmt(peaks[0], '.0f')} | {_fmt(peaks[1], '.0f')} | "
                    f"{_ratio(peaks[1], peaks[0])} | {_fmt(times[0], '.3g', unit)} | "
                    f"{_fmt(times[1], '.3g', unit)} | {_ratio(times[1], times[0])} |",
                    flush=True,
                )


def _fmt(x, spec, unit=""):
    if x is None:
        return "not run"
    if isinstance(x, str):
        return x
    return f"{x:{spec}}" + (f" {unit}" if unit else "")


def _ratio(a, b):
    return f"{a / b:.2f}" if isinstance(a, float) and isinstance(b, float) else "-"


def _time_in_subprocess(script, impl, obj, N, H, V, rep):
    out = subprocess.run(
        [sys.executable, script, "--cpu-time", impl, obj, str(N), str(H), str(V), str(rep)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
