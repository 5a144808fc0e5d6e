"""Causal / sliding-window flash attention: a Triton forward + backward and a blocked PyTorch backend.

Oracle: ``reference/attention.py`` (mask conventions, gradient derivation). Public API::

    flash_attention(q, k, v, *, causal=True, window=None, scale=None, backend="auto")  -> out
    flash_attention_with_lse(q, k, v, ...)                                               -> (out, lse)

Shapes: ``q [B, H_q, T, D]``, ``k, v [B, H_kv, T, D]`` with ``H_q`` a multiple of ``H_kv`` (grouped-
query attention: query head ``h`` reads kv head ``h // (H_q // H_kv)``); ``out [B, H_q, T, D]`` in the
input dtype, ``lse [B, H_q, T]`` float32 (float64 for float64 torch-backend inputs), natural log.

convention: ``window=w`` means query ``i`` sees keys ``i - w < j <= i`` (w keys including itself; the
w+1 convention of attention-gym/FlexAttention examples is our ``w + 1``). Without ``causal`` the window
is the symmetric band ``|i - j| < w``.

Why two backends: the Triton kernels are the GPU path (online softmax, fp32 accumulation, key blocks
outside the window skipped by the loop bounds, so the cost is O(T*w) and not O(T^2) masked); the
torch backend is a blocked loop over query chunks that only touches the keys a chunk can see, so CPU
training of the tiny GPTs is also O(T*w) in time and memory, and autograd does the backward.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fast.utils import (
    LN2,
    LOG2E,
    check_float,
    empty,
    fuse_fma_in_interpreter,
    is_interpreting,
    resolve_backend,
)

fuse_fma_in_interpreter()  # tl.fma below must round once under TRITON_INTERPRET=1, as on a GPU

__all__ = [
    "flash_attention",
    "flash_attention_with_lse",
    "key_block_range",
    "key_block_split",
    "query_block_range",
    "query_block_split",
]

TORCH_CHUNK = 256  # query rows per step of the torch backend (dense for T <= 256)


# ----------------------------------------------------------------------------------------------
# validation and block bookkeeping (host side; tl.device_assert is a no-op, so validate here)


def _validate(q, k, v, window, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(t.shape)}")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or k.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    B, Hq, T, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if (B, T, D) != (Bk, Tk, Dk):
        raise ValueError(
            f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree on B, T and D ([B, H, T, D])"
        )
    if min(B, Hq, Hkv, T, D) < 1:
        raise ValueError(f"empty dimension: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"H_q={Hq} must be a multiple of H_kv={Hkv} (grouped-query attention)")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            raise ValueError(f"window must be None or an int >= 1, got {window!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1 (w keys including the query itself), got {window}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be None or a finite number, got {scale!r}")


def key_block_range(start_m, block_m, block_n, T, *, causal=True, window=None):  # ints -> (lo, hi)
    """Keys visited by the query block [start_m, start_m + block_m): ``range(lo, hi, block_n)``.

    The Triton forward and dq kernels use exactly this formula for their loop bounds (repeated there);
    ``lo`` is rounded down to a key-block boundary, ``hi`` is exclusive."""
    W = T if window is None else window
    lo = 0 if window is None else max(0, start_m - W + 1)
    lo = (lo // block_n) * block_n
    end_m = min(start_m + block_m, T)
    hi = end_m if causal else min(T, end_m + W - 1)
    return lo, hi


def query_block_range(start_n, block_n, block_m, T, *, causal=True, window=None):  # ints -> (lo, hi)
    """Queries that can see the key block [start_n, start_n + block_n): ``range(lo, hi, block_m)``
    (the loop bounds of the dk/dv kernel)."""
    W = T if window is None else window
    lo = start_n if causal else max(0, start_n - W + 1)
    lo = (lo // block_m) * block_m
    end_n = min(start_n + block_n, T)
    hi = min(T, end_n + W - 1)
    return lo, hi


# ----------------------------------------------------------------------------------------------
# torch backend: blocked over query chunks, autograd does the backward


def _chunk_mask(a, b, lo, hi, causal, window, device):  # -> bool [b - a, hi - lo] (True = allowed) or None
    i = torch.arange(a, b, device=device)[:, None]
    j = torch.arange(lo, hi, device=device)[None, :]
    ok = None
    if causal:
        ok = j <= i
    if window is not None:
        near = (i - j) < window
        if not causal:
            near = near & ((j - i) < window)
        ok = near if ok is None else ok & near
    return ok


def _torch_attention(q, k, v, causal, window, scale, chunk=TORCH_CHUNK, need_lse=True):
    """Returns (out [B, Hq, T, D] in q.dtype, lse [B, Hq, T] fp32/fp64, or None without ``need_lse``).
    Only the keys a query chunk can see (``key_block_range``) are multiplied, so sliding-window cost is
    O(T * (w + chunk)); T <= chunk is one dense block.

    Without ``need_lse`` each chunk is one fused ``scaled_dot_product_attention`` call with the chunk's
    boolean mask (PyTorch's CPU flash kernel: faster than the textbook masked softmax and it saves less
    for the backward). With the lse, the chunk is the textbook formula with the scale on q (T x D, not
    T x T), the mask applied in place on the fresh scores, one fused softmax, and GQA by broadcasting kv
    heads instead of copying them; the lse pass keeps the scores alive for its backward."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp32 accumulation
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if need_lse:
        qc = (qc * scale).reshape(B, Hkv, G, T, D) if G > 1 else qc * scale
        if G > 1:  # [B, Hkv, 1, T, D]: broadcast over the G query heads of each kv head
            kc, vc = kc[:, :, None], vc[:, :, None]
    outs, lses = [], []
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        lo, hi = key_block_range(a, b - a, 1, T, causal=causal, window=window)
        if not need_lse:
            dense_causal = causal and window is None and a == 0 and hi == b
            ok = None if dense_causal else _chunk_mask(a, b, lo, hi, causal, window, q.device)
            outs.append(
                torch.nn.functional.scaled_dot_product_attention(
                    qc[:, :, a:b],
                    kc[:, :, lo:hi],
                    vc[:, :, lo:hi],
                    attn_mask=ok,
                    is_causal=dense_causal,
                    scale=scale,
                    enable_gqa=G > 1,
                )
            )
            continue
        s = qc[..., a:b, :] @ kc[..., lo:hi, :].transpose(-1, -2)  # [B, Hkv, (G,) b-a, hi-lo]
        ok = _chunk_mask(a, b, lo, hi, causal, window, q.device)
        if ok is not None:
            s = s.masked_fill_(~ok, float("-inf"))  # in place: matmul's backward needs its inputs only
        lses.append(torch.logsumexp(s, dim=-1))  # finite: the diagonal is always allowed
        outs.append(torch.softmax(s, dim=-1) @ vc[..., lo:hi, :])
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    out = out.reshape(B, Hq, T, D).to(q.dtype)
    if not need_lse:
        return out, None
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, dim=-1)
    return out, lse.reshape(B, Hq, T)


# ----------------------------------------------------------------------------------------------
# Triton kernels
#
# Cost structure (``python -m fast.devtools.kernel_stats``, benchmarks/results/kernel_stats.md): every loop
# over
# key blocks (forward, dq) or query blocks (dk/dv) is split into *interior* blocks, where every
# (query, key) pair is allowed and in bounds, and *edge* blocks (causal diagonal, window edge, the
# partial last block); only edge blocks build a mask (``key_block_split`` / ``query_block_split``).
# Loads carry bounds masks only when T is not a multiple of both blocks (EVEN_T) or D is not the padded
# head size (EVEN_D). Offsets are int32 unless a tensor spans >= 2^31 elements (INT64, ``_needs_int64``).
# Softmax runs in the log2 domain: with qk_scale = scale * log2(e), every score costs one FFMA,
# exp2(fma(s, qk_scale, -m)), m the row's running max (forward) or its log2-domain lse (backward). The
# forward kernel writes the lse in log2 units, the backward reads that tensor, and the API returns it
# times ln(2) (a natural log). Recomputing P from one fp32 lse per row limits the gradients' relative
# accuracy to the lse's half-ulp, about |lse| * 2^-24: nothing at ordinary scores, ~3e-4 when
# |q.k scale| ~ 1e4 (every flash attention that stores one fp32 lse shares this;
# tests/test_attention.py::_lse_slack). The backward follows the layout of Triton's fused-attention
# tutorial: the dk/dv kernel computes S^T = K Q^T and dP^T = V dO^T so P^T, dS^T are already the left
# operands of dV += P^T dO and dK += dS^T Q (no register transpose through shared memory in the loop);
# Delta = rowsum(dO * O) - dlse comes from a small kernel. [RECON] The tutorial pre-scales K by
# scale * log2(e); here the backward recomputes P = exp2(fma(S, qk_scale, -lse2)) from unscaled K (the
# bf16 K is not rounded a second time). fp32 inputs keep the forward's Q K^T orientation in the dk/dv
# kernel (a transpose per iteration on CUDA cores): a NumPy/CUDA-core K Q^T rounds its sums in another
# order, which at |S * scale| ~ 1e4 moves the recomputed P by ~3e-4 (test_huge_logits).

_INT32_LIMIT = 2**31


def key_block_split(start_m, block_m, block_n, T, *, causal=True, window=None):  # ints -> (a, b, c, d)
    """Key blocks of the query block at ``start_m``: edge blocks ``range(a, b, block_n)`` and
    ``range(c, d, block_n)`` (masked), interior blocks ``range(b, c, block_n)`` (every pair allowed and
    every key < T, so no mask). ``(a, d) = key_block_range(...)``. The forward and dq kernels repeat
    this formula."""
    a, d = key_block_range(start_m, block_m, block_n, T, causal=causal, window=window)
    W = T if window is None else window
    end_m = min(start_m + block_m, T)
    c_lim = start_m + 1 if causal else start_m + W  # keys <= the block's first query / inside the band
    c = (min(c_lim, T) // block_n) * block_n
    b = -(-max(end_m - W, 0) // block_n) * block_n  # keys the block's last (valid) query still sees
    c = max(min(c, d), a)
    b = min(max(b, a), c)
    return a, b, c, d


def query_block_split(start_n, block_n, block_m, T, *, causal=True, window=None):  # ints -> (a, b, c, d)
    """Query blocks of the key block at ``start_n``, split like ``key_block_split`` (dk/dv kernel)."""
    a, d = query_block_range(start_n, block_n, block_m, T, causal=causal, window=window)
    W = T if window is None else window
    end_n = min(start_n + block_n, T)
    b_lim = end_n - 1 if causal else end_n - W  # queries that see the block's last (valid) key
    b = -(-max(b_lim, 0) // block_m) * block_m
    c = (min(start_n + W, T) // block_m) * block_m  # queries whose window still holds the first key
    c = max(min(c, d), a)
    b = min(max(b, a), c)
    return a, b, c, d


def _needs_int64(*tensors):
    """True when an element offset could pass 2^31 (int32 offsets would wrap). The bound adds 128 padded
    rows/columns per dimension: blocks past T or D compute (masked) addresses beyond the tensor."""
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if sum((n + 128) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True)) >= _INT32_LIMIT:
            return True
    return False


def _configs(kind):
    """CUDA: tensor-core tiles to autotune over for fp16/bf16 (``_fits`` says which head sizes each one
    serves: kernel_stats shows no spills and no serialized wgmma for those), then one small fp32 tile
    (fp32 "ieee" dots run on CUDA cores, fully unrolled: big tiles spill and compile for ~20 s)."""
    if is_interpreting():  # interpreter cost ~ programs x loop iterations: one big-block config
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    shapes = _SHAPES[kind]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s, _ in shapes
    ]


# (BLOCK_M, BLOCK_N, num_warps, num_stages, padded head sizes served); the fp32 tile last. The first tile
# that serves a head size is the only one used for T <= 1024. Left out after kernel_stats, as they spill:
# fwd 128x64 with 4 warps (every D), 128x128 and 64x128 (D = 128: no BLOCK_N = 128 forward tile fits in
# 255 registers there); dk/dv 32x128 with 4 warps, 64x64 and 64x128 with 4/8 warps at D = 128; dq 128x32
# at D = 128.
_ALL_D = (16, 32, 64, 128)
# fp32 inputs: "ieee" dots on CUDA cores, unrolled into FMAs, so registers grow with the tile. 32 x 32 with
# 4 warps spilled 2-7 KB per thread at D >= 64 (forward and dk/dv), 16 x 32 with 4 warps up to 6 KB at
# D = 128 with odd T; 16 x 32 with 8 warps spills at most 56 B in any kernel (kernel_stats.md).
_FP32_TILE = (16, 32, 8, 2, ())


def _tile_table(triton_version: str) -> dict:
    """The tiles for one Triton version (every number from kernel_stats: no spills, no serialized wgmma)."""
    shapes = {
        "fwd": [(128, 64, 8, 3, _ALL_D), (64, 64, 4, 3, _ALL_D), _FP32_TILE],
        "dkdv": [
            (32, 64, 4, 2, (16, 32, 64)),
            (32, 64, 8, 2, (128,)),  # 4 warps: 224 B spilled at D = 128 in the EVEN_T = 0 variant
            (64, 128, 8, 2, (16, 32, 64)),
            (64, 64, 4, 2, (16, 32, 64)),
            (32, 128, 8, 2, (128,)),
            (64, 64, 8, 2, (128,)),
            _FP32_TILE,
        ],
        "dq": [
            (128, 64, 8, 2, _ALL_D),
            (64, 64, 4, 2, _ALL_D),
            (128, 32, 4, 2, (16, 32, 64)),
            (64, 32, 4, 2, _ALL_D),
            _FP32_TILE,
        ],
    }
    # Triton 3.6 (older GPU images) compiles the same code differently. With two software-pipelined
    # stages ptxas serializes the wgmma (C7515) in every dk/dv tile: any one of its three query-block
    # loops (edge, interior, edge) alone compiles clean, two or more in a row carrying dk and dv do not.
    # The forward's 64 x 64 tile with three stages does the same at D = 128. One stage (loads not
    # prefetched) keeps the wgmma pipeline; at D = 128 only 32 x 128 with 8 warps then fits unspilled.
    if tuple(int(x) for x in triton_version.split(".")[:2]) < (3, 7):
        shapes["fwd"][1] = (64, 64, 4, 2, _ALL_D)
        shapes["dkdv"] = [
            (32, 64, 4, 1, (16, 32, 64)),
            (64, 128, 8, 1, (16, 32, 64)),
            (64, 64, 4, 1, (16, 32, 64)),
            (32, 128, 8, 1, (128,)),
            _FP32_TILE,
        ]
    return shapes


_SHAPES = _tile_table(triton.__version__)

# Autotune key: log2 buckets, not T and W themselves (every new length would re-tune, minutes on a GPU
# check); short sequences (tests, tiny GPTs) keep only the first config, so a key costs one compile.
_TUNE_KEY = ["T_BUCKET", "BLOCK_D", "IS_CAUSAL", "HAS_WINDOW", "LOWP_DOT"]


def _t_bucket(T, W=None):
    """0 for T <= 1024 (one config), else 64 * ceil(log2 T) + ceil(log2 W) (W = T without a window)."""
    if T <= 1024:
        return 0
    W = T if W is None else min(W, T)
    return 64 * (T - 1).bit_length() + (W - 1).bit_length()


def _fits(kind):
    table = {i: dims for i, (*_, dims) in enumerate(_SHAPES[kind])}

    def prune(configs, nargs, **kwargs):
        if len(configs) == 1:  # interpreter
            return configs
        if not kwargs.get("LOWP_DOT", False):
            return configs[-1:]  # fp32: the small CUDA-core tile
        ok = [c for i, c in enumerate(configs[:-1]) if kwargs["BLOCK_D"] in table[i]]
        return ok if nargs["T_BUCKET"] else ok[:1]

    return prune


_HEURISTICS = {
    "EVEN_T": lambda a: a["T"] % a["BLOCK_M"] == 0 and a["T"] % a["BLOCK_N"] == 0,
    "EVEN_D": lambda a: a["D"] == a["BLOCK_D"],
    "INT64": lambda a: _needs_int64(*a.values()),
}


@triton.jit
def _dot(a, b, LOWP_DOT: tl.constexpr):
    if LOWP_DOT:  # fp16/bf16 tensor cores, fp32 accumulation
        r = tl.dot(a, b)
    else:
        r = tl.dot(a, b, input_precision="ieee")
    return r


@triton.jit
def _load_tile(ptrs, rows, T, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr, LOWP_DOT: tl.constexpr):
    """[rows, BLOCK_D] tile; masks only where a row may be >= T or the head dim is padded. Kept in its
    dtype for tensor-core dots, fp32 otherwise (the interpreter's bf16 arithmetic is not trustworthy)."""
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=(rows < T)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < T)[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    if not LOWP_DOT:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, T, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    if CHECK_ROWS:
        if EVEN_D:
            tl.store(ptrs, x, mask=(rows < T)[:, None])
        else:
            tl.store(ptrs, x, mask=(rows < T)[:, None] & d_ok[None, :])
    else:
        if EVEN_D:
            tl.store(ptrs, x)
        else:
            tl.store(ptrs, x, mask=d_ok[None, :])


@triton.jit
def _allowed(qi, kj, T, W, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, CHECK_T: tl.constexpr):
    """Allowed (query qi, key kj) pairs, qi and kj broadcast to the tile (reference/attention.py mask)."""
    if IS_CAUSAL:
        ok = kj <= qi
    else:
        ok = (kj - qi) < W  # symmetric band; W = T without a window (always true in bounds)
    if HAS_WINDOW:
        ok = ok & ((qi - kj) < W)
    if CHECK_T:
        ok = ok & (kj < T) & (qi < T)
    return ok


@triton.jit
def _masked_step(s, ok, m_i, qk_scale):
    """The online-softmax step over a tile of raw scores ``s`` [BM, BN] with allowed entries ``ok``, in log2
    units (qk_scale = scale * log2(e) >= 0): the new running max ``m_new`` [BM] and ``p = exp2(s * qk_scale
    - m_new)`` (0 where not allowed). A row with no allowed key yet stays at -inf (no -inf * 0 when
    scale = 0); its p is masked to 0. MATCH's gathered retrieved keys (``fast/match_triton.py``) take the
    same step."""
    s_max = tl.max(tl.where(ok, s, float("-inf")), 1)
    m_new = tl.maximum(m_i, tl.where(s_max == float("-inf"), float("-inf"), s_max * qk_scale))
    p = tl.math.exp2(tl.where(ok, tl.fma(s, qk_scale, -m_new[:, None]), float("-inf")))
    return m_new, p


@triton.jit
def _rescale(m_i, m_new):
    """The factor exp2(m_i - m_new) of the running sums; m_i = -inf before the first allowed key gives 0
    (no -inf - -inf, no -inf * 0 when scale = 0)."""
    return tl.math.exp2(tl.where(m_i == float("-inf"), float("-inf"), m_i - m_new))


@triton.jit
def causal_window_split(first, end, W, T, BLOCK_N):
    """``key_block_split`` for the causal, windowed query rows [first, end) (positions) over the keys
    [0, T): the edge blocks [a, bb), the interior blocks [bb, c) (every key allowed for every row) and the
    edge blocks [c, end), multiples of BLOCK_N. The forward and dq kernels below inline the same bounds;
    MATCH's kernels call this with a query offset (decode)."""
    a = (tl.maximum(first - W + 1, 0) // BLOCK_N) * BLOCK_N
    c = (tl.minimum(first + 1, T) // BLOCK_N) * BLOCK_N
    bb = ((tl.maximum(end - W, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    c = tl.maximum(tl.minimum(c, end), a)
    bb = tl.minimum(tl.maximum(bb, a), c)
    return a, bb, c


@triton.jit
def _fwd_loop(
    acc,
    l_i,
    m_i,
    q,
    k_ptrs,
    v_ptrs,
    skt,
    svt,
    offs_m,
    offs_n,
    d_ok,
    lo,
    hi,
    T,
    W,
    qk_scale,
    EDGE: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    EVEN_T: tl.constexpr,
    EVEN_D: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi), in log2 units: m_i is the running max of the scaled scores
    s * qk_scale (qk_scale = scale * log2(e)), each row's max rounded once, and the exponents are
    exp2(fma(s, qk_scale, -m_new)): one FFMA per score. The fused product is exact, so the difference is
    exact where it matters (s * qk_scale close to m_new), even for |s * scale| ~ 1e4 (test_huge_logits);
    an unfused s * qk_scale would lose ~1e-3 there, which is why the interpreter's tl.fma is made to round
    once (``fast.utils.fuse_fma_in_interpreter``). The rescale factor alpha = exp2(m_i - m_new) is a plain
    difference of the stored maxima, the very offsets the exponents used, so they cancel exactly."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_tile(k_ptrs + start_n * skt, cols, T, d_ok, EDGE and not EVEN_T, EVEN_D, LOWP_DOT)
        s = _dot(q, tl.trans(k), LOWP_DOT)  # [BM, BN] raw scores
        # qk_scale >= 0 (the host flips q for a negative scale): max(s * qk_scale) = max(s) * qk_scale
        if EDGE:
            ok = _allowed(offs_m[:, None], cols[None, :], T, W, IS_CAUSAL, HAS_WINDOW, not EVEN_T)
            m_new, p = _masked_step(s, ok, m_i, qk_scale)
        else:  # interior block: every key allowed, m_new finite
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(tl.fma(s, qk_scale, -m_new[:, None]))
        alpha = _rescale(m_i, m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs + start_n * svt, cols, T, d_ok, EDGE and not EVEN_T, EVEN_D, LOWP_DOT)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, LOWP_DOT)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_configs("fwd"), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _fits("fwd")}
)
@triton.heuristics(_HEURISTICS)
@triton.jit
def attention_fwd_kernel(
    q_ptr,  # [B, Hq, T, D] queries (any strides)
    k_ptr,  # [B, Hkv, T, D] keys
    v_ptr,  # [B, Hkv, T, D] values
    o_ptr,  # [B, Hq, T, D] output, input dtype
    lse_ptr,  # [B, Hq, T] fp32 out: log2-domain log-sum-exp per query, lse / ln(2) (contiguous)
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sob,
    soh,
    sot,
    sod,
    Hq,
    G,
    T,
    D,
    W,  # G = Hq // Hkv; W = window (T when None)
    scale,
    T_BUCKET,  # scale >= 0; T_BUCKET: autotune key only (``_t_bucket``)
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_T: tl.constexpr,
    EVEN_D: tl.constexpr,
    INT64: tl.constexpr,
):
    """Grid (B * Hq, query blocks); launched x-fastest, so with the query blocks reversed under a causal
    mask every head's heaviest block (the most keys) starts first."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    if IS_CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m
    if INT64:
        pid_bh = pid_bh.to(tl.int64)
        pid_m = pid_m.to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BM] query rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)  # head dim, padded to a power of two >= 16
    d_ok = offs_d < D
    q = _load_tile(
        q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
        offs_m,
        T,
        d_ok,
        not EVEN_T,
        EVEN_D,
        LOWP_DOT,
    )  # [BM, BD]
    k_ptrs = k_ptr + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd  # [BN, BD] at key 0
    v_ptrs = v_ptr + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd
    qk_scale = scale * LOG2E  # log2(e): exp(x * scale) = exp2(x * qk_scale)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of s * qk_scale (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running numerator
    # key_block_split(): edge [a, b), interior [b, c), edge [c, d)
    a = tl.maximum(start_m - W + 1, 0)  # 0 without a window (W = T)
    a = (a // BLOCK_N) * BLOCK_N
    end_m = tl.minimum(start_m + BLOCK_M, T)
    if IS_CAUSAL:
        d = end_m
        c = (tl.minimum(start_m + 1, T) // BLOCK_N) * BLOCK_N
    else:
        d = tl.minimum(end_m + W - 1, T)
        c = (tl.minimum(start_m + W, T) // BLOCK_N) * BLOCK_N
    bb = ((tl.maximum(end_m - W, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    c = tl.maximum(tl.minimum(c, d), a)
    bb = tl.minimum(tl.maximum(bb, a), c)
    acc, l_i, m_i = _fwd_loop(
        acc,
        l_i,
        m_i,
        q,
        k_ptrs,
        v_ptrs,
        skt,
        svt,
        offs_m,
        offs_n,
        d_ok,
        a,
        bb,
        T,
        W,
        qk_scale,
        True,
        IS_CAUSAL,
        HAS_WINDOW,
        EVEN_T,
        EVEN_D,
        LOWP_DOT,
        BLOCK_N,
    )
    acc, l_i, m_i = _fwd_loop(
        acc,
        l_i,
        m_i,
        q,
        k_ptrs,
        v_ptrs,
        skt,
        svt,
        offs_m,
        offs_n,
        d_ok,
        bb,
        c,
        T,
        W,
        qk_scale,
        False,
        IS_CAUSAL,
        HAS_WINDOW,
        EVEN_T,
        EVEN_D,
        LOWP_DOT,
        BLOCK_N,
    )
    acc, l_i, m_i = _fwd_loop(
        acc,
        l_i,
        m_i,
        q,
        k_ptrs,
        v_ptrs,
        skt,
        svt,
        offs_m,
        offs_n,
        d_ok,
        c,
        d,
        T,
        W,
        qk_scale,
        True,
        IS_CAUSAL,
        HAS_WINDOW,
        EVEN_T,
        EVEN_D,
        LOWP_DOT,
        BLOCK_N,
    )
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padded rows (offs_m >= T) can have l = 0
    out = acc / l_safe[:, None]
    # log2-domain lse = m + log2(l), l = sum exp2(s * qk_scale - m); the wrapper returns it times ln(2)
    m_fin = tl.where(l_i == 0.0, 0.0, m_i)
    lse = tl.where(l_i == 0.0, float("-inf"), m_fin + tl.math.log2(l_safe))
    _store_tile(
        o_ptr + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
        out.to(o_ptr.dtype.element_ty),
        offs_m,
        T,
        d_ok,
        not EVEN_T,
        EVEN_D,
    )
    if EVEN_T:
        tl.store(lse_ptr + pid_bh * T + offs_m, lse)
    else:
        tl.store(lse_ptr + pid_bh * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def attention_bwd_delta_kernel(
    o_ptr,  # [B, Hq, T, D] forward output
    do_ptr,  # [B, Hq, T, D] output cotangent
    dlse_ptr,  # [B, Hq, T] fp32 lse cotangent (contiguous; unused without HAS_DLSE)
    delta_ptr,  # [B, Hq, T] fp32 out: rowsum(dO * O) - dlse (contiguous)
    sob,
    soh,
    sot,
    sod,
    sdb,
    sdh,
    sdt,
    sdd,
    Hq,
    T,
    D,
    HAS_DLSE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # one cheap pass: int64 always
    b = pid_bh // Hq
    h = pid_bh % Hq
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (offs_d < D)[None, :]
    o = tl.load(o_ptr + b * sob + h * soh + rows[:, None] * sot + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(
        do_ptr + b * sdb + h * sdh + rows[:, None] * sdt + offs_d[None, :] * sdd, mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + pid_bh * T + rows, mask=rows < T, other=0.0)
    tl.store(delta_ptr + pid_bh * T + rows, delta, mask=rows < T)


@triton.jit
def _dkdv_loop(
    dk,
    dv,
    k,
    v,
    q_ptrs,
    do_ptrs,
    lse_ptrs,
    delta_ptrs,
    sqt,
    sdt,
    offs_n,
    offs_m,
    d_ok,
    lo,
    hi,
    T,
    W,
    qk_scale,
    EDGE: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    EVEN_T: tl.constexpr,
    EVEN_D: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dK, dV of one key block over query blocks [lo, hi), in the transposed layout: S^T = K Q^T."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m  # [BM]
        q = _load_tile(q_ptrs + start_m * sqt, rows, T, d_ok, EDGE and not EVEN_T, EVEN_D, LOWP_DOT)
        do = _load_tile(do_ptrs + start_m * sdt, rows, T, d_ok, EDGE and not EVEN_T, EVEN_D, LOWP_DOT)
        if EDGE and not EVEN_T:
            lse = tl.load(lse_ptrs + rows, mask=rows < T, other=0.0)
            delta = tl.load(delta_ptrs + rows, mask=rows < T, other=0.0)
        else:
            lse = tl.load(lse_ptrs + rows)
            delta = tl.load(delta_ptrs + rows)
        if LOWP_DOT:
            s_t = _dot(k, tl.trans(q), LOWP_DOT)  # [BN, BM]
        else:  # fp32 (and the interpreter): the forward's Q K^T, so P matches its lse bit for bit
            s_t = tl.trans(_dot(q, tl.trans(k), LOWP_DOT))
        if EDGE:
            ok = _allowed(rows[None, :], offs_n[:, None], T, W, IS_CAUSAL, HAS_WINDOW, not EVEN_T)
            # masked before exp2: a masked score may be huge, exp2 of it must not overflow
            p_t = tl.math.exp2(tl.where(ok, tl.fma(s_t, qk_scale, -lse[None, :]), float("-inf")))
        else:  # [BN, BM] softmax recomputed from the log2 lse: one FFMA per score
            p_t = tl.math.exp2(tl.fma(s_t, qk_scale, -lse[None, :]))
        dv += _dot(p_t.to(do.dtype), do, LOWP_DOT)
        dp_t = _dot(v, tl.trans(do), LOWP_DOT)  # [BN, BM]
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, LOWP_DOT)
    return dk, dv


@triton.autotune(
    configs=_configs("dkdv"), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _fits("dkdv")}
)
@triton.heuristics(_HEURISTICS)
@triton.jit
def attention_bwd_dkdv_kernel(
    q_ptr,  # [B, Hq, T, D] queries
    k_ptr,  # [B, Hkv, T, D] keys
    v_ptr,  # [B, Hkv, T, D] values
    do_ptr,  # [B, Hq, T, D] output cotangent
    lse_ptr,  # [B, Hq, T] fp32 forward log-sum-exp in log2 units (the forward kernel's, contiguous)
    delta_ptr,  # [B, Hq, T] fp32 rowsum(dO * O) - dlse (contiguous)
    dk_ptr,  # [B, Hkv, T, D] key gradient, its own dtype (contiguous)
    dv_ptr,  # [B, Hkv, T, D] value gradient, its own dtype (contiguous)
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sdb,
    sdh,
    sdt,
    sdd,
    Hq,
    Hkv,
    G,
    T,
    D,
    W,
    scale,
    T_BUCKET,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_T: tl.constexpr,
    EVEN_D: tl.constexpr,
    INT64: tl.constexpr,
):
    """Grid (key blocks, B * Hkv). One program per (key block, batch, kv head): loops over the G query
    heads of the group and over the query blocks that see this key block (``query_block_split``),
    recomputing P from lse; summing the group inside the program avoids atomics. Programs are renumbered
    so that every head's first key block (the most queries under a causal mask) starts first."""
    num_n = tl.num_programs(0)
    n_bh = tl.num_programs(1)
    lin = tl.program_id(1) * num_n + tl.program_id(0)  # launch order
    if INT64:
        lin = lin.to(tl.int64)
    pid_n = lin // n_bh
    pid_bh = lin % n_bh
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BN]
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qk_scale = scale * LOG2E  # the forward's: P = exp2(s * qk_scale - lse2)
    k = _load_tile(
        k_ptr + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd,
        offs_n,
        T,
        d_ok,
        not EVEN_T,
        EVEN_D,
        LOWP_DOT,
    )  # [BN, BD]
    v = _load_tile(
        v_ptr + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd,
        offs_n,
        T,
        d_ok,
        not EVEN_T,
        EVEN_D,
        LOWP_DOT,
    )  # [BN, BD]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # query_block_split(): edge [a, bb), interior [bb, c), edge [c, d)
    end_n = tl.minimum(start_n + BLOCK_N, T)
    if IS_CAUSAL:
        a = start_n
        b_lim = end_n - 1
    else:
        a = tl.maximum(start_n - W + 1, 0)
        b_lim = tl.maximum(end_n - W, 0)
    a = (a // BLOCK_M) * BLOCK_M
    d = tl.minimum(end_n + W - 1, T)
    bb = ((b_lim + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    c = (tl.minimum(start_n + W, T) // BLOCK_M) * BLOCK_M
    c = tl.maximum(tl.minimum(c, d), a)
    bb = tl.minimum(tl.maximum(bb, a), c)
    q_off = offs_m[:, None] * sqt + offs_d[None, :] * sqd  # [BM, BD] at query 0
    do_off = offs_m[:, None] * sdt + offs_d[None, :] * sdd
    for g in range(0, G):
        h = hk * G + g
        q_ptrs = q_ptr + b * sqb + h * sqh + q_off
        do_ptrs = do_ptr + b * sdb + h * sdh + do_off
        lse_ptrs = lse_ptr + (b * Hq + h) * T
        delta_ptrs = delta_ptr + (b * Hq + h) * T
        dk, dv = _dkdv_loop(
            dk,
            dv,
            k,
            v,
            q_ptrs,
            do_ptrs,
            lse_ptrs,
            delta_ptrs,
            sqt,
            sdt,
            offs_n,
            offs_m,
            d_ok,
            a,
            bb,
            T,
            W,
            qk_scale,
            True,
            IS_CAUSAL,
            HAS_WINDOW,
            EVEN_T,
            EVEN_D,
            LOWP_DOT,
            BLOCK_M,
        )
        dk, dv = _dkdv_loop(
            dk,
            dv,
            k,
            v,
            q_ptrs,
            do_ptrs,
            lse_ptrs,
            delta_ptrs,
            sqt,
            sdt,
            offs_n,
            offs_m,
            d_ok,
            bb,
            c,
            T,
            W,
            qk_scale,
            False,
            IS_CAUSAL,
            HAS_WINDOW,
            EVEN_T,
            EVEN_D,
            LOWP_DOT,
            BLOCK_M,
        )
        dk, dv = _dkdv_loop(
            dk,
            dv,
            k,
            v,
            q_ptrs,
            do_ptrs,
            lse_ptrs,
            delta_ptrs,
            sqt,
            sdt,
            offs_n,
            offs_m,
            d_ok,
            c,
            d,
            T,
            W,
            qk_scale,
            True,
            IS_CAUSAL,
            HAS_WINDOW,
            EVEN_T,
            EVEN_D,
            LOWP_DOT,
            BLOCK_M,
        )
    out = (b * Hkv + hk) * T * D + offs_n[:, None] * D + offs_d[None, :]
    _store_tile(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), offs_n, T, d_ok, not EVEN_T, EVEN_D)
    _store_tile(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), offs_n, T, d_ok, not EVEN_T, EVEN_D)


@triton.jit
def _dq_loop(
    dq,
    q,
    do,
    lse,
    delta,
    k_ptrs,
    v_ptrs,
    skt,
    svt,
    offs_m,
    offs_n,
    d_ok,
    lo,
    hi,
    T,
    W,
    qk_scale,
    EDGE: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    EVEN_T: tl.constexpr,
    EVEN_D: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_tile(k_ptrs + start_n * skt, cols, T, d_ok, EDGE and not EVEN_T, EVEN_D, LOWP_DOT)
        v = _load_tile(v_ptrs + start_n * svt, cols, T, d_ok, EDGE and not EVEN_T, EVEN_D, LOWP_DOT)
        s = _dot(q, tl.trans(k), LOWP_DOT)  # [BM, BN]
        if EDGE:
            ok = _allowed(offs_m[:, None], cols[None, :], T, W, IS_CAUSAL, HAS_WINDOW, not EVEN_T)
            p = tl.math.exp2(tl.where(ok, tl.fma(s, qk_scale, -lse[:, None]), float("-inf")))
        else:
            p = tl.math.exp2(tl.fma(s, qk_scale, -lse[:, None]))
        dp = _dot(do, tl.trans(v), LOWP_DOT)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, LOWP_DOT)
    return dq


@triton.autotune(configs=_configs("dq"), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _fits("dq")})
@triton.heuristics(_HEURISTICS)
@triton.jit
def attention_bwd_dq_kernel(
    q_ptr,  # [B, Hq, T, D] queries
    k_ptr,  # [B, Hkv, T, D] keys
    v_ptr,  # [B, Hkv, T, D] values
    do_ptr,  # [B, Hq, T, D] output cotangent
    lse_ptr,  # [B, Hq, T] fp32 forward log-sum-exp in log2 units (the forward kernel's, contiguous)
    delta_ptr,  # [B, Hq, T] fp32 rowsum(dO * O) - dlse (contiguous)
    dq_ptr,  # [B, Hq, T, D] query gradient, its own dtype (contiguous)
    sqb,
    sqh,
    sqt,
    sqd,
    skb,
    skh,
    skt,
    skd,
    svb,
    svh,
    svt,
    svd,
    sdb,
    sdh,
    sdt,
    sdd,
    Hq,
    G,
    T,
    D,
    W,
    scale,
    T_BUCKET,
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_T: tl.constexpr,
    EVEN_D: tl.constexpr,
    INT64: tl.constexpr,
):
    """Grid (query blocks, B * Hq); same key loop split as the forward. Causal: programs renumbered so
    the last query blocks (the most keys) of every head start first."""
    num_m = tl.num_programs(0)
    n_bh = tl.num_programs(1)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if INT64:
        pid_m = pid_m.to(tl.int64)
        pid_bh = pid_bh.to(tl.int64)
    if IS_CAUSAL:
        lin = pid_bh * num_m + pid_m
        pid_m = num_m - 1 - lin // n_bh
        pid_bh = lin % n_bh
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qk_scale = scale * LOG2E  # the forward's: P = exp2(s * qk_scale - lse2)
    q = _load_tile(
        q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
        offs_m,
        T,
        d_ok,
        not EVEN_T,
        EVEN_D,
        LOWP_DOT,
    )  # [BM, BD]
    do = _load_tile(
        do_ptr + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd,
        offs_m,
        T,
        d_ok,
        not EVEN_T,
        EVEN_D,
        LOWP_DOT,
    )  # [BM, BD]
    if EVEN_T:
        lse = tl.load(lse_ptr + pid_bh * T + offs_m)  # [BM]
        delta = tl.load(delta_ptr + pid_bh * T + offs_m)
    else:
        lse = tl.load(lse_ptr + pid_bh * T + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(delta_ptr + pid_bh * T + offs_m, mask=offs_m < T, other=0.0)
    k_ptrs = k_ptr + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd
    v_ptrs = v_ptr + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    a = tl.maximum(start_m - W + 1, 0)
    a = (a // BLOCK_N) * BLOCK_N
    end_m = tl.minimum(start_m + BLOCK_M, T)
    if IS_CAUSAL:
        d = end_m
        c = (tl.minimum(start_m + 1, T) // BLOCK_N) * BLOCK_N
    else:
        d = tl.minimum(end_m + W - 1, T)
        c = (tl.minimum(start_m + W, T) // BLOCK_N) * BLOCK_N
    bb = ((tl.maximum(end_m - W, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    c = tl.maximum(tl.minimum(c, d), a)
    bb = tl.minimum(tl.maximum(bb, a), c)
    dq = _dq_loop(
        dq,
        q,
        do,
        lse,
        delta,
        k_ptrs,
        v_ptrs,
        skt,
        svt,
        offs_m,
        offs_n,
        d_ok,
        a,
        bb,
        T,
        W,
        qk_scale,
        True,
        IS_CAUSAL,
        HAS_WINDOW,
        EVEN_T,
        EVEN_D,
        LOWP_DOT,
        BLOCK_N,
    )
    dq = _dq_loop(
        dq,
        q,
        do,
        lse,
        delta,
        k_ptrs,
        v_ptrs,
        skt,
        svt,
        offs_m,
        offs_n,
        d_ok,
        bb,
        c,
        T,
        W,
        qk_scale,
        False,
        IS_CAUSAL,
        HAS_WINDOW,
        EVEN_T,
        EVEN_D,
        LOWP_DOT,
        BLOCK_N,
    )
    dq = _dq_loop(
        dq,
        q,
        do,
        lse,
        delta,
        k_ptrs,
        v_ptrs,
        skt,
        svt,
        offs_m,
        offs_n,
        d_ok,
        c,
        d,
        T,
        W,
        qk_scale,
        True,
        IS_CAUSAL,
        HAS_WINDOW,
        EVEN_T,
        EVEN_D,
        LOWP_DOT,
        BLOCK_N,
    )
    _store_tile(
        dq_ptr + pid_bh * T * D + offs_m[:, None] * D + offs_d[None, :],
        (dq * scale).to(dq_ptr.dtype.element_ty),
        offs_m,
        T,
        d_ok,
        not EVEN_T,
        EVEN_D,
    )


def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def _lowp(q):
    # fp16/bf16 dots on tensor cores when compiled (operands are exact in their own dtype; P is
    # rounded to it for P@V as in every flash attention); fp32 "ieee" dots in the interpreter, where
    # bf16 arithmetic is not trustworthy.
    return q.dtype in (torch.float16, torch.bfloat16) and not is_interpreting()


def _triton_fwd(q, k, v, causal, W, scale):
    """-> (out, lse2): lse2 in log2 units (lse / ln 2), what the backward kernels read. scale >= 0 here
    (``_FlashAttention`` flips q for a negative one)."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    o = empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    lse = empty((B, Hq, T), dtype=torch.float32, device=q.device)
    grid = lambda meta: (B * Hq, triton.cdiv(T, meta["BLOCK_M"]))
    attention_fwd_kernel[grid](
        q,
        k,
        v,
        o,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *o.stride(),
        Hq,
        G,
        T,
        D,
        W,
        scale,
        _t_bucket(T, W),
        IS_CAUSAL=causal,
        HAS_WINDOW=W < T,
        LOWP_DOT=_lowp(q),
        BLOCK_D=_block_d(D),
    )
    return o, lse


def _triton_delta(o, do, dlse):
    """rowsum(dO * O) - dlse, fp32 [B, Hq, T] (one pass over O and dO, no fp32 copies)."""
    B, Hq, T, D = o.shape
    delta = empty((B, Hq, T), dtype=torch.float32, device=o.device)
    dl = dlse.float().contiguous() if dlse is not None else delta
    BLOCK_T = 64
    attention_bwd_delta_kernel[(triton.cdiv(T, BLOCK_T), B * Hq)](
        o,
        do,
        dl,
        delta,
        *o.stride(),
        *do.stride(),
        Hq,
        T,
        D,
        HAS_DLSE=dlse is not None,
        BLOCK_T=BLOCK_T,
        BLOCK_D=_block_d(D),
    )
    return delta


def _triton_bwd(q, k, v, o, lse2, do, dlse, causal, W, scale):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    delta = _triton_delta(o, do, dlse)
    dq = empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    dk = empty((B, Hkv, T, D), dtype=k.dtype, device=q.device)
    dv = empty((B, Hkv, T, D), dtype=v.dtype, device=q.device)
    common = dict(IS_CAUSAL=causal, HAS_WINDOW=W < T, LOWP_DOT=_lowp(q), BLOCK_D=_block_d(D))
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    bucket = _t_bucket(T, W)
    attention_bwd_dkdv_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * Hkv)](
        q,
        k,
        v,
        do,
        lse2,
        delta,
        dk,
        dv,
        *strides,
        Hq,
        Hkv,
        G,
        T,
        D,
        W,
        scale,
        bucket,
        **common,
    )
    attention_bwd_dq_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * Hq)](
        q,
        k,
        v,
        do,
        lse2,
        delta,
        dq,
        *strides,
        Hq,
        G,
        T,
        D,
        W,
        scale,
        bucket,
        **common,
    )
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    """The kernels take scale >= 0 (their row max is max(s) * scale): a negative scale runs on -q, which
    is exact, and dq flips back."""

    @staticmethod
    def forward(ctx, q, k, v, causal, W, scale):
        qs = -q if scale < 0 else q
        o, lse2 = _triton_fwd(qs, k, v, causal, W, abs(scale))
        ctx.save_for_backward(qs, k, v, o, lse2)
        ctx.causal, ctx.W, ctx.scale = causal, W, scale
        return o, lse2 * LN2.value

    @staticmethod
    def backward(ctx, do, dlse):
        qs, k, v, o, lse2 = ctx.saved_tensors
        dq, dk, dv = _triton_bwd(qs, k, v, o, lse2, do, dlse, ctx.causal, ctx.W, abs(ctx.scale))
        return (-dq if ctx.scale < 0 else dq), dk, dv, None, None, None


# ----------------------------------------------------------------------------------------------
# public API


def flash_attention_with_lse(q, k, v, *, causal=True, window=None, scale=None, backend="auto"):
    """Masked softmax attention returning ``(out [B, Hq, T, D], lse [B, Hq, T])``; both differentiable.

    ``window=w``: query i sees keys i - w < j <= i (w keys including itself); ``scale`` defaults to
    1/sqrt(D). ``backend``: "auto" (Triton on CUDA, torch otherwise), "torch" or "triton"."""
    return _attention(q, k, v, causal, window, scale, backend, need_lse=True)


def _attention(q, k, v, causal, window, scale, backend, need_lse):
    _validate(q, k, v, window, scale)
    backend = resolve_backend(backend, q)
    T, D = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    causal = bool(causal)
    if backend == "torch":
        return _torch_attention(q, k, v, causal, window, scale, need_lse=need_lse)
    if q.dtype == torch.float64:
        raise ValueError(
            "backend='triton' supports fp16/bf16/fp32 inputs, got torch.float64 (use backend='torch')"
        )
    if D > 128:  # tiles are [BLOCK, next_pow2(D)]: larger heads are untested on GPU (shared memory)
        raise ValueError(f"backend='triton' supports head dim D <= 128, got D={D} (use backend='torch')")
    W = T if window is None else min(int(window), T)  # w >= T sees every allowed key: same as no window
    return _FlashAttention.apply(q, k, v, causal, W, scale)


def flash_attention(q, k, v, *, causal=True, window=None, scale=None, backend="auto"):
    """Masked softmax attention, ``out [B, Hq, T, D]`` (see ``flash_attention_with_lse``)."""
    return _attention(q, k, v, causal, window, scale, backend, need_lse=False)[0]


# ----------------------------------------------------------------------------------------------------
# a longer key sequence (a KV cache) or padding: bottom-right aligned, with a key mask


def attention_mask(tq: int, tk: int, *, window: int | None, key_valid, device) -> torch.Tensor:
    """Boolean mask ``[B or 1, 1, Tq, Tk]``, True = the query may look at the key (bottom-right aligned: the
    Tq queries are the last Tq of the Tk key positions). ``key_valid [B, Tk]``: False at padding keys; a
    query always sees itself, so a padding query's row is never fully masked (no NaN; nothing reads it)."""
    qi = torch.arange(tk - tq, tk, device=device)[:, None]  # [Tq, 1] key index of each query
    kj = torch.arange(tk, device=device)[None, :]  # [1, Tk]
    allowed = kj <= qi
    if window is not None:
        allowed = allowed & (kj > qi - window)
    allowed = allowed[None, None]  # [1, 1, Tq, Tk]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :].bool()
        allowed = allowed | (kj == qi)[None, None]
    return allowed


def attention_kv(q, k, v, *, window=None, key_valid=None, scale=None):  # [B,Hq,Tq,D], [B,Hkv,Tk,D] x2
    """Causal (sliding-window when ``window`` is set) attention of ``Tq <= Tk`` queries against a key
    sequence, bottom-right aligned, with an optional ``key_valid [B, Tk]`` padding mask; GQA when
    ``Hq`` is a multiple of ``Hkv``. Equal lengths without padding on CUDA run the kernels of this module;
    everything else runs SDPA with the explicit mask of :func:`attention_mask`."""
    tq, tk = q.shape[-2], k.shape[-2]
    if q.is_cuda and key_valid is None and tq == tk and q.dtype != torch.float64 and q.shape[-1] <= 128:
        return flash_attention(q, k, v, causal=True, window=window, scale=scale)
    mask = attention_mask(tq, tk, window=window, key_valid=key_valid, device=q.device)
    gqa = q.shape[1] != k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa
    )
