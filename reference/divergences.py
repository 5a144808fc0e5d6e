"""Token-level distillation divergences: the NumPy float64 oracle.

Every function works row by row over the last axis of logits shaped ``[..., V]`` (teacher first,
student second) and returns one loss per row ``[...]``; each ``NAME_grad`` returns the hand-derived
gradient of that per-row loss with respect to the *student logits*, ``[..., V]``.

With ``a = t / τ``, ``b = s / τ``: ``log p = a − lse(a)`` (teacher), ``log q = b − lse(b)`` (student).

=====================  ===========================================  ===========================
name                   loss                                         params (range)
=====================  ===========================================  ===========================
``forward_kl``         KL(p‖q) = Σ p (log p − log q)
``reverse_kl``         KL(q‖p)
``symmetric_kl``       KL(p‖q) + KL(q‖p)
``js_divergence``      β·KL(p‖m) + (1−β)·KL(q‖m),  m = βp + (1−β)q    ``beta`` ∈ [0, 1], 0.5
``tv_distance``        ½ Σ |p − q|
``skew_forward_kl``    KL(p ‖ αp + (1−α)q)         (DistiLLM SKL)   ``alpha`` ∈ [0, 1], 0.1
``skew_reverse_kl``    KL(q ‖ (1−α)p + αq)         (DistiLLM SRKL)  ``alpha`` ∈ [0, 1], 0.1
=====================  ===========================================  ===========================

Gradients. For a loss L(q) with ``g_v = ∂L/∂q_v``, the softmax Jacobian gives
``∂L/∂b_k = q_k (g_k − Σ_v q_v g_v)`` and ``∂L/∂s = (1/τ) ∂L/∂b``. Per divergence (``r = log q − log p``):

* forward KL: ``∂L/∂b = q − p``;
* reverse KL: ``∂L/∂b = q ⊙ (r − KL(q‖p))``;
* JSD(β): ``g = (1−β)(log q − log m)`` (the other terms cancel because ``Σ m = 1``), so
  ``∂L/∂b = (1−β) q ⊙ (log q − log m − KL(q‖m))``;
* TV: ``g = ½ sign(q − p)`` (subgradient ``sign(0) = 0``);
* skew forward KL: ``g = −(1−α) p/m``, so ``∂L/∂b = −(1−α) q ⊙ (p/m − Σ q p/m)``;
* skew reverse KL: ``∂L/∂b = q ⊙ [(log q − log m − L) − α (q/m − Σ q²/m)]``.

Conventions (each has a test in ``tests/test_divergences.py`` named ``test_convention_*``):

* convention: **KL, not soft cross-entropy.** ``forward_kl`` is Σ p (log p − log q). DistiLLM's
  ``forward_kl`` returns the soft cross-entropy −Σ p log q = KL + H(p): the same gradient in q, a
  different value (not 0 at p = q).
* convention: **no τ² factor anywhere in this module or in ``fast.divergences``.** The loss is the
  divergence between the two *softened* distributions. Hinton-style training multiplies by τ² in
  the training loop (so gradient magnitudes do not shrink as 1/τ²); that is the caller's choice.
* convention: **−inf marks a padded vocabulary entry, shared by teacher and student.** Such an entry
  has p = q = m = 0 and contributes exactly 0 to the loss and 0 to the gradient (0·log 0 = 0, never
  NaN). A position that is −inf in one and finite in the other, a row that is −inf everywhere, NaN or
  +inf are ``ValueError`` (a support mismatch would make some divergences infinite).
* convention: **mixtures in log space**: ``log m = logaddexp(log β + log p, log(1−β) + log q)``, not
  ``log(β p + (1−β) q)`` (which underflows to −inf, then NaN, for logits of magnitude ~1e3).
* convention: **degenerate ends are the formula's values, not a switch to another loss.** JSD at
  β ∈ {0, 1} and both skew losses at α = 1 are identically 0 (m equals one of the two arguments).
  Skew KLs at α = 0 are exactly forward/reverse KL. Some peers special-case β ∈ {0, 1} of JSD to a
  plain KL instead; here ``forward_kl``/``reverse_kl`` are separate names.
* Batch reduction (mean over tokens, masks) is not here: these are per-row values. ``fast``
  averages over unmasked tokens ("token mean"), not over sequences ("batchmean").
"""

from __future__ import annotations

import numpy as np

from reference.nn import log_softmax

__all__ = [
    "forward_kl",
    "forward_kl_grad",
    "reverse_kl",
    "reverse_kl_grad",
    "symmetric_kl",
    "symmetric_kl_grad",
    "js_divergence",
    "js_divergence_grad",
    "tv_distance",
    "tv_distance_grad",
    "skew_forward_kl",
    "skew_forward_kl_grad",
    "skew_reverse_kl",
    "skew_reverse_kl_grad",
    "DIVERGENCES",
    "PARAMS",
    "validate_logits",
    "log_softmax",
]

# name -> {param: default}; the only keyword parameters each divergence accepts besides temperature
PARAMS: dict[str, dict[str, float]] = {
    "forward_kl": {},
    "reverse_kl": {},
    "symmetric_kl": {},
    "js_divergence": {"beta": 0.5},
    "tv_distance": {},
    "skew_forward_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.1},
}


def validate_logits(t, s, temperature=1.0, **params):  # [..., V], [..., V] -> (t, s) float64
    """Check shapes, finiteness (−inf allowed, shared), temperature and parameters; ValueError otherwise."""
    t = np.asarray(t, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    if t.shape != s.shape:
        raise ValueError(f"teacher and student logits must have the same shape, got {t.shape} vs {s.shape}")
    if t.ndim < 1 or t.shape[-1] < 1:
        raise ValueError(f"logits need a non-empty last (vocabulary) axis, got shape {t.shape}")
    for who, x in (("teacher", t), ("student", s)):
        if np.isnan(x).any() or np.isposinf(x).any():
            raise ValueError(f"{who} logits contain NaN or +inf (only -inf, for padded entries, is allowed)")
    if (np.isneginf(t) != np.isneginf(s)).any():
        raise ValueError(
            "-inf (padded vocabulary) entries must be at the same positions in teacher and student"
        )
    if np.isneginf(t).all(axis=-1).any():
        raise ValueError("a row of logits is -inf everywhere: no distribution to compare")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")
    for k, v in params.items():
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"{k} must lie in [0, 1], got {v!r}")
    return t, s


def _logs(t, s, temperature, **params):  # [..., V] x2 -> log p, log q, valid  (each [..., V])
    t, s = validate_logits(t, s, temperature, **params)
    valid = np.isfinite(t)  # padded entries (-inf in both) contribute nothing
    return log_softmax(t / temperature), log_softmax(s / temperature), valid


def _kl_terms(la, lb, valid):  # log a, log b [..., V] -> a (log a − log b), 0 where padded [..., V]
    # convention: 0·log 0 = 0 -- padded positions are masked, never evaluated as (-inf) - (-inf)
    d = np.where(valid, la - np.where(valid, lb, 0.0), 0.0)
    return np.where(valid, np.exp(la), 0.0) * d


def _log_mix(w, la, lb):  # log(w·a + (1−w)·b) in log space, w ∈ [0, 1]  -> [..., V]
    with np.errstate(divide="ignore"):
        lw, l1w = np.log(w), np.log1p(-w)  # -inf at the ends: logaddexp handles it exactly
    return np.logaddexp(lw + la, l1w + lb)


def _softmax_vjp(q, g, valid):  # q, g [..., V] -> q ⊙ (g − Σ q g)  [..., V]
    g = np.where(valid, g, 0.0)
    return q * (g - np.sum(q * g, axis=-1, keepdims=True))


# ---- forward KL -----------------------------------------------------------------------------------
def forward_kl(t, s, *, temperature=1.0):  # [..., V], [..., V] -> [...]
    lp, lq, valid = _logs(t, s, temperature)
    return np.sum(_kl_terms(lp, lq, valid), axis=-1)


def forward_kl_grad(t, s, *, temperature=1.0):  # -> ∂/∂s [..., V]
    lp, lq, valid = _logs(t, s, temperature)
    return (np.exp(lq) - np.exp(lp)) / temperature  # exp(-inf) = 0 on padded entries


# ---- reverse KL -----------------------------------------------------------------------------------
def reverse_kl(t, s, *, temperature=1.0):  # [..., V], [..., V] -> [...]
    lp, lq, valid = _logs(t, s, temperature)
    return np.sum(_kl_terms(lq, lp, valid), axis=-1)


def reverse_kl_grad(t, s, *, temperature=1.0):  # -> [..., V]
    lp, lq, valid = _logs(t, s, temperature)
    q = np.exp(lq)
    r = np.where(valid, lq - np.where(valid, lp, 0.0), 0.0)  # log q − log p  [..., V]
    return _softmax_vjp(q, r, valid) / temperature  # Σ q r = KL(q‖p): the "− L" of the docstring


# ---- symmetric KL ---------------------------------------------------------------------------------
def symmetric_kl(t, s, *, temperature=1.0):  # -> [...]
    return forward_kl(t, s, temperature=temperature) + reverse_kl(t, s, temperature=temperature)


def symmetric_kl_grad(t, s, *, temperature=1.0):  # -> [..., V]
    return forward_kl_grad(t, s, temperature=temperature) + reverse_kl_grad(t, s, temperature=temperature)


# ---- generalised Jensen-Shannon (GKD) ------------------------------------------------------------
def js_divergence(t, s, *, temperature=1.0, beta=0.5):  # -> [...]
    lp, lq, valid = _logs(t, s, temperature, beta=beta)
    lm = _log_mix(beta, lp, lq)  # log(βp + (1−β)q)  [..., V]
    return beta * np.sum(_kl_terms(lp, lm, valid), -1) + (1 - beta) * np.sum(_kl_terms(lq, lm, valid), -1)


def js_divergence_grad(t, s, *, temperature=1.0, beta=0.5):  # -> [..., V]
    lp, lq, valid = _logs(t, s, temperature, beta=beta)
    lm = _log_mix(beta, lp, lq)
    g = (1 - beta) * np.where(valid, lq - np.where(valid, lm, 0.0), 0.0)  # ∂L/∂q  [..., V]
    return _softmax_vjp(np.exp(lq), g, valid) / temperature


# ---- total variation ------------------------------------------------------------------------------
def tv_distance(t, s, *, temperature=1.0):  # -> [...]
    lp, lq, valid = _logs(t, s, temperature)
    return 0.5 * np.sum(np.abs(np.exp(lp) - np.exp(lq)), axis=-1)


def tv_distance_grad(t, s, *, temperature=1.0):  # -> [..., V]
    lp, lq, valid = _logs(t, s, temperature)
    p, q = np.exp(lp), np.exp(lq)
    return _softmax_vjp(q, 0.5 * np.sign(q - p), valid) / temperature  # sign(0) = 0: a subgradient


# ---- DistiLLM skew KLs ----------------------------------------------------------------------------
def skew_forward_kl(t, s, *, temperature=1.0, alpha=0.1):  # KL(p ‖ αp + (1−α)q) -> [...]
    lp, lq, valid = _logs(t, s, temperature, alpha=alpha)
    return np.sum(_kl_terms(lp, _log_mix(alpha, lp, lq), valid), axis=-1)


def skew_forward_kl_grad(t, s, *, temperature=1.0, alpha=0.1):  # -> [..., V]
    lp, lq, valid = _logs(t, s, temperature, alpha=alpha)
    lm = _log_mix(alpha, lp, lq)
    q = np.exp(lq)
    # q ⊙ p/m formed in log space: at α = 0, p/m = p/q alone can overflow where q underflows
    qw = np.where(valid, np.exp(lq + lp - np.where(valid, lm, 0.0)), 0.0)  # [..., V]
    return -(1 - alpha) * (qw - q * np.sum(qw, axis=-1, keepdims=True)) / temperature


def skew_reverse_kl(t, s, *, temperature=1.0, alpha=0.1):  # KL(q ‖ (1−α)p + αq) -> [...]
    lp, lq, valid = _logs(t, s, temperature, alpha=alpha)
    return np.sum(_kl_terms(lq, _log_mix(alpha, lq, lp), valid), axis=-1)


def skew_reverse_kl_grad(t, s, *, temperature=1.0, alpha=0.1):  # -> [..., V]
    lp, lq, valid = _logs(t, s, temperature, alpha=alpha)
    lm = _log_mix(alpha, lq, lp)  # log(αq + (1−α)p)
    lqm = np.where(valid, lq - np.where(valid, lm, 0.0), 0.0)  # log q − log m  [..., V]
    q = np.exp(lq)
    # ∂L/∂q_v = log q_v − log m_v + 1 − α q_v/m_v; the constant 1 cancels in the softmax VJP.
    # α q²/m is formed in log space: at α = 0, q/m = q/p alone can overflow (0·inf = NaN).
    with np.errstate(divide="ignore"):
        aqqm = np.where(valid, np.exp(np.log(alpha) + lq + lqm), 0.0)  # α q²/m  [..., V]
    return (_softmax_vjp(q, lqm, valid) - (aqqm - q * np.sum(aqqm, axis=-1, keepdims=True))) / temperature


DIVERGENCES = {
    "forward_kl": (forward_kl, forward_kl_grad),
    "reverse_kl": (reverse_kl, reverse_kl_grad),
    "symmetric_kl": (symmetric_kl, symmetric_kl_grad),
    "js_divergence": (js_divergence, js_divergence_grad),
    "tv_distance": (tv_distance, tv_distance_grad),
    "skew_forward_kl": (skew_forward_kl, skew_forward_kl_grad),
    "skew_reverse_kl": (skew_reverse_kl, skew_reverse_kl_grad),
}
