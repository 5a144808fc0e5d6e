"""A tiny nanoGPT-style decoder with pluggable attention and KV-cache generation.

Architecture (mirrored line for line by the NumPy oracle ``reference/gpt.py``):

* byte-level token embedding ``wte`` (tied with the output head, to keep checkpoints small);
* ``n_layer`` pre-LN blocks: ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``;
* **rotary positions** (RoPE, rotate-half / GPT-NeoX layout, base ``rope_base``) applied to q and k.
  Chosen over learned positions because (a) MATCH keeps *post-RoPE* keys in its retrieval
  store, so a retrieval score equals the attention logit, (b) nothing has to be learned per position,
  so the long-range tasks can run past the training length;
* linear layers without bias, LayerNorm with weight and bias (eps 1e-5), tanh-approximate GELU, no dropout
  (dropout would make the NumPy oracle and exact resume harder for no gain at this size).

Attention is chosen by name from a registry (``ATTENTION``), so MATCH plugs in with
:func:`register_attention`. Every attention function has the signature::

    fn(q, k, v, *, window, key_valid, scale, **attn_kwargs) -> out    # [B, H, Tq, D] x3 -> [B, H, Tq, D]

with ``q: [B, H, Tq, D]``, ``k, v: [B, H, Tk, D]`` (Tk >= Tq) and ``key_valid: [B, Tk]`` bool or None.

convention (bottom-right alignment): the Tq queries are the *last* Tq of the Tk key positions, so query
row t sits at key index ``Tk - Tq + t``. This is what KV-cache decoding needs (Tq = 1).

convention (window, shared with ``fast/attention.py`` and MATCH): with window ``w`` a query at
index i sees keys j with ``i - w < j <= i`` -- **w keys including itself** (the NSA convention; zoology,
attention-gym and FlashAttention's ``window_size=(w, 0)`` count w + 1 keys). ``w >= 1``.

convention (padding): batched generation left-pads prompts; ``key_valid`` masks pad keys. A query always
sees itself, so a pad query row is never fully masked (no NaN); its output is garbage that nothing reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fast.training import sampling

# byte-level tokenizer ids (tiny_models/tasks.py encodes text as UTF-8 bytes 0..255)
BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = VOCAB_SIZE
    block_size: int = 256  # the training context length (RoPE itself has no maximum)
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    mlp_ratio: int = 4
    attention: str = "full"  # key of ATTENTION: "full" | "sliding" | anything registered later
    window: int | None = None  # sliding window w (keys including the query itself); None = unlimited
    attn_kwargs: tuple = ()  # extra (name, value) pairs passed to the attention fn (hashable: frozen)
    rope_base: float = 10000.0
    ln_eps: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head dim {self.n_embd // self.n_head} must be even for RoPE")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 (keys including the query itself), got {self.window}")
        if self.attention == "sliding" and self.window is None:
            raise ValueError("attention='sliding' needs a window w >= 1")
        if self.attention == "match":  # MATCH options: attn_kwargs top_k (required), block_size, mode
            opts = dict(self.attn_kwargs)
            bad_mode = opts.get("mode", "joint") not in ("joint", "gated")
            if self.window is None or "top_k" not in opts or bad_mode:
                raise ValueError(
                    f"attention='match' needs a window w >= 1 and attn_kwargs with top_k (and "
                    f"mode 'joint' or 'gated'); got window={self.window}, attn_kwargs={opts}"
                )
        if self.attention not in ATTENTION:
            raise ValueError(f"unknown attention {self.attention!r}; registered: {sorted(ATTENTION)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "GPTConfig":
        d = json.loads(s)
        d["attn_kwargs"] = tuple(tuple(p) for p in d.get("attn_kwargs", ()))
        return cls(**d)


# ----------------------------------------------------------------------------------------------------
# attention registry


def _sdpa_attention(q, k, v, *, window, key_valid, scale):  # [B, H, Tq, D] x3 -> [B, H, Tq, D]
    from fast.attention import attention_kv  # lazy: importing triton is not free

    return attention_kv(q, k, v, window=window, key_valid=key_valid, scale=scale)


def full_attention(q, k, v, *, window=None, key_valid=None, scale=None):  # [B,H,Tq,D] x3 -> [B,H,Tq,D]
    """Causal attention over every earlier key (``window`` is ignored)."""
    return _sdpa_attention(q, k, v, window=None, key_valid=key_valid, scale=scale)


def sliding_attention(q, k, v, *, window, key_valid=None, scale=None):  # [B,H,Tq,D] x3 -> [B,H,Tq,D]
    """Causal sliding-window attention: query i sees keys ``i - window < j <= i``."""
    if window is None or window < 1:
        raise ValueError(f"sliding attention needs window >= 1, got {window}")
    return _sdpa_attention(q, k, v, window=window, key_valid=key_valid, scale=scale)


ATTENTION: dict[str, Callable] = {"full": full_attention, "sliding": sliding_attention}


def register_attention(name: str, fn: Callable, *, overwrite: bool = False) -> None:
    """Plug an attention implementation in under ``name`` (the MATCH hook).

    ``fn(q, k, v, *, window, key_valid, scale, **attn_kwargs) -> [B, H, Tq, D]``; see the module docstring
    for the alignment, window and padding conventions it must follow. ``GPTConfig(attention=name,
    attn_kwargs=(("top_k", 8),))`` then routes every layer through it.
    """
    if not callable(fn):
        raise ValueError(f"attention {name!r} must be callable, got {type(fn).__name__}")
    if name in ATTENTION and not overwrite and ATTENTION[name] is not fn:
        raise ValueError(f"attention {name!r} is already registered (pass overwrite=True to replace it)")
    ATTENTION[name] = fn


def match_attention(
    q,
    k,
    v,
    *,
    window,
    key_valid=None,
    scale=None,
    top_k,
    block_size=1,
    mode="joint",
    gate_logit=None,
    summaries=None,
):  # [B, H, Tq, D] x3 -> [B, H, Tq, D]
    """MATCH (arXiv 2606.29844, ``fast/match.py``): the window plus the ``top_k`` retrieved out-of-window keys
    (tokens, or the candidate keys of ``top_k`` blocks of ``block_size``); ``mode`` "joint" or "gated" (the
    gate logit ``[B, H, Tq]`` comes from the block's ``c_gate``). Full length without padding:
    ``match_attention`` (Triton on CUDA); one query against a cache: ``match_decode``; otherwise (padding,
    Tq < Tk): the torch path with ``key_valid``. With left padding, blocks stay aligned to the padded
    index. ``summaries``: the decode step's block summaries, kept up to date in the layer's KV cache."""
    from fast import match as fm  # lazy, like fast.attention above

    tq, tk = q.shape[-2], k.shape[-2]
    kw = dict(
        window=window, top_k=top_k, block_size=block_size, mode=mode, gate_logit=gate_logit, scale=scale
    )
    if tq == 1 and tk > 1:
        return fm.match_decode(q, k, v, key_valid=key_valid, summaries=summaries, **kw)
    if tq == tk and key_valid is None:
        return fm.match_attention(q, k, v, **kw)
    return fm.match_attention_kv(q, k, v, key_valid=key_valid, **kw)


register_attention("match", match_attention)


# ----------------------------------------------------------------------------------------------------
# model


def rope_cos_sin(pos: torch.Tensor, head_dim: int, base: float, dtype):  # [B, T] -> [B, 1, T, D/2] x2
    """cos/sin of the rotary angles, computed in float64 then cast (fp32 angles drift at large positions)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=pos.device) / head_dim)
    ang = pos.to(torch.float64)[..., None] * inv_freq  # [B, T, D/2]
    return ang.cos().to(dtype)[:, None], ang.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):  # [B, H, T, D], [B, 1, T, D/2] x2 -> [B, H, T, D]
    """Rotate-half RoPE: pairs (x[i], x[i + D/2]) are rotated by angle pos * base^(-2i/D)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.c_gate = None
        if cfg.attention == "match" and dict(cfg.attn_kwargs).get("mode") == "gated":
            # MATCH gated mode [RECON]: a per-head gate logit from the block input; zero bias, so at init
            # g = sigmoid(~0) ~ 0.5 (the weight gets the usual N(0, 0.02) init)
            self.c_gate = nn.Linear(cfg.n_embd, cfg.n_head, bias=True)
            nn.init.zeros_(self.c_gate.bias)

    def forward(self, x, cos, sin, key_valid, cache):  # [B, T, C] -> [B, T, C]
        B, T, C = x.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # cache: dict with "k", "v" of earlier positions, [B, H, Tpast, D]
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        fn = ATTENTION[self.cfg.attention]
        extra = dict(self.cfg.attn_kwargs)
        if self.c_gate is not None:
            extra["gate_logit"] = self.c_gate(x).transpose(1, 2)  # [B, H, T]
        if cache is not None and self.cfg.attention == "match" and extra.get("block_size", 1) > 1:
            # MATCH block retrieval: the block summaries live in the cache and only the last (partial) block
            # and any new one are recomputed, so a decode step costs O(B D), not O(T D), for them
            from fast import match as fm

            bs = extra["block_size"]
            old = cache.get("summ")
            cache["summ"] = (
                fm.block_summaries(k, bs, key_valid=key_valid)
                if old is None
                else fm.update_block_summaries(old, k, bs, key_valid=key_valid)
            )
            if T == 1 and k.shape[2] > 1:
                extra["summaries"] = cache["summ"]
        y = fn(q, k, v, window=self.cfg.window, key_valid=key_valid, scale=None, **extra)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):  # [B, T, C] -> [B, T, C]
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, key_valid, cache):  # [B, T, C] -> [B, T, C]
        x = x + self.attn(self.ln_1(x), cos, sin, key_valid, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by 1/sqrt(2L)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # the causal-LM protocol of fast.training.lm: left-padded rows, positions from the key mask, a KV cache
    eos_id, pad_id = EOS, PAD

    def new_cache(self) -> list[dict]:
        return [dict() for _ in range(self.cfg.n_layer)]

    def lm_logits(self, idx, valid, cache=None):  # [B, T] long, [B, Tk] bool -> [B, T, V]
        pos = (valid.long().cumsum(1) - 1).clamp_min(0)[:, -idx.shape[1] :]
        return self(idx, pos=pos, key_valid=valid, cache=cache)

    def lm_hidden(self, idx, *, pos=None, key_valid=None, cache=None):  # [B, T] -> [B, T, C]
        """The final hidden states (after ``ln_f``): the logits are ``lm_hidden(idx) @ lm_head_weight().T``
        (``fast.fused`` computes the loss from them chunk by chunk). Arguments as for ``forward``."""
        B, T = idx.shape
        if pos is None:
            past = cache[0]["k"].shape[2] if cache is not None and "k" in cache[0] else 0
            pos = torch.arange(past, past + T, device=idx.device).expand(B, T)
        x = self.wte(idx)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_base, x.dtype)
        for i, block in enumerate(self.h):
            x = block(x, cos, sin, key_valid, None if cache is None else cache[i])
        return self.ln_f(x)

    def lm_head_weight(self) -> torch.Tensor:  # [V, C]: the output head, tied to the token embedding
        return self.wte.weight

    def forward(self, idx, *, targets=None, pos=None, key_valid=None, cache=None):
        """``idx [B, T]`` -> logits ``[B, T, V]`` (and the mean token loss if ``targets`` is given).

        ``pos [B, T]``: RoPE positions (default ``0..T-1``, or continuing the cache). ``key_valid [B, Tk]``:
        False for pad keys (Tk = cached + new). ``cache``: a list with one dict per layer, filled in place.
        ``targets [B, T]`` with -100 = ignored (prompt and padding).
        """
        logits = F.linear(self.lm_hidden(idx, pos=pos, key_valid=key_valid, cache=cache), self.wte.weight)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss


# ----------------------------------------------------------------------------------------------------
# generation (the loop and the samplers are fast.training.sampling's; this binds the tiny GPT's ids)


def generate(
    model: GPT,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int = EOS,
    use_cache: bool = True,
) -> list[list[int]]:
    """Batched generation from prompts of different lengths; returns the new tokens per row (EOS excluded).

    Prompts are left-padded with PAD; each row's RoPE positions start at 0 at its first real token, so a
    row's result does not depend on the other rows. A row stops at its first EOS. ``use_cache=False``
    recomputes the whole sequence every step (the oracle the KV-cache path is tested against).
    Sampling needs an explicit ``torch.Generator`` (a CPU generator; draws are moved to the model device).
    """
    return sampling.generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        pad_id=PAD,
        use_cache=use_cache,
    )
