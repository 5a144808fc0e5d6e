"""The few building blocks every oracle shares, written once: log-softmax, softmax, sigmoid and GELU.

Float64 NumPy, row-wise over the last axis. The attention mask is in ``reference/attention.py``
(``allowed``, ``attention_mask``).
"""

import numpy as np


def log_softmax(x):  # [..., V] -> [..., V]
    """``x - log sum exp(x)`` over the last axis, max-subtracted.

    convention: a ``-inf`` entry (a padded vocabulary slot) stays ``-inf``, so its probability is exactly 0;
    a row that is ``-inf`` everywhere stays ``-inf`` everywhere (all probabilities 0, never NaN). Callers
    that need a distribution reject such a row first (``reference.divergences.validate_logits``,
    ``reference.dac_kl.check_inputs``)."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)  # [..., 1]
    m = np.where(np.isfinite(m), m, 0.0)  # an all -inf row: subtract 0, not -inf
    z = x - m
    with np.errstate(divide="ignore", invalid="ignore"):  # log 0 and -inf - -inf on an all -inf row
        out = z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))
    return np.where(np.isneginf(x), -np.inf, out)


def softmax(x):  # [..., V] -> [..., V]
    """``exp(x - max) / sum`` over the last axis: a ``-inf`` entry gets probability exactly 0. A row needs
    one finite entry (an all ``-inf`` row gives NaN here; ``exp(log_softmax(x))`` gives zeros)."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))  # [..., V]
    return e / np.sum(e, axis=-1, keepdims=True)


def sigmoid(z):  # [...] -> [...]
    return np.exp(-np.logaddexp(0.0, -z))  # 1 / (1 + e^-z) without overflow for large |z|


def gelu(x):  # [...] -> [...]  convention: the tanh approximation (GPT-2; torch GELU(approximate="tanh"))
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def gelu_grad(x):  # [...] -> [...]  d gelu / dx, by hand
    c = np.sqrt(2.0 / np.pi)
    th = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th**2) * c * (1.0 + 3 * 0.044715 * x**2)
