"""MATCH Triton kernels (fast/match_triton.py) against the NumPy oracle (reference/match.py).

Kernel tests run on ``DEVICE`` (CUDA when present, else the Triton interpreter on CPU); outputs are
NaN-poisoned by conftest (integer outputs: the dtype's minimum), so a lane a kernel forgets to write fails.

The oracle is one head per call; grouped-query attention (GQA) is checked against a dense float64 torch
implementation that takes its masks from the oracle (``retrieve(..., grouped=True)``, ``retrieved_mask``)
and is itself checked against ``reference.match`` for G = 1.
"""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fast.match_triton as mt
from fast.attention import flash_attention
from fast.match_triton import (
    MAX_TOP_K,
    block_summaries_triton,
    match_attention_triton,
    match_decode_triton,
    retrieve_triton,
    reverse_index,
)
from fast.testing import assert_close, examples
from reference import match as ref

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _inputs(B, Hq, Hkv, T, D, dtype, seed, normal=False):
    """q, k on the grid {-1, -1/2, 0, 1/2, 1} (unless ``normal``): every selection score (a power-of-two
    scale, see ``_scale``) is then exact in fp32 and float64 alike, even summed over a GQA group or averaged
    over a power-of-two block, so the selection compares exactly, with many exact ties (lower index wins).
    v, gate logits and the output cotangent are standard normal."""
    g = torch.Generator().manual_seed(seed)
    if normal:
        q = torch.randn(B, Hq, T, D, generator=g)
        k = torch.randn(B, Hkv, T, D, generator=g)
    else:
        q = torch.randint(-2, 3, (B, Hq, T, D), generator=g) / 2.0
        k = torch.randint(-2, 3, (B, Hkv, T, D), generator=g) / 2.0
    v = torch.randn(B, Hkv, T, D, generator=g)
    gl = torch.randn(B, Hq, T, generator=g)
    do = torch.randn(B, Hq, T, D, generator=g)
    return [x.to(dtype) for x in (q, k, v)] + [gl, do.to(dtype)]


def _scale(D):  # the power of two nearest 1/sqrt(D): exact products (see _inputs)
    return 2.0 ** -round(math.log2(math.sqrt(D)))


def _np(x):
    return x.detach().double().cpu().numpy()


def _grouped(q, Hkv):  # [B, Hq, T, D] -> [B, Hkv, G, T, D] (query head h reads kv head h // G)
    B, Hq, T, D = q.shape
    return q.reshape(B, Hkv, Hq // Hkv, T, D)


def oracle_idx(q, k, *, window, top_k, block_size, scale):
    return ref.retrieve(
        _np(_grouped(q, k.shape[1])),
        _np(k),
        window=window,
        top_k=top_k,
        block_size=block_size,
        scale=scale,
        grouped=True,
    )


def dense_match(q, k, v, gate, idx, *, window, block_size, mode, scale):
    """float64 torch, autograd-able: MATCH with the selection ``idx`` [B, Hkv, T, K] held fixed (GQA by
    repeating k, v). Masks from the oracle."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    kk, vv = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    m_w = torch.from_numpy(ref.window_mask(T, window=window))
    m_r = torch.from_numpy(ref.retrieved_mask(idx.cpu().numpy(), T, window=window, block_size=block_size))
    m_r = m_r.repeat_interleave(G, dim=1)  # [B, Hq, T, T]
    s = scale * q @ kk.transpose(-1, -2)

    def part(mask):
        sm = s.masked_fill(~mask, -math.inf)
        lse = torch.logsumexp(sm, dim=-1, keepdim=True)
        p = torch.exp(sm - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
        return p @ vv

    if mode == "joint":
        return part(m_w | m_r)
    g = torch.sigmoid(gate)[..., None]
    has = m_r.any(-1, keepdim=True)
    return torch.where(has, g * part(m_r) + (1 - g) * part(m_w), part(m_w))


def expected(q, k, v, gl, do, *, window, top_k, block_size, mode, scale):
    """(idx, out, dq, dk, dv, dgate) of the float64 oracle on the (rounded) inputs."""
    idx = torch.from_numpy(oracle_idx(q, k, window=window, top_k=top_k, block_size=block_size, scale=scale))
    qq, kk, vv, gg = (x.detach().double().cpu().requires_grad_() for x in (q, k, v, gl))
    out = dense_match(qq, kk, vv, gg, idx, window=window, block_size=block_size, mode=mode, scale=scale)
    out.backward(do.double().cpu())
    return idx, out.detach(), qq.grad, kk.grad, vv.grad, (gg.grad if mode == "gated" else None)


def run_triton(q, k, v, gl, do, *, window, top_k, block_size, mode, scale, **launch):
    """The op forward + backward; ``launch``: explicit launch choices of ``mt._launch`` (tiles, path)."""
    qq, kk, vv = (x.detach().to(DEVICE).requires_grad_() for x in (q, k, v))
    gg = gl.detach().to(DEVICE).requires_grad_() if mode == "gated" else None
    op = functools.partial(mt._launch, **launch) if launch else match_attention_triton
    out = op(
        qq, kk, vv, window=window, top_k=top_k, block_size=block_size, mode=mode, gate_logit=gg, scale=scale
    )
    out.backward(do.to(DEVICE))
    return out, qq.grad, kk.grad, vv.grad, (gg.grad if gg is not None else None)


def check_all(B, Hq, Hkv, T, D, window, top_k, block_size, mode, dtype, seed=0, **launch):
    scale = _scale(D)
    q, k, v, gl, do = _inputs(B, Hq, Hkv, T, D, dtype, seed)
    cfg = dict(window=window, top_k=top_k, block_size=block_size, scale=scale)
    idx_e, *exp = expected(q, k, v, gl, do, mode=mode, **cfg)
    idx = retrieve_triton(q.to(DEVICE), k.to(DEVICE), **cfg)
    assert torch.equal(idx.cpu(), idx_e), "selection differs from the oracle"
    got = run_triton(q, k, v, gl, do, mode=mode, **cfg, **launch)
    for name, a, e in zip(("out", "dq", "dk", "dv", "dgate"), got, exp, strict=True):
        if e is None:
            assert a is None
            continue
        assert a.dtype == (gl.dtype if name == "dgate" else dtype)
        assert_close(a, e, dtype=dtype, name=f"{name} (T={T} w={window} K={top_k} B={block_size} {mode})")


# ----------------------------------------------------------------------------------------------
# the float64 GQA helper agrees with the oracle (G = 1)


@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_dense_helper_matches_oracle(mode):
    T, D, w, K, bs = 23, 8, 5, 2, 4
    q, k, v, gl, do = _inputs(1, 2, 2, T, D, torch.float64, 3)
    cfg = dict(window=w, top_k=K, block_size=bs, scale=_scale(D))
    idx, out, dq, dk, dv, dg = expected(q, k, v, gl, do, mode=mode, **cfg)
    o_ref = ref.match_attention(_np(q), _np(k), _np(v), mode=mode, gate_logit=_np(gl), **cfg)
    g_ref = ref.match_attention_grad(_np(q), _np(k), _np(v), _np(do), mode=mode, gate_logit=_np(gl), **cfg)
    assert_close(out, o_ref, name="out")
    for a, e in zip((dq, dk, dv, dg), g_ref, strict=True):
        if e is not None:
            assert_close(a, e)


# ----------------------------------------------------------------------------------------------
# selection: exact


def _score_gap(q, k, *, window, top_k, block_size, scale):
    """Smallest gap between consecutive oracle scores among each row's top_k + 1 candidates (the data
    must not hold near-ties for an exact comparison of an fp32 selection with a float64 one)."""
    s = ref.retrieval_scores(
        _np(_grouped(q, k.shape[1])), _np(k), window=window, block_size=block_size, scale=scale, grouped=True
    )
    s = -np.sort(-s, axis=-1)[..., : top_k + 1]
    s = np.where(np.isfinite(s), s, np.nan)
    d = -np.diff(s, axis=-1)
    d = d[np.isfinite(d)]
    return d.min() if d.size else np.inf


@pytest.mark.parametrize("block_size", [1, 6])
def test_select_generic_data_matches_oracle(block_size):
    # standard normal q, k (no exact ties; block means over 6 keys are inexact): the data has score gaps far
    # above fp32's error (~1e-6 here)
    T, D, w, K = 77, 20, 9, 5
    q, k, *_ = _inputs(2, 4, 2, T, D, torch.float32, 3, normal=True)
    cfg = dict(window=w, top_k=K, block_size=block_size, scale=D**-0.5)
    assert _score_gap(q, k, **cfg) > 1e-4  # test data sanity, not a tolerance
    idx = retrieve_triton(q.to(DEVICE), k.to(DEVICE), **cfg)
    assert torch.equal(idx.cpu(), torch.from_numpy(oracle_idx(q, k, **cfg)))


@pytest.mark.parametrize(
    "T, D, Hq, Hkv, window, top_k, block_size",
    [
        (37, 16, 2, 2, 8, 3, 1),
        (77, 20, 4, 2, 9, 5, 1),
        (64, 16, 1, 1, 8, 4, 4),
        (77, 24, 3, 1, 16, 3, 8),
        (77, 16, 2, 1, 16, 2, 16),
        (200, 32, 1, 1, 16, 32, 1),  # top_k = MAX_TOP_K, several candidate chunks
        (1, 16, 1, 1, 1, 2, 1),
    ],
)
def test_select_matches_oracle(T, D, Hq, Hkv, window, top_k, block_size):
    q, k, *_ = _inputs(2, Hq, Hkv, T, D, torch.float32, T + top_k)
    cfg = dict(window=window, top_k=top_k, block_size=block_size, scale=_scale(D))
    idx = retrieve_triton(q.to(DEVICE), k.to(DEVICE), **cfg)
    assert idx.dtype == torch.int64 and idx.shape == (2, Hkv, T, top_k)
    assert torch.equal(idx.cpu(), torch.from_numpy(oracle_idx(q, k, **cfg)))


@pytest.mark.parametrize("block_size", [1, 4])
def test_select_ties_lower_index_wins(block_size):
    # keys (or whole blocks) repeat 3 vectors: many equal scores. Grid values (see _inputs) make them
    # exactly equal in every arithmetic (the interpreter's BLAS matmul may round identical rows of generic
    # floats differently at a tile edge, so identical generic keys are not a reliable tie there)
    T, D, w, K = 70, 16, 8, 5
    g = torch.Generator().manual_seed(1)
    base = torch.randint(-2, 3, (3, D), generator=g) / 2.0
    k = base[(torch.arange(T) // block_size) % 3].reshape(1, 1, T, D)
    q = torch.randint(-2, 3, (1, 1, T, D), generator=g) / 2.0
    cfg = dict(window=w, top_k=K, block_size=block_size, scale=_scale(D))
    e = torch.from_numpy(oracle_idx(q, k, **cfg))
    idx = retrieve_triton(q.to(DEVICE), k.to(DEVICE), **cfg).cpu()
    assert torch.equal(idx, e)
    # the tie rule is visible: the last query picks the K lowest indices of the best of the 3 vectors
    row = idx[0, 0, -1]
    assert row.tolist() == sorted(row.tolist()) and row[0] < 3 and (row % 3 == row[0] % 3).all(), row


def _select_both(q, k, **cfg):
    """(idx, per-program fallback flags) with the tensor-core band, and idx of the exact fp32 pass alone."""
    fb = []
    with mt.select_tensor_cores(True):
        band = mt._select(q.to(DEVICE), k.to(DEVICE), fallbacks=fb, **cfg).cpu()
    with mt.select_tensor_cores(False):
        exact = mt._select(q.to(DEVICE), k.to(DEVICE), **cfg).cpu()
    return band, fb[0].cpu(), exact


@pytest.mark.parametrize(
    "Hq, Hkv, T, D, window, top_k, block_size, scale, q_start",
    [
        (4, 2, 77, 20, 9, 5, 1, 0.2236, 0),
        (2, 1, 130, 16, 8, 8, 4, 0.25, 0),
        (3, 3, 77, 24, 16, 3, 6, -0.2, 0),  # a negative scale
        (1, 1, 200, 32, 16, 32, 1, 0.17, 0),  # top_k = MAX_TOP_K: a band of up to 64
        (2, 2, 1, 16, 4, 2, 2, 0.25, 66),  # a decode row (a query offset)
    ],
)
def test_select_tensor_core_band_equals_the_exact_pass(
    Hq, Hkv, T, D, window, top_k, block_size, scale, q_start
):
    # standard normal data: the band (fp16 scores, fp32 re-scoring) picks what the fp32 pass picks, and
    # does so without falling back
    q, k, *_ = _inputs(2, Hq, Hkv, T, D, torch.float32, T + top_k, normal=True)
    if q_start:
        k = torch.randn(2, Hkv, q_start + T, D, generator=torch.Generator().manual_seed(1))
    cfg = dict(window=window, top_k=top_k, block_size=block_size, scale=scale, q_start=q_start)
    band, fb, exact = _select_both(q, k, **cfg)
    assert torch.equal(band, exact) and not fb.any()
    if q_start == 0:
        assert torch.equal(
            band, torch.from_numpy(oracle_idx(q, k, **{x: cfg[x] for x in cfg if x != "q_start"}))
        )


@pytest.mark.parametrize("block_size", [1, 4])
def test_select_near_ties_below_fp16_resolution(block_size):
    # candidates that differ by 2^-14 of their size in one coordinate: fp16 unit-vector scores cannot
    # order them (its resolution is 2^-11); the band holds them all (7 of 8 candidates, within its 16
    # slots), the fp32 re-scoring orders them as float64 does, and no program falls back
    T, D, w, K = 16, 16, 8, 2
    base = torch.ones(D) / 4
    n_cand = (T - w) // block_size + 1
    keys = torch.stack([base + (j % n_cand) * 2.0**-14 * torch.eye(D)[0] for j in range(T)])
    k = keys.repeat_interleave(block_size, 0)[:T] if block_size > 1 else keys
    k = k.reshape(1, 1, T, D)
    q = torch.ones(1, 1, T, D)
    cfg = dict(window=w, top_k=K, block_size=block_size, scale=0.25)
    band, fb, exact = _select_both(q, k, **cfg)
    e = torch.from_numpy(oracle_idx(q, k, **cfg))
    assert torch.equal(band, e) and torch.equal(exact, e) and not fb.any()
    last = band[0, 0, -1].tolist()
    assert last == sorted(last, reverse=True) and last[0] == (T - 1 - w) // block_size  # the largest offset


@pytest.mark.parametrize("pert, seed", [(2.0**-6, 0), (2.0**-6, 1), (2.0**-10, 0)])
def test_select_band_needs_its_error_bound(monkeypatch, pert, seed):
    # keys that are one vector plus small noise: many scores lie within fp16's error of each row's cut.
    # With the bound the band (or its fallback) selects what the exact pass selects; with no bound (2^-6
    # noise) or a tenth of it (2^-10 noise) some row loses a member of its exact top-k, so this data does
    # test the bound
    T, D, K = 64, 16, 3
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(D, generator=g)
    k = base + torch.randn(1, 1, T, D, generator=g) * pert
    q = base + torch.randn(1, 1, T, D, generator=g) * 0.5
    cfg = dict(window=8, top_k=K, block_size=1, scale=0.25)
    band, fb, exact = _select_both(q, k, **cfg)
    assert torch.equal(band, exact)
    assert fb.any() == (pert < 2.0**-6)  # the 2^-6 data is decided by the band alone
    real = mt.select_error
    monkeypatch.setattr(mt, "select_error", (lambda D: 0.0) if pert == 2.0**-6 else (lambda D: real(D) / 10))
    weak, fb, _ = _select_both(q, k, **cfg)
    assert not torch.equal(weak, exact) and not fb.any()


def test_select_error_bound_value():
    # 2 u = 2^-10 for fp16's u = 2^-11, plus (D + 8) 2^-20 for u^2 and the O(D 2^-24) terms
    assert mt.select_error(64) == 2.0**-10 + 72 * 2.0**-20
    assert 2 * 2.0**-11 + 2.0**-22 < mt.select_error(16) < 2.0**-9


def test_select_band_overflow_falls_back_to_the_exact_pass():
    # 3 distinct key vectors repeated: dozens of candidates tie at each row's top score, more than the band
    # holds; those programs run the exact fp32 pass, and the selection still follows the tie rule
    T, D, w, K = 70, 16, 8, 5
    g = torch.Generator().manual_seed(1)
    base = torch.randint(-2, 3, (3, D), generator=g) / 2.0
    k = base[torch.arange(T) % 3].reshape(1, 1, T, D)
    q = torch.randint(-2, 3, (1, 1, T, D), generator=g) / 2.0
    cfg = dict(window=w, top_k=K, block_size=1, scale=_scale(D))
    band, fb, exact = _select_both(q, k, **cfg)
    assert fb.any() and torch.equal(band, exact)
    assert torch.equal(band, torch.from_numpy(oracle_idx(q, k, **cfg)))


def test_select_band_one_candidate_over_its_slots_falls_back():
    # top_k 3 -> 16 band slots. Keys 0..15 equal, key 16 the same plus 2^-14 (fp16 cannot tell them
    # apart, fp32 can: it is the best), later keys far below. The last row's band has 17 members, one more
    # than its slots: it must fall back, or it would lose key 16 (the last listed) and pick 0, 1, 2
    T, D, w, K = 40, 16, 8, 3
    v = torch.full((D,), 0.25)
    k = (-v).repeat(T, 1)
    k[:17] = v
    k[16, 0] += 2.0**-14
    k = k.reshape(1, 1, T, D)
    q = torch.ones(1, 1, T, D)
    cfg = dict(window=w, top_k=K, block_size=1, scale=0.25)
    band, fb, exact = _select_both(q, k, **cfg)
    assert fb.any() and torch.equal(band, exact)
    assert band[0, 0, -1].tolist() == [16, 0, 1]


@settings(max_examples=examples(6), deadline=None)
@given(
    mag=st.sampled_from([1e-20, 1e-3, 1.0, 1e4]),
    T=st.integers(9, 90),
    K=st.integers(1, 9),
    bs=st.sampled_from([1, 3, 4]),
    seed=st.integers(0, 2**16),
)
@example(mag=1e4, T=90, K=9, bs=1, seed=0)
@example(mag=1e-20, T=33, K=4, bs=3, seed=1)
def test_select_band_at_any_magnitude(mag, T, K, bs, seed):
    # the band's error bound scales with |q| |c|: tiny and huge inputs (fp16 would under- or overflow
    # without the unit-vector normalisation) select what the exact pass selects
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, T, 16, generator=g) * mag
    k = torch.randn(1, 1, T, 16, generator=g) * mag
    band, fb, exact = _select_both(q, k, window=8, top_k=K, block_size=bs, scale=0.25)
    assert torch.equal(band, exact)


def test_select_top_k_exceeds_candidates_pads_minus_one():
    T, D, w, bs, K = 37, 16, 8, 4, 9  # at most 8 candidate blocks (position 36: blocks 0..7)
    q, k, *_ = _inputs(1, 2, 1, T, D, torch.float32, 5)
    cfg = dict(window=w, top_k=K, block_size=bs, scale=_scale(D))
    idx = retrieve_triton(q.to(DEVICE), k.to(DEVICE), **cfg).cpu()
    assert torch.equal(idx, torch.from_numpy(oracle_idx(q, k, **cfg)))
    assert (idx[..., :w, :] == -1).all()  # no candidates inside the first window
    assert (idx[0, 0, -1, 8:] == -1).all() and (idx[0, 0, -1, :8] >= 0).all()


def test_top_k_over_limit_raises():
    # 38 candidate tokens for the last query: top_k = 33 stays 33 after clamping, over the kernels' 32 slots
    q, k, v, *_ = _inputs(1, 1, 1, 40, 16, torch.float32, 0)
    with pytest.raises(
        ValueError, match=f"at most {MAX_TOP_K} retrieved slots per query, got {MAX_TOP_K + 1}"
    ):
        retrieve_triton(q, k, window=2, top_k=MAX_TOP_K + 1, block_size=1, scale=0.25)
    with pytest.raises(ValueError, match=r"got 34 \(top_k=100 clamped to the 34 candidates\)"):
        match_attention_triton(
            q[:, :, :36],
            k[:, :, :36],
            v[:, :, :36],
            window=2,
            top_k=100,
            block_size=1,
            mode="joint",
            gate_logit=None,
            scale=0.25,
        )


@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_top_k_beyond_the_candidates_is_clamped(mode):
    # T = 33, blocks of 4, window 4: 8 candidate blocks at most, so top_k = 100 (over the kernels' 32 slots)
    # runs and equals the oracle; the selection keeps top_k columns, -1 where no candidate exists
    check_all(1, 2, 1, 33, 16, 4, 100, 4, mode, torch.float32, seed=5)
    q, k, *_ = _inputs(1, 2, 1, 33, 16, torch.float32, 5)
    idx = retrieve_triton(q, k, window=4, top_k=100, block_size=4, scale=0.25)
    assert idx.shape[-1] == 100 and (idx[..., 8:] == -1).all()


def test_unsupported_inputs_raise():
    q, k, v, *_ = _inputs(1, 1, 1, 8, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        retrieve_triton(q.double(), k.double(), window=2, top_k=1, block_size=1, scale=0.25)
    big = torch.zeros(1, 1, 8, 160)
    with pytest.raises(ValueError, match="D <= 128"):
        match_decode_triton(
            big[:, :, -1:],
            big,
            big,
            window=2,
            top_k=1,
            block_size=1,
            mode="joint",
            gate_logit=None,
            scale=0.25,
        )


def test_block_summaries_are_block_means():
    k = _inputs(2, 1, 3, 45, 20, torch.float32, 2)[1]
    s = block_summaries_triton(k.to(DEVICE), 8).cpu()
    assert s.shape == (2, 3, 5, 20) and s.dtype == torch.float32  # the partial last block is left out
    assert_close(s, ref.block_summaries(_np(k), 8)[..., :5, :], dtype=torch.float32)


def test_reverse_index_lists_every_selection_once():
    idx = torch.tensor([[[[2, -1], [0, 2], [-1, -1], [1, 0]]]])  # [1, 1, T=4, K=2]
    entries, starts = reverse_index(idx, 4, 1)
    lists = [entries[starts[s] : starts[s + 1]].tolist() for s in range(4)]
    assert lists == [[2, 7], [6], [0, 3], []]  # entry t * K + slot: query t = e // K, slot e % K
    # random selections, several (batch, kv head) segments and a partial last block: every filled
    # (query, slot) is listed exactly once, under the block it holds, in ascending query order
    g = torch.Generator().manual_seed(0)
    B, Hkv, T, K, bs = 2, 3, 29, 4, 4
    NB = -(-T // bs)
    idx = torch.stack([torch.randperm(NB, generator=g)[:K] for _ in range(B * Hkv * T)]).view(B, Hkv, T, K)
    idx[torch.rand(idx.shape, generator=g) < 0.3] = -1
    entries, starts = reverse_index(idx, T, bs)
    assert entries.dtype == torch.int32 and starts.shape == (B * Hkv * NB + 1,)
    seen = torch.zeros_like(idx)
    for seg in range(B * Hkv * NB):
        lst = entries[starts[seg] : starts[seg + 1]].long()
        t, slot = lst // K, lst % K
        assert (t[1:] > t[:-1]).all(), "ascending query positions"
        b, h, blk = seg // (Hkv * NB), (seg // NB) % Hkv, seg % NB
        assert (idx[b, h, t, slot] == blk).all()
        seen[b, h, t, slot] += 1
    assert torch.equal(seen, (idx >= 0).long())


# ----------------------------------------------------------------------------------------------
# forward and every gradient vs the oracle


@pytest.mark.parametrize(
    "B, Hq, Hkv, T, D, window, top_k, block_size, mode, dtype",
    [
        (1, 2, 2, 37, 16, 8, 3, 1, "joint", "fp32"),
        (2, 2, 1, 37, 20, 8, 3, 1, "gated", "fp32"),
        (1, 1, 1, 64, 16, 16, 2, 4, "joint", "fp32"),
        (1, 4, 2, 77, 16, 16, 3, 8, "gated", "fp32"),
        (1, 2, 1, 77, 16, 16, 2, 16, "joint", "fp32"),
        (1, 1, 1, 77, 24, 20, 2, 16, "gated", "fp32"),
        (1, 3, 1, 77, 16, 9, 5, 8, "joint", "fp32"),  # B does not divide w, G = 3
        (1, 1, 1, 1, 16, 1, 2, 1, "gated", "fp32"),  # T = 1: nothing retrieved
        (1, 2, 2, 5, 16, 1, 1, 1, "joint", "fp32"),  # w = 1
        (1, 2, 1, 77, 16, 12, 4, 4, "joint", "bf16"),
        (1, 2, 1, 64, 16, 8, 3, 1, "gated", "fp16"),
        (1, 1, 1, 200, 64, 64, 2, 64, "gated", "fp32"),  # big blocks: several gathered chunks per slot
    ],
)
def test_forward_and_grads_match_oracle(B, Hq, Hkv, T, D, window, top_k, block_size, mode, dtype):
    check_all(B, Hq, Hkv, T, D, window, top_k, block_size, mode, DTYPES[dtype])


@pytest.mark.parametrize("lowp,D", [(True, 16), (True, 100), (False, 16), (False, 100)])
@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_gpu_tiles_under_the_interpreter(lowp, D, mode):
    # the interpreter otherwise runs its own big tiles: run the GPU ones (tensor-core and fp32 choice,
    # D <= 64 and D = 128 padded) on the gathered path, slots that straddle several BLOCK_R chunks
    check_all(1, 2, 1, 41, D, 6, 5, 2, mode, torch.float32, tiles=mt.gpu_tiles(lowp, D))


@settings(max_examples=examples(5))
@given(
    T=st.integers(1, 70),
    window=st.integers(1, 20),
    top_k=st.integers(0, 6),
    bs=st.sampled_from([1, 4, 8, 16]),
    mode=st.sampled_from(["joint", "gated"]),
    G=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
@example(T=33, window=16, top_k=6, bs=16, mode="gated", G=2, seed=0)
@example(T=17, window=4, top_k=0, bs=4, mode="joint", G=1, seed=1)
def test_property_forward_and_grads(T, window, top_k, bs, mode, G, seed):
    bs = max(b for b in (1, 4, 8, 16) if b <= min(bs, window))  # power of two: exact means (see _inputs)
    check_all(1, G, 1, T, 12, window, top_k, bs, mode, torch.float32, seed)


# ----------------------------------------------------------------------------------------------
# identities on the Triton path


def _grads(fn, q, k, v, do):
    qq, kk, vv = (x.detach().to(DEVICE).requires_grad_() for x in (q, k, v))
    out = fn(qq, kk, vv)
    out.backward(do.to(DEVICE))
    return out, qq.grad, kk.grad, vv.grad


@pytest.mark.parametrize("T, block_size, K", [(30, 1, 22), (45, 4, 12)])  # K = the most candidates a row has
def test_top_k_covering_every_candidate_is_full_causal(T, block_size, K):
    D, w = 16, 8
    q, k, v, _, do = _inputs(1, 2, 1, T, D, torch.float32, 7)
    scale = _scale(D)
    got = _grads(
        lambda a, b, c: match_attention_triton(
            a, b, c, window=w, top_k=K, block_size=block_size, mode="joint", gate_logit=None, scale=scale
        ),
        q,
        k,
        v,
        do,
    )
    want = _grads(
        lambda a, b, c: flash_attention(a, b, c, causal=True, scale=scale, backend="triton"), q, k, v, do
    )
    for a, e in zip(got, want, strict=True):
        assert_close(a, e, dtype=torch.float32)


@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_top_k_zero_is_sliding_window(mode):
    T, D, w = 40, 16, 7
    q, k, v, gl, do = _inputs(1, 2, 2, T, D, torch.float32, 8)
    scale = _scale(D)
    gg = gl.to(DEVICE).requires_grad_()
    got = _grads(
        lambda a, b, c: match_attention_triton(
            a, b, c, window=w, top_k=0, block_size=4, mode=mode, gate_logit=gg, scale=scale
        ),
        q,
        k,
        v,
        do,
    )
    want = _grads(
        lambda a, b, c: flash_attention(a, b, c, window=w, scale=scale, backend="triton"), q, k, v, do
    )
    for a, e in zip(got, want, strict=True):
        assert_close(a, e, dtype=torch.float32)
    if mode == "gated":
        assert torch.equal(gg.grad, torch.zeros_like(gg))  # nothing retrieved: zero gate gradient


# ----------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize(
    "T, Hq, Hkv, window, top_k, block_size, mode, cached",
    [
        (37, 2, 1, 8, 3, 1, "joint", False),
        (50, 2, 2, 8, 2, 4, "gated", True),
        (77, 4, 2, 16, 3, 16, "joint", True),
        (77, 1, 1, 16, 3, 8, "gated", False),
        (5, 1, 1, 8, 2, 4, "joint", False),  # T <= w: nothing to retrieve
    ],
)
def test_decode_is_last_row(T, Hq, Hkv, window, top_k, block_size, mode, cached):
    D = 16
    scale = _scale(D)
    q, k, v, gl, do = _inputs(1, Hq, Hkv, T, D, torch.float32, 9)
    cfg = dict(window=window, top_k=top_k, block_size=block_size, mode=mode, scale=scale)
    _, want, *_ = expected(q, k, v, gl, do, **cfg)
    summ = None
    if cached and block_size > 1:  # the oracle's means, ceil(T / B) blocks, as a decoder would cache them
        summ = torch.from_numpy(ref.block_summaries(_np(k), block_size)).float().to(DEVICE)
    got = match_decode_triton(
        q[:, :, -1:].to(DEVICE),
        k.to(DEVICE),
        v.to(DEVICE),
        summaries=summ,
        gate_logit=gl[:, :, -1:].to(DEVICE) if mode == "gated" else None,
        **cfg,
    )
    assert got.shape == (1, Hq, 1, D)
    assert_close(got, want[:, :, -1:], dtype=torch.float32)
    full = match_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), gate_logit=gl.to(DEVICE), **cfg)
    assert_close(got, full[:, :, -1:], dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# compiled only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_gpu_larger_shapes(dtype, mode):
    # tensor-core tiles, several tiles per row of programs, D = 64 and 128, GQA
    check_all(1, 4, 2, 700, 64, 128, 4, 32, mode, DTYPES[dtype], seed=11)
    check_all(1, 2, 1, 333, 128, 64, 6, 1, mode, DTYPES[dtype], seed=12)


# ----------------------------------------------------------------------------------------------
# the retrieved part: block-major (block_size >= BLOCK_MAJOR_MIN_BLOCK) and per-row gathered, forced


def _spied(monkeypatch):
    """Record the path the forward and the backward took (the path itself is chosen by ``block_major``)."""
    took = []
    fwd_bm, bwd = mt._fwd_block_major, mt._bwd

    def spy_fwd(*a, **kw):
        took.append("fwd block-major")
        return fwd_bm(*a, **kw)

    def spy_bwd(*a, block_major, **kw):
        took.append("bwd block-major" if block_major else "bwd gathered")
        return bwd(*a, block_major=block_major, **kw)

    monkeypatch.setattr(mt, "_fwd_block_major", spy_fwd)
    monkeypatch.setattr(mt, "_bwd", spy_bwd)
    return took


BLOCK_MAJOR_CASES = [  # B, Hq, Hkv, T, D, window, top_k, block_size, mode, dtype
    (1, 2, 1, 77, 16, 16, 3, 16, "joint", "fp32"),  # GQA, T not a multiple of the block
    (1, 2, 1, 77, 16, 16, 3, 16, "gated", "fp32"),
    (2, 4, 2, 58, 16, 16, 4, 16, "joint", "bf16"),  # several (batch, kv head) segments, low precision
    (1, 2, 1, 100, 32, 40, 5, 32, "joint", "fp32"),  # top_k > the candidate blocks (at most 2): sentinels
    (1, 2, 1, 100, 24, 40, 5, 32, "gated", "bf16"),
    (1, 1, 1, 190, 16, 80, 2, 80, "gated", "fp32"),  # block_size > 64: the block in chunks (NSUB = 2)
    (1, 2, 1, 12, 16, 16, 2, 16, "gated", "fp32"),  # T <= w: nothing to retrieve, every list empty
]


@pytest.mark.parametrize("path", ["block-major", "gathered"])
@pytest.mark.parametrize("B, Hq, Hkv, T, D, window, top_k, block_size, mode, dtype", BLOCK_MAJOR_CASES)
def test_retrieved_paths_match_oracle(
    monkeypatch, path, B, Hq, Hkv, T, D, window, top_k, block_size, mode, dtype
):
    took = _spied(monkeypatch)
    check_all(
        B,
        Hq,
        Hkv,
        T,
        D,
        window,
        top_k,
        block_size,
        mode,
        DTYPES[dtype],
        seed=T + top_k,
        block_major=path == "block-major",
    )
    # no candidate at all (T <= w): top_k is clamped to 0 and nothing is retrieved, on either path
    retrieves = mt.candidates(T, window, block_size) > 0
    want = ["fwd block-major", "bwd block-major"] if path == "block-major" and retrieves else ["bwd gathered"]
    assert took == want


@pytest.mark.parametrize("dT", [-1, 0, 1, 2])  # T = w - 1, w, w + 1 (the first candidate exists), w + 2
@pytest.mark.parametrize("path,bs", [("gathered", 1), ("gathered", 2), ("block-major", 16)])
@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_lengths_around_the_first_candidate(path, bs, mode, dT):
    # at T = w + 1 only the last query has a candidate (key 0 / block 0) and it sits at the end of a tile:
    # forward and every gradient against the oracle, both retrieved paths
    w = 16
    check_all(
        1, 2, 1, w + dT, 16, w, 2, bs, mode, torch.float32, seed=w + dT, block_major=path == "block-major"
    )


@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_block_major_equals_gathered(monkeypatch, mode):
    # same inputs, both paths: forward and every gradient agree to fp32 rounding (the merge order differs);
    # two block-major runs: bitwise equal under the interpreter (programs run in order); on a GPU the atomic
    # fp32 adds may finish in another order, so only equal to rounding there
    T, D, w, K, bs = 70, 16, 16, 4, 16
    q, k, v, gl, do = _inputs(1, 2, 1, T, D, torch.float32, 21, normal=True)  # GQA, G = 2
    cfg = dict(window=w, top_k=K, block_size=bs, mode=mode, scale=D**-0.5)
    runs = {}
    for path in ("gathered", "block-major", "block-major again"):
        took = _spied(monkeypatch)
        runs[path] = run_triton(q, k, v, gl, do, **cfg, block_major=path != "gathered")
        assert took[0] == ("bwd gathered" if path == "gathered" else "fwd block-major")
    for name, a, b, c in zip(
        ("out", "dq", "dk", "dv", "dgate"),
        runs["block-major"],
        runs["gathered"],
        runs["block-major again"],
        strict=True,
    ):
        if a is None:
            continue
        assert_close(a, b.double(), dtype=torch.float32, name=f"{name} block-major vs gathered ({mode})")
        if DEVICE == "cpu":
            assert torch.equal(a, c), f"{name}: block-major differs between two runs"
        else:
            assert_close(a, c.double(), dtype=torch.float32, name=f"{name} block-major twice")


# ----------------------------------------------------------------------------------------------
# scaling: work items, no host synchronisation, memory independent of top_k x D


def test_work_items_cut_every_list_in_order():
    g = torch.Generator().manual_seed(4)
    lens = torch.tensor([0, 5, 17, 1, 0, 8, 40, 3])
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)])
    n = int(starts[-1]) + int(torch.randint(0, 9, (1,), generator=g))  # the bound may exceed the real count
    items = mt.work_items(starts, n, 8)
    assert items.shape == (3, -(-n // 8) + len(lens))  # a static bound: no host read of the counts
    seg, lo, hi = items.tolist()
    got = {}
    for s, a, b in zip(seg, lo, hi, strict=True):
        assert 0 <= b - a <= 8
        if b > a:
            got.setdefault(s, []).append((a, b))
    for s in range(len(lens)):  # each non-empty list is cut into consecutive items that cover it
        want = [(a, min(a + 8, int(starts[s + 1]))) for a in range(int(starts[s]), int(starts[s + 1]), 8)]
        assert got.get(s, []) == want


@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_a_block_every_query_selects_is_spread_over_programs(monkeypatch, mode):
    # an attention sink: block 0's keys align with every query, so every query with a candidate selects it
    # first; its list (~T entries) is cut into work items of 8, each a program; results equal the oracle
    monkeypatch.setattr(mt, "WORK_ITEM", 8)
    B, Hq, Hkv, T, D, w, bs = 1, 2, 1, 83, 16, 16, 16
    g = torch.Generator().manual_seed(7)
    q = torch.randint(-2, 3, (B, Hq, T, D), generator=g) / 2.0
    k = torch.randint(-2, 3, (B, Hkv, T, D), generator=g) / 2.0
    q[..., 0] = 4.0
    k[:, :, :bs, 0] = 8.0  # block 0's mean key scores 32 more than any other block's at most
    v, gl, do = (
        torch.randn(B, Hkv, T, D, generator=g),
        torch.randn(B, Hq, T, generator=g),
        torch.randn_like(q),
    )
    cfg = dict(window=w, top_k=2, block_size=bs, scale=_scale(D))
    idx_e, *exp = expected(q, k, v, gl, do, mode=mode, **cfg)
    rows = idx_e[..., 0] >= 0
    assert bool((idx_e[..., 0][rows] == 0).all()) and int(rows.sum()) > 4 * 8  # the sink, in many items
    entries, starts = reverse_index(idx_e, T, bs)
    items = mt.work_items(starts, idx_e.numel(), mt.WORK_ITEM)
    size = items[2] - items[1]
    assert int(size.max()) == 8 and int((items[0][size > 0] == 0).sum()) >= 4
    got = run_triton(q, k, v, gl, do, mode=mode, **cfg, block_major=True)
    for name, a, e in zip(("out", "dq", "dk", "dv", "dgate"), got, exp, strict=True):
        if e is not None:
            assert_close(a, e, dtype=torch.float32, name=f"{name} (sink, {mode})")


class _NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on any op that reads a tensor's value on the host or whose output shape depends on the data."""

    aten = torch.ops.aten
    SYNC = {
        aten._local_scalar_dense,  # .item(), int(t), bool(t), float(t)
        aten.nonzero,
        aten.masked_select,
        aten.unique_consecutive,
        aten._unique2,
        aten.unique_dim,
        aten.repeat_interleave,
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in self.SYNC:
            raise AssertionError(f"host synchronisation: {func}")
        if func.overloadpacket is self.aten.index:  # a boolean mask index has a data-dependent shape
            for ix in args[1]:
                if ix is not None and ix.dtype == torch.bool:
                    raise AssertionError(f"data-dependent shape: {func} with a boolean index")
        return func(*args, **kwargs)


@pytest.mark.parametrize("block_major", [True, False])
@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_forward_and_backward_never_synchronise_with_the_host(block_major, mode):
    q, k, v, gl, do = _inputs(1, 2, 1, 70, 16, torch.float32, 3)
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    gg = gl.clone().requires_grad_() if mode == "gated" else None
    with _NoHostSync():
        out = mt._launch(
            qq,
            kk,
            vv,
            window=16,
            top_k=3,
            block_size=16,
            mode=mode,
            gate_logit=gg,
            scale=0.25,
            block_major=block_major,
        )
        out.backward(do)
    assert torch.isfinite(qq.grad).all() and torch.isfinite(kk.grad).all()
    # the guard itself: a boolean-mask gather (what the reverse index used to do) is refused
    with pytest.raises(AssertionError, match="data-dependent"), _NoHostSync():
        q[q > 0]


def _peak_live_bytes(fn):
    """Peak bytes of live torch tensors while ``fn`` runs (the profiler's allocations and frees in order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_extra_memory_grows_with_top_k_not_with_top_k_times_d(mode):
    # forward + backward at top_k 2 and 8 (D = 128): per extra (query head, query, slot) the peak grows by
    # the index bookkeeping (tens of bytes), not by a per-slot output or dq row (4 D = 512 bytes each)
    B, H, T, D, w, bs = 1, 1, 200, 128, 16, 16
    q, k, v, gl, do = _inputs(B, H, H, T, D, torch.float32, 5, normal=True)

    def step(top_k):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        gg = gl.clone().requires_grad_() if mode == "gated" else None
        out = mt._launch(
            qq,
            kk,
            vv,
            window=w,
            top_k=top_k,
            block_size=bs,
            mode=mode,
            gate_logit=gg,
            scale=D**-0.5,
            block_major=True,
        )
        out.backward(do)

    peak = {K: _peak_live_bytes(lambda K=K: step(K)) for K in (2, 8)}
    per_slot = (peak[8] - peak[2]) / (B * H * T * 6)
    assert 0 < per_slot < D, (peak, per_slot)  # bytes per extra slot; a [.., K, D] fp32 buffer is 4 D


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("path", ["block-major", "gathered"])
@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_a_negative_scale(path, mode, big):
    # the window part runs fast/attention.py's loops, which take scale >= 0: a negative scale goes through
    # as (-q, -scale), and dq is negated back. ``big``: logits up to about +-100 (q on a coarser grid, still
    # exact), where an offset that is not the running max (a negative scale taken as is) overflows exp2;
    # there fp32 softmax carries a relative error of about 100 eps, which dk/dv multiply by |q| = 64, so
    # only the output and dq are compared
    B, Hq, Hkv, T, D, w, K, bs = 1, 2, 1, 53, 16, 16, 2, 16
    q, k, v, gl, do = _inputs(B, Hq, Hkv, T, D, torch.float32, 8)
    if big:
        q = q * 64
    cfg = dict(window=w, top_k=K, block_size=bs, scale=-_scale(D))
    idx_e, *exp = expected(q, k, v, gl, do, mode=mode, **cfg)
    got = run_triton(q, k, v, gl, do, mode=mode, **cfg, block_major=path == "block-major")
    names = ("out", "dq") if big else ("out", "dq", "dk", "dv", "dgate")
    for name, a, e in zip(names, got, exp, strict=False):
        if e is not None:
            assert_close(a, e, dtype=torch.float32, name=f"{name} (scale < 0, {path}, {mode}, big={big})")


@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_decode_with_a_negative_scale(mode):
    # decode runs the window loop of fast/attention.py with a query offset, which also takes scale >= 0.
    # Logits up to about +-100 (q on a coarser grid, still exact): an offset that is not the running max
    # (a negative scale taken as is) overflows exp2
    T, D, w, K, bs = 45, 16, 8, 3, 4
    q, k, v, gl, do = _inputs(1, 2, 1, T, D, torch.float32, 12)
    q = q * 64
    cfg = dict(window=w, top_k=K, block_size=bs, mode=mode, scale=-_scale(D))
    _, want, *_ = expected(q, k, v, gl, do, **cfg)
    got = match_decode_triton(
        q[:, :, -1:].to(DEVICE),
        k.to(DEVICE),
        v.to(DEVICE),
        gate_logit=gl[:, :, -1:].to(DEVICE) if mode == "gated" else None,
        **cfg,
    )
    assert_close(got, want[:, :, -1:], dtype=torch.float32, name=f"decode (scale < 0, {mode})")


def test_the_window_part_is_attention_s_loop():
    # one copy of the sliding-window loop and of its online-softmax step: MATCH's kernels call
    # fast/attention.py's (the per-row gathered retrieved keys take the same step), none has its own
    import inspect

    fwd, dq = (inspect.getsource(f.fn) for f in (mt.match_fwd_kernel, mt.match_bwd_dq_kernel))
    assert fwd.count("_fwd_loop(") == 3 and dq.count("_dq_loop(") == 3  # edge, interior, edge
    assert fwd.count("_masked_step(") == 2 and "causal_window_split(" in fwd and "causal_window_split(" in dq
    for src in (fwd, dq):
        assert "for start_n in range" not in src and "tl.dot(" not in src


@pytest.mark.parametrize("path", ["block-major", "gathered"])
@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_the_backward_in_batch_chunks(monkeypatch, path, mode):
    # the backward's fp32 accumulators one batch element at a time (a budget of 1 byte): every work item
    # is read by every launch and only its own batch element's are accumulated; results equal the oracle
    monkeypatch.setattr(mt, "BWD_ACC_BYTES", 1)
    check_all(3, 2, 1, 45, 16, 16, 2, 16, mode, torch.float32, seed=11, block_major=path == "block-major")
