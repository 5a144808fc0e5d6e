"""MATCH: sliding-window attention plus query-dependent retrieval of out-of-window in-context tokens.

The NumPy oracle of ``fast/match.py`` (MATCH, arXiv 2606.29844). The paper's method section was not
available; every choice below marked [RECON] is this project's reconstruction, with the alternative named.
One head per call: ``q, k, v [..., T, D]`` (leading axes are batch-like), float64 throughout.

Definitions (w = ``window``, K = ``top_k``, B = ``block_size``, s_ij = scale * q_i . k_j, scale = 1/sqrt(D)
unless given)::

    window        W_i = { j : i - w < j <= i }                 w keys including the query itself
    candidates    C_i = { j : j <= i - w }                     exactly the keys the window cannot see

    token retrieval (B = 1):
        R_i = the K candidates j in C_i with the largest s_ij
    block retrieval (B > 1):
        blocks      b = [bB, (b + 1)B) cut from position 0; summary kbar_b = mean of the block's keys
                    (a partial last block: the mean of the keys it has)
        candidate   block b is a candidate for query i  iff  bB <= i - w  (it holds a key of C_i)
        selection   the K candidate blocks with the largest scale * q_i . kbar_b
        R_i         = the candidate keys (j <= i - w) of the selected blocks
        B <= w is required (ValueError otherwise): then a candidate block ends at
        (b + 1)B - 1 <= i - w + B - 1 < i, so it lies wholly in the past; its summary is causal and can
        be cached while decoding
        (and the partial last block, which starts at >= T - B > T - 1 - w, is never a candidate).

    W_i and R_i are disjoint; selecting every candidate (K >= |C_i|, or K >= the number of candidate
    blocks) gives R_i = C_i, so W_i u R_i = {j <= i}, the full causal past.

    ties          the lower index (token or block) wins
    output idx    [..., T, K] in descending score order; slots beyond the candidate count hold -1
    [RECON] no gradient through the selection: R_i is a constant of the forward pass (NSA's selection
                  branch, MoBA); the gradient flows through the attention over the selected keys.
                  Alternative: a differentiable top-k relaxation.
    [RECON] GQA: query heads sharing a KV head share one selection, chosen by the scores summed over the
                  group's heads (NSA). ``retrieve(..., grouped=True)`` takes the group's queries stacked as
                  ``q [..., G, T, D]`` against ``k [..., T, D]``; G = 1 is plain per-head selection.
                  Alternative: per-query-head selections (G times the gathered keys).
    [RECON] keys are used as given (the tiny GPT passes post-RoPE keys, so a retrieval score is the attention
                  logit). Alternative: pre-RoPE keys, position-free matching.
    [RECON] block summary = mean key (MoBA). Alternatives: Quest's element-wise min/max bound, InfLLM's
                  representative tokens.

Integration (``mode``)::

    partial attention over a key set S:
        L_S = log sum_{j in S} exp(s_ij),   o_S = sum_{j in S} e^{s_ij - L_S} v_j
    (S empty: L_S = -inf, o_S = 0)

    joint (default): one softmax over W_i u R_i. W, R are disjoint, so e^{L_{W u R}} = e^{L_W} + e^{L_R} and
        o = (e^{L_W} o_W + e^{L_R} o_R) / (e^{L_W} + e^{L_R})
      so it is computed as two partial attentions merged by their log-sum-exps (``merge_partials``).
    gated [RECON, the "modulating" of the title; alternative: joint]:
        o = g o_R + (1 - g) o_W,   g = sigmoid(gate_logit_i)
      and o = o_W for a query with R_i empty (its gate gets zero gradient).
      ``gate_logit`` broadcasts to [..., T].

Gradients (``match_attention_grad``), derived by hand. For a partial attention over S with probabilities
P_ij = e^{s_ij - L_S} (j in S, 0 elsewhere) and output cotangent dO (``attention_grad`` of
reference/attention.py, restricted to S)::

    dV = P^T dO,   dS_ij = P_ij (dO_i . v_j - dO_i . o_i),   dQ = scale dS K,   dK = scale dS^T Q

    joint: the above with S = W u R (R held constant).
    gated, a row with R_i non-empty: o = o_W + g (o_R - o_W), so
        dO_R = g dO,   dO_W = (1 - g) dO,   d gate_logit_i = g (1 - g) dO_i . (o_R,i - o_W,i)
      a row with R_i empty: dO_W = dO, d gate_logit_i = 0. The two partial gradients add up.
      ``dgate_logit`` is summed back to ``gate_logit``'s own shape (broadcast axes reduced).

Complexity of this oracle: dense [T, T] masks, O(T^2 D); ``fast/match.py`` is the efficient path.
"""

from __future__ import annotations

import numpy as np

from reference.attention import attention_mask
from reference.nn import sigmoid

MODES = ("joint", "gated")


# ----------------------------------------------------------------------------------------------
# checks


def _check_int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
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


def _scale(D, scale):
    return 1.0 / np.sqrt(D) if scale is None else float(scale)


# ----------------------------------------------------------------------------------------------
# masks and selection


def window_mask(T, *, window):  # int -> [T, T] bool
    """W: query i sees keys i - w < j <= i (``reference.attention``'s causal sliding-window mask)."""
    return attention_mask(T, causal=True, window=window)


def candidate_mask(T, *, window):  # int -> [T, T] bool
    """C: the keys the window cannot see, j <= i - w."""
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    return j <= i - window


def block_summaries(k, block_size):  # [..., T, D] -> [..., ceil(T / B), D]
    """Mean key of each block [bB, (b + 1)B); a partial last block averages the keys it has."""
    k = np.asarray(k, dtype=np.float64)
    T = k.shape[-2]
    starts = range(0, T, block_size)
    return np.stack([k[..., s : s + block_size, :].mean(axis=-2) for s in starts], axis=-2)


def retrieval_scores(q, k, *, window, block_size=1, scale=None, grouped=False):
    # [..., (G,) T, D], [..., T, D] -> [..., T, N]; N = T (tokens) or ceil(T / B) (blocks); -inf: no candidate
    """Selection scores of every (query, token or block); non-candidates are -inf. ``grouped``: q carries a
    group axis before T, and the scores are summed over it (one selection per KV head)."""
    q, k = np.asarray(q, dtype=np.float64), np.asarray(k, dtype=np.float64)
    T, D = k.shape[-2:]
    scale = _scale(D, scale)
    keys = k if block_size == 1 else block_summaries(k, block_size)  # [..., N, D]
    if grouped:
        s = scale * (q @ np.swapaxes(keys, -1, -2)[..., None, :, :])  # [..., G, T, N]
        s = s.sum(axis=-3)  # [..., T, N]
    else:
        s = scale * (q @ np.swapaxes(keys, -1, -2))  # [..., T, N]
    i = np.arange(T)[:, None]
    first = np.arange(keys.shape[-2])[None, :] * block_size  # first key index of each token / block
    return np.where(first <= i - window, s, -np.inf)  # block b is a candidate iff bB <= i - w


def retrieve(q, k, *, window, top_k, block_size=1, scale=None, grouped=False):
    # [..., (G,) T, D], [..., T, D] -> [..., T, top_k] int64
    """Indices (tokens if ``block_size == 1``, else blocks) of the top_k candidates per query, in descending
    score order, ties -> lower index, -1 in slots beyond the candidate count."""
    _check_params(window, top_k, block_size)
    s = retrieval_scores(q, k, window=window, block_size=block_size, scale=scale, grouped=grouped)
    order = np.argsort(-s, axis=-1, kind="stable")  # descending; stable: equal scores keep index order
    n_cand = np.isfinite(s).sum(axis=-1, keepdims=True)  # [..., T, 1]; candidates sort before the -infs
    K = top_k
    if K > s.shape[-1]:  # more slots than tokens / blocks: pad with -1
        pad = np.full(order.shape[:-1] + (K - s.shape[-1],), -1, dtype=order.dtype)
        order = np.concatenate([order, pad], axis=-1)
    idx = order[..., :K]
    return np.where(np.arange(K) < n_cand, idx, -1).astype(np.int64)


def retrieved_mask(idx, T, *, window, block_size=1):  # [..., T, K] -> [..., T, T] bool
    """R as a dense mask: the retrieved keys only (the candidate keys of the selected tokens / blocks)."""
    idx = np.asarray(idx)
    sel = np.zeros(idx.shape[:-1] + (T,), dtype=bool)  # [..., T, T]
    j = np.arange(T)
    for slot in range(idx.shape[-1]):
        b = idx[..., slot : slot + 1]  # [..., T, 1]
        sel |= (b >= 0) & (j // block_size == b)  # the selected token / every key of the selected block
    return sel & candidate_mask(T, window=window)


# ----------------------------------------------------------------------------------------------
# attention


def partial_attention(q, k, v, mask, scale):  # [..., T, D] x3, [..., T, T] -> [..., T, D], [..., T]
    """Softmax attention over the keys in ``mask`` (rows may be empty: out 0, lse -inf)."""
    s = np.where(mask, scale * (q @ np.swapaxes(k, -1, -2)), -np.inf)  # [..., T, T]
    any_ = mask.any(axis=-1, keepdims=True)  # [..., T, 1]
    m = np.where(any_, s.max(axis=-1, keepdims=True), 0.0)  # guard: no -inf - -inf
    p = np.exp(s - m)  # 0 outside mask
    l = p.sum(axis=-1, keepdims=True)
    l_safe = np.where(any_, l, 1.0)
    out = (p / l_safe) @ v
    lse = np.where(any_, m + np.log(l_safe), -np.inf)[..., 0]
    return out, lse


def merge_partials(o_w, lse_w, o_r, lse_r):  # [..., T, D], [..., T] x2 -> [..., T, D], [..., T]
    """One softmax over two disjoint key sets from their partial results (the joint mode):
    o = (e^{L_W} o_W + e^{L_R} o_R) / (e^{L_W} + e^{L_R}); ``lse_w`` must be finite."""
    lse = np.logaddexp(lse_w, lse_r)  # [..., T]
    a_w, a_r = np.exp(lse_w - lse), np.exp(lse_r - lse)  # exp(-inf) = 0 for an empty R
    return a_w[..., None] * o_w + a_r[..., None] * o_r, lse


def _setup(q, k, v, window, top_k, block_size, mode, gate_logit, scale, idx):
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"q, k, v must share a shape [..., T, D]; got {q.shape}, {k.shape}, {v.shape}")
    _check_params(window, top_k, block_size)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    T, D = q.shape[-2:]
    g = None
    if mode == "gated":
        if gate_logit is None:
            raise ValueError("mode='gated' needs gate_logit (broadcastable to [..., T])")
        g = np.broadcast_to(np.asarray(gate_logit, dtype=np.float64), q.shape[:-1])  # [..., T]
    scale = _scale(D, scale)
    if idx is None:
        idx = retrieve(q, k, window=window, top_k=top_k, block_size=block_size, scale=scale)
    elif np.shape(idx) != q.shape[:-1] + (top_k,):
        raise ValueError(
            f"idx must have shape [..., T, top_k] = {q.shape[:-1] + (top_k,)}, got {np.shape(idx)}"
        )
    m_w = np.broadcast_to(window_mask(T, window=window), q.shape[:-1] + (T,))
    m_r = retrieved_mask(idx, T, window=window, block_size=block_size)
    return q, k, v, g, scale, m_w, m_r


def match_attention(
    q, k, v, *, window, top_k, block_size=1, mode="joint", gate_logit=None, scale=None, idx=None
):
    # [..., T, D] x3 (+ gate_logit broadcastable to [..., T]) -> [..., T, D]
    """MATCH attention of one head (see the module docstring). ``idx`` (optional): a selection made
    elsewhere, e.g. ``retrieve(q_group, k, grouped=True)`` shared by a GQA group; default
    ``retrieve(q, k)``."""
    q, k, v, g, scale, m_w, m_r = _setup(q, k, v, window, top_k, block_size, mode, gate_logit, scale, idx)
    o_w, lse_w = partial_attention(q, k, v, m_w, scale)
    o_r, lse_r = partial_attention(q, k, v, m_r, scale)
    if mode == "joint":
        return merge_partials(o_w, lse_w, o_r, lse_r)[0]
    has_r = m_r.any(axis=-1)[..., None]  # [..., T, 1]
    gate = sigmoid(g)[..., None]  # [..., T, 1]
    return np.where(has_r, gate * o_r + (1.0 - gate) * o_w, o_w)


def _partial_grad(q, k, v, mask, dout, scale):  # -> dq, dk, dv of partial_attention's out
    out, lse = partial_attention(q, k, v, mask, scale)
    s = scale * (q @ np.swapaxes(k, -1, -2))
    p = np.where(mask, np.exp(s - np.where(np.isfinite(lse), lse, 0.0)[..., None]), 0.0)  # [..., T, T]
    dv = np.swapaxes(p, -1, -2) @ dout
    dp = dout @ np.swapaxes(v, -1, -2)
    delta = (dout * out).sum(axis=-1, keepdims=True)
    ds = p * (dp - delta)
    return scale * (ds @ k), scale * (np.swapaxes(ds, -1, -2) @ q), dv


def _unbroadcast(g, shape):  # sum a broadcast gradient back to the operand's shape
    g = g.sum(axis=tuple(range(g.ndim - len(shape))))
    return g.sum(axis=tuple(a for a, n in enumerate(shape) if n == 1), keepdims=True).reshape(shape)


def match_attention_grad(
    q, k, v, dout, *, window, top_k, block_size=1, mode="joint", gate_logit=None, scale=None, idx=None
):
    # [..., T, D] x4 -> dq, dk, dv [..., T, D], dgate_logit (gate_logit's shape, or None in joint mode)
    """Hand-derived gradients of ``match_attention`` (the selection is held constant)."""
    q, k, v, g, scale, m_w, m_r = _setup(q, k, v, window, top_k, block_size, mode, gate_logit, scale, idx)
    dout = np.asarray(dout, dtype=np.float64)
    if mode == "joint":
        return (*_partial_grad(q, k, v, m_w | m_r, dout, scale), None)
    has_r = m_r.any(axis=-1)[..., None]  # [..., T, 1]
    gate = sigmoid(g)[..., None]  # [..., T, 1]
    o_w, _ = partial_attention(q, k, v, m_w, scale)
    o_r, _ = partial_attention(q, k, v, m_r, scale)
    d_ow = np.where(has_r, (1.0 - gate) * dout, dout)
    d_or = np.where(has_r, gate * dout, 0.0)
    gw = _partial_grad(q, k, v, m_w, d_ow, scale)
    gr = _partial_grad(q, k, v, m_r, d_or, scale)
    dgate = np.where(has_r, gate * (1.0 - gate) * (dout * (o_r - o_w)).sum(axis=-1, keepdims=True), 0.0)
    dgate = _unbroadcast(dgate[..., 0], np.shape(gate_logit))
    return gw[0] + gr[0], gw[1] + gr[1], gw[2] + gr[2], dgate


def match_attention_by_definition(
    q, k, v, *, window, top_k, block_size=1, mode="joint", gate_logit=None, scale=None
):
    # [T, D] x3 -> [T, D]
    """The oracle's oracle (one head, no batch axes): a loop over queries, selection by sorting Python
    tuples (-score, index), attention by explicit sums."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    _check_params(window, top_k, block_size)
    T, D = q.shape
    scale = _scale(D, scale)
    g = None if gate_logit is None else np.broadcast_to(np.asarray(gate_logit, dtype=np.float64), (T,))
    out = np.zeros((T, D))

    def attend(i, keys):  # -> (o, lse) over a list of key indices
        if not keys:
            return np.zeros(D), -np.inf
        s = np.array([scale * float(q[i] @ k[j]) for j in keys])
        lse = np.logaddexp.reduce(s)
        return sum(np.exp(sj - lse) * v[j] for sj, j in zip(s, keys, strict=True)), lse

    for i in range(T):
        win = [j for j in range(T) if i - window < j <= i]
        if block_size == 1:
            ranked = sorted((-scale * float(q[i] @ k[j]), j) for j in range(T) if j <= i - window)
            ret = sorted(j for _, j in ranked[:top_k])
        else:
            blocks = [b for b in range(-(-T // block_size)) if b * block_size <= i - window]
            kbar = {b: k[b * block_size : (b + 1) * block_size].mean(axis=0) for b in blocks}
            ranked = sorted((-scale * float(q[i] @ kbar[b]), b) for b in blocks)
            chosen = {b for _, b in ranked[:top_k]}
            ret = [j for j in range(T) if j <= i - window and j // block_size in chosen]
        if mode == "joint":
            out[i] = attend(i, win + ret)[0]
        else:
            o_w, o_r = attend(i, win)[0], attend(i, ret)[0]
            gate = sigmoid(g[i])
            out[i] = gate * o_r + (1 - gate) * o_w if ret else o_w
    return out
