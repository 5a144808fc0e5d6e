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

from fast.utils import check_float, empty, is_interpreting, resolve_backend

__all__ = ["flash_attention", "flash_attention_with_lse", "key_block_range", "query_block_range"]

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


def _torch_attention(q, k, v, causal, window, scale, chunk=TORCH_CHUNK):
    """Returns (out [B, Hq, T, D] in q.dtype, lse [B, Hq, T] fp32/fp64). Only the keys a query chunk
    can see (``key_block_range``) are multiplied, so sliding-window cost is O(T * (w + chunk))."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp32 accumulation
    qc = q.to(cdt)
    kc = k.to(cdt).repeat_interleave(G, dim=1)  # [B, Hq, T, D]
    vc = v.to(cdt).repeat_interleave(G, dim=1)  # [B, Hq, T, D]
    idx = torch.arange(T, device=q.device)
    outs, lses = [], []
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        lo, hi = key_block_range(a, b - a, 1, T, causal=causal, window=window)
        s = (qc[:, :, a:b] @ kc[:, :, lo:hi].transpose(-1, -2)) * scale  # [B, Hq, b-a, hi-lo]
        i, j = idx[a:b, None], idx[None, lo:hi]
        ok = torch.ones(b - a, hi - lo, dtype=torch.bool, device=q.device)
        if causal:
            ok &= j <= i
        if window is not None:
            ok &= (i - j) < window
            if not causal:
                ok &= (j - i) < window
        s = s.masked_fill(~ok, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # [B, Hq, b-a]; finite: the diagonal is always allowed
        p = torch.exp(s - lse[..., None])
        outs.append(p @ vc[:, :, lo:hi])
        lses.append(lse)
    out = torch.cat(outs, dim=2).to(q.dtype)
    return out, torch.cat(lses, dim=2)


# ----------------------------------------------------------------------------------------------
# Triton kernels


def _configs(kind):
    """CUDA: three tensor-core tiles to autotune over for fp16/bf16, then one small fp32 tile (fp32
    "ieee" dots run on CUDA cores, fully unrolled: big tiles gain nothing and take ~20 s to compile)."""
    if is_interpreting():  # interpreter cost ~ programs x loop iterations: one big-block config
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    if kind == "fwd":
        shapes = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (32, 32, 4, 2)]
    else:  # bwd kernels hold two fp32 [BLOCK, D] accumulators: smaller tiles
        shapes = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Autotune key: not T itself (every new length would re-tune, minutes on a GPU check) but a bucket;
# short sequences (tests, tiny GPTs) keep only the first config, so a key costs one compile.
_TUNE_KEY = ["T_BUCKET", "BLOCK_D", "IS_CAUSAL", "HAS_WINDOW", "LOWP_DOT"]


def _prune(configs, nargs, **kwargs):
    if len(configs) == 1:  # interpreter
        return configs
    if not kwargs.get("LOWP_DOT", False):
        return configs[-1:]  # fp32: the small CUDA-core tile
    return configs[:-1] if nargs["T_BUCKET"] else configs[:1]


@triton.autotune(configs=_configs("fwd"), key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def attention_fwd_kernel(
    q_ptr,  # [B, Hq, T, D] queries (any strides)
    k_ptr,  # [B, Hkv, T, D] keys
    v_ptr,  # [B, Hkv, T, D] values
    o_ptr,  # [B, Hq, T, D] output, input dtype
    lse_ptr,  # [B, Hq, T] fp32 log-sum-exp per query (contiguous)
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sob, soh, sot, sod,
    Hq, G, T, D, W,  # G = Hq // Hkv; W = window (T when None)
    scale, T_BUCKET,  # T_BUCKET: autotune key only (0: T <= 1024, tuned once with one config)
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, LOWP_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BM] query rows
    offs_d = tl.arange(0, BLOCK_D)  # [BD] head dim, padded to a power of two >= 16
    row_ok = offs_m < T
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BM, BD]
    if LOWP_DOT:  # exact: q came from this dtype; lets tl.dot use fp16/bf16 tensor cores
        q_dot = q.to(k_ptr.dtype.element_ty)
    else:
        q_dot = q
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running numerator
    # loop bounds = key_block_range(): key blocks wholly outside the window are never visited
    lo = tl.maximum(start_m - W + 1, 0)  # 0 without a window (W = T)
    lo = (lo // BLOCK_N) * BLOCK_N
    end_m = tl.minimum(start_m + BLOCK_M, T)
    if IS_CAUSAL:
        hi = end_m
    else:
        hi = tl.minimum(end_m + W - 1, T)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BN]
        col_ok = offs_n < T
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd,
                    mask=kv_mask, other=0.0).to(tl.float32)  # [BN, BD]
        v = tl.load(v_ptr + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd,
                    mask=kv_mask, other=0.0).to(tl.float32)  # [BN, BD]
        if LOWP_DOT:
            s = tl.dot(q_dot, tl.trans(k.to(k_ptr.dtype.element_ty)))
        else:
            s = tl.dot(q_dot, tl.trans(k), input_precision="ieee")  # [BM, BN]
        s = s * scale
        ok = row_ok[:, None] & col_ok[None, :]
        if IS_CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        if HAS_WINDOW:
            ok = ok & (offs_m[:, None] - offs_n[None, :] < W)
            if not IS_CAUSAL:
                ok = ok & (offs_n[None, :] - offs_m[:, None] < W)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked row: no -inf - -inf
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])  # [BM, BN], 0 where masked
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if LOWP_DOT:
            pv = tl.dot(p.to(v_ptr.dtype.element_ty), v.to(v_ptr.dtype.element_ty))
        else:
            pv = tl.dot(p, v, input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padded rows (offs_m >= T) can have l = 0
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_safe))
    tl.store(o_ptr + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + pid_bh * T + offs_m, lse, mask=row_ok)


@triton.autotune(configs=_configs("bwd"), key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def attention_bwd_dkdv_kernel(
    q_ptr,  # [B, Hq, T, D] queries
    k_ptr,  # [B, Hkv, T, D] keys
    v_ptr,  # [B, Hkv, T, D] values
    do_ptr,  # [B, Hq, T, D] output cotangent
    lse_ptr,  # [B, Hq, T] fp32 forward log-sum-exp (contiguous)
    delta_ptr,  # [B, Hq, T] fp32 rowsum(dO * O) - dlse (contiguous)
    dk_ptr,  # [B, Hkv, T, D] key gradient, input dtype (contiguous)
    dv_ptr,  # [B, Hkv, T, D] value gradient, input dtype (contiguous)
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sdb, sdh, sdt, sdd,
    Hq, Hkv, G, T, D, W,
    scale, T_BUCKET,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, LOWP_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (key block, batch, kv head): loops over the G query heads of the group and over
    the query blocks that can see this key block (``query_block_range``), recomputing P from lse.
    Summing the group inside the program avoids atomics (and so is safe to autotune-rerun)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BN]
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < T
    d_ok = offs_d < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd,
                mask=kv_mask, other=0.0).to(tl.float32)  # [BN, BD]
    v = tl.load(v_ptr + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd,
                mask=kv_mask, other=0.0).to(tl.float32)  # [BN, BD]
    if LOWP_DOT:
        k_dot = k.to(k_ptr.dtype.element_ty)
        v_dot = v.to(v_ptr.dtype.element_ty)
    else:
        k_dot = k
        v_dot = v
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if IS_CAUSAL:
        lo = start_n
    else:
        lo = tl.maximum(start_n - W + 1, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    end_n = tl.minimum(start_n + BLOCK_N, T)
    hi = tl.minimum(end_n + W - 1, T)
    for g in range(0, G):
        h = hk * G + g
        row_base = (b * Hq + h) * T
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)  # [BM]
            row_ok = offs_m < T
            qd_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                        mask=qd_mask, other=0.0).to(tl.float32)  # [BM, BD]
            do = tl.load(do_ptr + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd,
                         mask=qd_mask, other=0.0).to(tl.float32)  # [BM, BD]
            lse = tl.load(lse_ptr + row_base + offs_m, mask=row_ok, other=0.0)  # [BM]
            delta = tl.load(delta_ptr + row_base + offs_m, mask=row_ok, other=0.0)  # [BM]
            if LOWP_DOT:
                s = tl.dot(q.to(k_ptr.dtype.element_ty), tl.trans(k_dot))
                dp = tl.dot(do.to(v_ptr.dtype.element_ty), tl.trans(v_dot))
            else:
                s = tl.dot(q, tl.trans(k_dot), input_precision="ieee")  # [BM, BN]
                dp = tl.dot(do, tl.trans(v_dot), input_precision="ieee")  # [BM, BN]
            ok = row_ok[:, None] & col_ok[None, :]
            if IS_CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
            if HAS_WINDOW:
                ok = ok & (offs_m[:, None] - offs_n[None, :] < W)
                if not IS_CAUSAL:
                    ok = ok & (offs_n[None, :] - offs_m[:, None] < W)
            # softmax recomputed from lse; masked entries -> exp(-inf) = 0 (no overflow of exp(big))
            p = tl.exp(tl.where(ok, s * scale - lse[:, None], float("-inf")))  # [BM, BN]
            ds = p * (dp - delta[:, None])  # [BM, BN]
            if LOWP_DOT:
                dv += tl.dot(tl.trans(p.to(do_ptr.dtype.element_ty)), do.to(do_ptr.dtype.element_ty))
                dk += tl.dot(tl.trans(ds.to(q_ptr.dtype.element_ty)), q.to(q_ptr.dtype.element_ty))
            else:
                dv += tl.dot(tl.trans(p), do, input_precision="ieee")
                dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
    out_off = (b * Hkv + hk) * T * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(dk_ptr + out_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.autotune(configs=_configs("bwd"), key=_TUNE_KEY,
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def attention_bwd_dq_kernel(
    q_ptr,  # [B, Hq, T, D] queries
    k_ptr,  # [B, Hkv, T, D] keys
    v_ptr,  # [B, Hkv, T, D] values
    do_ptr,  # [B, Hq, T, D] output cotangent
    lse_ptr,  # [B, Hq, T] fp32 forward log-sum-exp (contiguous)
    delta_ptr,  # [B, Hq, T] fp32 rowsum(dO * O) - dlse (contiguous)
    dq_ptr,  # [B, Hq, T, D] query gradient, input dtype (contiguous)
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sdb, sdh, sdt, sdd,
    Hq, G, T, D, W,
    scale, T_BUCKET,
    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, LOWP_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (query block, batch, query head); same key loop bounds as the forward."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < D
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=qd_mask, other=0.0).to(tl.float32)  # [BM, BD]
    do = tl.load(do_ptr + b * sdb + h * sdh + offs_m[:, None] * sdt + offs_d[None, :] * sdd,
                 mask=qd_mask, other=0.0).to(tl.float32)  # [BM, BD]
    lse = tl.load(lse_ptr + pid_bh * T + offs_m, mask=row_ok, other=0.0)  # [BM]
    delta = tl.load(delta_ptr + pid_bh * T + offs_m, mask=row_ok, other=0.0)  # [BM]
    if LOWP_DOT:
        q_dot = q.to(q_ptr.dtype.element_ty)
        do_dot = do.to(do_ptr.dtype.element_ty)
    else:
        q_dot = q
        do_dot = do
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo = tl.maximum(start_m - W + 1, 0)  # 0 without a window (W = T)
    lo = (lo // BLOCK_N) * BLOCK_N
    end_m = tl.minimum(start_m + BLOCK_M, T)
    if IS_CAUSAL:
        hi = end_m
    else:
        hi = tl.minimum(end_m + W - 1, T)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < T
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :] * skd,
                    mask=kv_mask, other=0.0).to(tl.float32)  # [BN, BD]
        v = tl.load(v_ptr + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :] * svd,
                    mask=kv_mask, other=0.0).to(tl.float32)  # [BN, BD]
        if LOWP_DOT:
            s = tl.dot(q_dot, tl.trans(k.to(k_ptr.dtype.element_ty)))
            dp = tl.dot(do_dot, tl.trans(v.to(v_ptr.dtype.element_ty)))
        else:
            s = tl.dot(q_dot, tl.trans(k), input_precision="ieee")
            dp = tl.dot(do_dot, tl.trans(v), input_precision="ieee")
        ok = row_ok[:, None] & col_ok[None, :]
        if IS_CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        if HAS_WINDOW:
            ok = ok & (offs_m[:, None] - offs_n[None, :] < W)
            if not IS_CAUSAL:
                ok = ok & (offs_n[None, :] - offs_m[:, None] < W)
        p = tl.exp(tl.where(ok, s * scale - lse[:, None], float("-inf")))  # [BM, BN], 0 where masked
        ds = p * (dp - delta[:, None])
        if LOWP_DOT:
            dq += tl.dot(ds.to(k_ptr.dtype.element_ty), k.to(k_ptr.dtype.element_ty))
        else:
            dq += tl.dot(ds, k, input_precision="ieee")
    tl.store(dq_ptr + pid_bh * T * D + offs_m[:, None] * D + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=qd_mask)


def _t_bucket(T):
    return 0 if T <= 1024 else 1


def _block_d(D):
    return max(16, triton.next_power_of_2(D))


def _lowp(q):
    # fp16/bf16 dots on tensor cores when compiled (operands are exact in their own dtype; P is
    # rounded to it for P@V as in every flash attention); fp32 "ieee" dots in the interpreter, where
    # bf16 arithmetic is not trustworthy.
    return q.dtype in (torch.float16, torch.bfloat16) and not is_interpreting()


def _triton_fwd(q, k, v, causal, W, scale):
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    o = empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    lse = empty((B, Hq, T), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * Hq)
    attention_fwd_kernel[grid](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        Hq, G, T, D, W, scale, _t_bucket(T),
        IS_CAUSAL=causal, HAS_WINDOW=W < T, LOWP_DOT=_lowp(q), BLOCK_D=_block_d(D),
    )
    return o, lse


def _triton_bwd(q, k, v, o, lse, do, dlse, causal, W, scale):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    delta = (do.float() * o.float()).sum(-1)  # [B, Hq, T]
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    dq = empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    dk = empty((B, Hkv, T, D), dtype=k.dtype, device=q.device)
    dv = empty((B, Hkv, T, D), dtype=v.dtype, device=q.device)
    common = dict(IS_CAUSAL=causal, HAS_WINDOW=W < T, LOWP_DOT=_lowp(q), BLOCK_D=_block_d(D))
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    attention_bwd_dkdv_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, *strides, Hq, Hkv, G, T, D, W, scale, _t_bucket(T), **common,
    )
    attention_bwd_dq_kernel[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * Hq)](
        q, k, v, do, lse, delta, dq, *strides, Hq, G, T, D, W, scale, _t_bucket(T), **common,
    )
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, W, scale):
        o, lse = _triton_fwd(q, k, v, causal, W, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.W, ctx.scale = causal, W, scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _triton_bwd(q, k, v, o, lse, do, dlse, ctx.causal, ctx.W, ctx.scale)
        return dq, dk, dv, None, None, None


# ----------------------------------------------------------------------------------------------
# public API


def flash_attention_with_lse(q, k, v, *, causal=True, window=None, scale=None, backend="auto"):
    """Masked softmax attention returning ``(out [B, Hq, T, D], lse [B, Hq, T])``; both differentiable.

    ``window=w``: query i sees keys i - w < j <= i (w keys including itself); ``scale`` defaults to
    1/sqrt(D). ``backend``: "auto" (Triton on CUDA, torch otherwise), "torch" or "triton"."""
    _validate(q, k, v, window, scale)
    backend = resolve_backend(backend, q)
    T, D = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    causal = bool(causal)
    if backend == "torch":
        return _torch_attention(q, k, v, causal, window, scale)
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
    return flash_attention_with_lse(q, k, v, causal=causal, window=window, scale=scale, backend=backend)[0]
