"""Rounding-error bookkeeping for the fast-vs-oracle tests: how large an error a float32 computation of a
result must be allowed, in units of its epsilon, where the result is ill-conditioned by construction.

The oracles in ``reference/`` compute the algorithm only; these helpers re-derive, from the oracle's
intermediates, the size of the terms that cancel. The tests pass them to ``fast.testing.assert_close`` as
``slack`` (scaled by a few fp32 epsilons), next to the measured envelopes in the test files.
"""

import numpy as np

import reference.dac_kl as dac
import reference.span as span
from reference.nn import log_softmax, sigmoid

# ------------------------------------------------------------------------------------------------- DAC-KL


def _value_slope_rounding(p, valid, q):  # [N, V], [N, V] bool, [N] -> [N]
    """The value-quantile slope ``(n-1)(s[hi] - s[lo])`` is a difference of neighbouring order statistics:
    in float it loses ``eps (n-1)(|s[lo]| + |s[hi]|)``. Indices as in ``reference.dac_kl.value_quantile``."""
    n = valid.sum(-1)  # [N]
    s = np.sort(np.where(valid, p, np.inf), axis=-1)  # [N, V]
    lo = np.floor(q * (n - 1)).astype(np.int64)  # [N]
    hi = np.minimum(lo + 1, n - 1)
    r = np.arange(len(q))
    return (n - 1) * (np.abs(s[r, lo]) + np.abs(s[r, hi]))


def _mass_slope_rounding(p, valid, q):  # [N, V], [N, V] bool, [N] -> [N]
    """The mass-quantile slope ``(x - d) / x`` loses ``eps (x + d) / x``; 0 where the slope is exactly 0
    (the flat branch of ``reference.dac_kl.mass_quantile``, whose knot search is repeated here)."""
    kappa = np.zeros(len(q))
    for i in range(len(q)):
        v = np.sort(p[i][valid[i]])
        cand = np.concatenate([[0.0], v])
        above = np.array([v[v > x].sum() for x in cand])
        x = cand[above <= q[i]].min()
        m_x = v[v > x].sum()
        d = v[v > x].min() if np.any(v > x) else x
        if x > 0 and (q[i] - m_x) < x:
            kappa[i] = (x + d) / x
    return kappa


def dac_kl_bound_grad_scale(t, s, upper, lower, g=None, **cfg):  # [N, V], [N, V], [N], [N], [N] -> 2 x [N]
    """``(mag_upper, mag_lower)``: the size of the rounding error a float computation of d upper / d lower
    (``reference.dac_kl.dac_kl_grad``) must be allowed, in units of its epsilon.

    These gradients are sums over V of ``G_v dm_v/dtau`` with cancellation: each term's sigmoid argument
    amplifies a relative error of ``p`` by ``beta p``; ``G_v = dL/dw_v`` is itself a difference of terms as
    large as ``p_v / A`` (huge when the band keeps almost nothing); and the quantile slope is a difference
    of neighbouring order statistics (``kappa``, its rounding). So
    ``mag = |slope| sum_v G_abs_v |dm_v/dtau| (1 + beta p_v) + kappa |sum_v G_v dm_v/dtau|`` with ``G_abs``
    the sum of the absolute values of ``G``'s terms."""
    cfg = dac._cfg(cfg)
    f = dac.dac_kl_parts(t, s, upper, lower, **cfg)
    N = f["p"].shape[0]
    g = np.ones(N) if g is None else np.asarray(g, np.float64)
    if not cfg["band"]:
        return np.zeros(N), np.zeros(N)
    p, q, A, B, d = f["p"], f["q"], f["A"][:, None], f["B"][:, None], f["d"]
    if cfg["normalize"]:
        G = (p / A) * (d - f["cross"][:, None] / A) + q / B - p / A
        G_abs = (p / A) * (np.abs(d) + np.abs(f["cross"][:, None] / A)) + q / B + p / A
    else:
        G = p * d - p + q
        G_abs = p * np.abs(d) + p + q
    G = G - np.where(f["active"][:, None], cfg["lam_m"] * p, 0.0)
    G_abs = G_abs + np.where(f["active"][:, None], cfg["lam_m"] * p, 0.0)
    G = np.where(f["onehot"], 0.0, G) if cfg["target"] else G
    G = np.where(f["valid"], G, 0.0)
    beta, gam = f["beta"][:, None], cfg["gamma"]
    r1, r2 = sigmoid(-f["z1"]), sigmoid(-f["z2"])
    a1 = p - f["tau_lo"][:, None]
    a2 = f["tau_hi"][:, None] - p
    dm_dlo = f["m"] * (r1 * (-beta + gam * beta**2 * a1) + r2 * gam * beta**2 * a2)
    dm_dhi = f["m"] * (-r1 * gam * beta**2 * a1 + r2 * (beta - gam * beta**2 * a2))
    s_lo, s_hi = np.sum(G * dm_dlo, -1), np.sum(G * dm_dhi, -1)
    # the level feeding each threshold: value (lower -> tau_lo, upper -> tau_hi), mass (upper -> tau_lo, ...)
    lvl_lo, lvl_hi = (np.asarray(lower, np.float64), np.asarray(upper, np.float64))
    if cfg["bounds"] == "mass":
        lvl_lo, lvl_hi = lvl_hi, lvl_lo
    rounding = _value_slope_rounding if cfg["bounds"] == "value" else _mass_slope_rounding
    klo, khi = rounding(p, f["valid"], lvl_lo), rounding(p, f["valid"], lvl_hi)
    amp = 1.0 + beta * p  # [N, V] how much a relative error of p grows in the sigmoid argument
    mag_lo = np.abs(f["dlo"]) * np.sum(G_abs * np.abs(dm_dlo) * amp, -1) + klo * np.abs(s_lo)
    mag_hi = np.abs(f["dhi"]) * np.sum(G_abs * np.abs(dm_dhi) * amp, -1) + khi * np.abs(s_hi)
    mag_u, mag_l = (mag_hi, mag_lo) if cfg["bounds"] == "value" else (mag_lo, mag_hi)
    return mag_u * np.abs(g), mag_l * np.abs(g)


# --------------------------------------------------------------------------------------------------- span


def span_grad_scale(t, s, spans, squared=False):  # [T, V], [T, V], list -> [T, V]
    """The size of the rounding error a float computation of ``reference.span.span_loss_grad`` must be
    allowed, in units of its epsilon. Two places cancel: ``gq - <gq, q>`` at a dominant token (q near 1:
    terms of size |gq| leave a result of size |gq| (1 - q)), and ``e = q q' - p p'`` when the two products
    nearly agree (each rounded to ~eps of its size ``q q' + p p'``), which ``e / D`` divides by a small
    ``D``. So ``mag = q (|gq| + <|gq|, q>) + q (|dgq| + <|dgq|, q>)`` with ``dgq`` the same scatter of
    ``de = (qq' + pp') / D + |e / D| ||qq' + pp'|| / D`` (``2 (qq' + pp')`` squared)."""
    t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
    k = span.pairs(spans)
    if len(k) == 0:
        return np.zeros_like(s)
    p, q = np.exp(log_softmax(t)), np.exp(log_softmax(s))
    e = q[k] * q[k + 1] - p[k] * p[k + 1]  # [P, V]
    if squared:
        ge = 2.0 * e
    else:
        D = np.sqrt(np.sum(e * e, -1, keepdims=True))
        ge = np.where(D > 0, e / np.where(D > 0, D, 1.0), 0.0)
    ge = ge / len(k)
    gq = np.zeros_like(q)  # [T, V] the gradient w.r.t. q, as the oracle scatters it
    np.add.at(gq, k, ge * q[k + 1])
    np.add.at(gq, k + 1, ge * q[k])
    size = q[k] * q[k + 1] + p[k] * p[k + 1]  # [P, V] the size of the two products e is the difference of
    if squared:
        de = 2.0 * size
    else:
        Dn = np.where(D > 0, D, np.inf)  # D = 0: the zero subgradient, exact
        de = size / Dn + np.abs(e) / Dn * np.sqrt(np.sum(size * size, -1, keepdims=True)) / Dn
    de = de / len(k)
    dgq = np.zeros_like(q)
    np.add.at(dgq, k, de * q[k + 1])
    np.add.at(dgq, k + 1, de * q[k])
    agq = np.abs(gq)
    return q * (agq + np.sum(agq * q, -1, keepdims=True)) + q * (dgq + np.sum(dgq * q, -1, keepdims=True))
