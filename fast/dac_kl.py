"""DAC-KL (distribution-adaptive clipping KL): torch backend, Triton fwd/bwd kernels, and the ``DACKL`` module
that owns the bounds sub-network. Oracle: ``reference/dac_kl.py`` (read its docstring for the math and every
convention; this file implements exactly the same function).

Why the Triton kernel does not sort: a quantile needs one or two order statistics, not the whole order.
For non-negative fp32 numbers the bit pattern (as int32) orders like the value, so the k-th smallest
probability is the smallest bit pattern ``b`` with ``count(p <= b) >= k+1``: 31 steps of bisection on the
integer range ``[0, bits(1.0)]`` find it *exactly*, each step one streaming pass over V (the count, or the
mass above ``b`` for ``bounds="mass"``, is monotone in ``b``). Both thresholds are bisected in the same
passes. A last pass finds the neighbouring order statistic (the smallest value above), then one pass
computes mask, weights, ``A = sum w p``, ``B = sum w q`` and the cross term. The backward kernel is a single
streaming pass: ``dL/ds = w (q/B - p/A)`` plus the two sums that give ``dL/dtau``.

Cost per row: about 34 passes over V in the forward (bisection), 1 in the backward; memory: O(N) saved
statistics, no [N, V] intermediate (the torch backend keeps several).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from fast.utils import check_float, empty, is_interpreting, resolve_backend

BOUNDS = ("value", "mass")
DEFAULTS = dict(bounds="value", gamma=0.05, eps=1e-8, target=True, band=True, normalize=True,
                floor=True, rho_min=0.5, lam_m=1.0)
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
    check_float("t_logits", t)
    check_float("s_logits", s)
    check_float("upper", upper)
    check_float("lower", lower)
    if t.dim() != 2 or t.shape != s.shape:
        raise ValueError(f"teacher/student logits must both be [N, V], got {tuple(t.shape)} "
                         f"and {tuple(s.shape)}")
    N = t.shape[0]
    if upper.shape != (N,) or lower.shape != (N,):
        raise ValueError(f"upper/lower must be [N]={N}, got {tuple(upper.shape)} and {tuple(lower.shape)}")
    if not validate or N == 0:
        return
    u, l = upper.detach(), lower.detach()
    if not (torch.isfinite(u).all() and torch.isfinite(l).all() and (u <= 1).all() and (l >= 0).all()):
        raise ValueError(f"bounds must lie in [0, 1]; got upper in [{u.min().item()}, {u.max().item()}], "
                         f"lower in [{l.min().item()}, {l.max().item()}]")
    bad = l >= u
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"need lower < upper for every token; row {i} has lower={l[i].item()} "
                         f">= upper={u[i].item()}")
    # screen: a row whose teacher and student sums are finite holds no -inf/NaN/inf and passes both checks
    # below; only the other rows (padded vocabulary, or bad values) are examined entry by entry
    t, s = t.detach(), s.detach()
    acc = torch.promote_types(torch.promote_types(t.dtype, s.dtype), torch.float32)
    flagged = ~torch.isfinite(t.sum(-1, dtype=acc) + s.sum(-1, dtype=acc))
    if not bool(flagged.any()):
        return
    t, s = t[flagged], s[flagged]
    valid = torch.isfinite(t)
    if (valid.sum(-1) == 0).any():
        raise ValueError("a teacher row is entirely -inf (no valid vocabulary entry)")
    if (valid & torch.isneginf(s)).any():
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
    else:
        srt = _mass_sorted(p, valid)
        tau_lo, tau_hi = _mass_quantile(p, valid, upper, srt), _mass_quantile(p, valid, lower, srt)
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
    reg = cfg["lam_m"] * F.relu(cfg["rho_min"] - kept) if cfg["floor"] else torch.zeros_like(kept)
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
def dac_kl_fwd_kernel(
    T_ptr,  # [N, V] teacher logits (fp16/bf16/fp32), row stride stride_t
    S_ptr,  # [N, V] student logits, row stride stride_s
    U_ptr,  # [N] fp32 upper level
    L_ptr,  # [N] fp32 lower level
    LOSS_ptr,  # [N] fp32 out: per-token loss (KL + floor term)
    KEPT_ptr,  # [N] fp32 out: kept teacher mass sum_{v != c} m_v p_v
    C_ptr,  # [N] int32 out: target class (argmax of teacher logits, first index)
    STATS_ptr,  # [N, N_STATS] fp32 out: saved for the backward
    V, stride_t, stride_s, gamma, eps, rho_min, lam_m,
    MASS: tl.constexpr, TARGET: tl.constexpr, BAND: tl.constexpr, NORMALIZE: tl.constexpr,
    FLOOR: tl.constexpr, N_STATS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t_row = T_ptr + row * stride_t
    s_row = S_ptr + row * stride_s
    offs = tl.arange(0, BLOCK_V)
    ninf = float("-inf")

    # pass 1: online log-sum-exp of both rows, teacher argmax (first index), valid count
    mt = tl.full((), ninf, tl.float32)
    zt = tl.full((), 0.0, tl.float32)
    ms = tl.full((), ninf, tl.float32)
    zs = tl.full((), 0.0, tl.float32)
    best = tl.full((), ninf, tl.float32)
    cidx = tl.full((), 0, tl.int32)
    nval = tl.full((), 0, tl.int32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        inb = idx < V
        x = tl.load(t_row + idx, mask=inb, other=ninf).to(tl.float32)
        y = tl.load(s_row + idx, mask=inb, other=ninf).to(tl.float32)
        nval += tl.sum((x > ninf).to(tl.int32))
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
    if BAND:
        # bisection on the int32 bit pattern of p (monotone in the value for p >= 0), both thresholds at once
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
                p = tl.where(ok, tl.exp((x - mt) - lz_t), 0.0)
                pb = p.to(tl.int32, bitcast=True)
                if MASS:  # mass strictly above the candidate
                    a_acc += tl.sum(tl.where(ok & (pb > a_mid), p, 0.0), 0)
                    b_acc += tl.sum(tl.where(ok & (pb > b_mid), p, 0.0), 0)
                else:  # count at or below the candidate
                    a_acc += tl.sum((ok & (pb <= a_mid)).to(tl.float32), 0)
                    b_acc += tl.sum((ok & (pb <= b_mid)).to(tl.float32), 0)
            if MASS:
                a_ok = a_acc <= lev_lo
                b_ok = b_acc <= lev_hi
            else:
                a_ok = a_acc >= (k_lo + 1).to(tl.float32)
                b_ok = b_acc >= (k_hi + 1).to(tl.float32)
            a_hi = tl.where(a_ok, a_mid, a_hi)
            a_lo = tl.where(a_ok, a_lo, a_mid + 1)
            b_hi = tl.where(b_ok, b_mid, b_hi)
            b_lo = tl.where(b_ok, b_lo, b_mid + 1)
        # the found value, the mass/count around it and the next larger value
        a_cnt = tl.full((), 0.0, tl.float32)
        b_cnt = tl.full((), 0.0, tl.float32)
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
            p = tl.where(ok, tl.exp((x - mt) - lz_t), 0.0)
            pb = p.to(tl.int32, bitcast=True)
            a_le = ok & (pb <= a_hi)
            b_le = ok & (pb <= b_hi)
            a_cnt += tl.sum(a_le.to(tl.float32), 0)
            b_cnt += tl.sum(b_le.to(tl.float32), 0)
            a_m += tl.sum(tl.where(ok & ~a_le, p, 0.0), 0)
            b_m += tl.sum(tl.where(ok & ~b_le, p, 0.0), 0)
            a_x = tl.maximum(a_x, tl.max(tl.where(a_le, p, 0.0), 0))
            b_x = tl.maximum(b_x, tl.max(tl.where(b_le, p, 0.0), 0))
            a_up = tl.minimum(a_up, tl.min(tl.where(ok & ~a_le, p, float("inf")), 0))
            b_up = tl.minimum(b_up, tl.min(tl.where(ok & ~b_le, p, float("inf")), 0))
        a_up = tl.where(a_up == float("inf"), a_x, a_up)
        b_up = tl.where(b_up == float("inf"), b_x, b_up)
        if MASS:
            a_lin = (a_x > 0) & ((lev_lo - a_m) < a_x)
            a_fr = (lev_lo - a_m) / tl.where(a_x > 0, a_x, 1.0)
            tau_lo = tl.where(a_lin, a_up + a_fr * (a_x - a_up), a_x)
            dlo = tl.where(a_lin, (a_x - a_up) / tl.where(a_x > 0, a_x, 1.0), 0.0)
            b_lin = (b_x > 0) & ((lev_hi - b_m) < b_x)
            b_fr = (lev_hi - b_m) / tl.where(b_x > 0, b_x, 1.0)
            tau_hi = tl.where(b_lin, b_up + b_fr * (b_x - b_up), b_x)
            dhi = tl.where(b_lin, (b_x - b_up) / tl.where(b_x > 0, b_x, 1.0), 0.0)
        else:
            # next order statistic: a duplicate of x if enough entries are <= x, else the next larger value
            a_nx = tl.where(a_cnt >= (k_lo + 2).to(tl.float32), a_x, a_up)
            b_nx = tl.where(b_cnt >= (k_hi + 2).to(tl.float32), b_x, b_up)
            tau_lo = a_x + (pos_lo - k_lo.to(tl.float32)) * (a_nx - a_x)
            tau_hi = b_x + (pos_hi - k_hi.to(tl.float32)) * (b_nx - b_x)
            dlo = nf * (a_nx - a_x)
            dhi = nf * (b_nx - b_x)

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
    V, stride_t, stride_s, stride_ds, gamma, eps, lam_m,
    TARGET: tl.constexpr, BAND: tl.constexpr, NORMALIZE: tl.constexpr,
    N_STATS: tl.constexpr, BLOCK_V: tl.constexpr,
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
    def forward(ctx, t, s, upper, lower, cfg_items):
        cfg = dict(cfg_items)
        t, s = t.contiguous(), s.contiguous()
        N, V = t.shape
        dev = t.device
        u32, l32 = upper.detach().float().contiguous(), lower.detach().float().contiguous()
        loss = empty((N,), dtype=torch.float32, device=dev)
        kept = empty((N,), dtype=torch.float32, device=dev)
        cls = empty((N,), dtype=torch.int32, device=dev)
        stats = empty((N, N_STATS), dtype=torch.float32, device=dev)
        BLOCK_V = _block_v(V)
        if N > 0:
            dac_kl_fwd_kernel[(N,)](
                t, s, u32, l32, loss, kept, cls, stats, V, t.stride(0), s.stride(0),
                float(cfg["gamma"]), float(cfg["eps"]), float(cfg["rho_min"]), float(cfg["lam_m"]),
                MASS=cfg["bounds"] == "mass", TARGET=bool(cfg["target"]), BAND=bool(cfg["band"]),
                NORMALIZE=bool(cfg["normalize"]), FLOOR=bool(cfg["floor"]), N_STATS=N_STATS,
                BLOCK_V=BLOCK_V, num_warps=8 if BLOCK_V >= 2048 else 4,
            )
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
                t, s, cls, stats, g, ds, d_lo, d_hi, V, t.stride(0), s.stride(0), ds.stride(0),
                float(cfg["gamma"]), float(cfg["eps"]), float(cfg["lam_m"]),
                TARGET=bool(cfg["target"]), BAND=bool(cfg["band"]), NORMALIZE=bool(cfg["normalize"]),
                N_STATS=N_STATS, BLOCK_V=BLOCK_V, num_warps=8 if BLOCK_V >= 2048 else 4,
            )
        if cfg["bounds"] == "mass":
            d_up, d_low = d_lo, d_hi
        else:
            d_up, d_low = d_hi, d_lo
        return None, ds, d_up.to(ctx.dtypes[0]), d_low.to(ctx.dtypes[1]), None


def dac_kl(t, s, upper, lower, *, backend: str = "auto", validate: bool = True, **cfg):
    """Per-token DAC-KL. ``t, s``: teacher / student logits ``[N, V]`` (teacher is treated as constant);
    ``upper, lower``: levels ``[N]`` with ``0 <= lower < upper <= 1``. Options as in ``reference.dac_kl``
    (``bounds``, ``gamma``, ``eps``, ``target``, ``band``, ``normalize``, ``floor``, ``rho_min``, ``lam_m``).

    Returns ``(loss [N] fp32 (fp64 for fp64 input on the torch backend), kept [N], target_class [N])``;
    differentiable w.r.t. ``s``, ``upper`` and ``lower``."""
    cfg = _cfg(cfg)
    check_inputs(t, s, upper, lower, validate)
    be = resolve_backend(backend, s)
    if be == "torch":
        return dac_kl_torch(t, s, upper, lower, **cfg)
    loss, kept, cls = _DACKLTriton.apply(t.detach(), s, upper, lower, tuple(sorted(cfg.items())))
    return loss, kept, cls.long()


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
    ``upper``, ``lower``, ``kept`` and ``kl`` (detached) for logging."""

    def __init__(self, k: int = 64, hidden: int = 256, u_min: float = 0.5, fixed_bounds=None,
                 backend: str = "auto", generator: torch.Generator | None = None, **cfg):
        super().__init__()
        self.cfg = _cfg(cfg)
        self.k, self.u_min, self.backend = k, u_min, backend
        self.fixed_bounds = fixed_bounds
        if fixed_bounds is not None:
            u, l = fixed_bounds
            if not (0 <= l < u <= 1):
                raise ValueError(f"fixed_bounds must satisfy 0 <= lower < upper <= 1, "
                                 f"got upper={u}, lower={l}")
            self.mlp = None
            return
        self.mlp = nn.Sequential(nn.Linear(k + 1, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, 2))
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
            return (torch.full((N,), float(u), device=t.device), torch.full((N,), float(l), device=t.device))
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
        info = dict(upper=upper.detach(), lower=lower.detach(), kept=kept.detach(), loss=loss.detach())
        return total, info
