"""Distillation losses at real vocabulary sizes: the lm-head matmul and the loss computed chunk by chunk.

Every loss of this project takes materialised logits ``[N, V]`` for the teacher and the student. At a real
vocabulary (Qwen2.5: V = 151,936) that is where the memory goes: one fp32 ``[2048, V]`` tensor is 1.16 GiB,
and a loss step holds several (MGSR's DAC-KL torch path about sixteen). :func:`fused_distill_loss` starts
from the final hidden states instead and never holds more than ``chunk_rows`` rows of logits of either
model:

    for each chunk of rows [r0, r1):
        s = h_s[r0:r1] @ W_s.T,  t = h_t[r0:r1] @ W_t.T      # [R, V] each, fp32
        for each piece [a, b) of the chunk:                    # loss_rows rows
            loss_p, (ds, d_dac) = the objective on (t, s)[a:b] and its gradient, normalised by the whole batch
            t[a:b] = ds                                        # the piece's teacher rows are no longer read
        dh_s[r0:r1] = t @ W_s;  dW_s += t.T @ h_s[r0:r1]

Two levels because of time, not memory: each chunk reads the whole weight twice and ``dW_s`` once (read
and written), so with a few dozen rows these products are bound by memory traffic (on a 2-core CPU, 36-row
chunks ran 1.4x slower than the unfused loss); a chunk of about a hundred rows keeps them bound by
arithmetic, while the loss's own temporaries (a divergence about 6 copies of ``[C, V]``, MGSR about 20) are
held for one small piece at a time. The chunk's gradient is written over the teacher's logits, so it costs
no third ``[R, V]`` buffer.

The gradients are computed in the forward (as Liger-Kernel's chunked losses do) and scaled by
``grad_output`` in the backward, so peak memory is ``dW_s`` (``[V, H]`` fp32), the chunk's two buffers and
one piece's temporaries. The span term pairs adjacent rows: a chunk (and a piece) also computes the logits
of the row after it, so a span that crosses a boundary is exact (the pair ``(b - 1, b)`` belongs to the
piece ``[a, b)``; row ``b``'s own terms to the next piece, which adds the pair's gradient of row ``b`` to its
own). The per-piece losses are the unfused ones of ``fast.divergences``, ``fast.dac_kl`` and ``fast.span``
(their ``backend``: torch, or the Triton kernels), so the fused path equals the unfused one up to the order
of floating-point sums.

Objectives: ``"ce"`` (mean token cross-entropy over ``labels != ignore_index``), any divergence name of
``fast.divergences`` (mean over ``mask``; its ``params``), and ``"mgsr"``: ``w_sft * CE(labels) + w_token *
DAC-KL(mask) + w_span * span(spans)`` with the given ``fast.dac_kl.DACKL`` (its bounds sub-network gets its
gradient; ``token_loss`` may name a divergence instead, MGSR's ablation), each term normalised as the
trainer's MGSR objective does (CE by labelled rows, the token term by masked rows, the span term by pairs).

Sizes: ``chunk_rows`` (default :func:`default_chunk_rows`: about 144 MiB for the chunk's two fp32 ``[R, V]``
buffers, 124 rows at V = 151,936) and ``loss_rows`` (default :func:`default_loss_rows`: about 48 MiB of the
objective's temporaries, 13 rows for a divergence and 4 for MGSR at that vocabulary), each at least 1 and
at most N (the piece at most the chunk). On a GPU the same budgets serve: at B·T = 1,024 they make 9
chunks, whose products still have 124 rows.

On a CPU (Linux, glibc) the memory a chunk freed is handed back to the system before the next one
(``malloc_trim``): glibc keeps freed blocks under 32 MiB in its heap, and chunks of different temporaries
would otherwise fragment it, growing the resident set by several chunks' worth over a step.
"""

from __future__ import annotations

import math

import torch

from fast.divergences import PARAMS as DIV_PARAMS
from fast.divergences import divergence
from fast.span import pair_rows, span_loss
from fast.utils import check_float

OBJECTIVES = ("ce", "mgsr", *DIV_PARAMS)
COPIES = {"ce": 4, "mgsr": 20}  # fp32 [C, V] temporaries of one loss piece (divergences: 6)
LOGIT_BYTES = 144 * 2**20  # a chunk's two fp32 [R, V] buffers: student logits, teacher logits / gradient
LOSS_BYTES = 48 * 2**20  # one loss piece's temporaries


def default_chunk_rows(n_rows: int, vocab: int, objective: str | None = None) -> int:
    """Rows of logits per chunk: ``LOGIT_BYTES`` of two fp32 ``[R, V]`` buffers, at least 1 and at most N.
    (``objective`` is accepted for symmetry with :func:`default_loss_rows`; the buffers do not depend on
    it.)"""
    return max(1, min(n_rows, LOGIT_BYTES // (2 * 4 * vocab)))


def default_loss_rows(chunk_rows: int, vocab: int, objective: str) -> int:
    """Rows per loss piece: ``LOSS_BYTES`` of the objective's fp32 ``[C, V]`` temporaries, at most the
    chunk."""
    per_row = 4 * vocab * COPIES.get(objective, 6)
    return max(1, min(chunk_rows, LOSS_BYTES // per_row))


_LIBC = None


def _release_freed_memory():  # CPU: return the heap's free pages to the system (glibc); elsewhere a no-op
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC(0)


def _check(h, w, name):
    check_float(f"{name}_hidden", h)
    check_float(f"{name}_weight", w)
    if h.dim() != 2 or w.dim() != 2 or h.shape[1] != w.shape[1]:
        raise ValueError(
            f"{name}_hidden must be [N, H] and {name}_weight [V, H] with the same H, got "
            f"{tuple(h.shape)} and {tuple(w.shape)}"
        )


def _span_pairs(
    spans, n
):  # [S, 2] int rows of the flattened batch -> sorted first rows k of the pairs (k, k+1)
    if spans is None:
        return None
    spans = torch.as_tensor(spans, dtype=torch.int64)
    if spans.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if spans.dim() != 2 or spans.shape[1] != 2:
        raise ValueError(f"spans must be [S, 2] (start, end) rows of the N rows, got {tuple(spans.shape)}")
    s, e = spans[:, 0], spans[:, 1]
    if bool(((s < 0) | (e > n) | (e < s)).any()):
        raise ValueError(f"spans must satisfy 0 <= start <= end <= N={n}")
    return pair_rows(spans[None], n).sort().values


def _add_outer(dw, g, h):  # dw [V, H] += g.T @ h, without a [V, H] temporary
    if g.dtype == dw.dtype and h.dtype == dw.dtype:
        dw.addmm_(g.T, h)
        return
    step = 16384  # mixed dtypes (bf16 weights, fp32 accumulator): a bounded temporary, block by block
    for v0 in range(0, dw.shape[0], step):
        dw[v0 : v0 + step] += (g[:, v0 : v0 + step].T @ h).to(dw.dtype)


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, plan, *dac_params):
        n = hs.shape[0]
        cd = torch.float64 if hs.dtype == torch.float64 else torch.float32  # the losses' compute dtype
        ds_h = torch.zeros_like(hs, dtype=cd)
        dw = torch.zeros_like(ws, dtype=cd)
        d_dac = [torch.zeros_like(p, dtype=cd) for p in dac_params]
        total = torch.zeros((), dtype=torch.float64, device=hs.device)
        parts = {k: torch.zeros((), dtype=torch.float64, device=hs.device) for k in plan.part_names}
        R, C, pairs = plan.chunk, plan.loss_rows, plan.pairs is not None
        for r0 in range(0, n, R):
            r1 = min(r0 + R, n)
            re = r1 + 1 if (pairs and r1 < n) else r1  # the row after the chunk: its pair partner
            s_all = (hs[r0:re] @ ws.T).to(cd)
            t_all = None if ht is None else (ht[r0:re] @ wt.T).to(cd)  # CE needs no teacher
            if plan.vocab is not None:  # a padded vocabulary: -inf in both, as the unfused losses take it
                s_all[:, plan.vocab :] = -math.inf
                if t_all is not None:
                    t_all[:, plan.vocab :] = -math.inf
            # the gradient w.r.t. the logits, row by row as the loss consumes them: in the teacher's rows,
            # which no later loss piece reads (a piece's partner row is overwritten by the next piece)
            G = torch.empty_like(s_all) if t_all is None else t_all
            carry = None  # the partner row's gradient from the previous piece
            for a in range(r0, r1, C):
                b = min(a + C, r1)
                e = b + 1 if (pairs and b < n) else b
                i, j, k = a - r0, b - r0, e - r0
                with torch.enable_grad():
                    s = s_all[i:k].detach().requires_grad_()
                    t = None if t_all is None else t_all[i:k]
                    loss, chunk_parts = plan.chunk_loss(t, s, a, b, e, dac_params)
                    wrt = [s, *dac_params]
                    grads = (
                        torch.autograd.grad(loss, wrt, allow_unused=True)
                        if loss.requires_grad
                        else [None] * len(wrt)
                    )
                total += loss.detach().double()
                for key, v in chunk_parts.items():
                    parts[key] += v.double()
                g = grads[0]
                if g is None:
                    G[i:j] = 0.0
                else:
                    G[i:j] = g[: j - i]
                if carry is not None:
                    G[i : i + 1] += carry
                carry = None if (g is None or k == j) else g[j - i :].clone()
                for acc, gp in zip(d_dac, grads[1:], strict=True):
                    if gp is not None:
                        acc += gp.to(cd)
                del s, t, loss, chunk_parts, grads, g
            if re > r1:
                G[r1 - r0 : re - r0] = 0.0 if carry is None else carry
            del s_all
            if plan.vocab is not None:
                G[:, plan.vocab :] = 0.0  # padded logits are constants (-inf), not functions of h and W
            g = G.to(ws.dtype)  # in the weights' dtype, as autograd through `h @ W.T` would compute it
            ds_h[r0:re] += (g @ ws).to(cd)
            _add_outer(dw, g, hs[r0:re])
            del G, g, t_all, carry
            if hs.device.type == "cpu":
                _release_freed_memory()
        ctx.save_for_backward(ds_h, dw, *d_dac)
        ctx.used = False
        ctx.dtypes = (hs.dtype, ws.dtype, [p.dtype for p in dac_params])
        plan.parts = parts
        return total.to(cd)

    @staticmethod
    def backward(ctx, go):
        if ctx.used:
            raise RuntimeError("fused_distill_loss: backward through the same call twice is not supported")
        ctx.used = True
        ds_h, dw, *d_dac = ctx.saved_tensors
        hdt, wdt, pdts = ctx.dtypes
        go = go.to(ds_h.dtype)
        # scaled in place: the weight gradient ([V, H]) is the largest tensor here, and is not copied
        out = [ds_h.mul_(go).to(hdt), dw.mul_(go).to(wdt), None, None, None]
        out += [g.mul_(go).to(dt) for g, dt in zip(d_dac, pdts, strict=True)]
        return tuple(out)


class _Plan:
    """What one chunk computes: the objective's terms on rows [a, b) (and pairs up to row e - 1),
    normalised by the whole batch's counts."""

    def __init__(
        self,
        objective,
        labels,
        mask,
        pairs,
        dac,
        chunk,
        temperature,
        backend,
        weights,
        token_loss,
        ignore_index,
        vocab,
        params,
    ):
        self.objective, self.labels, self.mask, self.pairs = objective, labels, mask, pairs
        self.dac, self.chunk, self.temperature, self.backend = dac, chunk, temperature, backend
        self.w_sft, self.w_token, self.w_span = weights
        self.token_loss, self.ignore_index, self.vocab, self.params = token_loss, ignore_index, vocab, params
        self.span_squared = bool(params.pop("span_squared", False))
        self.n_labels = int((labels != ignore_index).sum()) if labels is not None else 0
        self.n_mask = int(mask.sum()) if mask is not None else 0
        self.n_pairs = 0 if pairs is None else int(pairs.numel())
        if objective == "ce":
            self.part_names = ("ce",)
        elif objective == "mgsr":
            dac_parts = ("kept", "share", "upper", "lower") if token_loss == "dac_kl" else ()
            self.part_names = ("sft", "token", "span", *dac_parts)
        else:
            self.part_names = (objective,)

    def _ce(self, s, a, b):
        y = self.labels[a:b]
        ok = y != self.ignore_index
        if not bool(ok.any()):
            return s.new_zeros(())  # no term in this chunk (a -inf padded row must not make 0 * inf)
        return torch.nn.functional.cross_entropy(s[: b - a][ok], y[ok], reduction="sum") / self.n_labels

    def _div(self, name, t, s, a, b, params):
        m = self.mask[a:b]
        if not bool(m.any()):
            return s.new_zeros(())  # no term in this chunk (a -inf padded row must not make 0 * inf)
        tot = divergence(
            name,
            t[: b - a],
            s[: b - a],
            mask=m,
            reduction="sum",
            temperature=self.temperature,
            backend=self.backend,
            **params,
        )
        return tot / self.n_mask

    def chunk_loss(self, t, s, a, b, e, dac_params):
        if self.objective == "ce":
            ce = self._ce(s, a, b)
            return ce, {"ce": ce.detach()}
        if self.objective != "mgsr":
            d = self._div(self.objective, t, s, a, b, self.params)
            return d, {self.objective: d.detach()}
        parts, loss = {}, s.new_zeros(())
        if self.labels is not None and self.n_labels:
            ce = self._ce(s, a, b)
            parts["sft"] = ce.detach()
            loss = loss + self.w_sft * ce
        m = self.mask[a:b]
        if self.n_mask and bool(m.any()):
            if self.token_loss == "dac_kl":
                tok_mean, info = self.dac(t[: b - a], s[: b - a], m)
                tok = tok_mean * (int(m.sum()) / self.n_mask)
                for k in ("kept", "share", "upper", "lower"):  # means over the masked rows
                    parts[k] = info[k].double().sum() / self.n_mask
            else:
                own = {k: v for k, v in self.params.items() if k in DIV_PARAMS[self.token_loss]}
                tok = self._div(self.token_loss, t, s, a, b, own)
            parts["token"] = tok.detach()
            loss = loss + self.w_token * tok
        if self.pairs is not None and self.n_pairs and self.w_span:
            k = self.pairs[(self.pairs >= a) & (self.pairs < b)]
            if k.numel():
                spans = torch.stack([k - a, k - a + 2], 1)  # one two-row span per pair: the same pair sum
                sp = span_loss(
                    t[: e - a],
                    s[: e - a],
                    spans,
                    squared=self.span_squared,
                    backend=self.backend,
                    validate=False,
                )
                sp = sp * (k.numel() / self.n_pairs)
                parts["span"] = sp.detach()
                loss = loss + self.w_span * sp
        return loss, parts


def fused_distill_loss(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    *,
    objective,
    labels=None,
    mask=None,
    spans=None,
    dac=None,
    chunk_rows=None,
    loss_rows=None,
    temperature=1.0,
    backend="auto",
    weights=(1.0, 1.0, 1.0),
    token_loss="dac_kl",
    ignore_index=-100,
    vocab=None,
    **params,
):
    """``(loss, parts)`` of ``objective`` on the logits ``h_s @ W_s.T`` and ``h_t @ W_t.T``, never holding
    more than ``chunk_rows`` rows of either (module docstring). ``student_hidden [N, H_s]``,
    ``student_weight [V, H_s]``, ``teacher_hidden [N, H_t]``, ``teacher_weight [V, H_t]`` (the teacher side is
    constant); ``labels [N]`` for CE, ``mask [N]`` bool for the token terms (default: every row), ``spans
    [S, 2]`` row ranges of the N rows for MGSR's span term, ``dac`` a ``fast.dac_kl.DACKL`` (MGSR with
    ``token_loss = "dac_kl"``), ``weights = (w_sft, w_token, w_span)``, ``span_squared`` (a keyword: the
    span term's squared distance), ``vocab``: the real vocabulary when
    the weights' rows are padded beyond it (those logits become -inf in both models). ``parts``: each
    term's value (unweighted, detached) and, with DAC-KL, the mean kept teacher mass. Differentiable
    w.r.t. the student's hidden states, its weight and the DAC-KL sub-network's parameters."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    _check(student_hidden, student_weight, "student")
    n = student_hidden.shape[0]
    if objective == "ce" and teacher_hidden is None:  # cross-entropy reads no teacher
        teacher_weight = None
    else:
        _check(teacher_hidden, teacher_weight, "teacher")
    if teacher_hidden is not None and (
        teacher_hidden.shape[0] != n or teacher_weight.shape[0] != student_weight.shape[0]
    ):
        raise ValueError(
            "teacher and student need the same rows and vocabulary, got hidden "
            f"{tuple(teacher_hidden.shape)} / {tuple(student_hidden.shape)} and weights "
            f"{tuple(teacher_weight.shape)} / {tuple(student_weight.shape)}"
        )
    if objective == "ce" and labels is None:
        raise ValueError("objective='ce' needs labels [N]")
    if labels is not None and tuple(labels.shape) != (n,):
        raise ValueError(f"labels must be [N]=[{n}], got {tuple(labels.shape)}")
    if mask is None:
        mask = torch.ones(n, dtype=torch.bool, device=student_hidden.device)
    elif tuple(mask.shape) != (n,):
        raise ValueError(f"mask must be [N]=[{n}], got {tuple(mask.shape)}")
    mask = mask.bool()
    if objective == "mgsr":
        if token_loss == "dac_kl" and dac is None:
            raise ValueError("objective='mgsr' with token_loss='dac_kl' needs dac (a fast.dac_kl.DACKL)")
        if token_loss != "dac_kl" and token_loss not in DIV_PARAMS:
            raise ValueError(f"token_loss must be 'dac_kl' or a divergence name, got {token_loss!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    pairs = _span_pairs(spans, n) if objective == "mgsr" else None
    if pairs is not None:
        pairs = pairs.to(student_hidden.device)
    V = student_weight.shape[0]
    C = chunk_rows if chunk_rows is not None else default_chunk_rows(n, V, objective)
    if not isinstance(C, int) or C < 1:
        raise ValueError(f"chunk_rows must be an integer >= 1, got {C!r}")
    L = loss_rows if loss_rows is not None else default_loss_rows(C, V, objective)
    if not isinstance(L, int) or not 1 <= L <= C:
        raise ValueError(f"loss_rows must be an integer in [1, chunk_rows={C}], got {L!r}")
    if vocab is not None and not (isinstance(vocab, int) and 1 <= vocab <= V):
        raise ValueError(f"vocab must be an integer in [1, V={V}], got {vocab!r}")
    plan = _Plan(
        objective,
        labels,
        mask,
        pairs,
        dac,
        C,
        float(temperature),
        backend,
        tuple(weights),
        token_loss,
        ignore_index,
        None if vocab == V else vocab,
        params,
    )
    plan.loss_rows = L
    dac_params = tuple(dac.parameters()) if (objective == "mgsr" and token_loss == "dac_kl") else ()
    ht = None if teacher_hidden is None else teacher_hidden.detach()
    wt = None if teacher_weight is None else teacher_weight.detach()
    loss = _Fused.apply(student_hidden, student_weight, ht, wt, plan, *dac_params)
    return loss, {k: v.to(loss.dtype) for k, v in plan.parts.items()}
