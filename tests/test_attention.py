"""Attention: the NumPy oracle against itself and finite differences, then fast (torch + Triton) vs oracle.

Kernel tests run on ``DEVICE`` (CUDA when present, else the Triton interpreter on CPU); outputs are
NaN-poisoned by conftest, so a lane a kernel forgets to write fails every comparison.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import fast.attention as attention_module
from fast.attention import (
    _needs_int64,
    _torch_attention,
    flash_attention,
    flash_attention_with_lse,
    key_block_range,
    key_block_split,
    query_block_range,
    query_block_split,
)
from fast.testing import assert_close, central_difference, compare
from reference.attention import (
    allowed,
    attention,
    attention_by_definition,
    attention_grad,
    attention_mask,
    online_softmax_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# reference


def test_mask_hand_computed():
    # T = 4, window = 2, causal: each query sees itself and its left neighbour (w keys incl. itself)
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=bool)
    assert np.array_equal(attention_mask(4, causal=True, window=2), expected)
    # non-causal window 2 = symmetric band |i - j| < 2
    band = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=bool)
    assert np.array_equal(attention_mask(4, causal=False, window=2), band)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 3, 7, 50])
def test_mask_predicate_vs_dense_loop(causal, window):
    T = 13
    dense = np.zeros((T, T), dtype=bool)
    for i in range(T):
        for j in range(T):
            if causal:
                lo = -1 if window is None else i - window
                dense[i, j] = lo < j <= i
            else:
                dense[i, j] = window is None or abs(i - j) < window
    assert np.array_equal(attention_mask(T, causal=causal, window=window), dense)
    assert np.array_equal(
        allowed(np.arange(T)[:, None], np.arange(T)[None, :], causal=causal, window=window), dense
    )


def test_window_edges():
    rng = np.random.default_rng(0)
    T, D = 9, 5
    q, k, v = rng.standard_normal((3, T, D))
    # w = 1: the diagonal only -> out = v, lse = scale * q_i . k_i
    out, lse = attention(q, k, v, window=1)
    assert_close(out, v, dtype="float64", name="w=1 out")
    assert_close(lse, (q * k).sum(-1) / math.sqrt(D), dtype="float64", name="w=1 lse")
    # w >= T: full causal
    full = attention(q, k, v, window=None)
    for w in (T, T + 5):
        for a, b in zip(attention(q, k, v, window=w), full, strict=True):
            assert_close(a, b, dtype="float64", name=f"w={w}")
    # w = T - 1 differs from full causal in exactly the last row
    o1, _ = attention(q, k, v, window=T - 1)
    assert_close(o1[:-1], full[0][:-1], dtype="float64", name="w=T-1, rows before the last")
    assert not compare(o1[-1], full[0][-1], dtype="float64")[0], "w=T-1 must drop key 0 from the last row"


@given(
    T=st.integers(1, 12),
    D=st.integers(1, 6),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 14)),
    seed=st.integers(0, 2**16),
)
def test_reference_vs_by_definition_and_online(T, D, causal, window, seed):
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((3, T, D))
    out, lse = attention(q, k, v, causal=causal, window=window, scale=0.7)
    o2, l2 = attention_by_definition(q, k, v, causal=causal, window=window, scale=0.7)
    o3, l3 = online_softmax_attention(q, k, v, block=4, causal=causal, window=window, scale=0.7)
    for name, a, b in (("out", out, o2), ("lse", lse, l2), ("online out", o3, out), ("online lse", l3, lse)):
        assert_close(a, b, dtype="float64", name=name)


def test_reference_huge_logits_stay_finite():
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((3, 6, 4))
    out, lse = attention(100 * q, 100 * k, v)  # scores ~ +-1e4
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    o2, l2 = attention_by_definition(100 * q, 100 * k, v)
    assert_close(out, o2, dtype="float64", name="out")
    assert_close(lse, l2, dtype="float64", name="lse")


@pytest.mark.parametrize("causal,window", [(True, None), (True, 2), (False, None), (False, 2)])
def test_reference_grad_finite_differences(causal, window):
    rng = np.random.default_rng(2)
    T, D = 5, 3
    q, k, v, dout = rng.standard_normal((4, T, D))
    dlse = rng.standard_normal(T)

    def loss(q, k, v):  # scalar L = <out, dout> + <lse, dlse>
        out, lse = attention(q, k, v, causal=causal, window=window, scale=0.8)
        return float((out * dout).sum() + (lse * dlse).sum())

    grads = attention_grad(q, k, v, dout, causal=causal, window=window, scale=0.8, dlse=dlse)
    eps = 1e-6
    for idx, (x, g) in enumerate(zip((q, k, v), grads, strict=True)):

        def loss_of(x_, idx=idx):  # L with argument idx (0: q, 1: k, 2: v) replaced by x_
            args = [q, k, v]
            args[idx] = x_
            return loss(*args)

        fd = central_difference(loss_of, x, eps=eps)
        assert_close(g, fd, dtype="float64", name=("dq", "dk", "dv")[idx], atol=1e-7, rtol=1e-6, rms=1e-7)
        # FD truncation/rounding error ~ eps^2 + 1e-16/eps ~ 1e-10 per entry: looser than the fp64 row


def test_reference_bad_window():
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="window must be >= 1"):
        attention(x, x, x, window=0)
    with pytest.raises(ValueError, match="share a shape"):
        attention(x, x, np.zeros((3, 3)))


# ----------------------------------------------------------------------------------------------
# block bookkeeping (the kernels' loop bounds): visited blocks == blocks holding an allowed pair


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 5, 16, 40, 200])
@pytest.mark.parametrize("T,bm,bn", [(100, 16, 16), (97, 32, 16), (64, 16, 32)])
def test_block_ranges_are_exact(T, bm, bn, causal, window):
    mask = attention_mask(T, causal=causal, window=window)
    for start_m in range(0, T, bm):
        lo, hi = key_block_range(start_m, bm, bn, T, causal=causal, window=window)
        visited = set(range(lo, hi, bn))
        needed = {s for s in range(0, T, bn) if mask[start_m : start_m + bm, s : s + bn].any()}
        assert visited == needed, (start_m, sorted(visited), sorted(needed))
    for start_n in range(0, T, bn):
        lo, hi = query_block_range(start_n, bn, bm, T, causal=causal, window=window)
        visited = set(range(lo, hi, bm))
        needed = {s for s in range(0, T, bm) if mask[s : s + bm, start_n : start_n + bn].any()}
        assert visited == needed, (start_n, sorted(visited), sorted(needed))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 1, 5, 16, 40, 63, 64, 65, 200])
@pytest.mark.parametrize("T,bm,bn", [(100, 16, 16), (97, 32, 16), (64, 16, 32), (256, 64, 64), (130, 64, 32)])
def test_block_splits_interior_needs_no_mask(T, bm, bn, causal, window):
    """Interior blocks (no mask in the kernels) hold only allowed pairs with both indices < T; edge +
    interior blocks are exactly the visited range, in order."""
    mask = attention_mask(T, causal=causal, window=window)
    for start_m in range(0, T, bm):
        a, b, c, d = key_block_split(start_m, bm, bn, T, causal=causal, window=window)
        assert (a, d) == key_block_range(start_m, bm, bn, T, causal=causal, window=window)
        assert a <= b <= c <= d and b % bn == 0 == c % bn
        for s in range(b, c, bn):
            rows = slice(start_m, min(start_m + bm, T))  # rows >= T are never stored
            assert s + bn <= T and mask[rows, s : s + bn].all(), (start_m, s)
    for start_n in range(0, T, bn):
        a, b, c, d = query_block_split(start_n, bn, bm, T, causal=causal, window=window)
        assert (a, d) == query_block_range(start_n, bn, bm, T, causal=causal, window=window)
        assert a <= b <= c <= d and b % bm == 0 == c % bm
        for s in range(b, c, bm):
            cols = slice(start_n, min(start_n + bn, T))  # keys >= T are never stored
            assert s + bm <= T and mask[s : s + bm, cols].all(), (start_n, s)


def test_block_splits_have_interior_blocks():
    # long causal rows are mostly interior (the point of the split): the diagonal block is the only edge
    a, b, c, d = key_block_split(1024, 128, 64, 4096)
    assert (a, b, c, d) == (0, 0, 1024, 1152)
    a, b, c, d = key_block_split(1024, 128, 64, 4096, window=512)  # window: 2 edge blocks below, 1 above
    assert (a, b, c, d) == (512, 640, 1024, 1152)
    a, b, c, d = query_block_split(1024, 128, 64, 4096, window=512)
    assert (a, b, c, d) == (1024, 1152, 1536, 1663)


def test_sliding_window_cost_is_linear_in_T():
    # the number of (query block, key block) tiles visited grows like T * w, not T^2
    def tiles(T, window):
        return sum(len(range(*key_block_range(s, 64, 64, T, window=window), 64)) for s in range(0, T, 64))

    # linear: each extra 4096 rows add the same number of tiles (w/64 + 1 = 5 per query block)
    assert tiles(12288, 256) - tiles(8192, 256) == tiles(8192, 256) - tiles(4096, 256) == 5 * 4096 // 64
    assert tiles(8192, None) > 3.9 * tiles(4096, None)


# ----------------------------------------------------------------------------------------------
# fast vs reference


def _reference(q, k, v, do, dlse, causal, window, scale):
    """Oracle on the rounded inputs (float64), GQA by repeating kv heads and summing their grads."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    qn, kn, vn = (x.detach().double().cpu().numpy() for x in (q, k, v))
    kr, vr = np.repeat(kn, G, axis=1), np.repeat(vn, G, axis=1)
    out, lse = attention(qn, kr, vr, causal=causal, window=window, scale=scale)
    dq, dk, dv = attention_grad(
        qn,
        kr,
        vr,
        do.double().cpu().numpy(),
        causal=causal,
        window=window,
        scale=scale,
        dlse=None if dlse is None else dlse.double().cpu().numpy(),
    )
    dk = dk.reshape(B, -1, G, T, D).sum(2)
    dv = dv.reshape(B, -1, G, T, D).sum(2)
    return out, lse, dq, dk, dv


def _lse_slack(q, k, v, do, dlse, causal, window, scale):
    """Elementwise bound on how far the Triton gradients move because P is recomputed from an fp32 lse.

    A stored lse is exact only to its half-ulp, <= |lse| 2^-24 (natural log; the kernels keep it in log2
    units, whose half-ulp times ln 2 has the same bound). That scales row i of the recomputed P by
    (1 + eps_i), |eps_i| <= |lse_i| 2^-24, so to first order dV_j moves by sum_i eps_i P_ij |dO_i|, dS_ij by
    eps_i |dS_ij|, dQ_i by scale sum_j eps_i |dS_ij| |K_j| and dK_j by scale sum_i eps_i |dS_ij| |Q_i|.
    Negligible for ordinary scores (|lse| ~ 10: 6e-7 relative); at |q.k scale| ~ 1e4 (test_huge_logits) it
    is ~3e-4, above fp32's rtol. Every flash attention that keeps one fp32 lse per row shares it."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    qn, kn, vn, don = (x.detach().double().cpu().numpy() for x in (q, k, v, do))
    kr, vr = np.repeat(kn, G, axis=1), np.repeat(vn, G, axis=1)
    mask = attention_mask(T, causal=causal, window=window)
    s = np.where(mask, scale * qn @ np.swapaxes(kr, -1, -2), -np.inf)
    mx = s.max(-1, keepdims=True)
    lse = mx + np.log(np.exp(s - mx).sum(-1, keepdims=True))  # [B, Hq, T, 1]
    p = np.exp(s - lse)
    delta = (don * (p @ vr)).sum(-1, keepdims=True)
    if dlse is not None:
        delta = delta - dlse.double().cpu().numpy()[..., None]
    ds = np.abs(p * (don @ np.swapaxes(vr, -1, -2) - delta))
    eps = np.abs(lse) * 2.0**-24
    dq = abs(scale) * (eps * ds) @ np.abs(kr)
    dk = (abs(scale) * np.swapaxes(eps * ds, -1, -2) @ np.abs(qn)).reshape(B, -1, G, T, D).sum(2)
    dv = (np.swapaxes(eps * p, -1, -2) @ np.abs(don)).reshape(B, -1, G, T, D).sum(2)
    return {"dq": dq, "dk": dk, "dv": dv}


def _run(backend, B, Hkv, G, T, D, causal, window, dtype, seed, mag=1.0, scale=None, with_lse=True):
    gen = torch.Generator().manual_seed(seed)
    q = (mag * torch.randn(B, Hkv * G, T, D, generator=gen)).to(dtype)
    k = (mag * torch.randn(B, Hkv, T, D, generator=gen)).to(dtype)
    v = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
    do = torch.randn(B, Hkv * G, T, D, generator=gen).to(dtype)  # random cotangent, not ones
    dlse = torch.randn(B, Hkv * G, T, generator=gen) if with_lse else None
    qd, kd, vd = (x.clone().to(DEVICE).requires_grad_() for x in (q, k, v))
    if with_lse:
        out, lse = flash_attention_with_lse(
            qd, kd, vd, causal=causal, window=window, scale=scale, backend=backend
        )
        ((out.float() * do.to(DEVICE).float()).sum() + (lse * dlse.to(DEVICE)).sum()).backward()
    else:
        out = flash_attention(qd, kd, vd, causal=causal, window=window, scale=scale, backend=backend)
        lse = None
        out.backward(do.to(DEVICE))
    sc = (1 / math.sqrt(D)) if scale is None else scale
    ref = _reference(q, k, v, do, dlse, causal, window, sc)
    # the torch backend differentiates through its forward; the kernels recompute P from the fp32 lse
    slack = _lse_slack(q, k, v, do, dlse, causal, window, sc) if backend == "triton" else {}
    assert out.dtype == dtype and out.shape == q.shape
    got = (out, lse, qd.grad, kd.grad, vd.grad)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref, strict=True):
        if a is not None:
            assert_close(a, b, dtype=dtype, name=f"{backend} {name}", slack=slack.get(name, 0.0))
    return got


@pytest.mark.gpu
def test_gpu_bf16_two_tokens_dq():
    """Open question from fuzzing (2026-11-28), for the next compiled run: under the *interpreter* this
    bf16 case gives a Triton dq 1.6e-2 off in relative RMS (budget 1e-2), the torch backend 1.9e-3.
    Rounding dS to bf16 before the dq dot explains only 1.7e-3, and Delta from the bf16 output makes
    it worse, so the suspect is the interpreter's bf16 tl.dot (its bf16 arithmetic is known to be
    wrong). Compiled on a GPU this must pass at the plain bf16 tolerance; if it does not, the kernel's
    bf16 backward loses precision and needs a look, not a wider tolerance."""
    _run("triton", 1, 1, 1, 2, 64, False, None, torch.bfloat16, 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    G=st.sampled_from([1, 2, 3]),
    T=st.integers(1, 300),
    D=st.sampled_from([16, 20, 32, 64]),
    causal=st.booleans(),
    wkind=st.sampled_from(["none", "one", "small", "geT"]),
    dtype=st.sampled_from(sorted(DTYPES)),
    seed=st.integers(0, 2**16),
)
@example(B=1, Hkv=1, G=1, T=1, D=16, causal=True, wkind="one", dtype="fp32", seed=0)  # single token
@example(B=1, Hkv=1, G=1, T=65, D=16, causal=True, wkind="small", dtype="fp32", seed=1)  # 1 row past a block
@example(B=1, Hkv=2, G=3, T=300, D=20, causal=True, wkind="small", dtype="bf16", seed=2)  # GQA, padded D
@example(B=2, Hkv=1, G=2, T=129, D=16, causal=False, wkind="small", dtype="fp16", seed=3)  # symmetric band
@example(B=1, Hkv=1, G=1, T=200, D=16, causal=False, wkind="none", dtype="fp32", seed=4)
def test_fast_vs_reference(backend, B, Hkv, G, T, D, causal, wkind, dtype, seed):
    window = {"none": None, "one": 1, "small": 1 + seed % 40, "geT": T + seed % 3}[wkind]
    _run(backend, B, Hkv, G, T, D, causal, window, DTYPES[dtype], seed)


_MANY = [(300, 1, 1, 3, True, None), (1, 75, 4, 5, True, 2), (3, 100, 1, 1, False, 1)]


@given(
    B=st.integers(1, 300),
    Hkv=st.integers(1, 300),
    G=st.sampled_from([1, 2, 4]),
    T=st.integers(1, 5),
    causal=st.booleans(),
    window=st.sampled_from([None, 1, 2]),
    seed=st.integers(0, 2**16),
)
def test_many_batches_and_heads_torch(B, Hkv, G, T, causal, window, seed):
    # B, H in [1, 300] (B*H*G capped at 300 to keep the oracle cheap; T tiny for the same reason)
    Hkv = max(1, min(Hkv, 300 // (B * G)))
    _run("torch", B, Hkv, G, T, 16, causal, window, torch.float32, seed)


@pytest.mark.parametrize("B,Hkv,G,T,causal,window", _MANY, ids=["B300", "Hq300-gqa4", "H300-T1"])
def test_many_batches_and_heads_triton(B, Hkv, G, T, causal, window):
    # The grid spans B*H programs: batch/head stride math and the GQA head mapping far past the small
    # B, H of test_fast_vs_reference. Pinned cases only: each is 300 interpreted programs per kernel.
    _run("triton", B, Hkv, G, T, 16, causal, window, torch.float32, seed=B + Hkv)


# The interpreter runs one 64 x 64 tile: T a multiple of it (no bounds masks, EVEN_T) or not, D equal to
# the padded head size (EVEN_D) or not, windows whose edges fall on / next to a block boundary.
_PATHS = [
    (128, 32, True, None, "fp32"),  # EVEN_T, EVEN_D, causal: interior + diagonal blocks
    (192, 64, True, 64, "fp32"),  # window = block: edge blocks on both sides
    (192, 16, True, 65, "bf16"),  # window one past a block
    (130, 20, True, 63, "fp32"),  # partial last block, padded D, window one short of a block
    (256, 32, False, 65, "fp32"),  # symmetric band, EVEN_T
    (128, 20, False, None, "fp16"),  # non-causal full, EVEN_T, padded D
]


@pytest.mark.parametrize("T,D,causal,window,dtype", _PATHS)
def test_split_paths_vs_reference(T, D, causal, window, dtype):
    _run("triton", 1, 1, 2, T, D, causal, window, DTYPES[dtype], seed=T + D)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_negative_scale(backend):
    # the kernels take scale >= 0 and run a negative scale on -q (exact), flipping dq back
    _run(backend, 1, 1, 1, 70, 16, True, 9, torch.float32, seed=11, scale=-0.4)


def test_int64_offsets_path(monkeypatch):
    # the INT64 kernels (tensors of >= 2^31 elements) cannot be allocated here: force the flag instead
    monkeypatch.setattr(attention_module, "_needs_int64", lambda *tensors: True)
    _run("triton", 1, 2, 2, 80, 16, True, 20, torch.float32, seed=12)


def test_needs_int64():
    small = torch.empty(2, 16, 4096, 128, device="meta")
    assert not _needs_int64(small, 3, None)
    assert _needs_int64(small, torch.empty(1, 32, 65536, 1024, device="meta"))  # 2^31 elements
    strided = torch.empty_strided((1, 1, 8, 16), (2**31, 2**31, 2**27, 1), device="meta")  # huge strides
    assert _needs_int64(strided)


@pytest.mark.parametrize("version", ["3.7.1", "3.6.0"])
def test_tile_tables_serve_every_head_size(version):
    # CUDA tile lists per Triton version: every padded head size gets a tensor-core tile in every
    # kernel, the fp32 CUDA-core tile comes last; under 3.6 the dk/dv tiles run one stage (kernel_stats:
    # two stages serialize its wgmma there)
    table = attention_module._tile_table(version)
    for kind in ("fwd", "dkdv", "dq"):
        *tensor_core, fp32 = table[kind]
        assert fp32[4] == ()
        for d in attention_module._ALL_D:
            assert any(d in dims for *_, dims in tensor_core), (version, kind, d)
    stages = {s for _, _, _, s, _ in table["dkdv"][:-1]}
    assert stages == ({1} if version == "3.6.0" else {2})
    assert table["dq"] == attention_module._tile_table("3.7.1")["dq"]


def _cuda_tiles(kind):
    tiles = []
    for version in ("3.7.1", "3.6.0"):
        for m, n, *_ in attention_module._tile_table(version)[kind]:
            if (m, n) not in tiles:
                tiles.append((m, n))
    return tiles


@pytest.mark.parametrize("i", range(max(len(_cuda_tiles(kind)) for kind in ("fwd", "dkdv", "dq"))))
def test_cuda_tiles_under_the_interpreter(monkeypatch, i):
    # the interpreter otherwise runs only its 64 x 64 tile: run the i-th CUDA tile of each kernel (both
    # Triton versions' tables, the fp32 tile included) on a shape with a partial last block and a window
    import triton

    for kernel, kind in (
        (attention_module.attention_fwd_kernel, "fwd"),
        (attention_module.attention_bwd_dkdv_kernel, "dkdv"),
        (attention_module.attention_bwd_dq_kernel, "dq"),
    ):
        tiles = _cuda_tiles(kind)
        m, n = tiles[i % len(tiles)]
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4)])
    _run("triton", 1, 1, 2, 150, 20, True, 40, torch.float32, seed=i)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("D", [100, 128])
def test_big_and_odd_head_dims(backend, D):
    # fp16 on CUDA: fp32 dots at D = 128 compile to long unrolled FMA code (slow GPU check), and the
    # 16-bit path is the one used at these head sizes; fp32 under the interpreter (cheap, tightest check)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    _run(backend, 1, 1, 2, 70, D, True, 9, dtype, seed=D)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_huge_logits(backend):
    # scores of order +-1e4 (|q|, |k| ~ 60, D = 16, scale 1/4): softmax is nearly one-hot, stays finite
    got = _run(backend, 1, 1, 1, 80, 16, True, 20, torch.float32, seed=5, mag=60.0)
    assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_only_and_explicit_scale(backend):
    # flash_attention (no lse) backward: the lse cotangent is absent / zero
    _run(backend, 1, 2, 2, 90, 32, True, 17, torch.float32, seed=6, scale=0.3, with_lse=False)


def test_torch_vs_triton_noncontiguous():
    # GPT layout: q/k/v come as transposes of [B, T, H, D]; both backends must agree (and with the oracle)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 100, 3, 2, 32, generator=gen)  # [B, T, 3, H, D]
    q, k, v = (x[:, :, i].transpose(1, 2).to(DEVICE) for i in range(3))  # [B, H, T, D], strided
    assert not q.is_contiguous()
    outs = {}
    for backend in ("torch", "triton"):
        outs[backend] = flash_attention_with_lse(q, k, v, window=13, backend=backend)
    assert_close(outs["triton"][0], outs["torch"][0].double(), dtype=torch.float32, name="out")
    assert_close(outs["triton"][1], outs["torch"][1].double(), dtype=torch.float32, name="lse")
    ref_out, ref_lse = attention(*(t.cpu().double().numpy() for t in (q, k, v)), window=13)
    assert_close(outs["triton"][0], ref_out, dtype=torch.float32)


@pytest.mark.parametrize("chunk", [1, 16, 37])
def test_torch_blocked_chunks(chunk):
    gen = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(3, 1, 2, 50, 8, generator=gen, dtype=torch.float64)
    for causal, window in ((True, None), (True, 7), (False, 7), (False, None)):
        out, lse = _torch_attention(q, k, v, causal, window, 0.5, chunk=chunk)
        ref_out, ref_lse = attention(q.numpy(), k.numpy(), v.numpy(), causal=causal, window=window, scale=0.5)
        assert_close(out, ref_out, dtype=torch.float64, name=f"out {causal} {window}")
        assert_close(lse, ref_lse, dtype=torch.float64, name=f"lse {causal} {window}")
        out2, none = _torch_attention(q, k, v, causal, window, 0.5, chunk=chunk, need_lse=False)  # fused SDPA
        assert none is None
        assert_close(out2, ref_out, dtype=torch.float64, name=f"out without lse {causal} {window}")


def test_torch_backend_saves_no_more_than_the_eager_formula():
    """Autograd-saved memory (what stays alive from forward to backward) of the out-only torch backend is
    at most the textbook masked softmax's, at the tiny GPT's shape; GQA does not copy kv heads."""

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(4, 2, 256, 32, generator=gen).requires_grad_() for _ in range(3))
    i, j = torch.arange(256)[:, None], torch.arange(256)[None, :]
    for window in (None, 64):
        masked = (j > i) if window is None else ((j > i) | (i - j >= window))

        def eager(window=window, masked=masked):
            att = ((q @ k.transpose(-1, -2)) * 32**-0.5).masked_fill(masked, float("-inf"))
            return torch.softmax(att, -1) @ v

        ours = saved_bytes(lambda window=window: flash_attention(q, k, v, window=window, backend="torch"))
        assert ours <= saved_bytes(eager), window
        assert_close(
            flash_attention(q, k, v, window=window, backend="torch"),
            eager().detach().double(),
            dtype=torch.float32,
            name=f"w={window}",
        )


def test_triton_skips_key_blocks_outside_the_window():
    """Poison (NaN) keys/values that no query of the last block may see: if the kernel loaded such a
    block, 0 * NaN = NaN would reach the last rows. Symmetrically poison late queries for dk/dv of the
    first keys. Margins assume blocks <= 128 (every CUDA config and the interpreter's 64)."""
    T, D, w = 640, 16, 8
    gen = torch.Generator().manual_seed(9)
    q, k, v, do = torch.randn(4, 1, 1, T, D, generator=gen)
    cut = T - 16 - 128 - w - 128  # keys below `cut` lie in blocks no query >= T - 16 ever visits
    kp, vp = k.clone(), v.clone()
    kp[:, :, :cut] = float("nan")
    vp[:, :, :cut] = float("nan")
    qd = q.clone().to(DEVICE).requires_grad_()
    out = flash_attention(qd, kp.to(DEVICE), vp.to(DEVICE), window=w, backend="triton")
    out.backward(do.to(DEVICE))
    ref_out, _ = attention(q.double().numpy(), k.double().numpy(), v.double().numpy(), window=w)
    dq_ref, _, _ = attention_grad(
        q.double().numpy(), k.double().numpy(), v.double().numpy(), do.double().numpy(), window=w
    )
    assert_close(out[..., -16:, :], ref_out[..., -16:, :], dtype=torch.float32, name="last rows")
    assert_close(qd.grad[..., -16:, :], dq_ref[..., -16:, :], dtype=torch.float32, name="last dq rows")
    # dk/dv of the first 16 keys: queries beyond 16 + 128 + w + 128 are never visited for them
    cut_q = 16 + 128 + w + 128
    qp, dop = q.clone(), do.clone()
    qp[:, :, cut_q:] = float("nan")
    dop[:, :, cut_q:] = float("nan")
    kd, vd = k.clone().to(DEVICE).requires_grad_(), v.clone().to(DEVICE).requires_grad_()
    flash_attention(qp.to(DEVICE), kd, vd, window=w, backend="triton").backward(dop.to(DEVICE))
    _, dk_ref, dv_ref = attention_grad(
        q.double().numpy(), k.double().numpy(), v.double().numpy(), do.double().numpy(), window=w
    )
    assert_close(kd.grad[..., :16, :], dk_ref[..., :16, :], dtype=torch.float32, name="first dk rows")
    assert_close(vd.grad[..., :16, :], dv_ref[..., :16, :], dtype=torch.float32, name="first dv rows")


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_input():
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"must be a multiple of H_kv=3"):
        flash_attention(q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16))
    with pytest.raises(ValueError, match=r"window must be >= 1.*got 0"):
        flash_attention(q, k, k, window=0)
    with pytest.raises(ValueError, match=r"window must be None or an int"):
        flash_attention(q, k, k, window=True)
    msg = r"q \(1, 4, 8, 16\) and k/v \(1, 2, 9, 16\) must agree on B, T and D"
    with pytest.raises(ValueError, match=msg):
        flash_attention(q, torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16))
    with pytest.raises(ValueError, match=r"k and v must have the same shape"):
        flash_attention(q, k, torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match=r"share a dtype.*float16"):
        flash_attention(q, k.half(), k.half())
    with pytest.raises(ValueError, match=r"one device.*meta"):
        flash_attention(q, k.to("meta"), k.to("meta"))
    with pytest.raises(ValueError, match=r"must be \[B, H, T, D\], got shape \(4, 8, 16\)"):
        flash_attention(q[0], k[0], k[0])
    with pytest.raises(ValueError, match=r"float tensor"):
        flash_attention(q.long(), k.long(), k.long())
    with pytest.raises(ValueError, match=r"backend must be one of"):
        flash_attention(q, k, k, backend="cuda")
    with pytest.raises(ValueError, match=r"scale must be None or a finite number"):
        flash_attention(q, k, k, scale=float("nan"))
    qd, kd = q.to(DEVICE), k.to(DEVICE)
    with pytest.raises(ValueError, match=r"supports fp16/bf16/fp32 inputs, got torch.float64"):
        flash_attention(qd.double(), kd.double(), kd.double(), backend="triton")
    big = torch.zeros(1, 1, 4, 129, device=DEVICE)
    with pytest.raises(ValueError, match=r"head dim D <= 128, got D=129"):
        flash_attention(big, big, big, backend="triton")
