"""DAC-KL (distribution-adaptive clipping KL): torch backend, Triton fwd/bwd kernels, and the ``DACKL`` module
that owns the bounds sub-network. Oracle: ``reference/dac_kl.py`` (read its docstring for the math and every
convention; this file implements exactly the same function).

Why the Triton kernel does not sort: a quantile needs one or two order statistics, not the whole order.
``bounds="value"``: ``p = exp((t - max) - log z)`` is non-decreasing in the teacher logit ``t``, so the k-th
smallest probability is exp of the k-th smallest valid logit. That logit is found exactly by a radix select on
int32 keys that order like the fp32 logits (``_order_key``), one byte per pass with ``tl.histogram``: the top
byte's histogram rides along the log-sum-exp pass, three more passes narrow it to one key and, in the last
one, also give the next order statistic (the interpolation's neighbour); integer work only, no ``exp``.
``bounds="mass"``: the mass above a candidate is not a count, so the threshold is bisected on the bit pattern
of p (for ``p >= 0`` the int32 pattern orders like the value), 31 steps of one streaming pass each, plus one
pass for the neighbouring value (``bounds="nontarget"``: the same bisection with the target class left out,
at the masses ``upper r, lower r`` the host computes, ``r = 1 - p_c``).
Then one pass computes mask, weights, ``A = sum w p``, ``B = sum w q`` and
the cross term. The backward kernel is a single streaming pass: ``dL/ds = w (q/B - p/A)`` plus the two sums
that give ``dL/dtau``. The input checks on the logits' values (a row with no finite teacher logit, a -inf
student logit where the teacher's is finite) are made by the first pass (``CHECK``), not by the host.

Cost per row (forward): 5 passes over V for ``bounds="value"`` (log-sum-exp + top byte, three select passes,
the sums), 34 for ``"mass"``, 2 with ``band=False``; backward 1. Memory: O(N) saved statistics, no [N, V]
intermediate (the torch backend keeps several).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from fast.utils import check_float, empty, is_interpreting, resolve_backend

BOUNDS = ("value", "mass", "nontarget")
DEFAULTS = dict(
    bounds="value",
    gamma=0.05,
    eps=1e-8,
    target=True,
    band=True,
    normalize=True,
    floor=True,
    rho_min=0.5,
    lam_m=1.0,
)
ONE_BITS = 0x3F800000  # int32 bit pattern of 1.0f
N_STATS = 12  # saved per row: max_t, log z_t, tau_lo, tau_hi, dlo, dhi, A, B, cross, active, max_s, log z_s


def _cfg(cfg: dict) -> dict:
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown DAC-KL option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    if out["bounds"] not in BOUNDS:
        raise ValueError(f"bounds must be one of {BOUNDS}, got {out['bounds']!r}")
    return out


def check_inputs(t, s, upper, lower, validate: bool = True) -> None:
    """Host-side validation (``tl.device_assert`` is a no-op). ``validate=False`` skips the value checks
    (which synchronise a GPU) but keeps the shape checks."""
    if _check_levels(t, s, upper, lower, validate):
        _check_logits(t, s)


def _check_levels(t, s, upper, lower, validate: bool) -> bool:
    """Dtypes, shapes and (if ``validate``) the levels, all O(N); True when the logits' values must be checked
    too (the Triton forward checks them in its first pass, see ``_raise_on_bad_rows``)."""
    check_float("t_logits", t)
    check_float("s_logits", s)
    check_float("upper", upper)
    check_float("lower", lower)
    if t.dim() != 2 or t.shape != s.shape:
        raise ValueError(
            f"teacher/student logits must both be [N, V], got {tuple(t.shape)} and {tuple(s.shape)}"
        )
    N = t.shape[0]
    if upper.shape != (N,) or lower.shape != (N,):
        raise ValueError(f"upper/lower must be [N]={N}, got {tuple(upper.shape)} and {tuple(lower.shape)}")
    if not validate or N == 0:
        return False
    u, l = upper.detach(), lower.detach()
    if not (torch.isfinite(u).all() and torch.isfinite(l).all() and (u <= 1).all() and (l >= 0).all()):
        raise ValueError(
            f"bounds must lie in [0, 1]; got upper in [{u.min().item()}, {u.max().item()}], "
            f"lower in [{l.min().item()}, {l.max().item()}]"
        )
    bad = l >= u
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"need lower < upper for every token; row {i} has lower={l[i].item()} >= upper={u[i].item()}"
        )
    return True


def _check_logits(t, s) -> None:  # [N, V], [N, V] -> None  (two more reads of both [N, V] tensors)
    # screen: a row whose teacher and student sums are finite holds no -inf/NaN/inf and passes both checks
    # below; only the other rows (padded vocabulary, or bad values) are examined entry by entry
    t, s = t.detach(), s.detach()
    acc = torch.promote_types(torch.promote_types(t.dtype, s.dtype), torch.float32)
    flagged = ~torch.isfinite(t.sum(-1, dtype=acc) + s.sum(-1, dtype=acc))
    if not bool(flagged.any()):
        return
    t, s = t[flagged], s[flagged]
    valid = torch.isfinite(t)
    _raise_on_bad_rows((valid.sum(-1) == 0).any(), (valid & torch.isneginf(s)).any())


def _raise_on_bad_rows(empty_row, unshared_padding) -> None:  # bool-like, bool-like -> None
    if bool(empty_row):
        raise ValueError("a teacher row is entirely -inf (no valid vocabulary entry)")
    if bool(unshared_padding):
        raise ValueError("student logits are -inf where the teacher's are finite; padding must be shared")


# ------------------------------------------------------------------------------------------ torch backend


def _value_sorted(p, valid):  # [N, V] -> the valid entries of p ascending, then +inf (serves both levels)
    return torch.where(valid, p, float("inf")).sort(-1).values


def _value_quantile(srt, valid, q):  # [N, V] sorted, [N, V], [N] -> [N]  (differentiable in q)
    n = valid.sum(-1)
    idx = q * (n - 1).to(q.dtype)
    lo = idx.detach().floor().long().clamp(min=0)
    lo = torch.minimum(lo, n - 1)
    hi = torch.minimum(lo + 1, n - 1)
    s_lo, s_hi = srt.gather(-1, lo[:, None])[:, 0], srt.gather(-1, hi[:, None])[:, 0]
    return s_lo + (idx - lo.to(q.dtype)) * (s_hi - s_lo)


def _mass_sorted(p, valid):  # [N, V] -> (p with 0 at padding, its values descending, their cumsum)
    pv = torch.where(valid, p, 0.0)
    d = pv.sort(-1, descending=True).values
    return pv, d, d.cumsum(-1)


def _mass_quantile(p, valid, q, sorted_):  # [N, V], [N, V], [N], _mass_sorted -> [N]  (differentiable in q)
    pv, d, C = sorted_
    j = (C <= q.detach()[:, None]).sum(-1)  # entries fully inside mass q; d[j] straddles it
    x = d.gather(-1, j.clamp(max=d.shape[-1] - 1)[:, None])[:, 0]
    x = torch.where(j < d.shape[-1], x, torch.zeros_like(q))  # beyond the total mass: x* = 0
    above = valid & (p > x[:, None])
    M = (pv * above).sum(-1)
    d_up = torch.where(above, pv, torch.full_like(pv, float("inf"))).min(-1).values
    d_up = torch.where(torch.isfinite(d_up), d_up, x)
    lin = (x > 0) & ((q.detach() - M) < x)
    frac = (q - M) / torch.where(x > 0, x, torch.ones_like(x))
    return torch.where(lin, d_up + frac * (x - d_up), x)


def dac_kl_torch(t, s, upper, lower, **cfg):  # [N, V], [N, V], [N], [N] -> ([N] loss, [N] kept, [N] class)
    """Vectorised PyTorch, autograd through student logits and both bounds (teacher treated as constant)."""
    cfg = _cfg(cfg)
    ct = torch.promote_types(s.dtype, torch.float32)
    t = t.detach().to(ct)
    s = s.to(ct)
    upper, lower = upper.to(ct), lower.to(ct)
    valid = torch.isfinite(t)
    lp, lq = t.log_softmax(-1), s.log_softmax(-1)
    p, q = lp.exp(), lq.exp()
    c = t.argmax(-1)  # first maximal index (torch documents this for ties)
    onehot = torch.zeros_like(t, dtype=torch.bool).scatter_(-1, c[:, None], True)
    if cfg["bounds"] == "value":  # one sort serves both levels
        srt = _value_sorted(p, valid)
        tau_lo, tau_hi = _value_quantile(srt, valid, lower), _value_quantile(srt, valid, upper)
    elif cfg["bounds"] == "mass":
        srt = _mass_sorted(p, valid)
        tau_lo, tau_hi = _mass_quantile(p, valid, upper, srt), _mass_quantile(p, valid, lower, srt)
    else:  # nontarget: the non-target entries' mass quantiles at the masses upper r, lower r
        pn, vn = torch.where(onehot, 0.0, p), valid & ~onehot
        r = pn.sum(-1).detach()
        srt = _mass_sorted(pn, vn)
        tau_lo, tau_hi = _mass_quantile(pn, vn, upper * r, srt), _mass_quantile(pn, vn, lower * r, srt)
    del srt  # [N, V]: not needed past the thresholds (the backward needs only the gathered values)
    if cfg["band"]:
        beta = 1.0 / (cfg["gamma"] * (tau_hi - tau_lo) + cfg["eps"])
        b_ = beta[:, None]
        m = torch.sigmoid(b_ * (p - tau_lo[:, None])) * torch.sigmoid(b_ * (tau_hi[:, None] - p))
    else:
        m = torch.ones_like(p) + 0.0 * (upper + lower)[:, None]  # keeps the graph (zero grads)
    m = torch.where(valid, m, 0.0)
    if cfg["target"]:
        mk = torch.where(onehot, 0.0, m)
        w = torch.where(onehot, 1.0, m)
    else:
        mk = w = m
    d = torch.where(p > 0, lp - lq, 0.0)
    A, B = (w * p).sum(-1), (w * q).sum(-1)
    cross = (w * p * d).sum(-1)
    kl = cross / A + B.log() - A.log() if cfg["normalize"] else cross - A + B
    kept = (mk * p).sum(-1)
    spanned = upper - lower if cfg["bounds"] == "nontarget" else kept  # what the floor holds up
    reg = cfg["lam_m"] * F.relu(cfg["rho_min"] - spanned) if cfg["floor"] else torch.zeros_like(kept)
    return kl + reg, kept.detach(), c


# ----------------------------------------------------------------------------------------- Triton kernels


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _sigmoid_pair(z):
    """(sigmoid(z), sigmoid(-z)) from one exp and one reciprocal: sigmoid(-z) = e^-z sigmoid(z). Where
    e^-z > 1e30, sigmoid(-z) rounds to 1 in fp32 (and e^-z may be inf, sigmoid(z) 0 or subnormal)."""
    e = tl.exp(-z)
    s = 1.0 / (1.0 + e)
    return s, tl.where(e > 1e30, 1.0, e * s)


@triton.jit
def _order_key(x):
    """int32 key whose signed order is the order of the fp32 values x: the bit pattern itself for
    x >= +0.0, the pattern with its 31 low bits inverted for x <= -0.0 (the usual float -> uint32 flip,
    minus its sign-bit toggle, so that int32 compares do). -0.0 sorts just below +0.0 (same p), -inf below
    every number."""
    b = x.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_value(k):
    """Inverse of ``_order_key`` (the map is its own inverse): the fp32 value of a key."""
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _radix_pick(h, r, bins):
    """Bucket of the entry of 0-based rank r in the 256-bin histogram h: (digit, rank inside the bucket,
    entries in the bucket)."""
    c = tl.cumsum(h, 0)
    d = tl.sum((c <= r).to(tl.int32), 0)
    return d, r - tl.sum(tl.where(bins < d, h, 0), 0), tl.sum(tl.where(bins == d, h, 0), 0)


@triton.jit
def dac_kl_fwd_kernel(
    T_ptr,  # [N, V] teacher logits (fp16/bf16/fp32), row stride stride_t
    S_ptr,  # [N, V] student logits, row stride stride_s
    U_ptr,  # [N] fp32 upper level
    L_ptr,  # [N] fp32 lower level
    LOSS_ptr,  # [N] fp32 out: per-token loss (KL + floor term)
    KEPT_ptr,  # [N] fp32 out: kept teacher mass sum_{v != c} m_v p_v
    C_ptr,  # [N] int32 out: target class (argmax of teacher logits, first index)
    STATS_ptr,  # [N, N_STATS] fp32 out: saved for the backward
    ERR_ptr,  # [N] int32 out (CHECK): 1 if no teacher logit is finite, + 2 if the student is -inf where it is
    V,
    stride_t,
    stride_s,
    gamma,
    eps,
    rho_min,
    lam_m,
    MASS: tl.constexpr,
    NONTARGET: tl.constexpr,  # MASS over the non-target entries (the host passes the masses upper r, lower r)
    TARGET: tl.constexpr,
    BAND: tl.constexpr,
    NORMALIZE: tl.constexpr,
    FLOOR: tl.constexpr,
    CHECK: tl.constexpr,
    N_STATS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t_row = T_ptr + row * stride_t
    s_row = S_ptr + row * stride_s
    offs = tl.arange(0, BLOCK_V)
    ninf = float("-inf")

    # pass 1: online log-sum-exp of both rows, teacher argmax (first index), valid count; with CHECK the input
    # checks, and for value quantiles the histogram of the top 8 bits of the teacher logits' order keys
    mt = tl.full((), ninf, tl.float32)
    zt = tl.full((), 0.0, tl.float32)
    ms = tl.full((), ninf, tl.float32)
    zs = tl.full((), 0.0, tl.float32)
    best = tl.full((), ninf, tl.float32)
    cidx = tl.full((), 0, tl.int32)
    nval = tl.full((), 0, tl.int32)
    nfin = tl.full((), 0, tl.int32)
    nbad = tl.full((), 0, tl.int32)
    hist = tl.zeros([256], dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        inb = idx < V
        x = tl.load(t_row + idx, mask=inb, other=ninf).to(tl.float32)
        y = tl.load(s_row + idx, mask=inb, other=ninf).to(tl.float32)
        ok = x > ninf
        nval += tl.sum(ok.to(tl.int32))
        if CHECK:  # as check_inputs: a finite teacher entry is valid, the student must not be -inf there
            fin = ok & (x < float("inf"))
            nfin += tl.sum(fin.to(tl.int32), 0)
            nbad += tl.sum((fin & (y == ninf)).to(tl.int32), 0)
        if BAND and not MASS:
            hist += tl.histogram(((_order_key(x) >> 24) & 255) ^ 128, 256, mask=ok)
        cmax = tl.max(x, 0)
        cfirst = tl.min(tl.where(x == cmax, idx, 2147483647), 0).to(tl.int32)
        cidx = tl.where(cmax > best, cfirst, cidx)  # strict: an earlier chunk wins a tie
        best = tl.maximum(best, cmax)
        mt_new = tl.maximum(mt, cmax)
        mt_safe = tl.where(mt_new == ninf, 0.0, mt_new)  # all -inf so far: avoid -inf - -inf
        zt = zt * tl.exp(mt - mt_safe) + tl.sum(tl.exp(x - mt_safe), 0)
        mt = mt_new
        ms_new = tl.maximum(ms, tl.max(y, 0))
        ms_safe = tl.where(ms_new == ninf, 0.0, ms_new)
        zs = zs * tl.exp(ms - ms_safe) + tl.sum(tl.exp(y - ms_safe), 0)
        ms = ms_new
    # keep max and log(z) apart: (x - max) - log z is exact-ish for |logits| ~ 1e4, x - (max + log z) is not
    lz_t = tl.log(zt)
    lz_s = tl.log(zs)
    if CHECK:
        tl.store(ERR_ptr + row, tl.where(nfin == 0, 1, 0) + tl.where(nbad > 0, 2, 0))

    u = tl.load(U_ptr + row).to(tl.float32)
    lw = tl.load(L_ptr + row).to(tl.float32)
    if MASS:
        lev_lo = u  # the tail beyond cumulative mass `upper` is cut
        lev_hi = lw  # the head inside cumulative mass `lower` is cut
    else:
        lev_lo = lw
        lev_hi = u
    nf = (nval - 1).to(tl.float32)
    pos_lo = lev_lo * nf
    pos_hi = lev_hi * nf
    k_lo = tl.floor(pos_lo).to(tl.int32)
    k_hi = tl.floor(pos_hi).to(tl.int32)

    tau_lo = tl.full((), 0.0, tl.float32)
    tau_hi = tl.full((), 0.0, tl.float32)
    dlo = tl.full((), 0.0, tl.float32)
    dhi = tl.full((), 0.0, tl.float32)
    if BAND and MASS:
        # bisection on the int32 bit pattern of p (monotone in the value for p >= 0), both thresholds in the
        # same passes: 31 passes (30 already shrink the 1065353217 patterns of [0, bits(1.0)] to one), each
        # recomputing exp, then one pass for the value, mass and next value around the result. The radix
        # select of the value quantiles does not carry over: the criterion here is the MASS above a
        # candidate (a sum of p, so one exp per entry and pass anyway), and tl.histogram only counts; a
        # mass-weighted 256-bin histogram would be 256 masked sums per chunk.
        a_lo = tl.full((), 0, tl.int32)
        a_hi = tl.full((), 1065353216, tl.int32)
        b_lo = tl.full((), 0, tl.int32)
        b_hi = tl.full((), 1065353216, tl.int32)
        for _ in range(31):
            a_mid = a_lo + ((a_hi - a_lo) >> 1)
            b_mid = b_lo + ((b_hi - b_lo) >> 1)
            a_acc = tl.full((), 0.0, tl.float32)
            b_acc = tl.full((), 0.0, tl.float32)
            for v0 in range(0, V, BLOCK_V):
                idx = v0 + offs
                x = tl.load(t_row + idx, mask=idx < V, other=ninf).to(tl.float32)
                ok = x > ninf
                if NONTARGET:
                    ok = ok & (idx != cidx)
                p = tl.where(ok, tl.exp((x - mt) - lz_t), 0.0)
                pb = p.to(tl.int32, bitcast=True)
                a_acc += tl.sum(tl.where(ok & (pb > a_mid), p, 0.0), 0)  # mass strictly above the candidate
                b_acc += tl.sum(tl.where(ok & (pb > b_mid), p, 0.0), 0)
            a_ok = a_acc <= lev_lo
            b_ok = b_acc <= lev_hi
            a_hi = tl.where(a_ok, a_mid, a_hi)
            a_lo = tl.where(a_ok, a_lo, a_mid + 1)
            b_hi = tl.where(b_ok, b_mid, b_hi)
            b_lo = tl.where(b_ok, b_lo, b_mid + 1)
        # the found value, the mass above it and the next larger value
        a_m = tl.full((), 0.0, tl.float32)
        b_m = tl.full((), 0.0, tl.float32)
        a_x = tl.full((), 0.0, tl.float32)
        b_x = tl.full((), 0.0, tl.float32)
        a_up = tl.full((), float("inf"), tl.float32)
        b_up = tl.full((), float("inf"), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs
            x = tl.load(t_row + idx, mask=idx < V, other=ninf).to(tl.float32)
            ok = x > ninf
            if NONTARGET:
                ok = ok & (idx != cidx)
            p = tl.where(ok, tl.exp((x - mt) - lz_t), 0.0)
            pb = p.to(tl.int32, bitcast=True)
            a_le = ok & (pb <= a_hi)
            b_le = ok & (pb <= b_hi)
            a_m += tl.sum(tl.where(ok & ~a_le, p, 0.0), 0)
            b_m += tl.sum(tl.where(ok & ~b_le, p, 0.0), 0)
            a_x = tl.maximum(a_x, tl.max(tl.where(a_le, p, 0.0), 0))
            b_x = tl.maximum(b_x, tl.max(tl.where(b_le, p, 0.0), 0))
            a_up = tl.minimum(a_up, tl.min(tl.where(ok & ~a_le, p, float("inf")), 0))
            b_up = tl.minimum(b_up, tl.min(tl.where(ok & ~b_le, p, float("inf")), 0))
        a_up = tl.where(a_up == float("inf"), a_x, a_up)
        b_up = tl.where(b_up == float("inf"), b_x, b_up)
        a_lin = (a_x > 0) & ((lev_lo - a_m) < a_x)
        a_fr = (lev_lo - a_m) / tl.where(a_x > 0, a_x, 1.0)
        tau_lo = tl.where(a_lin, a_up + a_fr * (a_x - a_up), a_x)
        dlo = tl.where(a_lin, (a_x - a_up) / tl.where(a_x > 0, a_x, 1.0), 0.0)
        b_lin = (b_x > 0) & ((lev_hi - b_m) < b_x)
        b_fr = (lev_hi - b_m) / tl.where(b_x > 0, b_x, 1.0)
        tau_hi = tl.where(b_lin, b_up + b_fr * (b_x - b_up), b_x)
        dhi = tl.where(b_lin, (b_x - b_up) / tl.where(b_x > 0, b_x, 1.0), 0.0)
    if BAND and not MASS:
        # value quantiles: p = exp((x - max) - log z) is non-decreasing in the logit x, so the k-th smallest p
        # is exp of the k-th smallest valid logit (and likewise the (k+1)-th). That one is found exactly by a
        # radix select on the order keys of the fp32 logits, 8 bits per pass, integer work only (no exp):
        # pass 1 histogrammed the top byte, each pass below histograms the next byte of the keys that share
        # the bytes chosen so far, for both thresholds (3 passes). Padding (-inf) never enters a histogram.
        bins = tl.arange(0, 256)
        a_d, a_r, a_n = _radix_pick(hist, k_lo, bins)
        b_d, b_r, b_n = _radix_pick(hist, k_hi, bins)
        a_key = (a_d ^ 128) << 24  # the key chosen so far (low bytes still 0)
        b_key = (b_d ^ 128) << 24
        a_h = hist
        b_h = hist
        a_up = tl.full((), float("inf"), tl.float32)  # smallest valid logit above the last pass's block
        b_up = tl.full((), float("inf"), tl.float32)
        for sh in tl.static_range(16, -1, -8):
            a_h = tl.zeros([256], dtype=tl.int32)
            b_h = tl.zeros([256], dtype=tl.int32)
            for v0 in range(0, V, BLOCK_V):
                idx = v0 + offs
                x = tl.load(t_row + idx, mask=idx < V, other=ninf).to(tl.float32)
                ok = x > ninf
                key = _order_key(x)
                dig = (key >> sh) & 255
                a_h += tl.histogram(dig, 256, mask=ok & (((key ^ a_key) >> (sh + 8)) == 0))
                b_h += tl.histogram(dig, 256, mask=ok & (((key ^ b_key) >> (sh + 8)) == 0))
                if sh == 0:
                    a_up = tl.minimum(a_up, tl.min(tl.where(ok & (key > (a_key | 255)), x, float("inf")), 0))
                    b_up = tl.minimum(b_up, tl.min(tl.where(ok & (key > (b_key | 255)), x, float("inf")), 0))
            a_d, a_r, a_n = _radix_pick(a_h, a_r, bins)
            b_d, b_r, b_n = _radix_pick(b_h, b_r, bins)
            a_key = a_key | (a_d << sh)
            b_key = b_key | (b_d << sh)
        # the next order statistic: the same logit if its key holds one more entry, else the next non-empty
        # bucket of the last pass, else the smallest logit above that pass's block (none: the maximum itself)
        a_x = _key_value(a_key)
        b_x = _key_value(b_key)
        a_nb = tl.min(tl.where((bins > a_d) & (a_h > 0), bins, 256), 0)
        b_nb = tl.min(tl.where((bins > b_d) & (b_h > 0), bins, 256), 0)
        a_nx = tl.where(a_nb < 256, _key_value(a_key - a_d + a_nb), tl.where(a_up < float("inf"), a_up, a_x))
        b_nx = tl.where(b_nb < 256, _key_value(b_key - b_d + b_nb), tl.where(b_up < float("inf"), b_up, b_x))
        a_nx = tl.where(a_r + 1 < a_n, a_x, a_nx)
        b_nx = tl.where(b_r + 1 < b_n, b_x, b_nx)
        # their probabilities, exactly as the sums pass computes p, and the oracle's interpolation
        a_p = tl.exp((a_x - mt) - lz_t)
        b_p = tl.exp((b_x - mt) - lz_t)
        a_pn = tl.exp((a_nx - mt) - lz_t)
        b_pn = tl.exp((b_nx - mt) - lz_t)
        tau_lo = a_p + (pos_lo - k_lo.to(tl.float32)) * (a_pn - a_p)
        tau_hi = b_p + (pos_hi - k_hi.to(tl.float32)) * (b_pn - b_p)
        dlo = nf * (a_pn - a_p)
        dhi = nf * (b_pn - b_p)

    # mask, weights and the sums of the loss
    beta = 1.0 / (gamma * (tau_hi - tau_lo) + eps)
    A = tl.full((), 0.0, tl.float32)
    B = tl.full((), 0.0, tl.float32)
    cross = tl.full((), 0.0, tl.float32)
    kept = tl.full((), 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        inb = idx < V
        x = tl.load(t_row + idx, mask=inb, other=ninf).to(tl.float32)
        y = tl.load(s_row + idx, mask=inb, other=ninf).to(tl.float32)
        ok = x > ninf
        p = tl.where(ok, tl.exp((x - mt) - lz_t), 0.0)
        q = tl.where(y > ninf, tl.exp((y - ms) - lz_s), 0.0)
        if BAND:
            m = _sigmoid(beta * (p - tau_lo)) * _sigmoid(beta * (tau_hi - p))
        else:
            m = tl.full((BLOCK_V,), 1.0, tl.float32)
        m = tl.where(ok, m, 0.0)
        if TARGET:
            is_c = idx == cidx
            mk = tl.where(is_c, 0.0, m)
            w = tl.where(is_c, 1.0, m)
        else:
            mk = m
            w = m
        d = tl.where(p > 0, ((x - mt) - lz_t) - ((y - ms) - lz_s), 0.0)
        A += tl.sum(w * p, 0)
        B += tl.sum(w * q, 0)
        cross += tl.sum(w * p * d, 0)
        kept += tl.sum(mk * p, 0)
    if NORMALIZE:
        kl = cross / A + tl.log(B) - tl.log(A)
    else:
        kl = cross - A + B
    active = tl.full((), 0.0, tl.float32)
    if FLOOR:
        active = tl.where(rho_min - kept > 0, 1.0, 0.0)
    loss = kl + active * lam_m * (rho_min - kept)
    tl.store(LOSS_ptr + row, loss)
    tl.store(KEPT_ptr + row, kept)
    tl.store(C_ptr + row, cidx)
    st = STATS_ptr + row * N_STATS
    tl.store(st + 0, mt)
    tl.store(st + 1, lz_t)
    tl.store(st + 10, ms)
    tl.store(st + 11, lz_s)
    tl.store(st + 2, tau_lo)
    tl.store(st + 3, tau_hi)
    tl.store(st + 4, dlo)
    tl.store(st + 5, dhi)
    tl.store(st + 6, A)
    tl.store(st + 7, B)
    tl.store(st + 8, cross)
    tl.store(st + 9, active)


@triton.jit
def dac_kl_bwd_kernel(
    T_ptr,  # [N, V] teacher logits, row stride stride_t
    S_ptr,  # [N, V] student logits, row stride stride_s
    C_ptr,  # [N] int32 target class from the forward
    STATS_ptr,  # [N, N_STATS] fp32 statistics from the forward
    G_ptr,  # [N] fp32 cotangent of the per-token loss
    DS_ptr,  # [N, V] out: dL/d student logits (dtype of S), row stride stride_ds
    DLO_ptr,  # [N] fp32 out: dL / d(level feeding tau_lo)
    DHI_ptr,  # [N] fp32 out: dL / d(level feeding tau_hi)
    V,
    stride_t,
    stride_s,
    stride_ds,
    gamma,
    eps,
    lam_m,
    TARGET: tl.constexpr,
    BAND: tl.constexpr,
    NORMALIZE: tl.constexpr,
    N_STATS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t_row = T_ptr + row * stride_t
    s_row = S_ptr + row * stride_s
    ds_row = DS_ptr + row * stride_ds
    offs = tl.arange(0, BLOCK_V)
    ninf = float("-inf")
    st = STATS_ptr + row * N_STATS
    mt = tl.load(st + 0)
    lz_t = tl.load(st + 1)
    ms = tl.load(st + 10)
    lz_s = tl.load(st + 11)
    tau_lo = tl.load(st + 2)
    tau_hi = tl.load(st + 3)
    dlo = tl.load(st + 4)
    dhi = tl.load(st + 5)
    A = tl.load(st + 6)
    B = tl.load(st + 7)
    cross = tl.load(st + 8)
    active = tl.load(st + 9)
    cidx = tl.load(C_ptr + row)
    g = tl.load(G_ptr + row)
    beta = 1.0 / (gamma * (tau_hi - tau_lo) + eps)
    # row constants: the per-element divisions p/A, q/B and cross/A become multiplications (a division is
    # a reciprocal, two range checks and a multiply per element on the GPU)
    inv_a = 1.0 / A
    inv_b = 1.0 / B
    cross_a = cross * inv_a
    b2 = gamma * beta * beta
    acc_lo = tl.zeros([BLOCK_V], dtype=tl.float32)  # per-lane partial sums, reduced once after the loop
    acc_hi = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        inb = idx < V
        x = tl.load(t_row + idx, mask=inb, other=ninf).to(tl.float32)
        y = tl.load(s_row + idx, mask=inb, other=ninf).to(tl.float32)
        ok = x > ninf
        p = tl.where(ok, tl.exp((x - mt) - lz_t), 0.0)
        q = tl.where(y > ninf, tl.exp((y - ms) - lz_s), 0.0)
        if BAND:
            z1 = beta * (p - tau_lo)
            z2 = beta * (tau_hi - p)
            s1, r1 = _sigmoid_pair(z1)
            s2, r2 = _sigmoid_pair(z2)
            m = s1 * s2
        else:
            m = tl.full((BLOCK_V,), 1.0, tl.float32)
        m = tl.where(ok, m, 0.0)
        if TARGET:
            is_c = idx == cidx
            w = tl.where(is_c, 1.0, m)
        else:
            w = m
        if NORMALIZE:
            pa = p * inv_a
            qb = q * inv_b
            dsv = w * (qb - pa)
        else:
            dsv = w * (q - p) + (A - B) * q
        tl.store(ds_row + idx, (g * dsv).to(DS_ptr.dtype.element_ty), mask=inb)
        if BAND:
            d = tl.where(p > 0, ((x - mt) - lz_t) - ((y - ms) - lz_s), 0.0)
            if NORMALIZE:
                G = pa * (d - cross_a) + qb - pa
            else:
                G = p * d - p + q
            G = G - active * lam_m * p
            if TARGET:
                G = tl.where(is_c, 0.0, G)
            G = tl.where(ok, G, 0.0)
            dm_lo = m * (r1 * (-beta + b2 * (p - tau_lo)) + r2 * b2 * (tau_hi - p))
            dm_hi = m * (-r1 * b2 * (p - tau_lo) + r2 * (beta - b2 * (tau_hi - p)))
            acc_lo += G * dm_lo
            acc_hi += G * dm_hi
    tl.store(DLO_ptr + row, g * tl.sum(acc_lo, 0) * dlo)
    tl.store(DHI_ptr + row, g * tl.sum(acc_hi, 0) * dhi)


def _block_v(V: int) -> int:
    cap = 1024 if is_interpreting() else 4096
    return max(16, min(cap, triton.next_power_of_2(V)))


class _DACKLTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, s, upper, lower, cfg_items, check):
        cfg = dict(cfg_items)
        t, s = t.contiguous(), s.contiguous()
        N, V = t.shape
        dev = t.device
        u32, l32 = upper.detach().float().contiguous(), lower.detach().float().contiguous()
        loss = empty((N,), dtype=torch.float32, device=dev)
        kept = empty((N,), dtype=torch.float32, device=dev)
        cls = empty((N,), dtype=torch.int32, device=dev)
        stats = empty((N, N_STATS), dtype=torch.float32, device=dev)
        err = empty((N,), dtype=torch.int32, device=dev)
        # at least one entry per thread (4 warps below 2048): the histograms then see no replicated layout
        BLOCK_V = max(_block_v(V), 128)
        if N > 0:
            dac_kl_fwd_kernel[(N,)](
                t,
                s,
                u32,
                l32,
                loss,
                kept,
                cls,
                stats,
                err,
                V,
                t.stride(0),
                s.stride(0),
                float(cfg["gamma"]),
                float(cfg["eps"]),
                float(cfg["rho_min"]),
                float(cfg["lam_m"]),
                MASS=cfg["bounds"] in ("mass", "nontarget"),
                NONTARGET=cfg["bounds"] == "nontarget",
                TARGET=bool(cfg["target"]),
                BAND=bool(cfg["band"]),
                NORMALIZE=bool(cfg["normalize"]),
                FLOOR=bool(cfg["floor"]) and cfg["bounds"] != "nontarget",
                CHECK=bool(check),
                N_STATS=N_STATS,
                BLOCK_V=BLOCK_V,
                num_warps=8 if BLOCK_V >= 2048 else 4,
            )
            if check:  # the logits' value checks, made by the first pass instead of two host reads of t, s
                _raise_on_bad_rows((err & 1).any(), (err & 2).any())
        ctx.save_for_backward(t, s, cls, stats)
        ctx.cfg = cfg
        ctx.dtypes = (upper.dtype, lower.dtype)
        ctx.mark_non_differentiable(kept, cls)
        return loss, kept, cls

    @staticmethod
    def backward(ctx, g_loss, g_kept, g_cls):
        t, s, cls, stats = ctx.saved_tensors
        cfg = ctx.cfg
        N, V = t.shape
        g = g_loss.float().contiguous()
        ds = empty((N, V), dtype=s.dtype, device=s.device)
        d_lo = empty((N,), dtype=torch.float32, device=s.device)
        d_hi = empty((N,), dtype=torch.float32, device=s.device)
        BLOCK_V = _block_v(V)
        if N > 0:
            dac_kl_bwd_kernel[(N,)](
                t,
                s,
                cls,
                stats,
                g,
                ds,
                d_lo,
                d_hi,
                V,
                t.stride(0),
                s.stride(0),
                ds.stride(0),
                float(cfg["gamma"]),
                float(cfg["eps"]),
                float(cfg["lam_m"]),
                TARGET=bool(cfg["target"]),
                BAND=bool(cfg["band"]),
                NORMALIZE=bool(cfg["normalize"]),
                N_STATS=N_STATS,
                BLOCK_V=BLOCK_V,
                num_warps=8 if BLOCK_V >= 2048 else 4,
            )
        if cfg["bounds"] in ("mass", "nontarget"):
            d_up, d_low = d_lo, d_hi
        else:
            d_up, d_low = d_hi, d_lo
        return None, ds, d_up.to(ctx.dtypes[0]), d_low.to(ctx.dtypes[1]), None, None


def dac_kl(t, s, upper, lower, *, backend: str = "auto", validate: bool = True, **cfg):
    """Per-token DAC-KL. ``t, s``: teacher / student logits ``[N, V]`` (teacher is treated as constant);
    ``upper, lower``: levels ``[N]`` with ``0 <= lower < upper <= 1``. Options as in ``reference.dac_kl``
    (``bounds``, ``gamma``, ``eps``, ``target``, ``band``, ``normalize``, ``floor``, ``rho_min``, ``lam_m``).

    Returns ``(loss [N] fp32 (fp64 for fp64 input on the torch backend), kept [N], target_class [N])``;
    differentiable w.r.t. ``s``, ``upper`` and ``lower``."""
    cfg = _cfg(cfg)
    check_values = _check_levels(t, s, upper, lower, validate)
    be = resolve_backend(backend, s)
    if be == "torch":
        if check_values:
            _check_logits(t, s)
        return dac_kl_torch(t, s, upper, lower, **cfg)
    cfg_items = tuple(sorted(cfg.items()))
    if cfg["bounds"] != "nontarget":
        loss, kept, cls = _DACKLTriton.apply(t.detach(), s, upper, lower, cfg_items, check_values)
        return loss, kept, cls.long()
    # nontarget: the kernel takes the masses upper r, lower r (r = 1 - p_c; autograd multiplies the level
    # gradients by r) and leaves the target out of its mass bisection; the floor on upper - lower is here
    r = nontarget_mass(t).to(upper.dtype)
    loss, kept, cls = _DACKLTriton.apply(t.detach(), s, upper * r, lower * r, cfg_items, check_values)
    if cfg["floor"]:
        loss = loss + cfg["lam_m"] * torch.relu(cfg["rho_min"] - (upper - lower)).to(loss.dtype)
    return loss, kept, cls.long()


def nontarget_mass(t):  # [N, V] -> [N], no gradient
    """``r = 1 - p_c`` of the teacher logits: the mass of every entry but the largest, summed in log space
    (no cancellation when p_c is close to 1)."""
    with torch.no_grad():
        lp = t.float().log_softmax(-1) if t.dtype != torch.float64 else t.log_softmax(-1)
        if lp.shape[-1] < 2:
            return torch.zeros(lp.shape[:-1], dtype=lp.dtype, device=lp.device)
        c = lp.argmax(-1, keepdim=True)
        rest = lp.scatter(-1, c, float("-inf"))
        return rest.logsumexp(-1).exp()


# ------------------------------------------------------------------------------------ the module with f_sub


def teacher_features(t, k: int):  # [N, V] -> [N, k+1]
    """Sorted top-k teacher probabilities (zero-padded when V < k) and the entropy; no gradient."""
    with torch.no_grad():
        lp = t.float().log_softmax(-1)
        p = lp.exp()
        top = p.topk(min(k, p.shape[-1]), dim=-1).values
        top = F.pad(top, (0, k - top.shape[-1]))
        ent = -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1, keepdim=True)
        return torch.cat([top, ent], -1)


class DACKL(nn.Module):
    """DAC-KL with its bounds sub-network ``f_sub`` (Eq. 6, [RECON] architecture: top-k sorted teacher
    probabilities + entropy -> Linear(k+1, h) -> GELU(tanh) -> Linear(h, h) -> GELU -> Linear(h, 2)).
    ``upper = u_min + (1 - u_min) sigmoid(a)``, ``lower = upper * sigmoid(b)``.

    ``fixed_bounds=(u, l)``: the "fixed clipping" ablation (no sub-network, constant levels).
    ``forward(t, s, mask=None)`` returns ``(mean loss over mask, info)`` with ``info`` holding per-token
    ``upper``, ``lower``, ``kept`` (the teacher's non-target mass the band keeps), ``share`` (kept / the
    non-target mass) and ``loss`` (detached) for logging."""

    def __init__(
        self,
        k: int = 64,
        hidden: int = 256,
        u_min: float = 0.5,
        fixed_bounds=None,
        backend: str = "auto",
        generator: torch.Generator | None = None,
        **cfg,
    ):
        super().__init__()
        self.cfg = _cfg(cfg)
        self.k, self.u_min, self.backend = k, u_min, backend
        self.fixed_bounds = fixed_bounds
        if fixed_bounds is not None:
            u, l = fixed_bounds
            if not (0 <= l < u <= 1):
                raise ValueError(
                    f"fixed_bounds must satisfy 0 <= lower < upper <= 1, got upper={u}, lower={l}"
                )
            self.mlp = None
            return
        self.mlp = nn.Sequential(
            nn.Linear(k + 1, hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, hidden),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, 2),
        )
        if generator is not None:  # explicit, reproducible init: nn.Linear's default U(+-1/sqrt(fan_in))
            with torch.no_grad():
                for lin in (self.mlp[0], self.mlp[2], self.mlp[4]):
                    b = 1.0 / math.sqrt(lin.in_features)
                    lin.weight.uniform_(-b, b, generator=generator)
                    lin.bias.uniform_(-b, b, generator=generator)
        with torch.no_grad():
            self.mlp[4].bias.zero_()

    def bounds(self, t):  # [N, V] -> ([N], [N])
        N = t.shape[0]
        if self.mlp is None:
            u, l = self.fixed_bounds
            dt = torch.promote_types(t.dtype, torch.float32)  # fp64 teachers get fp64 levels
            return (
                torch.full((N,), float(u), device=t.device, dtype=dt),
                torch.full((N,), float(l), device=t.device, dtype=dt),
            )
        x = teacher_features(t, self.k).to(self.mlp[0].weight.dtype)
        a, b = self.mlp(x).unbind(-1)
        upper = self.u_min + (1.0 - self.u_min) * torch.sigmoid(a)
        return upper, upper * torch.sigmoid(b)

    def forward(self, t, s, mask=None):
        if t.dim() == 3:
            t, s = t.reshape(-1, t.shape[-1]), s.reshape(-1, s.shape[-1])
            mask = None if mask is None else mask.reshape(-1)
        if mask is not None:
            keep = mask.bool()
            t, s = t[keep], s[keep]
        upper, lower = self.bounds(t)
        loss, kept, _ = dac_kl(t, s, upper, lower, backend=self.backend, validate=False, **self.cfg)
        total = loss.mean() if loss.numel() else loss.sum()
        r = nontarget_mass(t).to(kept.dtype)
        share = torch.where(r > 0, kept.detach() / r.clamp_min(torch.finfo(r.dtype).tiny), torch.ones_like(r))
        info = dict(
            upper=upper.detach(), lower=lower.detach(), kept=kept.detach(), share=share, loss=loss.detach()
        )
        return total, info
