"""Token-level distillation divergences: vectorised PyTorch and Triton fwd/bwd, with autograd.

The oracle is ``reference/divergences.py`` (same names, same conventions: KL not soft-CE, no τ²
factor, −inf = padded entry shared by teacher and student, log-space mixtures, degenerate ends are
the formula's values). Entry point::

    loss = divergence("forward_kl", teacher_logits, student_logits, mask=mask, temperature=2.0)

The Triton kernels (the CUDA default) are two passes forward, one backward:

* forward, per row: pass 1 is an online log-sum-exp of ``a = t/τ`` and ``b = s/τ`` over vocabulary
  chunks (and the input checks); pass 2 accumulates the loss and one or two row scalars ``c0, c1``
  that the gradient needs (e.g. ``c0 = KL(q‖p)`` for reverse KL). Saved: ``[N]`` loss and ``[N, 6]``
  stats ``(max t, log2 z_a, max s, log2 z_b, c0, c1)`` plus an ``[N]`` int status; nothing ``[N, V]``.
  ``log2 p = (t − max t)·(log2 e/τ) − log2 z_a``, never ``t/τ − lse``: a large lse rounds to its own ulp.
  The kernels work in base 2 (one multiply by ``log2 e/τ``, then ``exp2``: one MUFU instruction, where
  ``exp`` adds a multiply and a range fix-up; it flushes results under 2^-126 to 0, far below every
  tolerance); losses and row scalars are stored in nats. Sums are kept
  per lane inside the chunk loops and reduced across the block once per row: a chunk of pass 1 costs two
  block reductions (the running maxima), a chunk of pass 2 none.
* backward, per row: one pass recomputes ``log p, log q`` chunk by chunk from the saved stats and
  writes ``grad_output_row / τ · ∂L/∂b`` straight into the ``[N, V]`` gradient (the only ``[N, V]``
  tensor allocated), in the student's dtype.

Status bits (checked on the host after the forward, so bad input costs no extra pass over ``[N, V]``):
1 = NaN or +inf, 2 = −inf in one of teacher/student only, 4 = row −inf everywhere. Masked rows are
skipped entirely (loss 0, gradient 0, never checked), so padding rows may hold anything.

The PyTorch backend (the CPU default) is built for a CPU's caches and allocator instead: rows go in
chunks of about 2^17 elements, each chunk is screened by one reduction (finite row sums mean no −inf,
NaN or +inf; only flagged rows are diagnosed, with the same errors), then one log-softmax per input and
only the divergence asked for; the forward also forms each row's gradient ∂L/∂b (up to a constant) and
saves it, the one ``[N, V]`` tensor it allocates, and the backward scales it by the row's cotangent.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fast.utils import LN2, LOG2E, check_float, empty, resolve_backend

__all__ = [
    "divergence",
    "DIVERGENCES",
    "PARAMS",
    "divergence_fwd_kernel",
    "divergence_bwd_kernel",
    "demo_fit",
    "format_demo_table",
]

# name -> (kernel code, {param: default}); the registry has the same keys as reference.DIVERGENCES
_CODES = {
    "forward_kl": (0, {}),
    "reverse_kl": (1, {}),
    "symmetric_kl": (2, {}),
    "js_divergence": (3, {"beta": 0.5}),
    "tv_distance": (4, {}),
    "skew_forward_kl": (5, {"alpha": 0.1}),
    "skew_reverse_kl": (6, {"alpha": 0.1}),
}
PARAMS = {name: dict(p) for name, (_, p) in _CODES.items()}
REDUCTIONS = ("mean", "sum", "none")
_STATUS = {
    1: "NaN or +inf",
    2: "-inf (padded vocabulary) in only one of teacher/student",
    4: "-inf everywhere (no distribution)",
}


# =============================================================================================
# Triton kernels. One program per row; vocabulary in chunks of BLOCK_V; fp32 accumulation.
# =============================================================================================


@triton.jit
def _logaddexp2(x, y):
    # log2(2^x + 2^y) with x or y possibly -inf (mixture weight 0); never both on valid lanes
    mx = tl.maximum(x, y)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + tl.log2(tl.exp2(x - mx) + tl.exp2(y - mx))


@triton.jit
def divergence_fwd_kernel(
    T,
    S,  # [N, V] teacher / student logits (any float dtype, upcast to fp32 after load)
    KEEP,  # [N] int32, 0 = masked row (skipped)
    LOSS,  # [N] fp32 per-row loss (out)
    STATS,  # [N, 6] fp32 (max t, log2 z_a, max s, log2 z_b, c0, c1) for the backward (out)
    STATUS,  # [N] int32 input-check bits (out)
    stride_t,
    stride_s,
    V,
    inv_tau,  # 1 / temperature
    log_w,
    log_1mw,  # log(param), log(1 - param): mixture weights in log space (may be -inf)
    DIV: tl.constexpr,  # divergence code, see _CODES
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t_row = T + row * stride_t
    s_row = S + row * stride_s
    keep = tl.load(KEEP + row)
    if keep == 0:
        tl.store(LOSS + row, 0.0)
        tl.store(STATUS + row, 0)
        for j in tl.static_range(6):
            tl.store(STATS + row * 6 + j, 0.0)
    else:
        # everything in base 2: a = t/τ is never formed, (t - max)·(log2 e/τ) is one multiply, exp2 one MUFU
        c = inv_tau * LOG2E
        lw2 = log_w * LOG2E  # -inf stays -inf
        l1mw2 = log_1mw * LOG2E
        # ---- pass 1: online log-sum-exp of a = t/τ and b = s/τ, plus the input checks -------------
        # the running maxima are of the raw logits (τ > 0 keeps the argmax), so that later
        # log2 p = (t - max t)·c - log2 z: the subtraction is exact near the max, and no large
        # lse = max + log z is ever rounded to its own ulp (which at |logit| ~ 1e3 is ~1e-4 in fp32).
        # Per-lane partial sums (rescaled by the scalar factor when the chunk raises the max) and
        # per-lane status bits: two block reductions per chunk (the maxima), the sums reduced once at the end
        m_a = float("-inf")
        m_b = float("-inf")
        z_a = tl.zeros([BLOCK_V], dtype=tl.float32)
        z_b = tl.zeros([BLOCK_V], dtype=tl.float32)
        bad = tl.zeros([BLOCK_V], dtype=tl.int32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            inb = offs < V
            t = tl.load(t_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
            s = tl.load(s_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
            nonfinite = (t != t) | (s != s) | (t == float("inf")) | (s == float("inf"))
            mismatch = (t == float("-inf")) != (s == float("-inf"))
            bad = bad | tl.where(nonfinite, 1, 0) | tl.where(mismatch, 2, 0)
            new_a = tl.maximum(m_a, tl.max(t, axis=0))
            new_b = tl.maximum(m_b, tl.max(s, axis=0))
            safe_a = tl.where(new_a == float("-inf"), 0.0, new_a)  # all -inf so far: keep exp2() finite
            safe_b = tl.where(new_b == float("-inf"), 0.0, new_b)
            z_a = z_a * tl.exp2((m_a - safe_a) * c) + tl.exp2((t - safe_a) * c)
            z_b = z_b * tl.exp2((m_b - safe_b) * c) + tl.exp2((s - safe_b) * c)
            m_a = new_a
            m_b = new_b
        bad = tl.max(bad, axis=0) | tl.where(m_a == float("-inf"), 4, 0)
        lz_a = tl.log2(tl.sum(z_a, axis=0))  # log2 p = (t - m_a)·c - lz_a
        lz_b = tl.log2(tl.sum(z_b, axis=0))

        # ---- pass 2: the loss and the row scalars the gradient needs ------------------------------
        # per-lane partial sums, reduced once after the loop; log terms in bits (×ln 2 at the end)
        acc = tl.zeros([BLOCK_V], dtype=tl.float32)  # the loss, or its first part
        acc2 = tl.zeros([BLOCK_V], dtype=tl.float32)  # second part (symmetric KL: reverse KL; JSD: KL(q||m))
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            inb = offs < V
            t = tl.load(t_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
            s = tl.load(s_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
            valid = inb & (t != float("-inf"))  # padded and tail lanes contribute exactly 0
            lp = tl.where(valid, (t - m_a) * c - lz_a, 0.0)  # log2 p
            lq = tl.where(valid, (s - m_b) * c - lz_b, 0.0)  # log2 q
            p = tl.where(valid, tl.exp2(lp), 0.0)
            q = tl.where(valid, tl.exp2(lq), 0.0)
            if DIV == 0:  # forward KL
                acc += p * (lp - lq)
            elif DIV == 1:  # reverse KL
                acc += q * (lq - lp)
            elif DIV == 2:  # symmetric KL
                acc += p * (lp - lq)
                acc2 += q * (lq - lp)
            elif DIV == 3:  # JSD(β): m = βp + (1-β)q
                lm = _logaddexp2(lw2 + lp, l1mw2 + lq)
                acc += p * (lp - lm)
                acc2 += q * (lq - lm)
            elif DIV == 4:  # total variation
                acc += 0.5 * tl.abs(p - q)
                sgn = tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
                acc2 += q * sgn
            elif DIV == 5:  # skew forward KL: m = αp + (1-α)q
                lm = _logaddexp2(lw2 + lp, l1mw2 + lq)
                acc += p * (lp - lm)
                # k = q(p - q)/m (q/m <= 1/(1-α); unused, and kept finite, at α = 1)
                acc2 += tl.where(valid & (log_1mw != float("-inf")), tl.exp2(lq - lm) * (p - q), 0.0)
            else:  # skew reverse KL: m = αq + (1-α)p
                lm = _logaddexp2(lw2 + lq, l1mw2 + lp)
                acc += q * (lq - lm)
                # h = q(q - p)/m (q/m <= 1/α; unused, and kept finite, at α = 0)
                acc2 += tl.where(valid & (log_w != float("-inf")), tl.exp2(lq - lm) * (q - p), 0.0)
        c1 = 0.0
        if DIV == 2:
            c0 = tl.sum(acc2, axis=0) * LN2
            loss = tl.sum(acc, axis=0) * LN2 + c0
        elif DIV == 3:
            c0 = tl.sum(acc2, axis=0) * LN2
            loss = tl.exp(log_w) * (tl.sum(acc, axis=0) * LN2) + tl.exp(log_1mw) * c0
        elif DIV == 4:
            loss = tl.sum(acc, axis=0)
            c0 = tl.sum(acc2, axis=0)
        elif DIV == 5:
            loss = tl.sum(acc, axis=0) * LN2
            c0 = tl.sum(acc2, axis=0)
        elif DIV == 6:
            loss = tl.sum(acc, axis=0) * LN2
            c0 = loss
            c1 = tl.sum(acc2, axis=0)
        else:
            loss = tl.sum(acc, axis=0) * LN2
            c0 = loss
        tl.store(LOSS + row, loss)
        tl.store(STATUS + row, bad)
        tl.store(STATS + row * 6 + 0, m_a)
        tl.store(STATS + row * 6 + 1, lz_a)
        tl.store(STATS + row * 6 + 2, m_b)
        tl.store(STATS + row * 6 + 3, lz_b)
        tl.store(STATS + row * 6 + 4, c0)
        tl.store(STATS + row * 6 + 5, c1)


@triton.jit
def divergence_bwd_kernel(
    T,
    S,  # [N, V] teacher / student logits
    KEEP,  # [N] int32
    STATS,  # [N, 6] fp32 from the forward
    GSCALE,  # [N] fp32: grad_output of the row / τ
    GRAD,  # [N, V] out, the student's dtype
    stride_t,
    stride_s,
    stride_g,
    V,
    inv_tau,
    log_w,
    log_1mw,
    DIV: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    t_row = T + row * stride_t
    s_row = S + row * stride_s
    g_row = GRAD + row * stride_g
    keep = tl.load(KEEP + row)
    if keep == 0:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            zero = tl.zeros([BLOCK_V], dtype=tl.float32)
            tl.store(g_row + offs, zero.to(GRAD.dtype.element_ty), mask=offs < V)
    else:
        c = inv_tau * LOG2E
        lw2 = log_w * LOG2E
        l1mw2 = log_1mw * LOG2E
        m_a = tl.load(STATS + row * 6 + 0)
        lz_a = tl.load(STATS + row * 6 + 1)  # log2 z
        m_b = tl.load(STATS + row * 6 + 2)
        lz_b = tl.load(STATS + row * 6 + 3)
        c0 = tl.load(STATS + row * 6 + 4)
        c1 = tl.load(STATS + row * 6 + 5)
        scale = tl.load(GSCALE + row)
        c0_2 = c0 * LOG2E  # the row scalar in bits, beside the log2 terms
        if DIV == 1 or DIV == 3 or DIV == 6:
            scale_log = scale * LN2  # a gradient made of log2 terms only: ×ln 2 folded into the row scale
        else:
            scale_log = scale
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            inb = offs < V
            t = tl.load(t_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
            s = tl.load(s_row + offs, mask=inb, other=float("-inf")).to(tl.float32)
            valid = inb & (t != float("-inf"))
            lp = tl.where(valid, (t - m_a) * c - lz_a, 0.0)  # log2 p
            lq = tl.where(valid, (s - m_b) * c - lz_b, 0.0)  # log2 q
            p = tl.where(valid, tl.exp2(lp), 0.0)
            q = tl.where(valid, tl.exp2(lq), 0.0)
            # ∂L/∂b (b = s/τ); the docstring of reference/divergences.py derives each line
            if DIV == 0:
                g = q - p
            elif DIV == 1:  # q (log q - log p - c0), in bits (×ln 2 in scale_log)
                g = q * (lq - lp - c0_2)
            elif DIV == 2:
                g = (q - p) + q * (lq - lp - c0_2) * LN2
            elif DIV == 3:
                lm = _logaddexp2(lw2 + lp, l1mw2 + lq)
                g = tl.exp(log_1mw) * q * (lq - lm - c0_2)
            elif DIV == 4:
                sgn = tl.where(q > p, 0.5, tl.where(q < p, -0.5, 0.0))
                g = q * (sgn - c0)
            elif DIV == 5:  # -(1-α)² (k - q Σk): the O(1) parts of q·p/m cancelled analytically
                lm = _logaddexp2(lw2 + lp, l1mw2 + lq)
                k = tl.where(valid & (log_1mw != float("-inf")), tl.exp2(lq - lm) * (p - q), 0.0)
                g = -tl.exp(2.0 * log_1mw) * (k - q * c0)
            else:  # q(log q - log m - L) - α(1-α)(h - q Σh), in bits (×ln 2 in scale_log)
                lm = _logaddexp2(lw2 + lq, l1mw2 + lp)
                h = tl.where(valid & (log_w != float("-inf")), tl.exp2(lq - lm) * (q - p), 0.0)
                g = q * (lq - lm - c0_2) - (tl.exp(log_w + log_1mw) * LOG2E) * (h - q * c1)
            g = tl.where(valid, g, 0.0) * scale_log
            tl.store(g_row + offs, g.to(GRAD.dtype.element_ty), mask=inb)


def _block_and_warps(V: int, block_v: int | None):
    if block_v is None:
        block_v = min(triton.next_power_of_2(V), 2048)
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    return block_v, (4 if block_v <= 1024 else 8)


def _triton_fwd(t, s, keep, code, log_w, log_1mw, inv_tau, block_v):  # [N,V] x2, [N] -> [N], [N,6], [N]
    N, V = s.shape
    loss = empty((N,), dtype=torch.float32, device=s.device)
    stats = empty((N, 6), dtype=torch.float32, device=s.device)
    status = empty((N,), dtype=torch.int32, device=s.device)
    BLOCK_V, warps = _block_and_warps(V, block_v)
    divergence_fwd_kernel[(N,)](
        t,
        s,
        keep,
        loss,
        stats,
        status,
        t.stride(0),
        s.stride(0),
        V,
        inv_tau,
        log_w,
        log_1mw,
        DIV=code,
        BLOCK_V=BLOCK_V,
        num_warps=warps,
    )
    return loss, stats, status


def _triton_bwd(t, s, keep, stats, gscale, code, log_w, log_1mw, inv_tau, block_v):  # -> [N, V]
    N, V = s.shape
    grad = empty((N, V), dtype=s.dtype, device=s.device)
    BLOCK_V, warps = _block_and_warps(V, block_v)
    divergence_bwd_kernel[(N,)](
        t,
        s,
        keep,
        stats,
        gscale,
        grad,
        t.stride(0),
        s.stride(0),
        grad.stride(0),
        V,
        inv_tau,
        log_w,
        log_1mw,
        DIV=code,
        BLOCK_V=BLOCK_V,
        num_warps=warps,
    )
    return grad


# =============================================================================================
# PyTorch backend (the CPU default): row chunks, one log-softmax per input, the gradient in the forward.
# =============================================================================================
# Rows are processed in chunks of about _CHUNK_ELEMS elements, so every temporary is a small, cache-sized
# block that the allocator reuses; the only [N, V] tensor is ``y``, the gradient of each row's loss
# w.r.t. b = s/τ, written chunk by chunk in the forward (when a gradient is needed) and saved. The
# backward is then one product ``grad = y · (grad_output · coef / τ)`` per row. Compared with the eager
# formula (two [N, V] log-softmaxes, the loss's elementwise temporaries, and autograd's saved tensors and
# backward temporaries, each a fresh [N, V] allocation), this allocates two [N, V] tensors in all.
_CHUNK_ELEMS = 1 << 17
# On a GPU small chunks cost a kernel launch per operation and a host read-back (the screen) per chunk, far
# more than the memory they save: there the chunk is ~2^25 elements (one or a few chunks for a batch of
# logits).
_CHUNK_ELEMS_CUDA = 1 << 25


def _log_probs(x, inv_tau, cd):  # [n, V] -> log softmax(x/τ) [n, V] in cd, as the kernel: (x - max)/τ - log z
    if inv_tau == 1.0:
        return torch.log_softmax(x, -1, dtype=cd)
    x = x.to(cd)
    return torch.log_softmax((x - x.amax(-1, keepdim=True)).mul_(inv_tau), -1)


def _probs(x, inv_tau, cd):  # [n, V] -> softmax(x/τ) [n, V] in cd
    if inv_tau == 1.0:
        return torch.softmax(x, -1, dtype=cd)
    x = x.to(cd)
    return torch.softmax((x - x.amax(-1, keepdim=True)).mul_(inv_tau), -1)


def _rowdot(a, b):  # [n, V] x2 -> [n]: one dot product per row, no [n, V] temporary
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _mixture(a, b, w, tiny):  # w·a + (1-w)·b for 0 < w < 1, floored at ``tiny`` (see _chunk_rows)
    return torch.mul(a, w).add_(b, alpha=1.0 - w).clamp_min_(tiny)


def _chunk_rows(code, w, t, s, inv_tau, cd, padded, y):  # [n, V] x2 -> loss [n]; writes y [n, V] if given
    """Loss of each row and, into ``y``, its gradient w.r.t. b = s/τ divided by ``_COEF[code](w)``.

    ``padded``: some entries are -inf (shared). log p there is -inf, so (log p - log q) would be NaN;
    it is replaced by a finite -max/4, so that every product with p = q = 0 is exactly 0 (the
    kernel masks these lanes instead). NaN and +inf are kept (they mean bad input; eager code raises
    before this point, compiled code returns NaN).

    Mixtures m = w·a + (1-w)·b are formed linearly from p and q (two positive terms, relative error of
    a few ulps, like the kernel's logaddexp) and floored at the smallest normal number: m underflows
    to 0 only where p and q do too, and every term that uses log m or 1/m is multiplied by p or q
    there, so the floor changes the result by less than one subnormal."""
    if code == 4:  # total variation needs no logarithm, and softmax maps -inf to exactly 0
        p, q = _probs(t, inv_tau, cd), _probs(s, inv_tau, cd)
        e = q.sub(p)
        loss = 0.5 * torch.linalg.vector_norm(e, 1, -1)
        sgn = e.sign_().mul_(0.5)
        if y is not None:
            torch.mul(sgn.sub_(_rowdot(q, sgn)[:, None]), q, out=y)  # q (½ sign - Σ q ½ sign)
        return loss
    lp, lq = _log_probs(t, inv_tau, cd), _log_probs(s, inv_tau, cd)
    if padded:
        big = -torch.finfo(cd).max / 4
        lp.nan_to_num_(nan=float("nan"), posinf=float("inf"), neginf=big)
        lq.nan_to_num_(nan=float("nan"), posinf=float("inf"), neginf=big)
    tiny = torch.finfo(cd).tiny
    if code == 0:  # forward KL; ∂L/∂b = q - p
        d = lp - lq
        p = lp.exp_()
        loss = _rowdot(p, d)
        if y is not None:
            torch.sub(lq.exp_(), p, out=y)
    elif code == 1:  # reverse KL; ∂L/∂b = q (r - L), r = log q - log p
        r = torch.sub(lq, lp, out=lp)
        q = lq.exp_()
        loss = _rowdot(q, r)
        if y is not None:
            torch.mul(r.sub_(loss[:, None]), q, out=y)
    elif code == 2:  # symmetric KL; ∂L/∂b = (q - p) + q (-d - R) = -(q (d + R - 1) + p), d = log p - log q
        d = lp - lq
        p, q = lp.exp_(), lq.exp_()
        fkl, rkl = _rowdot(p, d), -_rowdot(q, d)
        loss = fkl + rkl
        if y is not None:
            torch.add(d.add_((rkl - 1.0)[:, None]).mul_(q), p, out=y)
    elif code == 3:  # JSD(β), 0 < β < 1; ∂L/∂b = (1-β) q (u - K), u = log q - log m, K = KL(q‖m)
        p, q = lp.exp(), lq.exp()
        lm = _mixture(p, q, w, tiny).log_()
        kl_p = _rowdot(p, lp.sub_(lm))
        u = lq.sub_(lm)
        kl_q = _rowdot(q, u)
        loss = w * kl_p + (1.0 - w) * kl_q
        if y is not None:
            torch.mul(u.sub_(kl_q[:, None]), q, out=y)
    elif code == 5:  # skew forward KL, 0 < α < 1; ∂L/∂b = -(1-α)² q (v - Σ q v), v = (p - q)/m
        p, q = lp.exp(), lq.exp()
        m = _mixture(p, q, w, tiny)
        v = torch.sub(p, q).div_(m)
        loss = _rowdot(p, lp.sub_(m.log_()))
        if y is not None:
            torch.mul(v.sub_(_rowdot(q, v)[:, None]), q, out=y)
    else:  # skew reverse KL, 0 < α < 1, m = αq + (1-α)p, u = log q - log m, v = (q - p)/m;
        # ∂L/∂b = q (u - L) - α(1-α) q (v - Σ q v) = q (z - C), z = u - α(1-α) v, C = L - α(1-α) Σ q v
        p, q = lp.exp(), lq.exp()
        m = _mixture(q, p, w, tiny)
        v = torch.sub(q, p).div_(m)
        u = lq.sub_(m.log_())
        loss = _rowdot(q, u)
        if y is not None:
            c = w * (1.0 - w)
            const = loss - c * _rowdot(q, v)
            torch.mul(u.add_(v, alpha=-c).sub_(const[:, None]), q, out=y)
    return loss


# the row-constant factor of the gradient that _chunk_rows leaves out of y (given the weight w)
_COEF = {
    0: lambda w: 1.0,
    1: lambda w: 1.0,
    2: lambda w: -1.0,
    3: lambda w: 1.0 - w,
    4: lambda w: 1.0,
    5: lambda w: -((1.0 - w) ** 2),
    6: lambda w: 1.0,
}


def _effective(code, w):  # the degenerate ends: identically zero (None), or plainly forward/reverse KL
    if (code == 3 and w in (0.0, 1.0)) or (code in (5, 6) and w == 1.0):
        return None
    if code in (5, 6) and w == 0.0:
        return code - 5
    return code


def _status(t, s):  # [n, V] x2 -> [n] int32 status bits (see _STATUS)
    ninf = float("-inf")
    nonfinite = (t.isnan() | s.isnan() | (t == float("inf")) | (s == float("inf"))).any(-1)
    mismatch = ((t == ninf) != (s == ninf)).any(-1)
    all_ninf = (t == ninf).all(-1)
    return nonfinite.int() | (mismatch.int() * 2) | (all_ninf.int() * 4)


def _torch_fwd(
    t, s, keep, code, w, inv_tau, need_grad, chunk_elems=None
):  # -> loss [N], y [N, V] | None, coef
    """Eager: each chunk is screened by one cheap reduction (the row sums of t and s are finite exactly
    when a row holds no -inf, NaN or +inf); only flagged rows are diagnosed. A kept row with bad values
    raises (``_raise_on_status`` over the whole batch, so the message counts every bad row); a kept
    row with shared -inf entries switches its chunk to the padded arithmetic; a masked row with
    non-finite values is replaced by zeros (its loss and gradient are zeroed anyway).
    Under torch.compile the chunk is the whole tensor and nothing is read back to the host: padded
    arithmetic and zeroed masked rows always (the value check is eager-only, see ``divergence``)."""
    cd = torch.float64 if torch.float64 in (t.dtype, s.dtype) else torch.float32
    N, V = s.shape
    kb = keep.bool()
    eff = _effective(code, w)
    coef = 0.0 if eff is None else _COEF[eff](w)
    compiling = torch.compiler.is_compiling()
    if compiling:
        t = torch.where(kb[:, None], t, 0.0)
        s = torch.where(kb[:, None], s, 0.0)
        if eff is None:
            return t.new_zeros(N, dtype=cd), None, coef
        y = torch.empty((N, V), dtype=cd, device=s.device) if need_grad else None
        loss = _chunk_rows(eff, w, t, s, inv_tau, cd, True, y)
        return torch.where(kb, loss, 0.0), y, coef
    loss = torch.zeros(N, dtype=cd, device=s.device)
    y = torch.empty((N, V), dtype=cd, device=s.device) if (need_grad and eff is not None) else None
    if chunk_elems is None:
        chunk_elems = _CHUNK_ELEMS_CUDA if s.is_cuda else _CHUNK_ELEMS
    rows = max(1, chunk_elems // V)
    for r0 in range(0, N, rows):
        tc, sc, kc = t[r0 : r0 + rows], s[r0 : r0 + rows], kb[r0 : r0 + rows]
        flagged = ~torch.isfinite(tc.sum(-1, dtype=cd) + sc.sum(-1, dtype=cd))
        padded = False
        if bool(flagged.any()):
            if bool((flagged & kc).any()):
                rows_k = torch.nonzero(flagged & kc).flatten()
                if bool((_status(tc[rows_k], sc[rows_k]) != 0).any()):
                    _raise_on_status(_status(t, s) * kb.int())
                padded = True  # the flagged kept rows are fine: they hold shared -inf entries
            if bool((flagged & ~kc).any()):
                tc = torch.where(kc[:, None], tc, 0.0)
                sc = torch.where(kc[:, None], sc, 0.0)
        if eff is None:
            continue
        yc = None if y is None else y[r0 : r0 + rows]
        loss[r0 : r0 + rows] = _chunk_rows(eff, w, tc, sc, inv_tau, cd, padded, yc)
    return torch.where(kb, loss, 0.0), y, coef


# =============================================================================================
# autograd + public API
# =============================================================================================
class _DivergenceRows(torch.autograd.Function):
    """Per-row losses [N] of teacher/student [N, V]; gradient only to the student logits."""

    @staticmethod
    def forward(ctx, t, s, keep, code, w, inv_tau, backend, block_v, need_grad):
        log_w = math.log(w) if w > 0 else float("-inf")  # mixture weights in log space (-inf at the ends)
        log_1mw = math.log1p(-w) if w < 1 else float("-inf")
        if backend == "triton":
            loss, stats, status = _triton_fwd(t, s, keep, code, log_w, log_1mw, inv_tau, block_v)
            if not torch.compiler.is_compiling():
                # reading the status back is a host sync and, under torch.compile, a graph break: compiled
                # code skips the input check (see ``divergence``), eager code always runs it
                _raise_on_status(status)
            ctx.save_for_backward(t, s, keep, stats)
        else:  # the torch backend checks its input chunk by chunk (eager only), raising the same errors
            loss, y, ctx.coef = _torch_fwd(t, s, keep, code, w, inv_tau, need_grad, block_v)
            ctx.save_for_backward(keep, y)
        ctx.cfg = (code, log_w, log_1mw, inv_tau, backend, block_v)
        ctx.student = (s.shape, s.dtype, s.device)
        out_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
        # not ``loss.to(out_dtype)`` when it is a no-op: torch 2.11's dynamo then loses the gradient of
        # the Function's output (compiled backward got grad_rows = 0; seen in 2.11.0, fine in 2.13.0)
        return loss if loss.dtype == out_dtype else loss.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_rows):  # grad_rows [N]
        code, log_w, log_1mw, inv_tau, backend, block_v = ctx.cfg
        shape, sdt, dev = ctx.student
        if backend == "triton":
            t, s, keep, stats = ctx.saved_tensors
            gscale = (grad_rows.to(stats.dtype) * inv_tau).contiguous()
            grad = _triton_bwd(t, s, keep, stats, gscale, code, log_w, log_1mw, inv_tau, block_v)
            return None, grad, None, None, None, None, None, None, None
        keep, y = ctx.saved_tensors
        if y is None:  # a degenerate end (identically zero), or no gradient was asked for in the forward
            return None, torch.zeros(shape, dtype=sdt, device=dev), None, None, None, None, None, None, None
        gs = torch.where(keep != 0, grad_rows.to(y.dtype) * (inv_tau * ctx.coef), 0.0)[:, None]
        if y.dtype == sdt:
            grad = y * gs
        else:
            grad = torch.empty(shape, dtype=sdt, device=dev)
            torch.mul(y, gs, out=grad)
        return None, grad, None, None, None, None, None, None, None


def _raise_on_status(status: torch.Tensor) -> None:
    if not bool((status != 0).any()):
        return
    bad = torch.nonzero(status).flatten()
    row = int(bad[0])
    bits = int(status[row])
    what = "; ".join(msg for bit, msg in _STATUS.items() if bits & bit)
    raise ValueError(f"bad logits in {bad.numel()} unmasked row(s), first row {row} (flattened): {what}")


def divergence(
    name,
    teacher_logits,
    student_logits,
    *,
    mask=None,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    temperature=1.0,
    backend="auto",
    block_v=None,
    **params,
):
    """Divergence ``name`` between softmax(teacher/τ) and softmax(student/τ) over the last axis.

    teacher_logits, student_logits: ``[..., V]``, fp32/fp16/bf16/fp64 (dtypes may differ). The teacher
    is detached; autograd flows to the student logits. ``mask`` (``[...]``, True = keep) and/or
    ``labels`` (``[...]``, tokens equal to ``ignore_index`` are excluded) drop tokens.
    ``reduction``: "mean" over kept tokens (0 with zero gradient when none is kept), "sum", or "none"
    (``[...]``, 0 at dropped tokens). ``params``: ``beta`` for ``js_divergence``, ``alpha`` for the
    skew KLs (see ``PARAMS`` for defaults). No τ² factor is applied. The loss is float32 (float64 for a
    float64 student); the gradient has the student's dtype. The Triton backend computes in fp32;
    the torch backend in fp32, or fp64 when an input is fp64. ``block_v`` overrides the chunk size: the
    vocabulary block of the Triton kernels (a power of two), or the elements per row chunk of the torch
    backend (1: one row per chunk). Bad input raises ``ValueError`` naming the problem.

    Under ``torch.compile`` the whole call traces as one graph (``fullgraph=True`` works): the checks on
    shapes, dtypes and options still run at trace time, but the check of the logits' *values* (NaN,
    +inf, a row that is -inf everywhere) is skipped there, because it reads a per-row status back to the
    host. Run a step eagerly to validate data; compiled, such rows give NaN instead of an error.
    """
    if name not in _CODES:
        raise ValueError(f"unknown divergence {name!r}; known: {sorted(_CODES)}")
    code, defaults = _CODES[name]
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"{name} takes parameters {sorted(defaults) or 'none'}, got {sorted(unknown)}")
    pv = {**defaults, **params}
    w = float(next(iter(pv.values()))) if pv else 0.5
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"{next(iter(pv))} must lie in [0, 1], got {w!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")
    check_float("teacher_logits", teacher_logits)
    check_float("student_logits", student_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher and student logits must have the same shape, got "
            f"{tuple(teacher_logits.shape)} vs {tuple(student_logits.shape)}"
        )
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher on {teacher_logits.device} but student on {student_logits.device}")
    if student_logits.dim() < 1 or student_logits.shape[-1] < 1:
        raise ValueError(f"logits need a non-empty last (vocabulary) axis, got {tuple(student_logits.shape)}")
    lead, V = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    be = resolve_backend(backend, student_logits)

    keep = torch.ones(lead, dtype=torch.bool, device=student_logits.device)
    for nm, m in (("mask", mask), ("labels", labels)):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != lead:
            raise ValueError(
                f"{nm} must be a tensor of shape {lead} (the logits without V), "
                f"got {getattr(m, 'shape', type(m).__name__)}"
            )
        keep = keep & (m.to(keep.device).bool() if nm == "mask" else (m.to(keep.device) != ignore_index))
    t = teacher_logits.detach().reshape(-1, V)
    s = student_logits.reshape(-1, V)
    if t.stride(-1) != 1:
        t = t.contiguous()
    if s.stride(-1) != 1:
        s = s.contiguous()
    keep_i = keep.reshape(-1).to(torch.int32).contiguous()
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    rows = _DivergenceRows.apply(t, s, keep_i, code, w, 1.0 / temperature, be, block_v, need_grad)
    if reduction == "none":
        return rows.reshape(lead)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep_i.sum().clamp(min=1).to(rows.dtype)


DIVERGENCES = {name: (lambda t, s, _n=name, **kw: divergence(_n, t, s, **kw)) for name in _CODES}


# =============================================================================================
# demo: a tiny unimodal student fitted to a fixed teacher with each divergence (``make demo``)
# =============================================================================================
def demo_fit(*, V: int = 64, steps: int = 200, lr: float = 0.05, seed: int = 0, backend: str = "torch"):
    """Fit a unimodal student (a discretised Gaussian over ``V`` bins: two parameters, centre and width)
    to a fixed bimodal teacher with each divergence (Adam, full batch). A student that could represent
    the teacher exactly would make every divergence agree; a unimodal one shows what each divergence
    gives up: forward KL covers both modes (mode covering), reverse KL picks one (mode seeking).

    Returns one dict per divergence: final loss, forward KL(p‖q) and reverse KL(q‖p) of the fitted
    student, its probability mass near each teacher mode, its centre (in units of V) and entropy."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(V, dtype=torch.float32)
    bump = lambda c, w: torch.exp(-0.5 * ((x - c) / w) ** 2)
    p = 0.6 * bump(V * 0.25, V / 24) + 0.4 * bump(V * 0.75, V / 24) + 1e-6
    teacher = (p / p.sum()).log()[None] + 0.01 * torch.randn(1, V, generator=g)  # [1, V]
    modes = [(x - V * 0.25).abs() < V / 8, (x - V * 0.75).abs() < V / 8]
    rows = []
    for name in _CODES:
        centre = torch.tensor(0.45, requires_grad=True)  # in units of V, a little left of the middle
        log_width = torch.tensor(math.log(0.2), requires_grad=True)  # in units of V
        opt = torch.optim.Adam([centre, log_width], lr=lr)

        def student(centre=centre, log_width=log_width):  # [1, V] logits of the discretised Gaussian
            return (-0.5 * ((x / V - centre) / log_width.exp()) ** 2)[None]

        for _ in range(steps):
            opt.zero_grad()
            loss = divergence(name, teacher, student(), backend=backend)
            loss.backward()
            opt.step()
        with torch.no_grad():
            s = student()
            q = torch.softmax(s, -1)[0].double()
            rows.append(
                {
                    "divergence": name,
                    "final_loss": float(divergence(name, teacher, s, backend=backend)),
                    "KL(p||q)": float(divergence("forward_kl", teacher, s, backend=backend)),
                    "KL(q||p)": float(divergence("reverse_kl", teacher, s, backend=backend)),
                    "mass_mode_1": float(q[modes[0]].sum()),
                    "mass_mode_2": float(q[modes[1]].sum()),
                    "centre": float(centre),
                    "entropy_q": float(-(q * q.clamp_min(1e-30).log()).sum()),
                }
            )
    return rows


def format_demo_table(rows) -> str:
    cols = list(rows[0])
    out = [" | ".join(f"{c:>15}" for c in cols)]
    out.append("-" * len(out[0]))
    for r in rows:
        out.append(" | ".join(f"{r[c]:>15}" if isinstance(r[c], str) else f"{r[c]:>15.4f}" for c in cols))
    return "\n".join(out)
