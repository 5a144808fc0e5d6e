"""MATCH (arXiv 2606.29844): sliding-window attention plus query-dependent retrieval of out-of-window tokens.

Oracle and definitions: ``reference/match.py`` (window, candidates, token / block retrieval, ties, the joint
and gated integrations, the gradients). In one line: query i attends to its window ``i - w < j <= i`` plus
``R_i``, the ``top_k`` out-of-window keys (``j <= i - w``) with the largest ``scale * q_i . k_j`` (or the
candidate keys of the ``top_k`` blocks with the largest ``scale * q_i . mean_key(block)``); ties go to the
lower index. Public API::

    match_attention(q, k, v, *, window, top_k, block_size=1, mode="joint", gate_logit=None, scale=None,
                    backend="auto")                                          -> out [B, H_q, T, D]
    retrieve(q, k, *, window, top_k, block_size=1, scale=None, backend="auto")
                                                                             -> idx [B, H_kv, T, top_k] int64
    match_decode(q, k_cache, v_cache, *, window, top_k, ..., summaries=None) -> out [B, H_q, 1, D]
    block_summaries(k, block_size)                                            -> [B, H_kv, ceil(T / B), D]
    update_block_summaries(summaries, k_cache, block_size)                   -> the same, after appending keys
    match_attention_kv(q, k, v, *, key_valid=None, ...)                      -> Tq <= Tk, padding (torch)

Shapes: ``q [B, H_q, T, D]``, ``k, v [B, H_kv, T, D]``, ``H_q`` a multiple of ``H_kv`` (query head h reads
kv head ``h // (H_q // H_kv)``). ``idx`` holds token indices (``block_size == 1``) or block indices, in
descending score order, -1 in slots beyond the candidate count. ``gate_logit`` (gated mode only) broadcasts
to ``[B, H_q, T]``.

Choices (all [RECON]; the paper's method section was not available, alternatives in docs/match.md):

* [RECON] no gradient through the selection (NSA's selection branch, MoBA): ``idx`` is computed under
  ``torch.no_grad``; autograd differentiates the attention over the selected keys (and ``gate_logit``).
* [RECON] GQA: one selection per KV head from the scores summed over its query heads (NSA). By linearity
  this is the score of the summed query, which is what is computed (G times fewer dot products; equal up
  to rounding, so only near-ties below the rounding level can differ from the oracle's order).
* [RECON] block summary = mean key (MoBA); summaries are kept in fp32 (fp64 for fp64 inputs).
* [RECON] joint mode (one softmax over window and retrieved keys) is the default; gated mode,
  ``o = sigmoid(gate_logit) o_R + (1 - sigmoid(gate_logit)) o_W``, is the "modulating" alternative.

Torch backend: a loop over chunks of ``TORCH_CHUNK`` queries; per chunk, the scores against every
candidate (``[chunk, T]`` tokens or ``[chunk, ceil(T / B)]`` blocks) under no_grad, a *stable* descending
sort (equal scores keep their index order: the lower index wins, exactly), the retrieved keys -- while the
chunk has at most ``DENSE_RETRIEVED * top_k * B`` candidate keys, scored all at once with one product and the
selection as a mask; beyond that a gather of each row's selected keys and values (``[chunk, top_k * B, D]``)
-- and the window keys of the chunk (``[chunk, chunk + w - 1]``), two partial attentions with their
log-sum-exps and the merge
``o = (e^{L_W} o_W + e^{L_R} o_R) / (e^{L_W} + e^{L_R})``. No ``[T, T]`` tensor beyond one chunk.

Complexity per head (T tokens, w window, K = top_k, B = block_size, D head dim):

=======================  ==========================  ===============================
part                     time                        memory (torch backend, saved)
=======================  ==========================  ===============================
window attention         O(T w D)                    O(T w)
token scoring (B = 1)    O(T^2 D) + sort O(T^2 log)  O(chunk T) transient
block scoring            O(T^2 D / B)                O(chunk T / B) transient
retrieved attention      O(T K B D)                  O(T K B D) (gathered keys/values)
decode, one token        O(T D / B + (w + K B) D)    summaries O(T D / B) when cached
=======================  ==========================  ===============================

Token retrieval is quadratic in T (scoring only, no softmax over it); block retrieval divides that by B.
"""

from __future__ import annotations

import math

import torch

from fast.utils import check_float, resolve_backend

__all__ = [
    "match_attention",
    "match_attention_kv",
    "retrieve",
    "match_decode",
    "block_summaries",
    "update_block_summaries",
    "MODES",
    "TORCH_CHUNK",
    "DENSE_RETRIEVED",
]

TORCH_CHUNK = 128  # query rows per step of the torch backend
# the torch backend's retrieved part scores a chunk's rows against all its candidate keys at once (one
# shared product, the selection as a mask) while there are at most DENSE_RETRIEVED * top_k * block_size of
# them, and gathers each row's selected keys beyond that (see _torch_match)
DENSE_RETRIEVED = 8
MODES = ("joint", "gated")


# ----------------------------------------------------------------------------------------------
# validation


def _check_int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def _check_params(window, top_k, block_size):
    _check_int("window", window, 1)
    _check_int("top_k", top_k, 0)
    _check_int("block_size", block_size, 1)
    if block_size > window:
        raise ValueError(
            f"block_size={block_size} must be <= window={window} (candidate blocks then lie "
            "wholly in the past)"
        )


def _validate(q, k, v, window, top_k, block_size, mode, gate_logit, scale, *, need_v=True):
    """Checks shapes ``q [B, H_q, Tq, D]``, ``k, v [B, H_kv, Tk, D]`` with Tq <= Tk; returns the resolved
    scale (float). Callers with Tq == Tk only check that themselves."""
    named = (("q", q), ("k", k), ("v", v)) if need_v else (("q", q), ("k", k))
    for name, t in named:
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(t.shape)}")
    ts = [t for _, t in named]
    if len({t.dtype for t in ts}) != 1:
        raise ValueError(f"q, k, v must share a dtype, got {[t.dtype for t in ts]}")
    if len({t.device for t in ts}) != 1:
        raise ValueError(f"q, k, v must be on one device, got {[str(t.device) for t in ts]}")
    if need_v and k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    B, Hq, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if B != Bk or D != Dk or Tq > Tk:
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on B and D, with "
            "T_q <= T_k ([B, H, T, D])"
        )
    if min(B, Hq, Hkv, Tq, D) < 1:
        raise ValueError(f"empty dimension: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"H_q={Hq} must be a multiple of H_kv={Hkv} (grouped-query attention)")
    _check_params(window, top_k, block_size)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "gated":
        if gate_logit is None:
            raise ValueError(f"mode='gated' needs gate_logit, broadcastable to [B, H_q, T] = {[B, Hq, Tq]}")
        check_float("gate_logit", gate_logit)
        if gate_logit.device != q.device:
            raise ValueError(f"gate_logit is on {gate_logit.device}, q on {q.device}")
        try:
            ok = torch.broadcast_shapes(gate_logit.shape, (B, Hq, Tq)) == (B, Hq, Tq)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"gate_logit of shape {tuple(gate_logit.shape)} does not broadcast to "
                f"[B, H_q, T] = {[B, Hq, Tq]}"
            )
    elif gate_logit is not None:
        raise ValueError("gate_logit is only used by mode='gated' (got one with mode='joint')")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


def _check_key_valid(key_valid, k):
    if key_valid is None:
        return None
    if not isinstance(key_valid, torch.Tensor) or tuple(key_valid.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_valid must be a [B, T_k] = {[k.shape[0], k.shape[2]]} tensor, got "
            f"{getattr(key_valid, 'shape', type(key_valid).__name__)}"
        )
    if key_valid.device != k.device:
        raise ValueError(f"key_valid is on {key_valid.device}, k on {k.device}")
    return key_valid.bool()


# ----------------------------------------------------------------------------------------------
# block summaries


def _cdt(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def block_summaries(k, block_size, *, key_valid=None):  # [B, H, T, D] -> [B, H, ceil(T / B), D]
    """Mean key of each block ``[bB, (b + 1)B)`` (a partial last block: the mean of the keys it has), in
    fp32 (fp64 for fp64 keys). With ``key_valid [B, T]``: the mean of the block's valid keys (0 if none)."""
    check_float("k", k)
    if k.dim() != 4:
        raise ValueError(f"k must be [B, H, T, D], got shape {tuple(k.shape)}")
    _check_int("block_size", block_size, 1)
    key_valid = _check_key_valid(key_valid, k)
    Bt, H, T, D = k.shape
    nb = -(-T // block_size)
    kc = k.to(_cdt(k))
    w = torch.ones(Bt, T, dtype=kc.dtype, device=k.device) if key_valid is None else key_valid.to(kc.dtype)
    pad = nb * block_size - T
    kc = torch.nn.functional.pad(kc * w[:, None, :, None], (0, 0, 0, pad))  # [B, H, nb * Bs, D]
    w = torch.nn.functional.pad(w, (0, pad))  # [B, nb * Bs]
    sums = kc.view(Bt, H, nb, block_size, D).sum(3)  # [B, H, nb, D]
    counts = w.view(Bt, nb, block_size).sum(2)  # [B, nb]
    return sums / counts.clamp_min(1)[:, None, :, None]


def update_block_summaries(summaries, k_cache, block_size, *, key_valid=None):
    # [B, H, nb_old, D], [B, H, T, D] -> [B, H, ceil(T / B), D]
    """Summaries after keys were appended to the cache: the complete old blocks are kept, the last old
    block (maybe partial before) and the new ones are recomputed from ``k_cache``."""
    keep = max(summaries.shape[2] - 1, 0)
    start = keep * block_size
    kv = None if key_valid is None else key_valid[:, start:]
    return torch.cat(
        [
            summaries[:, :, :keep].to(_cdt(k_cache)),
            block_summaries(k_cache[:, :, start:], block_size, key_valid=kv),
        ],
        dim=2,
    )


# ----------------------------------------------------------------------------------------------
# torch backend


def _select(qs, kc, summ, pos, window, top_k, block_size, scale, key_valid, cum_valid):
    """Selection for one chunk (no grad). ``qs [B, H_kv, c, D]`` summed queries of each group, ``kc``
    ``[B, H_kv, Tk, D]`` keys, ``summ [B, H_kv, nb, D]`` block summaries or None, ``pos [c]`` key index of
    each query, ``cum_valid [B, Tk + 1]`` prefix counts of valid keys or None. -> idx [B, H_kv, c, K]."""
    Tk = kc.shape[2]
    if top_k == 0:
        return torch.empty(qs.shape[:3] + (0,), dtype=torch.long, device=kc.device)
    keys = kc if block_size == 1 else summ  # [B, H_kv, N, D]
    N = keys.shape[2]
    s = (qs @ keys.transpose(-1, -2)) * scale  # [B, H_kv, c, N]
    first = torch.arange(N, device=kc.device) * block_size  # first key of each token / block
    last_cand = pos[:, None] - window  # [c, 1]: candidates are keys j <= pos - w
    cand = (first[None, :] <= last_cand)[None, None]  # [1, 1, c, N]
    if key_valid is not None:  # a block is a candidate iff it holds a valid candidate key
        hi = torch.minimum(first[None, :] + block_size, last_cand + 1).clamp(0, Tk)  # [c, N]
        n_valid = cum_valid[:, hi] - cum_valid[:, first.clamp_max(Tk)][:, None, :]  # [B, c, N]
        cand = cand & (n_valid > 0)[:, None]
    s = s.masked_fill(~cand, float("-inf"))
    # stable descending sort: equal scores keep index order, so ties go to the lower index exactly;
    # non-candidates (-inf) sort after every candidate
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :top_k]  # [B, H_kv, c, <=K]
    if order.shape[-1] < top_k:
        order = torch.nn.functional.pad(order, (0, top_k - order.shape[-1]), value=-1)
    n_cand = cand.sum(-1, keepdim=True)  # [B or 1, 1, c, 1]
    slot = torch.arange(top_k, device=kc.device)
    return torch.where(slot < n_cand, order, torch.full_like(order, -1))


def _partial(s, mask, v):
    """Softmax attention over the keys in ``mask`` (rows may be empty: out 0, lse -inf), NaN-free in the
    forward and the backward. ``s [..., c, M]``, ``mask`` broadcastable, ``v [..., c or 1, M, D]``: values
    per query row (a batched product of 1-row matrices), or shared by the rows (one matrix product, the
    values never copied per row)."""
    s = s.masked_fill(~mask, float("-inf"))
    has = mask.any(-1, keepdim=True).expand(s.shape[:-1] + (1,))  # [..., c, 1]
    m = torch.where(has, s.amax(-1, keepdim=True), torch.zeros_like(s[..., :1])).detach()  # shift only
    e = torch.exp(s - m)  # 0 where masked
    l = e.sum(-1, keepdim=True)
    l_safe = torch.where(has, l, torch.ones_like(l))
    if v.shape[-3] == 1:  # shared values: [..., c, M] @ [..., M, D]
        out = (e / l_safe) @ v.squeeze(-3)
    else:  # per-row values: [..., c, 1, M] @ [..., c, M, D]
        out = ((e / l_safe).unsqueeze(-2) @ v).squeeze(-2)
    lse = torch.where(has, m + torch.log(l_safe), torch.full_like(l, float("-inf")))
    return out, lse[..., 0], has[..., 0]


def _integrate(mode, o_w, lse_w, o_r, lse_r, has_r, gc, a, b):
    """The window and retrieved partials of one chunk -> its output."""
    if mode == "joint":  # one softmax over window u retrieved, from the two partials
        lse = torch.logaddexp(lse_w, lse_r)  # lse_w is finite: a query always sees itself
        return torch.exp(lse_w - lse)[..., None] * o_w + torch.exp(lse_r - lse)[..., None] * o_r
    # gated; nothing retrieved: o = o_w and a zero gate gradient
    g = torch.where(has_r, torch.sigmoid(gc[..., a:b]), torch.zeros_like(lse_r))
    return o_w + g[..., None] * (o_r - o_w)


def _torch_match(
    q,
    k,
    v,
    window,
    top_k,
    block_size,
    mode,
    gate,
    scale,
    *,
    key_valid=None,
    summaries=None,
    chunk=TORCH_CHUNK,
    return_idx=False,
):
    """q [B, H_q, Tq, D], k, v [B, H_kv, Tk, D] (queries = the last Tq positions), gate [B, H_q, Tq] or
    None, key_valid [B, Tk] bool or None. Returns out [B, H_q, Tq, D] in q.dtype (or idx if return_idx)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    cdt = _cdt(q)
    dev = q.device
    qc = q.to(cdt).view(B, Hkv, G, Tq, D)
    kc = k.to(cdt)
    vc = None if return_idx else v.to(cdt)
    gc = None if gate is None else gate.to(cdt).reshape(B, Hkv, G, Tq)
    summ = None
    if block_size > 1 and top_k > 0:
        summ = block_summaries(k, block_size, key_valid=key_valid) if summaries is None else summaries.to(cdt)
    cum_valid = None
    if key_valid is not None:
        cum_valid = torch.nn.functional.pad(key_valid.long().cumsum(1), (1, 0))  # [B, Tk + 1]
    offset = Tk - Tq
    if top_k > 0 and not return_idx:
        # keys / values as rows of whole blocks, [B * H_kv * nbk, block_size * D], the last block zero-padded:
        # a selected block is one contiguous row, fetched by index_select (a row copy; its backward adds rows)
        nbk = -(-Tk // block_size)
        pad = nbk * block_size - Tk
        k_rows = torch.nn.functional.pad(kc, (0, 0, 0, pad)).reshape(B * Hkv * nbk, block_size * D)
        v_rows = torch.nn.functional.pad(vc, (0, 0, 0, pad)).reshape(B * Hkv * nbk, block_size * D)
        row0 = (torch.arange(B * Hkv, device=dev) * nbk).view(B, Hkv, 1, 1)
    outs, idxs = [], []
    for a in range(0, Tq, chunk):
        b = min(a + chunk, Tq)
        pos = torch.arange(offset + a, offset + b, device=dev)  # [c] key index of each query
        qg = qc[:, :, :, a:b]  # [B, H_kv, G, c, D]
        # --- selection (no gradient through it)
        with torch.no_grad():
            idx = _select(qg.sum(2), kc, summ, pos, window, top_k, block_size, scale, key_valid, cum_valid)
        if return_idx:
            idxs.append(idx)
            continue
        # --- window part: keys lo .. hi - 1 cover the chunk's windows
        lo, hi = max(0, offset + a - window + 1), offset + b
        j = torch.arange(lo, hi, device=dev)
        ok_w = (j[None, :] <= pos[:, None]) & (j[None, :] > pos[:, None] - window)  # [c, L]
        ok_w = ok_w[None, None, None]  # [1, 1, 1, c, L]
        if key_valid is not None:  # pad keys are out, except a query's own position
            ok_w = ok_w & (key_valid[:, lo:hi][:, None, None, None] | (j[None, :] == pos[:, None]))
        s_w = (qg @ kc[:, :, None, lo:hi].transpose(-1, -2)) * scale  # [B, H_kv, G, c, L]
        o_w, lse_w, _ = _partial(s_w, ok_w, vc[:, :, None, None, lo:hi])  # [B, H_kv, G, c, D], [.., c]
        n_cand = max(0, min(offset + b - window, Tk))  # candidate keys: j <= pos - w of the chunk's last row
        if top_k == 0 or n_cand == 0:  # nothing can be retrieved: sliding-window attention
            if mode == "gated":  # keep the gate in the graph with an exactly zero gradient
                zero = torch.zeros_like(lse_w)
                o_w = o_w + torch.where(zero.bool(), torch.sigmoid(gc[..., a:b]), zero)[..., None]
            outs.append(o_w)
            continue
        # --- retrieved part
        c = b - a
        if n_cand <= DENSE_RETRIEVED * top_k * block_size:
            # few candidates: score the chunk's rows against all of them with one product and keep each
            # row's selected blocks by a mask (a per-row gather of K * B keys would copy more than it saves)
            nb = -(-n_cand // block_size)
            sel = torch.zeros(B, Hkv, c, nb + 1, dtype=torch.bool, device=dev)
            sel.scatter_(-1, torch.where(idx >= 0, idx, nb), True)  # an empty slot marks the spare column
            j = torch.arange(n_cand, device=dev)
            ok_r = sel[..., :nb].repeat_interleave(block_size, -1)[..., :n_cand] & (
                j <= pos[:, None] - window
            )
            if key_valid is not None:
                ok_r = ok_r & key_valid[:, None, None, :n_cand]
            s_r = (qg @ kc[:, :, None, :n_cand].transpose(-1, -2)) * scale  # [B, H_kv, G, c, n_cand]
            o_r, lse_r, has_r = _partial(s_r, ok_r[:, :, None], vc[:, :, None, None, :n_cand])
            outs.append(_integrate(mode, o_w, lse_w, o_r, lse_r, has_r, gc, a, b))
            continue
        # many candidates: gather each row's selected keys / values
        if block_size == 1:
            tok = idx  # [B, H_kv, c, K]
            ok_r = idx >= 0
        else:
            tok = (idx[..., None] * block_size + torch.arange(block_size, device=dev)).flatten(-2)
            ok_r = (idx >= 0).repeat_interleave(block_size, -1) & (tok <= pos[:, None] - window) & (tok < Tk)
        if key_valid is not None:
            kv_all = key_valid[:, None, None, :].expand(B, Hkv, c, Tk)
            ok_r = ok_r & torch.gather(kv_all, 3, tok.clamp(0, Tk - 1))
        M = tok.shape[-1]  # top_k * block_size keys per query row, slot-major
        rows = (row0 + idx.clamp_min(0)).reshape(-1)  # an empty slot (-1) fetches block 0, masked by ok_r
        k_r = k_rows.index_select(0, rows).view(B, Hkv, 1, c, M, D)
        v_r = v_rows.index_select(0, rows).view(B, Hkv, 1, c, M, D)
        s_r = (qg.unsqueeze(-2) @ k_r.transpose(-1, -2)).squeeze(-2) * scale  # [B, H_kv, G, c, M]
        o_r, lse_r, has_r = _partial(s_r, ok_r[:, :, None], v_r)
        outs.append(_integrate(mode, o_w, lse_w, o_r, lse_r, has_r, gc, a, b))
    if return_idx:
        return torch.cat(idxs, dim=2)
    return torch.cat(outs, dim=3).reshape(B, Hq, Tq, D).to(q.dtype)


# ----------------------------------------------------------------------------------------------
# backend choice


def _backend(backend, q, top_k, k_len, window, block_size):
    """-> ('torch', None) or ('triton', module). "auto" takes Triton only for CUDA tensors the kernels
    support (fp16/bf16/fp32, D <= 128, top_k clamped to the candidate count <= their MAX_TOP_K); with
    "triton" the kernels reject the rest."""
    resolved = resolve_backend(backend, q)
    if resolved == "torch":
        return "torch", None
    from fast import match_triton as mod  # imported on first use: importing it compiles nothing

    if backend == "auto":
        fits = q.dtype in (torch.float16, torch.bfloat16, torch.float32) and q.shape[-1] <= 128
        if not fits or min(top_k, mod.candidates(k_len, window, block_size)) > mod.MAX_TOP_K:
            return "torch", None
    return "triton", mod


def _expand_gate(gate_logit, q):
    if gate_logit is None:
        return None
    B, Hq, Tq, _ = q.shape
    return gate_logit.expand(B, Hq, Tq).contiguous()


# ----------------------------------------------------------------------------------------------
# public API


def match_attention(
    q, k, v, *, window, top_k, block_size=1, mode="joint", gate_logit=None, scale=None, backend="auto"
):
    """MATCH attention ``out [B, H_q, T, D]`` (input dtype); differentiable in q, k, v and gate_logit.

    ``window=w``: query i sees keys i - w < j <= i, plus the retrieved out-of-window keys (see the module
    docstring). ``mode`` "joint" (one softmax) or "gated" (needs ``gate_logit`` broadcastable to
    ``[B, H_q, T]``). ``backend``: "auto" (Triton for CUDA tensors the kernels of fast/match_triton.py
    support, else torch), "torch" or "triton"."""
    scale = _validate(q, k, v, window, top_k, block_size, mode, gate_logit, scale)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same T "
            "(match_attention_kv / match_decode take a longer key sequence)"
        )
    name, mod = _backend(backend, q, top_k, k.shape[2], window, block_size)
    gate = _expand_gate(gate_logit, q)
    if name == "triton":
        return mod.match_attention_triton(
            q,
            k,
            v,
            window=window,
            top_k=top_k,
            block_size=block_size,
            mode=mode,
            gate_logit=gate,
            scale=scale,
        )
    return _torch_match(q, k, v, window, top_k, block_size, mode, gate, scale)


def match_attention_kv(
    q,
    k,
    v,
    *,
    window,
    top_k,
    block_size=1,
    mode="joint",
    gate_logit=None,
    scale=None,
    key_valid=None,
    chunk=TORCH_CHUNK,
):
    """Torch backend with ``T_q <= T_k`` (the queries are the *last* T_q key positions, as in KV-cache
    decoding) and an optional padding mask ``key_valid [B, T_k]``: invalid keys are never candidates, never
    in a block summary, and never in a window except as a query's own position (a query always sees
    itself). Block boundaries stay at multiples of ``block_size`` of the key index. ``chunk``: query rows
    per step."""
    scale = _validate(q, k, v, window, top_k, block_size, mode, gate_logit, scale)
    key_valid = _check_key_valid(key_valid, k)
    _check_int("chunk", chunk, 1)
    return _torch_match(
        q,
        k,
        v,
        window,
        top_k,
        block_size,
        mode,
        _expand_gate(gate_logit, q),
        scale,
        key_valid=key_valid,
        chunk=chunk,
    )


def retrieve(q, k, *, window, top_k, block_size=1, scale=None, backend="auto"):
    """The selection ``idx [B, H_kv, T, top_k]`` int64: token indices (``block_size == 1``) or block indices,
    descending score, ties -> lower index, -1 in empty slots; one selection per KV head (GQA: scores summed
    over the group's query heads)."""
    scale = _validate(q, k, None, window, top_k, block_size, "joint", None, scale, need_v=False)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same T")
    name, mod = _backend(backend, q, top_k, k.shape[2], window, block_size)
    if name == "triton":
        return mod.retrieve_triton(q, k, window=window, top_k=top_k, block_size=block_size, scale=scale)
    with torch.no_grad():
        return _torch_match(q, k, None, window, top_k, block_size, "joint", None, scale, return_idx=True)


def match_decode(
    q,
    k_cache,
    v_cache,
    *,
    window,
    top_k,
    block_size=1,
    mode="joint",
    gate_logit=None,
    scale=None,
    summaries=None,
    key_valid=None,
    backend="auto",
):
    """One new token against a KV cache: ``q [B, H_q, 1, D]``, ``k_cache, v_cache [B, H_kv, T, D]`` whose
    last position is the new token's own key. Equals the last row of ``match_attention`` over the T tokens.

    ``summaries`` (block retrieval): ``block_summaries(k_cache, block_size)`` (or kept up to date with
    ``update_block_summaries``), ``[B, H_kv, ceil(T / B), D]``; computed here when None. ``key_valid
    [B, T]`` (padding, torch backend only): as in ``match_attention_kv``; given summaries must then have
    been built with the same ``key_valid``."""
    scale = _validate(q, k_cache, v_cache, window, top_k, block_size, mode, gate_logit, scale)
    if q.shape[2] != 1:
        raise ValueError(f"match_decode takes one query position, got q {tuple(q.shape)}")
    key_valid = _check_key_valid(key_valid, k_cache)
    if summaries is not None:
        B, Hkv, T, D = k_cache.shape
        want = (B, Hkv, -(-T // block_size), D)
        if not isinstance(summaries, torch.Tensor) or tuple(summaries.shape) != want:
            raise ValueError(
                f"summaries must be a tensor of shape [B, H_kv, ceil(T / B), D] = {list(want)}, "
                f"got {getattr(summaries, 'shape', type(summaries).__name__)}"
            )
        if summaries.device != q.device:
            raise ValueError(f"summaries are on {summaries.device}, q on {q.device}")
    name, mod = (
        _backend(backend, q, top_k, k_cache.shape[2], window, block_size)
        if key_valid is None
        else ("torch", None)
    )
    gate = _expand_gate(gate_logit, q)
    if name == "triton":
        return mod.match_decode_triton(
            q,
            k_cache,
            v_cache,
            window=window,
            top_k=top_k,
            block_size=block_size,
            mode=mode,
            gate_logit=gate,
            scale=scale,
            summaries=summaries,
        )
    return _torch_match(
        q,
        k_cache,
        v_cache,
        window,
        top_k,
        block_size,
        mode,
        gate,
        scale,
        key_valid=key_valid,
        summaries=summaries,
    )
