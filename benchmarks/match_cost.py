"""A cost model of one MATCH training step (forward + backward, block-major path) on an H100, per launch:
FLOPs, bytes moved and launches, and the time they imply at the GPU's peak, beside the sliding-window kernel
and causal SDPA at the same shape; plus the extra memory of the step. Run it to read a GPU measurement of
``benchmarks/match.py`` against what the design should cost, or where no GPU is at hand:

    python benchmarks/match.py --cost                      # B1 H16 T32K D64, w = 512 + 8 blocks of 64
    python benchmarks/match_cost.py --B 8 --H 32 --T 32768 --D 128 --top-k 16

A model, not a measurement. Each kernel's time is ``max(FLOPs / peak FLOP rate, bytes / HBM bandwidth) +
launches x 4 us``: every kernel at its roofline, no occupancy or latency effects, so real kernels are slower
(FlashAttention-3 reaches about 60-75 % of the bf16 peak). Bytes count what a kernel reads and writes once,
with gathered rows counted per gather (no reuse across programs through L2) and atomic adds as a read and a
write of fp32. The selection (``--select``) is priced as the kernel's default runs it
(``fast.match_triton.SELECT_TENSOR_CORES``): ``exact``, one fp32 pass, its FLOPs at the fp32 CUDA-core peak;
or ``band``, two fp16 tensor-core passes over the candidates plus an fp32 re-scoring of ``KG`` band
candidates per query row (gathered rows). The insertion loops are not counted, nor the band's
fallbacks to the exact pass (none on generic data). Every query is assumed to fill all ``top_k`` slots
(true once ``T >> w + top_k * block``).

H100 SXM figures: 989 TFLOP/s dense bf16 tensor, 67 TFLOP/s fp32 CUDA core, 3.35 TB/s HBM3, 80 GB.
"""

from __future__ import annotations

import argparse
import math
import sys

PEAK_TC = 989e12  # bf16 dense tensor-core FLOP/s
PEAK_FP32 = 67e12  # fp32 CUDA-core FLOP/s
HBM = 3.35e12  # bytes/s
LAUNCH_S = 4e-6
GPU_BYTES = 80e9
WORK_ITEM = 256  # fast.match_triton.WORK_ITEM
BWD_ACC_BYTES = 2 * 2**30  # fast.match_triton.BWD_ACC_BYTES
SELECT_GUARD = 8  # fast.match_triton.SELECT_GUARD


def _k(name, flops=0.0, bytes_=0.0, launches=1, fp32=False):
    t = max(flops / (PEAK_FP32 if fp32 else PEAK_TC), bytes_ / HBM) + launches * LAUNCH_S
    return dict(kernel=name, flops=flops, bytes=bytes_, launches=launches, ms=t * 1e3)


def window_parts(B, Hq, Hkv, T, D, w, es=2):
    """Forward, dq and dk/dv of sliding-window attention (the window part of MATCH, and the baseline):
    flash-attention counts (forward 4 T w D per head, backward 2.5x), K/V re-read per 64-row query tile."""
    w = min(w, T)
    f = 4.0 * B * Hq * T * w * D
    qo = B * Hq * T * D * es
    kv_reread = B * Hq * math.ceil(T / 64) * (w + 64) * D * es * 2
    return [
        _k("window fwd", f, 2 * qo + kv_reread + B * Hq * T * 4),
        _k("window dq", 1.0 * f, 3 * qo + kv_reread),  # S, dP, dQ: 3 of the 5 backward products
        _k("window dk/dv", 1.5 * f, 2 * qo + kv_reread + 2 * B * Hkv * T * D * es),  # S, dP, dV, dK
    ]


def selection(B, Hq, Hkv, T, D, top_k, bs, es=2, select="exact"):
    """The selection's rows: candidates (block summaries, fp32) streamed per 32-row query tile, half of them
    on average (causal); ``band``: two fp16 tensor-core passes and ``KG`` gathered fp32 re-scorings per
    query row; ``exact``: one fp32 CUDA-core pass."""
    NB = math.ceil(T / bs)
    E = B * Hkv * T * top_k
    q_in = B * Hq * T * D * es + B * Hq * T * D  # read q, sum the group
    stream = B * Hkv * math.ceil(T / 32) * NB / 2 * D * 4  # candidate bytes per pass
    pairs = B * Hkv * T * (NB / 2)  # (query row, candidate) pairs
    if select == "exact":
        return [
            _k("selection (exact, fp32)", 2.0 * pairs * D + B * Hq * T * D, q_in + stream + E * 8, fp32=True)
        ]
    KG = 1 << max(top_k + SELECT_GUARD - 1, 1).bit_length()
    return [
        _k("selection: fp16 band passes (tensor core)", 2 * 2.0 * pairs * D, q_in + 2 * stream + E * 8),
        _k(
            "selection: band re-scoring (fp32)",
            2.0 * B * Hkv * T * KG * D,
            B * Hkv * T * KG * D * 4,
            launches=0,
            fp32=True,
        ),
    ]


def match_step(B, Hq, Hkv, T, D, w, top_k, bs, es=2, select="exact"):
    """Per-launch rows of one forward + backward of the block-major path (fast/match_triton.py)."""
    NB = math.ceil(T / bs)
    E = B * Hkv * T * top_k  # listed (query, slot) entries
    El = B * Hq * T * top_k  # ... per query head
    items = math.ceil(E / WORK_ITEM) + B * Hkv * NB
    nsub = math.ceil(bs / 64)
    rows = [_k("block summaries", B * Hkv * T * D, B * Hkv * T * D * es + B * Hkv * NB * D * 4)]
    rows += selection(B, Hq, Hkv, T, D, top_k, bs, es, select)
    win = window_parts(B, Hq, Hkv, T, D, w, es)
    rows.append(win[0] | {"kernel": "window fwd (o_W fp32)"})
    rows.append(_k("reverse index + work items (torch)", 0, E * 8 * 22 + items * 24 * 4, launches=16))
    rows.append(
        _k(
            "blocks: lse pass",
            2.0 * El * bs * D,
            El * D * es + items * bs * D * es + El * 4,
        )
    )
    rows.append(
        _k("lse merge, o_W rescale (torch)", 0, El * 4 + B * Hq * T * (3 * 4 + 2 * D * 4), launches=5)
    )
    rows.append(
        _k(
            "blocks: accumulate pass (atomic)",
            4.0 * El * bs * D,
            El * (D * es + 4) + items * 2 * bs * D * es + El * D * 4 * 2,
        )
    )
    rows.append(_k("cast o", 0, B * Hq * T * D * (4 + es)))
    rows.append(_k("delta, stats (torch)", 0, B * Hq * T * (2 * D * es + 4 * 4), launches=3))
    rows.append(win[1] | {"kernel": "window dq (fp32)"})
    rows.append(win[2] | {"kernel": "window dk/dv (fp32)"})
    rows.append(
        _k(
            "blocks: dk/dv + dq (atomic)",
            10.0 * El * bs * D,
            El * (2 * D * es + 8) * nsub
            + items * nsub * 2 * bs * D * es
            + El * D * 4 * 2 * nsub
            + items * nsub * 2 * bs * D * 4 * 2,
        )
    )
    rows.append(_k("casts dq, dk, dv", 0, (B * Hq + 2 * B * Hkv) * T * D * (4 + es), launches=3))
    return rows


def extra_memory(B, Hq, Hkv, T, D, top_k, bs):
    """Peak extra bytes of the block-major step beyond q, k, v, o, dO and the gradients (module docstring
    of fast/match_triton.py): forward o_W, lse_part and the index; backward dq_W, dk_W, dv_W for as many
    batch elements at a time as fit in BWD_ACC_BYTES."""
    E = B * Hkv * T * top_k
    index = E * 8 + E * 4 + (math.ceil(E / WORK_ITEM) + B * Hkv * math.ceil(T / bs)) * 24
    fwd = B * Hq * T * D * 4 + B * Hq * T * top_k * 4 + index + E * 8 * 3  # + transient sort keys
    per_b = (Hq + 2 * Hkv) * T * D * 4  # the backward's fp32 accumulators, BWD_ACC_BYTES of batch at a time
    chunk = max(1, min(B, BWD_ACC_BYTES // per_b))
    bwd = index + chunk * per_b + B * Hq * T * 4 * 5 + B * Hq * T * D * 2  # + stats, the dO_R copy (gated)
    return max(fwd, bwd)


def report(B, Hq, Hkv, T, D, w, top_k, bs, es=2, select="exact") -> tuple[list[dict], dict]:
    rows = match_step(B, Hq, Hkv, T, D, w, top_k, bs, es, select)
    match_ms = sum(r["ms"] for r in rows)
    swa_ms = sum(r["ms"] for r in window_parts(B, Hq, Hkv, T, D, w, es))
    f = 2.0 * B * Hq * T * T * D  # causal: half of 4 T^2 D
    sdpa_ms = sum(
        r["ms"]
        for r in (
            _k("sdpa fwd", f, 4 * B * Hq * T * D * es),
            _k("sdpa bwd", 2.5 * f, 8 * B * Hq * T * D * es),
        )
    )
    io = (4 * B * Hq * T * D + 4 * B * Hkv * T * D) * es  # q, o, dO, dq and k, v, dk, dv
    summary = dict(
        match_ms=match_ms,
        swa_ms=swa_ms,
        sdpa_ms=sdpa_ms,
        match_over_swa=match_ms / swa_ms,
        sdpa_over_match=sdpa_ms / match_ms,
        launches=sum(r["launches"] for r in rows),
        extra_gb=extra_memory(B, Hq, Hkv, T, D, top_k, bs) / 1e9,
        io_gb=io / 1e9,
    )
    summary["fits_80gb"] = (summary["extra_gb"] + summary["io_gb"]) * 1e9 < GPU_BYTES
    # the floor: MATCH attends w + top_k * bs keys per query where the window attends w; at the window
    # kernel's efficiency and with a free selection and merge it costs (w + K B) / w times the window
    floor = (min(w, T) + top_k * bs) / min(w, T)
    summary.update(floor_over_swa=floor, sdpa_over_floor=sdpa_ms / (floor * swa_ms))
    return rows, summary


def print_report(B, Hq, Hkv, T, D, w, top_k, bs, es=2, select="exact") -> dict:
    rows, s = report(B, Hq, Hkv, T, D, w, top_k, bs, es, select)
    print(
        f"cost model, H100 peak: B{B} H{Hq}/{Hkv} T{T} D{D}, w = {w} + {top_k} blocks of {bs}, "
        "forward + backward"
    )
    print("| kernel | GFLOP | GB moved | launches | ms at peak |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['kernel']} | {r['flops'] / 1e9:.1f} | {r['bytes'] / 1e9:.2f} | {r['launches']} | "
            f"{r['ms']:.3f} |"
        )
    print(
        f"| **MATCH total** | | | {s['launches']} | **{s['match_ms']:.2f}** |\n"
        f"| sliding window (same w) | | | 3 | {s['swa_ms']:.2f} |\n"
        f"| causal SDPA | | | 2 | {s['sdpa_ms']:.2f} |"
    )
    print(
        f"MATCH / sliding = {s['match_over_swa']:.2f} (target <= 2), "
        f"SDPA / MATCH = {s['sdpa_over_match']:.2f} (target >= 5); extra memory {s['extra_gb']:.2f} GB, "
        "with q, k, v, o and the gradients "
        f"{s['extra_gb'] + s['io_gb']:.2f} GB ({'fits' if s['fits_80gb'] else 'does not fit'} 80 GB)"
    )
    print(
        "floor (the attended keys alone, (w + top_k B) / w, at the window kernel's efficiency): "
        f"MATCH / sliding >= {s['floor_over_swa']:.2f}, so SDPA / MATCH <= {s['sdpa_over_floor']:.2f} here"
    )
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=16, help="query heads")
    ap.add_argument("--Hkv", type=int, default=None, help="kv heads (default: H)")
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--select", choices=["band", "exact"], default="exact", help="the selection's pricing")
    a = ap.parse_args(argv)
    print_report(a.B, a.H, a.Hkv or a.H, a.T, a.D, a.window, a.top_k, a.block, select=a.select)
    return 0


if __name__ == "__main__":
    sys.exit(main())
