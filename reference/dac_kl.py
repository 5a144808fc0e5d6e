"""DAC-KL (distribution-adaptive clipping KL), the token-level loss of MGSR (arXiv 2407.10068), NumPy float64.

The paper describes the loss in words; its exact equations are reconstructed here, so every step below is
[RECON] unless noted (docs/papers.md lists each choice and the alternative). Per token (row) ``i``:

1. ``p = softmax(t_i)`` (teacher, constant), ``q = softmax(s_i)`` (student), temperature 1.
2. Two *levels* ``0 <= lower < upper <= 1`` (from the bounds sub-network, :func:`mlp_bounds`) become two
   *value thresholds* ``tau_lo <= tau_hi`` on the teacher probabilities:

   * ``bounds="value"`` (default): value quantiles of the multiset of probabilities,
     ``tau_hi = Q_upper(p)``, ``tau_lo = Q_lower(p)`` with linear interpolation between order statistics;
   * ``bounds="mass"`` (alternative): a cumulative-mass window on the descending-sorted distribution,
     ``tau_lo = Qm(upper)`` (the tail beyond cumulative mass ``upper`` is cut), ``tau_hi = Qm(lower)`` (the
     head whose cumulative mass is below ``lower`` is cut); see :func:`mass_quantile` for the interpolation.

   * ``bounds="nontarget"``: the same cumulative-mass window over the *non-target* entries only (the
     target class left out of the sorted list), at the masses ``upper r`` and ``lower r`` with
     ``r = 1 - p_c`` the non-target mass: the levels are shares of the non-target mass, and scaling the
     non-target probabilities scales both thresholds alike, so the band (and the share it keeps) does not
     depend on the teacher's confidence. With ``"mass"`` a teacher with ``p_c > upper`` keeps no
     non-target entry at all; with ``"value"`` the band follows the vocabulary's many near-zero entries.

   All three are piecewise linear and continuous in the level, so the loss is differentiable in the bounds.
3. A soft band mask ``m_v = sigma(beta (p_v - tau_lo)) * sigma(beta (tau_hi - p_v))``,
   ``beta = 1 / (gamma (tau_hi - tau_lo) + eps)``.
4. Target class ``c = argmax_v t_v`` (teacher logits; the lowest index wins a tie). With ``target=True`` the
   vectors are ``[m * p ; p_c]`` and ``[m * q ; q_c]`` with ``m_c := 0`` (V+1 entries); with ``target=False``
   they are ``m * p`` and ``m * q`` (``m_c`` keeps its sigmoid value).
5. ``normalize=True`` (default): KL between the renormalised vectors; ``normalize=False``: the
   generalised KL ``sum a log(a/b) - a + b`` of the literal unnormalised vectors.
6. ``floor=True`` (default; a DEVIATION from the paper, which has no such term): add
   ``lam_m * relu(rho_min - kept)``, ``kept = sum_{v != c} m_v p_v`` (the teacher mass the band keeps), so the
   sub-network cannot shrink the band to nothing. It depends on the bounds only, not on the student. With
   ``bounds="nontarget"`` the floor is on the share of the non-target mass the levels span,
   ``lam_m * relu(rho_min - (upper - lower))`` (an absolute floor of 0.5 could never be met by a teacher
   whose non-target mass is 0.01).

Everything is written with per-entry weights ``w`` (``w_v = m_v``; ``w_c = 1`` when ``target``): because the
ratio ``(w_v p_v) / (w_v q_v) = p_v / q_v``, the normalised KL is
``(1/A) sum_v w_v p_v (log p_v - log q_v) + log B - log A`` with ``A = sum w p``, ``B = sum w q``; no epsilon
is needed and everything stays in log-space. The same identity lets the Triton kernel stream over V.

Ablations (the paper's Table 3b): ``band=False`` ("w/o high-density") sets ``m == 1`` (no clipping; the
target entry plus the whole rest of the distribution, i.e. plain KL when ``target=True`` and normalised);
``target=False`` ("w/o target-class"); fixed clipping = constant ``upper, lower`` (no sub-network).

-inf teacher logits are padding: those entries are left out of the quantile multiset (convention) and
contribute nothing; the student must be -inf at least where the teacher is (checked).
"""

import numpy as np

from reference.nn import gelu, gelu_grad, log_softmax, sigmoid

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


def _cfg(cfg):  # dict -> dict
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown DAC-KL option(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **cfg}
    if out["bounds"] not in BOUNDS:
        raise ValueError(f"bounds must be one of {BOUNDS}, got {out['bounds']!r}")
    return out


def check_inputs(t, s, upper, lower):  # [N, V], [N, V], [N], [N] -> None
    if t.ndim != 2 or t.shape != s.shape:
        raise ValueError(f"teacher/student logits must both be [N, V], got {t.shape} and {s.shape}")
    if upper.shape != (t.shape[0],) or lower.shape != (t.shape[0],):
        raise ValueError(f"upper/lower must be [N]={t.shape[0]}, got {upper.shape} and {lower.shape}")
    if np.any(~np.isfinite(upper)) or np.any(~np.isfinite(lower)) or np.any(upper > 1) or np.any(lower < 0):
        raise ValueError(
            f"bounds must lie in [0, 1]; got upper in [{upper.min()}, {upper.max()}], "
            f"lower in [{lower.min()}, {lower.max()}]"
        )
    if np.any(lower >= upper):
        i = int(np.argmax(lower >= upper))
        raise ValueError(
            f"need lower < upper for every token; row {i} has lower={lower[i]} >= upper={upper[i]}"
        )
    valid = np.isfinite(t)
    if np.any(valid.sum(-1) == 0):
        raise ValueError("a teacher row is entirely -inf (no valid vocabulary entry)")
    if np.any(valid & np.isneginf(s)):
        raise ValueError("student logits are -inf where the teacher's are finite; padding must be shared")


def value_quantile(p, valid, q):  # [N, V], [N, V] bool, [N] -> ([N] tau, [N] dtau/dq)
    """q-quantile of the multiset of valid probabilities, linear interpolation between order statistics
    (numpy's default 'linear' method): ``idx = q (n-1)``, ``Q = s[lo] + (idx - lo) (s[lo+1] - s[lo])``."""
    n = valid.sum(-1)  # [N]
    s = np.sort(np.where(valid, p, np.inf), axis=-1)  # [N, V] valid values first, ascending
    idx = q * (n - 1)  # [N]
    lo = np.floor(idx).astype(np.int64)  # [N]
    hi = np.minimum(lo + 1, n - 1)  # [N]
    frac = idx - lo  # [N]
    r = np.arange(len(q))
    s_lo, s_hi = s[r, lo], s[r, hi]  # [N], [N]
    # convention: at an exact order statistic (frac = 0) the derivative is the right-hand slope
    return s_lo + frac * (s_hi - s_lo), (n - 1) * (s_hi - s_lo)


def mass_quantile(p, valid, q):  # [N, V], [N, V] bool, [N] -> ([N] tau, [N] dtau/dq)
    """Cumulative-mass quantile: the value threshold at which the descending-sorted distribution has
    accumulated mass ``q``, made continuous by linear interpolation between the knots ``(C_k, d_k)``
    (``d_k`` the k-th largest probability, ``C_k = d_1 + ... + d_k``, plus the knot ``(0, d_1)``).

    Written the way the Triton kernel finds it without sorting: ``x* = min{x in {0} U p : M(x) <= q}`` with
    ``M(x) = sum_v p_v [p_v > x]`` (monotone in x), ``d = min{p_v > x*}`` (``x*`` if none), then
    ``tau = d + min((q - M(x*)) / x*, 1) (x* - d)`` (``tau = x*`` when ``x* = 0``)."""
    tau, dtau = np.zeros(len(q)), np.zeros(len(q))
    for i in range(len(q)):  # by the definition, one row at a time
        v = np.sort(p[i][valid[i]])  # [n] ascending
        cand = np.concatenate([[0.0], v])  # [n+1]
        above = np.array([v[v > x].sum() for x in cand])  # [n+1] M(x)
        x = cand[above <= q[i]].min()
        m_x = v[v > x].sum()
        d = v[v > x].min() if np.any(v > x) else x
        if x > 0 and (q[i] - m_x) < x:
            tau[i], dtau[i] = d + (q[i] - m_x) / x * (x - d), (x - d) / x
        else:
            tau[i], dtau[i] = x, 0.0
    return tau, dtau


def thresholds(p, valid, upper, lower, bounds, onehot):  # [N, V], [N, V], [N], [N], str, [N, V] -> 4 x [N]
    """Return ``(tau_lo, tau_hi, dtau_lo/d(level), dtau_hi/d(level))``; which level feeds which threshold
    depends on ``bounds`` (value: lower->tau_lo, upper->tau_hi; mass and nontarget: upper->tau_lo,
    lower->tau_hi). ``onehot``: the target class (nontarget leaves it out)."""
    if bounds == "value":
        lo, dlo = value_quantile(p, valid, lower)
        hi, dhi = value_quantile(p, valid, upper)
    elif bounds == "mass":
        lo, dlo = mass_quantile(p, valid, upper)
        hi, dhi = mass_quantile(p, valid, lower)
    else:  # nontarget: the mass quantiles of the non-target entries at the masses upper r, lower r
        pn, vn = np.where(onehot, 0.0, p), valid & ~onehot
        r = nontarget_mass(p, onehot)
        lo, dlo = mass_quantile(pn, vn, upper * r)
        hi, dhi = mass_quantile(pn, vn, lower * r)
        dlo, dhi = dlo * r, dhi * r
    return lo, hi, dlo, dhi


def nontarget_mass(p, onehot):  # [N, V], [N, V] -> [N]
    """``r = 1 - p_c``, summed over the non-target entries (no cancellation when p_c is close to 1)."""
    return np.sum(np.where(onehot, 0.0, p), -1)


def _forward(t, s, upper, lower, cfg):  # [N, V], [N, V], [N], [N], dict -> dict of [N] / [N, V]
    t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
    upper, lower = np.asarray(upper, np.float64), np.asarray(lower, np.float64)
    check_inputs(t, s, upper, lower)
    N, V = t.shape
    valid = np.isfinite(t)  # [N, V]
    lp, lq = log_softmax(t), log_softmax(s)  # [N, V]
    p, q = np.exp(lp), np.exp(lq)  # [N, V]
    c = np.argmax(t, axis=-1)  # [N]  convention: argmax of the teacher *logits*, lowest index on ties
    onehot = np.arange(V)[None, :] == c[:, None]  # [N, V]
    tau_lo, tau_hi, dlo, dhi = thresholds(p, valid, upper, lower, cfg["bounds"], onehot)
    beta = 1.0 / (cfg["gamma"] * (tau_hi - tau_lo) + cfg["eps"])  # [N]
    z1 = beta[:, None] * (p - tau_lo[:, None])  # [N, V]
    z2 = beta[:, None] * (tau_hi[:, None] - p)  # [N, V]
    m = sigmoid(z1) * sigmoid(z2) if cfg["band"] else np.ones_like(p)  # [N, V]
    m = np.where(valid, m, 0.0)
    mk = np.where(onehot, 0.0, m) if cfg["target"] else m  # [N, V] mask entries (target handled apart)
    w = np.where(onehot, 1.0, m) if cfg["target"] else m  # [N, V] weight of each entry in the KL
    with np.errstate(invalid="ignore"):  # -inf - -inf on padded entries, discarded by the where
        d = np.where(p > 0, lp - lq, 0.0)  # [N, V] log p - log q; 0 * (anything) = 0 where p = 0
    A, B = np.sum(w * p, -1), np.sum(w * q, -1)  # [N]
    cross = np.sum(w * p * d, -1)  # [N]
    if cfg["normalize"]:
        kl = cross / A + np.log(B) - np.log(A)
    else:
        kl = cross - A + B
    kept = np.sum(mk * p, -1)  # [N]
    spanned = upper - lower if cfg["bounds"] == "nontarget" else kept  # what the floor holds up
    active = (cfg["rho_min"] - spanned > 0) & cfg["floor"]  # [N] convention: relu'(0) = 0
    reg = np.where(active, cfg["lam_m"] * (cfg["rho_min"] - spanned), 0.0)
    return dict(
        loss=kl + reg,
        kl=kl,
        reg=reg,
        kept=kept,
        p=p,
        q=q,
        d=d,
        w=w,
        m=m,
        mk=mk,
        A=A,
        B=B,
        cross=cross,
        z1=z1,
        z2=z2,
        beta=beta,
        tau_lo=tau_lo,
        tau_hi=tau_hi,
        dlo=dlo,
        dhi=dhi,
        active=active,
        onehot=onehot,
        valid=valid,
        target_class=c,
    )


def dac_kl(t, s, upper, lower, **cfg):  # [N, V], [N, V], [N], [N] -> [N]
    """Per-token DAC-KL loss (KL of the clipped vectors plus the kept-mass floor term if ``floor``)."""
    return _forward(t, s, upper, lower, _cfg(cfg))["loss"]


def dac_kl_parts(t, s, upper, lower, **cfg):  # [N, V], [N, V], [N], [N] -> dict of [N] / [N, V]
    """All intermediates (kl, reg, kept, thresholds, mask, target class) for tests and notebooks."""
    return _forward(t, s, upper, lower, _cfg(cfg))


def dac_kl_grad(t, s, upper, lower, g=None, **cfg):  # [N, V], [N, V], [N], [N], [N] -> [N, V], [N], [N]
    """Hand-derived gradient of ``sum_i g_i * dac_kl(...)_i`` w.r.t. student logits, upper and lower.

    Student: ``dL/ds_j = w_j (q_j / B - p_j / A)`` (normalised) or ``w_j (q_j - p_j) + (A - B) q_j``.
    Bounds: ``dL/dw_v = (p_v / A)(d_v - cross/A) + q_v / B - p_v / A`` (normalised) or
    ``p_v d_v - p_v + q_v``, plus ``-lam_m p_v`` from an active floor; then through
    ``m = sigma(z1) sigma(z2)`` (with ``beta`` depending on both thresholds) and the quantile slopes:
    ``dm/dtau_lo = m [(1 - sigma(z1)) (-beta + gamma beta^2 a1) + (1 - sigma(z2)) gamma beta^2 a2]``,
    ``dm/dtau_hi = m [-(1 - sigma(z1)) gamma beta^2 a1 + (1 - sigma(z2)) (beta - gamma beta^2 a2)]``
    with ``a1 = p - tau_lo``, ``a2 = tau_hi - p``."""
    cfg = _cfg(cfg)
    f = _forward(t, s, upper, lower, cfg)
    N = f["p"].shape[0]
    g = np.ones(N) if g is None else np.asarray(g, np.float64)
    p, q, w, A, B, d = f["p"], f["q"], f["w"], f["A"][:, None], f["B"][:, None], f["d"]
    if cfg["normalize"]:
        ds = w * (q / B - p / A)
        G = (p / A) * (d - f["cross"][:, None] / A) + q / B - p / A  # [N, V] dL/dw
    else:
        ds = w * (q - p) + (A - B) * q
        G = p * d - p + q
    if cfg["bounds"] != "nontarget":  # the floor on kept (nontarget: on upper - lower, added below)
        G = G - np.where(f["active"][:, None], cfg["lam_m"] * p, 0.0)
    G = np.where(f["onehot"], 0.0, G) if cfg["target"] else G  # m_c is not used when target
    G = np.where(f["valid"], G, 0.0)
    if cfg["band"]:
        beta, gam = f["beta"][:, None], cfg["gamma"]
        r1, r2 = sigmoid(-f["z1"]), sigmoid(-f["z2"])  # 1 - sigma(z1), 1 - sigma(z2)
        a1 = p - f["tau_lo"][:, None]  # [N, V]
        a2 = f["tau_hi"][:, None] - p  # [N, V]
        dm_dlo = f["m"] * (r1 * (-beta + gam * beta**2 * a1) + r2 * gam * beta**2 * a2)
        dm_dhi = f["m"] * (-r1 * gam * beta**2 * a1 + r2 * (beta - gam * beta**2 * a2))
        s_lo, s_hi = np.sum(G * dm_dlo, -1), np.sum(G * dm_dhi, -1)  # [N] dL/dtau_lo, dL/dtau_hi
        d_lo = s_lo * f["dlo"]  # [N] dL / d(level feeding tau_lo)
        d_hi = s_hi * f["dhi"]
    else:
        d_lo = d_hi = np.zeros(N)
    if cfg["bounds"] == "value":
        d_upper, d_lower = d_hi, d_lo
    else:
        d_upper, d_lower = d_lo, d_hi
    if cfg["bounds"] == "nontarget":  # d/d(upper, lower) of lam_m (rho_min - (upper - lower)) where active
        d_upper = d_upper - np.where(f["active"], cfg["lam_m"], 0.0)
        d_lower = d_lower + np.where(f["active"], cfg["lam_m"], 0.0)
    return ds * g[:, None], d_upper * g, d_lower * g


# ---------------------------------------------------------------- bounds sub-network (Eq. 6, [RECON])


def features(t, k):  # [N, V], int -> [N, k+1]
    """Permutation-invariant features of the teacher distribution: the top-k probabilities in descending
    order (zero-padded when V < k) and the entropy (nats). The sub-network input is constant (stop-grad)."""
    lp = log_softmax(np.asarray(t, np.float64))
    p = np.exp(lp)
    top = -np.sort(-p, axis=-1)[:, :k]  # [N, min(k, V)]
    top = np.pad(top, ((0, 0), (0, k - top.shape[1])))  # [N, k]
    ent = -np.sum(np.where(p > 0, p * lp, 0.0), -1, keepdims=True)  # [N, 1]
    return np.concatenate([top, ent], -1)


def mlp_init(rng, n_in, hidden=256):  # Generator, int, int -> dict of arrays
    """``Linear(n_in, h) -> GELU -> Linear(h, h) -> GELU -> Linear(h, 2)``, uniform(+-1/sqrt(fan_in)) init
    (torch.nn.Linear's default), explicit generator. The last layer starts at zero bias."""

    def lin(i, o):  # int, int -> ([i, o], [o])
        b = 1.0 / np.sqrt(i)
        return rng.uniform(-b, b, (i, o)), rng.uniform(-b, b, o)

    W1, b1 = lin(n_in, hidden)
    W2, b2 = lin(hidden, hidden)
    W3, b3 = lin(hidden, 2)
    return dict(W1=W1, b1=b1, W2=W2, b2=b2, W3=W3, b3=np.zeros(2))


def mlp_bounds(params, x, u_min=0.5):  # dict, [N, F] -> ([N] upper, [N] lower, cache)
    """``(a, b) = f_sub(x)``; ``upper = u_min + (1 - u_min) sigma(a)``, ``lower = upper * sigma(b)``, so
    ``0 <= lower < upper <= 1`` by construction."""
    h1 = x @ params["W1"] + params["b1"]
    a1 = gelu(h1)
    h2 = a1 @ params["W2"] + params["b2"]
    a2 = gelu(h2)
    o = a2 @ params["W3"] + params["b3"]  # [N, 2]
    sa, sb = sigmoid(o[:, 0]), sigmoid(o[:, 1])
    upper = u_min + (1.0 - u_min) * sa
    lower = upper * sb
    return upper, lower, dict(x=x, h1=h1, a1=a1, h2=h2, a2=a2, sa=sa, sb=sb, upper=upper, u_min=u_min)


def mlp_bounds_backward(params, cache, d_upper, d_lower):  # dict, dict, [N], [N] -> dict of arrays
    """Gradients of ``sum(d_upper * upper + d_lower * lower)`` w.r.t. every parameter (hand-derived)."""
    sa, sb, upper = cache["sa"], cache["sb"], cache["upper"]
    du_tot = d_upper + d_lower * sb  # lower = upper * sb
    da = du_tot * (1.0 - cache["u_min"]) * sa * (1.0 - sa)
    db = d_lower * upper * sb * (1.0 - sb)
    do = np.stack([da, db], -1)  # [N, 2]
    gW3, gb3 = cache["a2"].T @ do, do.sum(0)
    dh2 = (do @ params["W3"].T) * gelu_grad(cache["h2"])
    gW2, gb2 = cache["a1"].T @ dh2, dh2.sum(0)
    dh1 = (dh2 @ params["W2"].T) * gelu_grad(cache["h1"])
    gW1, gb1 = cache["x"].T @ dh1, dh1.sum(0)
    return dict(W1=gW1, b1=gb1, W2=gW2, b2=gb2, W3=gW3, b3=gb3)
