"""Softmax attention with a causal / sliding-window mask: the NumPy oracle of ``fast/attention.py``.

Shapes: ``q [..., H_q, T, D]`` and ``k, v [..., H_kv, T, D]`` with ``H_q`` a multiple of ``H_kv``
(grouped-query attention, GQA: query head ``h`` reads kv head ``h // G``, ``G = H_q // H_kv``, i.e. each kv
head is repeated G times in place, ``np.repeat``). ``H_q = H_kv`` is plain multi-head attention, and any
equal shapes ``[..., T, D]`` work too (no head axis needed).

Per head, with ``S = scale * Q K^T`` and ``M`` the boolean mask of allowed (query, key) pairs::

    P   = softmax(S masked to -inf outside M)   # row-wise
    out = P V,        lse_i = log sum_{j in M_i} exp(S_ij)

Mask (``attention_mask`` / the predicate ``allowed``)::

    causal=True,  window=None : j <= i                     (full causal)
    causal=True,  window=w    : i - w < j <= i             (w keys, including the query itself)
    causal=False, window=None : every j                    (bidirectional)
    causal=False, window=w    : |i - j| < w                (symmetric band, 2w - 1 keys)

convention: ``window=w`` counts the query's own key, so ``w = 1`` is the diagonal only and
``w >= T`` equals full causal. This is the convention of native-sparse-attention's naive code and of
this project's tiny GPTs. attention-gym / zoology / FlexAttention examples write ``i - j <= w`` instead,
i.e. ``w + 1`` keys; their ``window_size=w`` is our ``window=w + 1``. Every query row keeps at least its
diagonal, so no row is ever empty.

Gradients (``attention_grad``), derived by hand (``dlse`` is the optional cotangent of ``lse``)::

    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - delta),   delta_i = sum_d dO_id O_id - dlse_i      # softmax Jacobian + d lse/dS = P
    dQ = scale * dS K,       dK = scale * dS^T Q

With GQA, ``dK`` and ``dV`` of a kv head are the sums over the G query heads that read it.

``attention_by_definition`` is the oracle of the oracle: one query at a time, one key at a time.
"""

from __future__ import annotations

import numpy as np


def allowed(i, j, *, causal=True, window=None):  # [...] int, [...] int -> [...] bool (broadcast)
    """The mask as a predicate on (query index i, key index j); notebooks draw it, tests compare it."""
    i, j = np.asarray(i), np.asarray(j)
    ok = np.ones(np.broadcast_shapes(i.shape, j.shape), dtype=bool)  # [...]
    if causal:
        ok &= j <= i
    if window is not None:
        # convention: window counts the query's own key (i - w < j), see the module docstring
        ok &= (i - j) < window
        if not causal:
            ok &= (j - i) < window  # convention: non-causal window = symmetric band |i - j| < w
    return ok


def attention_mask(T, *, causal=True, window=None):  # int -> [T, T] bool
    """Dense mask, rows = queries, columns = keys."""
    idx = np.arange(T)
    return allowed(idx[:, None], idx[None, :], causal=causal, window=window)  # [T, T]


def _check(q, k, v, window):  # [..., H_q, T, D], [..., H_kv, T, D] x2 -> None
    if k.shape != v.shape or (
        q.shape != k.shape
        and not (
            q.ndim >= 3
            and q.shape[:-3] == k.shape[:-3]
            and q.shape[-2:] == k.shape[-2:]
            and q.shape[-3] % k.shape[-3] == 0
        )
    ):
        raise ValueError(
            f"q, k, v must share a shape [..., T, D], or be q [..., H_q, T, D] and "
            f"k, v [..., H_kv, T, D] with H_q a multiple of H_kv; "
            f"got {q.shape}, {k.shape}, {v.shape}"
        )
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 (w keys including the query itself), got {window}")


def _groups(q, k):  # [..., H_q, T, D], [..., H_kv, T, D] -> int G = H_q // H_kv (1 when shapes are equal)
    return 1 if q.shape == k.shape else q.shape[-3] // k.shape[-3]


def repeat_kv(x, G):  # [..., H_kv, T, D], int -> [..., H_kv * G, T, D]  kv head h // G serves query head h
    return x if G == 1 else np.repeat(x, G, axis=-3)


def _scores(q, k, scale, causal, window):  # [..., T, D], [..., T, D] -> [..., T, T], [T, T]
    T, D = q.shape[-2:]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    s = scale * (q @ np.swapaxes(k, -1, -2))  # [..., T, T]
    mask = attention_mask(T, causal=causal, window=window)  # [T, T]
    return np.where(mask, s, -np.inf), mask


def attention(q, k, v, *, causal=True, window=None, scale=None):
    # q [..., H_q, T, D], k, v [..., H_kv, T, D] -> out [..., H_q, T, D], lse [..., H_q, T]
    """Masked softmax attention; returns (out, lse). ``scale`` defaults to 1/sqrt(D); GQA as above."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    _check(q, k, v, window)
    G = _groups(q, k)
    k, v = repeat_kv(k, G), repeat_kv(v, G)  # [..., H_q, T, D]
    s, _ = _scores(q, k, scale, causal, window)  # [..., T, T], -inf where masked
    m = s.max(axis=-1, keepdims=True)  # [..., T, 1], finite: the diagonal is always allowed
    p = np.exp(s - m)  # [..., T, T], exactly 0 where masked
    l = p.sum(axis=-1, keepdims=True)  # [..., T, 1], >= 1
    lse = (m + np.log(l))[..., 0]  # [..., T]
    out = (p / l) @ v  # [..., T, D]
    return out, lse


def attention_grad(q, k, v, dout, *, causal=True, window=None, scale=None, dlse=None):
    # q, dout [..., H_q, T, D], k, v [..., H_kv, T, D] (+ dlse [..., H_q, T]) -> dq, dk, dv shaped as q, k, v
    """Hand-derived (dq, dk, dv) of ``attention``; ``dlse`` (optional) is the cotangent of ``lse``."""
    q, k, v, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, dout))
    _check(q, k, v, window)
    kv_shape, G = k.shape, _groups(q, k)
    k, v = repeat_kv(k, G), repeat_kv(v, G)  # [..., H_q, T, D]
    D = q.shape[-1]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    s, _ = _scores(q, k, scale, causal, window)  # [..., T, T]
    m = s.max(axis=-1, keepdims=True)  # [..., T, 1]
    p = np.exp(s - m)  # [..., T, T]
    p = p / p.sum(axis=-1, keepdims=True)  # [..., T, T] softmax, 0 where masked
    out = p @ v  # [..., T, D]
    dv = np.swapaxes(p, -1, -2) @ dout  # [..., T, D]
    dp = dout @ np.swapaxes(v, -1, -2)  # [..., T, T]
    delta = (dout * out).sum(axis=-1, keepdims=True)  # [..., T, 1]
    if dlse is not None:
        delta = delta - np.asarray(dlse, dtype=np.float64)[..., None]  # d lse_i / d S_ij = P_ij
    ds = p * (dp - delta)  # [..., T, T]
    dq = scale * (ds @ k)  # [..., T, D]
    dk = scale * (np.swapaxes(ds, -1, -2) @ q)  # [..., H_q, T, D]
    if G > 1:  # each kv head collects the gradients of the G query heads that read it
        dk = dk.reshape(*kv_shape[:-2], G, *kv_shape[-2:]).sum(-3)  # [..., H_kv, T, D]
        dv = dv.reshape(*kv_shape[:-2], G, *kv_shape[-2:]).sum(-3)
    return dq, dk, dv


def attention_by_definition(q, k, v, *, causal=True, window=None, scale=None):
    # [T, D] x3 -> [T, D], [T]
    """The oracle's oracle: a loop over queries and keys, straight from the definition (one head)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    _check(q, k, v, window)
    T, D = q.shape
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    out = np.zeros((T, D))  # [T, D]
    lse = np.zeros(T)  # [T]
    for i in range(T):
        keys = [j for j in range(T) if allowed(i, j, causal=causal, window=window)]
        s = np.array([scale * float(q[i] @ k[j]) for j in keys])  # [n_i]
        lse[i] = np.logaddexp.reduce(s)
        w = np.exp(s - lse[i])  # [n_i], sums to 1
        out[i] = sum(wj * v[j] for wj, j in zip(w, keys, strict=True))
    return out, lse


def online_softmax_attention(q, k, v, *, block=16, causal=True, window=None, scale=None):
    # [T, D] x3 -> [T, D], [T]
    """The flash-attention recurrence in NumPy (one head): visit key blocks left to right, keeping a
    running max ``m``, a running denominator ``l`` and an unnormalised accumulator ``acc``; rescale
    both by ``exp(m_old - m_new)`` when the max grows. Equal to ``attention`` up to rounding."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    _check(q, k, v, window)
    T, D = q.shape
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    m = np.full(T, -np.inf)  # [T] running max
    l = np.zeros(T)  # [T] running sum of exp(s - m)
    acc = np.zeros((T, D))  # [T, D] running sum of exp(s - m) v
    idx = np.arange(T)
    for start in range(0, T, block):
        j = idx[start : start + block]  # [Bn]
        s = scale * (q @ k[j].T)  # [T, Bn]
        s = np.where(allowed(idx[:, None], j[None, :], causal=causal, window=window), s, -np.inf)
        m_new = np.maximum(m, s.max(axis=1))  # [T], may stay -inf for a row with nothing seen yet
        m_safe = np.where(np.isneginf(m_new), 0.0, m_new)  # guard: avoid exp(-inf - -inf) = NaN
        alpha = np.exp(m - m_safe)  # [T], 0 while nothing was seen
        p = np.exp(s - m_safe[:, None])  # [T, Bn]
        l = alpha * l + p.sum(axis=1)
        acc = alpha[:, None] * acc + p @ v[j]
        m = m_new
    return acc / l[:, None], m + np.log(l)
