"""Benchmark: DAC-KL and the span-correlation loss, forward + backward through the student logits and
the bounds: the Triton kernels, the torch backends and the eager formulas, side by side.

``eager``: the clearest eager version of each loss, through autograd, without input checks. DAC-KL:
log-softmax of both inputs, one sort per quantile level (``_eager_value_quantile`` /
``_eager_mass_quantile``), a one-hot target mask, the band mask and the three weighted sums of
``reference/dac_kl.py``. Span: softmax of both inputs, the ``[P, V]`` rows of every pair gathered,
``e = q_k q_{k+1} - p_k p_{k+1}``, the mean of ``||e||``. ``vs_eager`` = eager time / this row's time
in the same run (> 1: faster than eager).

CUDA: N = 4096 tokens, V = 32000, bf16 and fp32 logits; the span loss on B = 8 sequences of T = 512
(4096 rows) with 4-token spans tiling every sequence (3 pairs per span).
CPU (without ``--quick``): fp32, DAC-KL at N × V = 1024 × 32000 and 4096 × 259 (the tiny GPTs'
vocabulary), the span loss at B × T × V = 2 × 512 × 32000 and 8 × 512 × 259, torch backend vs eager
timed interleaved; ``peak_mb`` is the peak resident-set growth of one call in a fresh subprocess
(``benchmarks/_cpu.py``). ``--quick``: tiny sizes so the script is exercised on CPU (Triton runs
interpreted there, so only at a toy size).

    python benchmarks/mgsr_losses.py --device cuda
    OMP_NUM_THREADS=2 python benchmarks/mgsr_losses.py --device cpu
    python benchmarks/mgsr_losses.py --device cpu --quick
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from fast.dac_kl import dac_kl
from fast.span import pair_rows, span_loss, spans_to_tensor
from fast.utils import is_interpreting

if __package__:  # imported as benchmarks.mgsr_losses (the tests, from the repository root)
    from benchmarks._cpu import interleaved_ms, peak_rss_in_subprocess, reps_for, rss_growth_mb
    from benchmarks._timing import cli, median_ms, peak_mb
else:  # run as a script (or by run_all.py): benchmarks/ is sys.path[0]
    from _cpu import interleaved_ms, peak_rss_in_subprocess, reps_for, rss_growth_mb
    from _timing import cli, median_ms, peak_mb


# ---------------------------------------------------------------------------------- the eager formulas
def _eager_value_quantile(p, valid, q):  # the level-q order statistic of the valid p, interpolated
    n = valid.sum(-1)
    srt = torch.where(valid, p, torch.full_like(p, float("inf"))).sort(-1).values
    idx = q * (n - 1).to(q.dtype)
    lo = torch.minimum(idx.detach().floor().long().clamp(min=0), n - 1)
    hi = torch.minimum(lo + 1, n - 1)
    s_lo, s_hi = srt.gather(-1, lo[:, None])[:, 0], srt.gather(-1, hi[:, None])[:, 0]
    return s_lo + (idx - lo.to(q.dtype)) * (s_hi - s_lo)


def _eager_mass_quantile(p, valid, q):  # the threshold whose head (largest entries) holds mass q
    pv = torch.where(valid, p, torch.zeros_like(p))
    d = pv.sort(-1, descending=True).values
    j = (d.cumsum(-1) <= q.detach()[:, None]).sum(-1)
    x = d.gather(-1, j.clamp(max=d.shape[-1] - 1)[:, None])[:, 0]
    x = torch.where(j < d.shape[-1], x, torch.zeros_like(q))
    above = valid & (p > x[:, None])
    M = (pv * above).sum(-1)
    d_up = torch.where(above, pv, torch.full_like(pv, float("inf"))).min(-1).values
    d_up = torch.where(torch.isfinite(d_up), d_up, x)
    frac = (q - M) / torch.where(x > 0, x, torch.ones_like(x))
    return torch.where((x > 0) & ((q.detach() - M) < x), d_up + frac * (x - d_up), x)


def eager_dac_kl(t, s, upper, lower, bounds, gamma=0.05, eps=1e-8, rho_min=0.5, lam_m=1.0):  # -> [N]
    """DAC-KL with the default options (target, band, normalize, floor), as reference/dac_kl.py writes it."""
    lp, lq = t.log_softmax(-1), s.log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    valid = torch.isfinite(t)
    onehot = F.one_hot(t.argmax(-1), t.shape[-1]).bool()
    if bounds == "value":
        tau_lo, tau_hi = _eager_value_quantile(p, valid, lower), _eager_value_quantile(p, valid, upper)
    else:
        tau_lo, tau_hi = _eager_mass_quantile(p, valid, upper), _eager_mass_quantile(p, valid, lower)
    beta = (1.0 / (gamma * (tau_hi - tau_lo) + eps))[:, None]
    m = torch.sigmoid(beta * (p - tau_lo[:, None])) * torch.sigmoid(beta * (tau_hi[:, None] - p))
    m = torch.where(valid, m, torch.zeros_like(m))
    mk, w = torch.where(onehot, torch.zeros_like(m), m), torch.where(onehot, torch.ones_like(m), m)
    d = torch.where(p > 0, lp - lq, torch.zeros_like(lp))
    A, B, cross = (w * p).sum(-1), (w * q).sum(-1), (w * p * d).sum(-1)
    return cross / A + B.log() - A.log() + lam_m * F.relu(rho_min - (mk * p).sum(-1))


def eager_span(t, s, spans):  # [B, T, V] x2, [B, S, 2] -> mean over pairs of ||q_k q_k+1 - p_k p_k+1||
    B, T, V = s.shape
    k = pair_rows(spans, T)
    p, q = t.reshape(B * T, V).softmax(-1), s.reshape(B * T, V).softmax(-1)
    d2 = (q[k] * q[k + 1] - p[k] * p[k + 1]).square().sum(-1)
    pos = d2 > 0
    return torch.where(pos, torch.where(pos, d2, torch.ones_like(d2)).sqrt(), torch.zeros_like(d2)).mean()


# ----------------------------------------------------------------------------------------------- cases
def _dac_case(N, V, dtype, device, bounds):
    g = torch.Generator(device="cpu").manual_seed(0)
    t = torch.randn(N, V, generator=g).mul_(3).to(device=device, dtype=dtype)
    s = torch.randn(N, V, generator=g).mul_(3).to(device=device, dtype=dtype).requires_grad_()
    u = (0.6 + 0.35 * torch.rand(N, generator=g)).to(device).requires_grad_()
    l = (u.detach() * torch.rand(N, generator=g).to(device)).requires_grad_()

    def make(impl):
        def fn():
            s.grad = u.grad = l.grad = None
            if impl == "eager":
                loss = eager_dac_kl(t, s, u, l, bounds)
            else:
                loss, _, _ = dac_kl(t, s, u, l, backend=impl, validate=False, bounds=bounds)
            loss.sum().backward()

        return fn

    return make, N * V * t.element_size() * 2  # read t and s once: the minimum traffic of one pass


def _span_case(B, T, V, dtype, device, width=4):
    g = torch.Generator(device="cpu").manual_seed(1)
    t = torch.randn(B, T, V, generator=g).mul_(3).to(device=device, dtype=dtype)
    s = torch.randn(B, T, V, generator=g).mul_(3).to(device=device, dtype=dtype).requires_grad_()
    spans = spans_to_tensor([[(a, a + width) for a in range(0, T - width + 1, width)]] * B, device)

    def make(impl):
        def fn():
            s.grad = None
            if impl == "eager":
                eager_span(t, s, spans).backward()
            else:
                span_loss(t, s, spans, backend=impl, validate=False).backward()

        return fn

    return make, B * T * V * t.element_size() * 2


CPU_CASES = [
    ("dac", (1024, 32000), "value"),
    ("dac", (1024, 32000), "mass"),
    ("dac", (4096, 259), "value"),
    ("dac", (4096, 259), "mass"),
    ("span", (2, 512, 32000), None),
    ("span", (8, 512, 259), None),
]


def _case(kind, shape, bounds, dtype, device):
    if kind == "dac":
        make, nbytes = _dac_case(*shape, dtype, device, bounds)
        return make, nbytes, f"dac_kl fwd+bwd ({bounds})", "N={} V={}".format(*shape)
    make, nbytes = _span_case(*shape, dtype, device)
    return make, nbytes, "span fwd+bwd", "B={} T={} V={}".format(*shape)


def _peak_rss_child(kind, shape, bounds, impl):
    make, _, _, _ = _case(kind, tuple(int(x) for x in shape.split("x")), bounds, torch.float32, "cpu")
    print(rss_growth_mb(make(impl)))


def run_cpu() -> list[dict]:
    rows = []
    for kind, shape, bounds in CPU_CASES:
        make, nbytes, op, shp = _case(kind, shape, bounds, torch.float32, "cpu")
        impls = ("torch", "eager")
        ms = interleaved_ms({i: make(i) for i in impls}, warmup=1, rep=reps_for(math.prod(shape)))
        for impl in impls:
            rows.append(
                dict(
                    op=op,
                    impl=impl,
                    shape=f"{shp} float32",
                    median_ms=ms[impl],
                    vs_eager=ms["eager"] / ms[impl],
                    gbps=nbytes / ms[impl] / 1e6,
                    peak_mb=peak_rss_in_subprocess(__file__, kind, "x".join(map(str, shape)), bounds, impl),
                )
            )
    return rows


def run(*, device: str, quick: bool) -> list[dict]:
    cuda = str(device).startswith("cuda")
    if not cuda and not quick:
        return run_cpu()
    rows = []
    if quick:
        dac_shapes, span_shapes, dtypes = [(2, 64)], [(1, 5, 64)], [torch.float32]
        warmup, rep = (1, 3) if cuda else (0, 1)  # interpreted Triton: one call is enough to exercise it
    else:
        dac_shapes, span_shapes, dtypes = [(4096, 32000)], [(8, 512, 32000)], [torch.bfloat16, torch.float32]
        warmup, rep = 2, 5
    impls = ["torch", "triton", "eager"] if (cuda or is_interpreting()) else ["torch", "eager"]
    cases = [("dac", sh, b) for sh in dac_shapes for b in ("value", "mass")] + [
        ("span", sh, None) for sh in span_shapes
    ]
    for dtype in dtypes:
        for kind, shape, bounds in cases:
            make, nbytes, op, shp = _case(kind, shape, bounds, dtype, device)
            group = []
            for impl in impls:
                fn = make(impl)
                row = dict(op=op, impl=impl, shape=f"{shp} {str(dtype)[6:]}")
                try:
                    ms = median_ms(fn, device=device, warmup=warmup, rep=rep)
                    row.update(median_ms=ms, gbps=nbytes / ms / 1e6, peak_mb=peak_mb(fn, device=device))
                except torch.OutOfMemoryError:
                    row["note"] = "out of memory"
                group.append(row)
                if cuda:
                    torch.cuda.empty_cache()
            base = [r["median_ms"] for r in group if r["impl"] == "eager" and "median_ms" in r]
            for r in group:
                if base and "median_ms" in r:
                    r["vs_eager"] = base[0] / r["median_ms"]
            rows += group
    return rows


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--peak-rss":
        kind, shape, bounds, impl = sys.argv[2:6]
        _peak_rss_child(kind, shape, None if bounds == "None" else bounds, impl)
        return
    cols = ["op", "impl", "shape", "median_ms", "vs_eager", "gbps", "peak_mb", "note"]
    cli(run, cols, __doc__.split("\n")[0])


if __name__ == "__main__":
    main()
