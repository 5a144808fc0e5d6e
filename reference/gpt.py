"""picoGPT-style NumPy forward of ``tiny_models/gpt.py`` (the oracle): same weights, float64, pure functions.

``params`` is a flat dict of NumPy arrays with the torch ``state_dict`` names (``wte.weight``,
``h.0.ln_1.weight``, ``h.0.attn.c_attn.weight`` ...). Linear weights keep torch's ``[out, in]`` layout,
so a linear layer is ``x @ w.T``.

Attention is ``reference.attention.attention`` (causal, optional sliding window), GELU ``reference.nn.gelu``.

convention: window w = query i sees keys j with i - w < j <= i (w keys including itself), as in
tiny_models/gpt.py and fast/attention.py (``reference.attention.allowed``).
convention: RoPE is rotate-half (GPT-NeoX layout): pairs (x[i], x[i + D/2]) rotate by pos * base^(-2i/D).
convention: GELU is the tanh approximation (GPT-2).
"""

from __future__ import annotations

import numpy as np

from reference.attention import attention
from reference.nn import gelu


def layer_norm(x, g, b, eps=1e-5):  # [T, C], [C], [C] -> [T, C]
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)  # biased variance, as torch
    return g * (x - mu) / np.sqrt(var + eps) + b


def rope(x, pos, base):  # [..., T, D], [T] -> [..., T, D]
    d = x.shape[-1]
    inv_freq = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # [D/2]
    ang = pos[:, None].astype(np.float64) * inv_freq  # [T, D/2]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def mha(x, w_attn, w_proj, n_head, window, pos, base):  # [T, C], [3C, C], [C, C] -> [T, C]
    T, C = x.shape
    heads = lambda t: t.reshape(T, n_head, C // n_head).transpose(1, 0, 2)  # [T, C] -> [H, T, D]
    q, k, v = (heads(t) for t in np.split(x @ w_attn.T, 3, axis=-1))  # [H, T, D] each
    out, _ = attention(rope(q, pos, base), rope(k, pos, base), v, causal=True, window=window)  # [H, T, D]
    return out.transpose(1, 0, 2).reshape(T, C) @ w_proj.T


def block(x, p, i, n_head, window, pos, base, eps):  # [T, C] -> [T, C]
    pre = f"h.{i}."
    a = layer_norm(x, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"], eps)
    x = x + mha(a, p[pre + "attn.c_attn.weight"], p[pre + "attn.c_proj.weight"], n_head, window, pos, base)
    m = layer_norm(x, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"], eps)
    return x + gelu(m @ p[pre + "mlp.c_fc.weight"].T) @ p[pre + "mlp.c_proj.weight"].T


def gpt(ids, p, *, n_layer, n_head, window=None, rope_base=10000.0, ln_eps=1e-5):  # [T] -> [T, V]
    """Logits for one unpadded sequence. ``window=None`` is full causal attention."""
    ids = np.asarray(ids)
    t = len(ids)
    pos = np.arange(t)
    x = p["wte.weight"][ids]  # [T, C]
    for i in range(n_layer):
        x = block(x, p, i, n_head, window, pos, rope_base, ln_eps)
    return layer_norm(x, p["ln_f.weight"], p["ln_f.bias"], ln_eps) @ p["wte.weight"].T  # tied head


def greedy_generate(ids, p, n_new, *, eos=None, **cfg):  # [T] -> [<= n_new]
    """Greedy decoding without a cache (argmax, lowest id on ties); stops before ``eos``."""
    ids, out = list(ids), []
    for _ in range(n_new):
        nxt = int(np.argmax(gpt(ids, p, **cfg)[-1]))
        if nxt == eos:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


def config_kwargs(cfg):  # GPTConfig -> dict of gpt() keyword arguments
    """The subset of a ``GPTConfig`` that the oracle needs (attention "full" or "sliding")."""
    if cfg.attention not in ("full", "sliding"):
        raise ValueError(f"the NumPy oracle implements attention 'full' and 'sliding', not {cfg.attention!r}")
    return dict(
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        window=cfg.window if cfg.attention == "sliding" else None,
        rope_base=cfg.rope_base,
        ln_eps=cfg.ln_eps,
    )
