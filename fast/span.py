"""Span-level correlation consistency loss: torch backend and Triton fwd/bwd kernels.
Oracle: ``reference/span.py`` (the math, the span extractor and every convention are documented there).

Batched API: logits ``[B, T, V]`` (or ``[T, V]``), spans as a padded integer tensor ``[B, S, 2]`` of half-open
``(start, end)`` token ranges, padding rows ``(-1, -1)`` (see :func:`spans_to_tensor`). The loss is the mean
over every adjacent in-span pair of the batch of ``||p^t_k p^t_{k+1} - p^s_k p^s_{k+1}||_2`` (or its square);
a batch without pairs gives exactly 0 (and a zero gradient), not NaN.

Why the Triton path never builds the ``[pairs, V]`` products: the forward needs one number per pair,
``D_k^2 = sum_v (p_k p_{k+1} - q_k q_{k+1})_v^2``, which streams over V. Three kernels, each row's
log-sum-exp computed once:

* statistics, one program per row that belongs to a pair: one pass over the teacher and student row gives
  ``(max, log2 z)`` of both, saved ``[B*T, 4]`` (max and log z apart: ``(x - max) log2 e - log2 z`` stays
  accurate for ``|x| ~ 1e4``, ``x - lse`` does not; base 2 because ``exp2`` is one GPU instruction);
* forward, one program per pair: one pass over the four rows gives ``D_k^2`` and ``A_k = <e_k, q_k q_{k+1}>``
  (``e_k = q_k q_{k+1} - p_k p_{k+1}``);
* backward, one program per *position*: position k receives
  ``gq_k = c_{k-1} e_{k-1} q_{k-1} + c_k e_k q_{k+1}`` from its left and right pairs (``c`` the per-pair
  coefficient, ``e`` recomputed on the fly); the softmax backward ``ds_k = q_k (gq_k - <gq_k, q_k>)``
  takes its dot product from the forward, ``<gq_k, q_k> = c_{k-1} A_{k-1} + c_k A_k``, so one pass
  writes the gradient.

Passes over V per row in a span's interior (two pairs): 1 (statistics) + 2 (forward, one per pair) + 3
(backward: its own position and both neighbours read it), for the teacher and the student row alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fast.utils import LOG2E, check_float, empty, is_interpreting, resolve_backend

PAD = -1


def spans_to_tensor(spans, device=None) -> torch.Tensor:
    """A list (batch) of lists of ``(start, end)`` -> int64 ``[B, S_max, 2]`` padded with ``(-1, -1)``."""
    S = max((len(x) for x in spans), default=0)
    out = torch.full((len(spans), S, 2), PAD, dtype=torch.int64)
    for b, row in enumerate(spans):
        if len(row):
            out[b, : len(row)] = torch.as_tensor(row, dtype=torch.int64).reshape(-1, 2)
    return out.to(device) if device is not None else out


def check_spans(spans: torch.Tensor, B: int, T: int, validate: bool = True) -> None:
    if not isinstance(spans, torch.Tensor):
        raise ValueError(f"spans must be an integer torch.Tensor [B, S, 2], got {type(spans).__name__}")
    if spans.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"spans must be an int32/int64 tensor, got dtype {spans.dtype}")
    if spans.dim() != 3 or spans.shape[0] != B or spans.shape[2] != 2:
        raise ValueError(f"spans must be [B={B}, S, 2], got {tuple(spans.shape)}")
    if not validate or spans.numel() == 0:
        return
    a, e = spans[..., 0].long(), spans[..., 1].long()
    pad = (a == PAD) & (e == PAD)
    bad = ~pad & ((a < 0) | (e > T) | (e - a < 2))
    if bad.any():
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"span {tuple(spans[b, j].tolist())} (batch {b}) out of range or shorter than "
            "2 tokens "
            f"for T={T} (need 0 <= start, start + 2 <= end <= T)"
        )
    big = torch.iinfo(torch.int64).max
    order = torch.where(pad, torch.full_like(a, big), a).argsort(-1)
    a_s, e_s, pad_s = a.gather(-1, order), e.gather(-1, order), pad.gather(-1, order)
    ov = ~pad_s[:, 1:] & (a_s[:, 1:] < e_s[:, :-1])
    if ov.any():
        b, j = (int(x) for x in ov.nonzero()[0])
        raise ValueError(
            f"spans overlap in batch {b}: ({a_s[b, j].item()}, {e_s[b, j].item()}) and "
            f"({a_s[b, j + 1].item()}, {e_s[b, j + 1].item()})"
        )


def pair_rows(spans: torch.Tensor, T: int) -> torch.Tensor:
    """Flat row index ``b*T + k`` of the first token of every adjacent in-span pair, int64 ``[P]``."""
    a, e = spans[..., 0].long().reshape(-1), spans[..., 1].long().reshape(-1)
    b = torch.arange(spans.shape[0], device=spans.device).repeat_interleave(spans.shape[1])
    keep = ~((a == PAD) & (e == PAD))
    a, e, b = a[keep], e[keep], b[keep]
    n = (e - a - 1).clamp(min=0)
    start = b * T + a
    base = start.repeat_interleave(n)
    offs = torch.arange(int(n.sum()), device=spans.device) - (n.cumsum(0) - n).repeat_interleave(n)
    return base + offs


def _prep(t, s, spans, validate):
    check_float("t_logits", t)
    check_float("s_logits", s)
    if t.shape != s.shape or t.dim() not in (2, 3):
        raise ValueError(
            f"teacher/student logits must both be [B, T, V] or [T, V], got {tuple(t.shape)} "
            f"and {tuple(s.shape)}"
        )
    if t.dim() == 2:
        t, s = t[None], s[None]
        if isinstance(spans, torch.Tensor) and spans.dim() == 2:
            spans = spans[None]
    B, T, V = t.shape
    check_spans(spans, B, T, validate)
    return t, s, spans, B, T, V


# ------------------------------------------------------------------------------------------ torch backend


def _rowdot(a, b):  # [n, V] x2 -> [n]: one dot product per row, no [n, V] temporary
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class _SpanTorch(torch.autograd.Function):
    """The torch backend with a hand-written backward (the kernels' formulas, see the module docstring).

    Instead of gathering the ``[P, V]`` rows of every pair, the products of *all* adjacent rows of the
    flattened batch are formed from two shifted views (``[B*T - 1, V]``; rows that are not a pair get a
    zero coefficient). Saved: ``q`` and ``e = q_k q_{k+1} - p_k p_{k+1}``; the backward allocates the
    scaled ``e`` and the gradient. Products are formed by separate multiplications (no fused
    multiply-add), so a pair where student == teacher has ``e = 0`` exactly: D = 0, the zero subgradient."""

    @staticmethod
    def forward(ctx, t, s, k, squared, ct):  # t, s [BT, V]; k [P] pair rows (P > 0) -> scalar
        p = torch.softmax(t, -1, dtype=ct)
        pp = p[:-1] * p[1:]  # [BT - 1, V]
        del p
        q = torch.softmax(s, -1, dtype=ct)
        e = (q[:-1] * q[1:]).sub_(pp)
        del pp
        d2 = _rowdot(e, e)[k]  # [P]
        if squared:
            per = d2
        else:
            pos = d2 > 0
            per = torch.where(pos, torch.where(pos, d2, torch.ones_like(d2)).sqrt(), torch.zeros_like(d2))
        ctx.save_for_backward(q, e, k, per)
        ctx.squared = squared
        ctx.sdtype = s.dtype
        return per.mean()

    @staticmethod
    def backward(ctx, g):
        q, e, k, per = ctx.saved_tensors
        if ctx.squared:
            c = torch.full_like(per, 2.0)
        else:  # dD/de = e / D, the zero subgradient at D = 0
            pos = per > 0
            c = torch.where(pos, 1.0 / torch.where(pos, per, torch.ones_like(per)), torch.zeros_like(per))
        coef = torch.zeros(e.shape[0], dtype=e.dtype, device=e.device)
        coef[k] = c * (g.to(e.dtype) / k.numel())
        ce = e * coef[:, None]  # [BT - 1, V]
        gq = torch.empty_like(q)  # d loss / d q: c_{k-1} e_{k-1} q_{k-1} + c_k e_k q_{k+1}
        torch.mul(ce, q[1:], out=gq[:-1])
        gq[-1].zero_()
        gq[1:].addcmul_(ce, q[:-1])
        del ce
        gq.sub_(_rowdot(gq, q)[:, None]).mul_(q)  # softmax backward: q (gq - <gq, q>)
        return None, gq if gq.dtype == ctx.sdtype else gq.to(ctx.sdtype), None, None, None


def span_loss_torch(t, s, spans, *, squared: bool = False, validate: bool = True):  # -> scalar
    t, s, spans, B, T, V = _prep(t, s, spans, validate)
    ct = torch.promote_types(s.dtype, torch.float32)
    k = pair_rows(spans, T)
    if k.numel() == 0:
        return (s.to(ct) * 0.0).sum()  # exact 0, keeps the graph
    return _SpanTorch.apply(t.detach().reshape(B * T, V), s.reshape(B * T, V), k, bool(squared), ct)


# ----------------------------------------------------------------------------------------- Triton kernels


@triton.jit
def _online(m, z, x):
    """One step of an online log-sum-exp over a chunk ``x`` (safe for all -inf), in base 2: ``m`` the
    running max (a scalar, one block reduction), ``z`` per-lane partial sums of ``2^((x - m) log2 e)``,
    rescaled when the max rises (summed across the block once, after the last chunk)."""
    m_new = tl.maximum(m, tl.max(x, 0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    z = z * tl.exp2((m - m_safe) * LOG2E) + tl.exp2((x - m_safe) * LOG2E)
    return m_new, z


@triton.jit
def _probs(x, m, lz):
    """softmax entries from a row's max ``m`` and ``log2 z``; (x - m) log2 e - lz stays accurate for
    |x| ~ 1e4 (x - lse would not: a large lse is rounded to its own ulp)."""
    return tl.where(x > float("-inf"), tl.exp2((x - m) * LOG2E - lz), 0.0)


@triton.jit
def _row_stats(ST_ptr, row):
    """The ``(max t, log2 z_t, max s, log2 z_s)`` that ``span_lse_kernel`` saved for ``row``."""
    st = ST_ptr + row * 4
    return tl.load(st + 0), tl.load(st + 1), tl.load(st + 2), tl.load(st + 3)


@triton.jit
def span_lse_kernel(
    T_ptr,  # [B*T, V] teacher logits, row stride stride_t
    S_ptr,  # [B*T, V] student logits, row stride stride_s
    NEED_ptr,  # [B*T] int32: 1 where the row belongs to a pair (other rows are never loaded)
    ST_ptr,  # [B*T, 4] fp32 out: (max t, log2 z_t, max s, log2 z_s) of the row (all -inf if not needed)
    V,
    stride_t,
    stride_s,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = tl.where(tl.load(NEED_ptr + row) != 0, V, 0)
    offs = tl.arange(0, BLOCK_V)
    ninf = float("-inf")
    mt = tl.full((), ninf, tl.float32)
    zt = tl.zeros([BLOCK_V], dtype=tl.float32)
    ms, zs = mt, zt
    for v0 in range(0, n, BLOCK_V):
        idx = v0 + offs
        inb = idx < V
        mt, zt = _online(mt, zt, tl.load(T_ptr + row * stride_t + idx, mask=inb, other=ninf).to(tl.float32))
        ms, zs = _online(ms, zs, tl.load(S_ptr + row * stride_s + idx, mask=inb, other=ninf).to(tl.float32))
    st = ST_ptr + row * 4
    tl.store(st + 0, mt)
    tl.store(st + 1, tl.log2(tl.sum(zt, 0)))
    tl.store(st + 2, ms)
    tl.store(st + 3, tl.log2(tl.sum(zs, 0)))


@triton.jit
def span_fwd_kernel(
    T_ptr,  # [B*T, V] teacher logits, row stride stride_t
    S_ptr,  # [B*T, V] student logits, row stride stride_s
    K_ptr,  # [P] int64 flat row of the first token of each pair
    ST_ptr,  # [B*T, 4] fp32 row statistics from span_lse_kernel
    D2_ptr,  # [P] fp32 out: squared distance of the pair's Hadamard products
    A_ptr,  # [P] fp32 out: <e, q_k q_{k+1}>, the pair's share of the backward's softmax dot products
    V,
    stride_t,
    stride_s,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    k = tl.load(K_ptr + pid).to(tl.int64)
    t0, t1 = T_ptr + k * stride_t, T_ptr + (k + 1) * stride_t
    s0, s1 = S_ptr + k * stride_s, S_ptr + (k + 1) * stride_s
    ma, la, mc, lc = _row_stats(ST_ptr, k)
    mb, lb, md, ld = _row_stats(ST_ptr, k + 1)
    offs = tl.arange(0, BLOCK_V)
    ninf = float("-inf")
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)  # per-lane partial sums, reduced once after the loop
    dot = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        inb = idx < V
        pa = _probs(tl.load(t0 + idx, mask=inb, other=ninf).to(tl.float32), ma, la)
        pb = _probs(tl.load(t1 + idx, mask=inb, other=ninf).to(tl.float32), mb, lb)
        qc = _probs(tl.load(s0 + idx, mask=inb, other=ninf).to(tl.float32), mc, lc)
        qd = _probs(tl.load(s1 + idx, mask=inb, other=ninf).to(tl.float32), md, ld)
        qq = qc * qd
        e = qq - pa * pb
        acc += e * e
        dot += e * qq
    tl.store(D2_ptr + pid, tl.sum(acc, 0))
    tl.store(A_ptr + pid, tl.sum(dot, 0))


@triton.jit
def span_bwd_kernel(
    T_ptr,  # [B*T, V] teacher logits, row stride stride_t
    S_ptr,  # [B*T, V] student logits, row stride stride_s
    ST_ptr,  # [B*T, 4] fp32 row statistics from span_lse_kernel
    CL_ptr,  # [B*T] fp32 coefficient of the pair (k-1, k) (0 if none)
    CR_ptr,  # [B*T] fp32 coefficient of the pair (k, k+1) (0 if none)
    DOT_ptr,  # [B*T] fp32 <gq_k, q_k> = c_{k-1} A_{k-1} + c_k A_k (A from span_fwd_kernel)
    DS_ptr,  # [B*T, V] out: d loss / d student logits (dtype of S), row stride stride_ds
    V,
    stride_t,
    stride_s,
    stride_ds,
    BLOCK_V: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    cl = tl.load(CL_ptr + k)
    cr = tl.load(CR_ptr + k)
    dot = tl.load(DOT_ptr + k)
    has_l = cl != 0.0  # the host only sets a coefficient where the neighbour row exists
    has_r = cr != 0.0
    act = has_l | has_r
    ninf = float("-inf")
    # the rows' (max, log2 z) from the statistics pass; an unused neighbour reads row k's (a valid row)
    row_l = tl.where(has_l, k - 1, k)
    row_r = tl.where(has_r, k + 1, k)
    mt_c, lt_c, ms_c, ls_c = _row_stats(ST_ptr, k)
    mt_l, lt_l, ms_l, ls_l = _row_stats(ST_ptr, row_l)
    mt_r, lt_r, ms_r, ls_r = _row_stats(ST_ptr, row_r)
    t_c, s_c = T_ptr + k * stride_t, S_ptr + k * stride_s
    t_l, s_l = T_ptr + (k - 1) * stride_t, S_ptr + (k - 1) * stride_s  # only read when has_l
    t_r, s_r = T_ptr + (k + 1) * stride_t, S_ptr + (k + 1) * stride_s  # only read when has_r
    offs = tl.arange(0, BLOCK_V)
    n_act = tl.where(act, V, 0)  # row limits instead of scalar-bool masks: `idx < n_l` is empty when unused
    n_l = tl.where(has_l, V, 0)
    n_r = tl.where(has_r, V, 0)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs
        inb = idx < V
        ld = idx < n_act
        pc = _probs(tl.load(t_c + idx, mask=ld, other=ninf).to(tl.float32), mt_c, lt_c)
        qc = _probs(tl.load(s_c + idx, mask=ld, other=ninf).to(tl.float32), ms_c, ls_c)
        pl = _probs(tl.load(t_l + idx, mask=idx < n_l, other=ninf).to(tl.float32), mt_l, lt_l)
        ql = _probs(tl.load(s_l + idx, mask=idx < n_l, other=ninf).to(tl.float32), ms_l, ls_l)
        pr = _probs(tl.load(t_r + idx, mask=idx < n_r, other=ninf).to(tl.float32), mt_r, lt_r)
        qr = _probs(tl.load(s_r + idx, mask=idx < n_r, other=ninf).to(tl.float32), ms_r, ls_r)
        gq = cl * (ql * qc - pl * pc) * ql + cr * (qc * qr - pc * pr) * qr
        ds = tl.where(act, qc * (gq - dot), 0.0)
        tl.store(DS_ptr + k * stride_ds + idx, ds.to(DS_ptr.dtype.element_ty), mask=inb)


def _block_v(V: int) -> int:
    cap = 1024 if is_interpreting() else 4096
    return max(16, min(cap, triton.next_power_of_2(V)))


class _SpanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, s, k, squared):
        BT, V = t.shape
        P = k.numel()
        d2 = empty((P,), dtype=torch.float32, device=t.device)
        dots = empty((P,), dtype=torch.float32, device=t.device)
        stats = empty((BT, 4), dtype=torch.float32, device=t.device)
        BLOCK_V = _block_v(V)
        warps = 8 if BLOCK_V >= 2048 else 4
        if P > 0:
            need = torch.zeros(BT, dtype=torch.int32, device=t.device)
            need[k] = 1
            need[k + 1] = 1
            span_lse_kernel[(BT,)](
                t, s, need, stats, V, t.stride(0), s.stride(0), BLOCK_V=BLOCK_V, num_warps=warps
            )
            # enable_fp_fusion=False: with FMA contraction, q_k q_k1 - p_k p_k1 is not exactly 0 for a pair
            # where student == teacher (seen on the H200), so D = rounding noise and e/D a noise gradient of
            # size ~|q|; unfused, identical rows give D = 0 exactly and the zero subgradient (reference).
            span_fwd_kernel[(P,)](
                t,
                s,
                k,
                stats,
                d2,
                dots,
                V,
                t.stride(0),
                s.stride(0),
                BLOCK_V=BLOCK_V,
                num_warps=warps,
                enable_fp_fusion=False,
            )
        if squared:
            per = d2
        else:
            pos = d2 > 0
            per = torch.where(pos, torch.where(pos, d2, torch.ones_like(d2)).sqrt(), torch.zeros_like(d2))
        loss = per.mean() if P > 0 else torch.zeros((), dtype=torch.float32, device=t.device)
        ctx.save_for_backward(t, s, k, per, stats, dots)
        ctx.squared = squared
        return loss

    @staticmethod
    def backward(ctx, g):
        t, s, k, per, stats, dots = ctx.saved_tensors
        BT, V = t.shape
        P = k.numel()
        ds = empty((BT, V), dtype=s.dtype, device=s.device)
        if BT == 0:
            return None, ds, None, None
        if P > 0:
            if ctx.squared:
                c = torch.full_like(per, 2.0)
            else:  # dD/dr = e / D, the zero subgradient at D = 0
                pos = per > 0
                c = torch.where(pos, 1.0 / torch.where(pos, per, torch.ones_like(per)), torch.zeros_like(per))
            c = c * (g.float() / P)
        else:
            c = per
        cl = torch.zeros(BT, dtype=torch.float32, device=s.device)
        cr = torch.zeros(BT, dtype=torch.float32, device=s.device)
        cr.index_put_((k,), c, accumulate=True)
        cl.index_put_((k + 1,), c, accumulate=True)
        # <gq_k, q_k> = c_{k-1} <e_{k-1}, q_{k-1} q_k> + c_k <e_k, q_k q_{k+1}>: the forward's per-pair
        # sums, so the backward needs no pass over V for it
        dot = torch.zeros(BT, dtype=torch.float32, device=s.device)
        ca = c * dots
        dot.index_put_((k,), ca, accumulate=True)
        dot.index_put_((k + 1,), ca, accumulate=True)
        BLOCK_V = _block_v(V)
        if P == 0:  # no statistics were computed: every row is inactive and its gradient 0
            stats = torch.zeros((BT, 4), dtype=torch.float32, device=s.device)
        span_bwd_kernel[(BT,)](
            t,
            s,
            stats,
            cl,
            cr,
            dot,
            ds,
            V,
            t.stride(0),
            s.stride(0),
            ds.stride(0),
            BLOCK_V=BLOCK_V,
            num_warps=8 if BLOCK_V >= 2048 else 4,
        )
        return None, ds, None, None


def span_loss(t, s, spans, *, squared: bool = False, backend: str = "auto", validate: bool = True):
    """Mean over adjacent in-span pairs of ``||r^t - r^s||_2`` (``squared``: of its square); scalar tensor,
    differentiable w.r.t. the student logits ``s`` (the teacher ``t`` is a constant). ``t, s``: ``[B, T, V]``
    or ``[T, V]``; ``spans``: int ``[B, S, 2]`` (or ``[S, 2]``) padded with ``(-1, -1)``.
    ``validate=False`` skips the value checks on ``spans`` (they synchronise a GPU)."""
    be = resolve_backend(backend, s)
    if be == "torch":
        return span_loss_torch(t, s, spans, squared=squared, validate=validate)
    t, s, spans, B, T, V = _prep(t, s, spans, validate)
    k = pair_rows(spans, T).contiguous()
    return _SpanTriton.apply(
        t.detach().reshape(B * T, V).contiguous(), s.reshape(B * T, V).contiguous(), k, bool(squared)
    )
