"""MATCH: the NumPy oracle against its by-definition loop, identities and finite differences; then the torch
backend of fast/match.py against the oracle; then the tiny GPT with attention="match"."""

import importlib.util
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fast import match
from fast.attention import flash_attention
from fast.match import (
    block_summaries,
    match_attention,
    match_attention_kv,
    match_decode,
    retrieve,
    update_block_summaries,
)
from fast.testing import assert_close, central_difference, tolerance_for
from reference import match as ref
from reference.attention import attention as ref_attention

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _qkv(seed, T, D, lead=()):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((3, *lead, T, D))


# ----------------------------------------------------------------------------------------------
# oracle: selection


def test_retrieve_hand_computed():
    # T = 6, w = 2, D = 1, q = 1: scores are the keys themselves; candidates of query i are j <= i - 2
    k = np.array([[3.0], [1.0], [2.0], [2.0], [0.0], [5.0]])
    q = np.ones((6, 1))
    idx = ref.retrieve(q, k, window=2, top_k=2, scale=1.0)
    expected = np.array(
        [
            [-1, -1],  # i = 0: no candidate
            [-1, -1],  # i = 1: none
            [0, -1],  # i = 2: {0}
            [0, 1],  # i = 3: {0, 1}: 3 > 1
            [0, 2],  # i = 4: {0, 1, 2}: 3, then 2 > 1
            [0, 2],
        ]
    )  # i = 5: {0..3}: 3, then the tie 2 = 2 goes to the lower index 2
    assert np.array_equal(idx, expected)
    # blocks of 2: summaries (2, 2, 2.5); block b is a candidate iff 2b <= i - 2
    idx_b = ref.retrieve(q, k, window=2, top_k=2, block_size=2, scale=1.0)
    expected_b = np.array([[-1, -1], [-1, -1], [0, -1], [0, -1], [0, 1], [0, 1]])  # tie of blocks 0, 1 -> 0
    assert np.array_equal(idx_b, expected_b)
    # what is retrieved from block 1 for query 4 is only its candidate key 2 (key 3 is in the window)
    mask = ref.retrieved_mask(idx_b, 6, window=2, block_size=2)
    assert mask[4].tolist() == [True, True, True, False, False, False]
    assert mask[5].tolist() == [True, True, True, True, False, False]


def test_retrieve_ties_and_padding_slots():
    # identical keys: every score ties, so the lowest indices win, in increasing order
    T, D, w = 9, 3, 2
    k = np.tile(np.random.default_rng(0).standard_normal(D), (T, 1))
    q = np.random.default_rng(1).standard_normal((T, D))
    idx = ref.retrieve(q, k, window=w, top_k=4)
    for i in range(T):
        n = max(0, i - w + 1)
        assert idx[i].tolist() == list(range(min(n, 4))) + [-1] * (4 - min(n, 4))
    # top_k beyond T: padded with -1
    assert ref.retrieve(q, k, window=w, top_k=T + 3).shape == (T, T + 3)
    assert ref.retrieve(q, k, window=w, top_k=0).shape == (T, 0)


@given(
    T=st.integers(1, 14),
    D=st.integers(1, 4),
    w=st.integers(1, 6),
    K=st.integers(0, 6),
    B=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
@example(T=1, D=1, w=1, K=1, B=1, seed=0)
@example(T=13, D=2, w=4, K=2, B=3, seed=1)  # partial last block
@example(T=8, D=3, w=3, K=20, B=3, seed=2)  # top_k beyond every count
def test_retrieve_properties(T, D, w, K, B, seed):
    B = min(B, w)
    q, k, _ = _qkv(seed, T, D)
    idx = ref.retrieve(q, k, window=w, top_k=K, block_size=B)
    s = ref.retrieval_scores(q, k, window=w, block_size=B)
    assert idx.shape == (T, K)
    for i in range(T):
        row = idx[i]
        n_cand = sum(1 for b in range(-(-T // B)) if b * B <= i - w)
        n = min(K, n_cand)
        assert (row[n:] == -1).all() and (row[:n] >= 0).all()
        assert all(b * B <= i - w for b in row[:n]), "only candidates are selected"
        sel = s[i, row[:n]]
        assert (np.diff(sel) <= 0).all(), "descending score order"
        rest = np.setdiff1d(np.flatnonzero(np.isfinite(s[i])), row[:n])
        if n and rest.size:
            assert sel.min() >= s[i, rest].max(), "no unselected candidate scores higher"
    m = ref.retrieved_mask(idx, T, window=w, block_size=B)
    assert not (m & ref.window_mask(T, window=w)).any(), "window and retrieved sets are disjoint"
    assert not (m & ~ref.candidate_mask(T, window=w)).any()


def test_retrieve_grouped_sums_the_group_scores():
    rng = np.random.default_rng(3)
    G, T, D = 3, 11, 4
    q = rng.standard_normal((G, T, D))
    k = rng.standard_normal((T, D))
    s = ref.retrieval_scores(q, k, window=2, grouped=True)
    assert_close(
        np.where(np.isfinite(s), s, 0),
        np.where(np.isfinite(s), sum(ref.retrieval_scores(q[g], k, window=2) for g in range(G)), 0),
    )
    # summing scores = scoring the summed query (linearity); G = 1 is plain per-head selection
    assert np.array_equal(
        ref.retrieve(q, k, window=2, top_k=3, grouped=True), ref.retrieve(q.sum(0), k, window=2, top_k=3)
    )
    assert np.array_equal(
        ref.retrieve(q[:1], k, window=2, top_k=3, grouped=True), ref.retrieve(q[0], k, window=2, top_k=3)
    )


def test_block_summaries_partial_last_block():
    k = np.arange(14.0).reshape(7, 2)
    s = ref.block_summaries(k, 3)
    assert_close(s, np.array([[2.0, 3.0], [8.0, 9.0], [12.0, 13.0]]))


def test_bad_parameters():
    x = np.zeros((4, 2))
    for kw, msg in (
        ({"window": 0, "top_k": 1}, "window"),
        ({"window": 2, "top_k": -1}, "top_k"),
        ({"window": 2, "top_k": 1, "block_size": 0}, "block_size"),
        ({"window": 2, "top_k": 1, "block_size": 3}, "block_size=3 must be <= window=2"),
    ):
        with pytest.raises(ValueError, match=msg):
            ref.match_attention(x, x, x, **kw)
    with pytest.raises(ValueError, match="mode"):
        ref.match_attention(x, x, x, window=2, top_k=1, mode="sum")
    with pytest.raises(ValueError, match="gate_logit"):
        ref.match_attention(x, x, x, window=2, top_k=1, mode="gated")
    with pytest.raises(ValueError, match="share a shape"):
        ref.match_attention(x, x, np.zeros((4, 3)), window=2, top_k=1)


# ----------------------------------------------------------------------------------------------
# oracle: attention


@given(
    T=st.integers(1, 12),
    D=st.integers(1, 4),
    w=st.integers(1, 5),
    K=st.integers(0, 5),
    B=st.integers(1, 3),
    mode=st.sampled_from(ref.MODES),
    seed=st.integers(0, 2**16),
)
@example(T=12, D=2, w=3, K=2, B=2, mode="gated", seed=0)
@example(T=11, D=3, w=3, K=1, B=3, mode="joint", seed=1)
def test_oracle_vs_by_definition(T, D, w, K, B, mode, seed):
    B = min(B, w)
    q, k, v = _qkv(seed, T, D)
    gate = np.random.default_rng(seed + 1).standard_normal(T)
    kw = dict(
        window=w, top_k=K, block_size=B, mode=mode, gate_logit=gate if mode == "gated" else None, scale=0.9
    )
    assert_close(ref.match_attention(q, k, v, **kw), ref.match_attention_by_definition(q, k, v, **kw))


def test_merge_partials_is_one_softmax():
    q, k, v = _qkv(4, 10, 3)
    m_w = ref.window_mask(10, window=3)
    m_r = ref.candidate_mask(10, window=3) & (np.arange(10)[None, :] % 2 == 0)
    o, lse = ref.merge_partials(
        *ref.partial_attention(q, k, v, m_w, 0.5), *ref.partial_attention(q, k, v, m_r, 0.5)
    )
    o2, lse2 = ref.partial_attention(q, k, v, m_w | m_r, 0.5)
    assert_close(o, o2, name="out")
    assert_close(lse, lse2, name="lse")


@pytest.mark.parametrize("B", [1, 2, 3])
def test_identities(B):
    T, D, w = 13, 3, 3
    q, k, v = _qkv(5, T, D, lead=(2,))
    full, _ = ref_attention(q, k, v)
    sliding, _ = ref_attention(q, k, v, window=w)
    # top_k >= every candidate count, joint: the full causal attention
    assert_close(ref.match_attention(q, k, v, window=w, top_k=T, block_size=B), full, name="top_k >= T")
    # top_k = 0: sliding; gated with nothing retrieved: sliding, whatever the gate
    assert_close(ref.match_attention(q, k, v, window=w, top_k=0, block_size=B), sliding, name="top_k = 0")
    gate = np.full(T, 3.0)
    assert_close(
        ref.match_attention(q, k, v, window=w, top_k=0, block_size=B, mode="gated", gate_logit=gate),
        sliding,
        name="gated, nothing retrieved",
    )
    # T <= w: nothing is a candidate, sliding = full causal
    qs, ks, vs = q[..., :w, :], k[..., :w, :], v[..., :w, :]
    assert_close(
        ref.match_attention(qs, ks, vs, window=w, top_k=2, block_size=B, mode="gated", gate_logit=gate[:w]),
        ref_attention(qs, ks, vs)[0],
        name="T <= w",
    )


@pytest.mark.parametrize(
    "mode,B,gate_shape",
    [("joint", 1, None), ("joint", 2, None), ("gated", 1, (2, 9)), ("gated", 3, (1, 9)), ("gated", 2, ())],
)
def test_oracle_grad_finite_differences(mode, B, gate_shape):
    T, D, w, K = 9, 3, 3, 2
    q, k, v = _qkv(6, T, D, lead=(2,))
    rng = np.random.default_rng(7)
    dout = rng.standard_normal(q.shape)
    gate = None if gate_shape is None else rng.standard_normal(gate_shape)
    kw = dict(window=w, top_k=K, block_size=B, mode=mode, scale=0.8)
    # the selection is piecewise constant: the FD step must not cross a selection boundary
    idx = ref.retrieve(q, k, window=w, top_k=K, block_size=B, scale=0.8)

    def loss(q=q, k=k, v=v, gate=gate):
        assert np.array_equal(ref.retrieve(q, k, window=w, top_k=K, block_size=B, scale=0.8), idx)
        return float((ref.match_attention(q, k, v, gate_logit=gate, **kw) * dout).sum())

    dq, dk, dv, dg = ref.match_attention_grad(q, k, v, dout, gate_logit=gate, **kw)
    tol = dict(atol=1e-7, rtol=1e-6, rms=1e-7)  # FD error ~ eps^2 + 1e-16 / eps per entry
    assert_close(dq, central_difference(lambda x: loss(q=x), q), name="dq", **tol)
    assert_close(dk, central_difference(lambda x: loss(k=x), k), name="dk", **tol)
    assert_close(dv, central_difference(lambda x: loss(v=x), v), name="dv", **tol)
    if mode == "joint":
        assert dg is None
    else:
        assert dg.shape == np.shape(gate)
        assert_close(
            dg,
            central_difference(lambda x: loss(gate=x), np.asarray(gate, dtype=np.float64)),
            name="dgate",
            **tol,
        )


def test_oracle_gate_gradient_is_zero_without_retrieval():
    T, D, w = 7, 2, 3
    q, k, v = _qkv(8, T, D)
    dout = np.ones((T, D))
    *_, dg = ref.match_attention_grad(q, k, v, dout, window=w, top_k=2, mode="gated", gate_logit=np.zeros(T))
    assert (dg[:w] == 0).all() and (dg[w:] != 0).all()


# ----------------------------------------------------------------------------------------------
# torch backend vs oracle

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}


def _group_idx(qn, kn, window, K, bs, scale):
    """Oracle selection per (batch, kv head) from the group's stacked queries: [B, H_kv, T, K]."""
    B, Hkv = kn.shape[:2]
    G = qn.shape[1] // Hkv
    qg = qn.reshape(B, Hkv, G, *qn.shape[2:])
    return ref.retrieve(qg, kn, window=window, top_k=K, block_size=bs, scale=scale, grouped=True)


def _margin_ok(qn, kn, window, K, bs, scale, rel=1e-4):
    """Clear score gaps: the first K + 1 ranked candidate scores of every row differ by more than ``rel``
    (relative), so rounding in any tested dtype cannot reorder the selection."""
    B, Hkv = kn.shape[:2]
    G = qn.shape[1] // Hkv
    s = ref.retrieval_scores(
        qn.reshape(B, Hkv, G, *qn.shape[2:]), kn, window=window, block_size=bs, scale=scale, grouped=True
    )
    top = -np.sort(-s, axis=-1)[..., : K + 1]
    with np.errstate(invalid="ignore"):  # -inf - -inf past the last candidate: not a gap
        gap = -np.diff(top, axis=-1)
    fin = np.isfinite(gap)
    return bool((gap[fin] > rel * (1 + np.abs(top[..., 1:][fin]))).all())


def _draw(B, Hkv, G, T, D, window, K, bs, dtype, seed, scale, gate_shape=None):
    """Inputs rounded to ``dtype`` with clear selection gaps (re-drawn with the next seed until so)."""
    for attempt in range(50):
        gen = torch.Generator().manual_seed(seed + 7919 * attempt)
        q = torch.randn(B, Hkv * G, T, D, generator=gen).to(dtype)
        k = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
        v = torch.randn(B, Hkv, T, D, generator=gen).to(dtype)
        do = torch.randn(B, Hkv * G, T, D, generator=gen).to(dtype)  # random cotangent, not ones
        gate = None if gate_shape is None else torch.randn(gate_shape, generator=gen).to(dtype)
        qn, kn = q.double().numpy(), k.double().numpy()
        if _margin_ok(qn, kn, window, K, bs, scale):
            return q, k, v, do, gate
    raise AssertionError("no draw with clear score gaps")  # pragma: no cover


def _oracle(q, k, v, do, gate, window, K, bs, mode, scale):
    """Oracle forward and gradients on the rounded inputs, GQA through the group's shared selection."""
    qn, kn, vn, don = (x.double().numpy() for x in (q, k, v, do))
    B, Hq, T, D = qn.shape
    Hkv = kn.shape[1]
    G = Hq // Hkv
    idx = _group_idx(qn, kn, window, K, bs, scale)
    gfull = None if gate is None else np.broadcast_to(gate.double().numpy(), (B, Hq, T))
    out, dq = np.zeros_like(qn), np.zeros_like(qn)
    dk, dv = np.zeros_like(kn), np.zeros_like(vn)
    dg = None if gate is None else np.zeros((B, Hq, T))
    for b in range(B):
        for h in range(Hq):
            hk = h // G
            kw = dict(
                window=window,
                top_k=K,
                block_size=bs,
                mode=mode,
                scale=scale,
                idx=idx[b, hk],
                gate_logit=None if gate is None else gfull[b, h],
            )
            out[b, h] = ref.match_attention(qn[b, h], kn[b, hk], vn[b, hk], **kw)
            gq, gk, gv, gg = ref.match_attention_grad(qn[b, h], kn[b, hk], vn[b, hk], don[b, h], **kw)
            dq[b, h] += gq
            dk[b, hk] += gk
            dv[b, hk] += gv
            if gate is not None:
                dg[b, h] = gg
    if gate is not None:  # sum the broadcast axes back to gate_logit's shape
        shape = tuple(gate.shape)
        dg = dg.sum(axis=tuple(range(3 - len(shape))))
        dg = dg.sum(axis=tuple(a for a, n in enumerate(shape) if n == 1), keepdims=True).reshape(shape)
    return idx, out, dq, dk, dv, dg


def _check_fast(
    B, Hkv, G, T, D, window, K, bs, mode, dtype, seed, *, scale=None, gate_shape="full", chunk=None
):
    sc = 1 / math.sqrt(D) if scale is None else scale
    if mode == "gated":
        gate_shape = {"full": (B, Hkv * G, T), "heads": (1, Hkv * G, T), "time": (T,)}[gate_shape]
    else:
        gate_shape = None
    q, k, v, do, gate = _draw(B, Hkv, G, T, D, window, K, bs, dtype, seed, sc, gate_shape)
    idx, *ref_vals = _oracle(q, k, v, do, gate, window, K, bs, mode, sc)
    assert np.array_equal(retrieve(q, k, window=window, top_k=K, block_size=bs, scale=scale).numpy(), idx)
    qd, kd, vd = (x.clone().requires_grad_() for x in (q, k, v))
    gd = None if gate is None else gate.clone().requires_grad_()
    kw = dict(window=window, top_k=K, block_size=bs, mode=mode, gate_logit=gd, scale=scale)
    if chunk is None:
        out = match_attention(qd, kd, vd, **kw, backend="torch")
    else:
        out = match_attention_kv(qd, kd, vd, **kw, chunk=chunk)
    assert out.dtype == dtype and out.shape == q.shape
    out.backward(do)
    got = (out, qd.grad, kd.grad, vd.grad, None if gd is None else gd.grad)
    for name, a, e in zip(("out", "dq", "dk", "dv", "dgate"), got, ref_vals, strict=True):
        if e is not None:
            # An exact zero that the fp64 oracle leaves as rounding residue (e.g. dq where every softmax
            # has a single key, so dP - delta cancels): every entry is below atol, and a relative RMS would
            # compare noise with noise. As for an all-zero reference, the elementwise atol alone decides.
            noise = np.abs(e).max(initial=0.0) < tolerance_for(dtype).atol
            assert_close(a, e, dtype=dtype, name=name, rms=math.inf if noise else None)


@given(
    B=st.integers(1, 2),
    Hkv=st.integers(1, 2),
    G=st.sampled_from([1, 2, 3]),
    T=st.integers(1, 45),
    D=st.sampled_from([1, 4, 7]),
    window=st.integers(1, 9),
    K=st.integers(0, 5),
    bs=st.integers(1, 4),
    mode=st.sampled_from(ref.MODES),
    dtype=st.sampled_from(sorted(DTYPES)),
    gate_shape=st.sampled_from(["full", "heads", "time"]),
    seed=st.integers(0, 2**16),
)
@example(
    B=1, Hkv=1, G=1, T=1, D=1, window=1, K=1, bs=1, mode="joint", dtype="fp64", gate_shape="full", seed=0
)  # a single token, nothing to retrieve
@example(
    B=2, Hkv=2, G=3, T=45, D=7, window=5, K=3, bs=4, mode="gated", dtype="fp32", gate_shape="heads", seed=1
)  # GQA, blocks with a partial last block, broadcast gate
@example(
    B=1, Hkv=1, G=2, T=40, D=4, window=3, K=5, bs=1, mode="joint", dtype="bf16", gate_shape="full", seed=2
)
@example(
    B=1, Hkv=2, G=1, T=30, D=4, window=9, K=5, bs=3, mode="gated", dtype="fp64", gate_shape="time", seed=3
)  # top_k beyond the candidate blocks
def test_torch_vs_oracle(B, Hkv, G, T, D, window, K, bs, mode, dtype, gate_shape, seed):
    _check_fast(B, Hkv, G, T, D, window, K, min(bs, window), mode, DTYPES[dtype], seed, gate_shape=gate_shape)


@pytest.mark.parametrize("chunk", [1, 7, 300])
@pytest.mark.parametrize("mode,bs", [("joint", 1), ("gated", 2), ("joint", 3)])
def test_torch_chunks_and_scale(chunk, mode, bs):
    # chunk boundaries inside the window and inside blocks; an explicit scale
    _check_fast(1, 2, 2, 50, 6, 5, 3, bs, mode, torch.float64, seed=chunk + bs, scale=0.37, chunk=chunk)


@pytest.mark.parametrize("dense", [0, 10**6], ids=["gathered", "dense"])
@pytest.mark.parametrize(
    "G,T,w,K,bs,mode,dtype",
    [
        (2, 45, 5, 3, 4, "gated", torch.float32),  # GQA, a partial last block
        (1, 40, 3, 5, 1, "joint", torch.bfloat16),  # tokens
        (1, 30, 9, 5, 3, "gated", torch.float64),  # top_k beyond the candidate blocks
        (3, 33, 4, 2, 2, "joint", torch.float64),
    ],
)
def test_torch_retrieved_parts_vs_oracle(G, T, w, K, bs, mode, dtype, dense, monkeypatch):
    # the torch backend scores few candidates densely (the selection as a mask) and gathers each row's
    # selected keys otherwise: both against the oracle, forward and every gradient, chunks of 7 rows
    monkeypatch.setattr(match, "DENSE_RETRIEVED", dense)
    _check_fast(2, 2, G, T, 5, w, K, bs, mode, dtype, seed=T + K, chunk=7)


@pytest.mark.parametrize("bs", [1, 2, 3])
@pytest.mark.parametrize("G", [1, 3])
def test_torch_ties_go_to_the_lower_index(bs, G):
    # identical keys: every score ties (token and block summaries alike), so the lowest indices win
    T, D, w, K = 23, 4, 3, 4
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 2 * G, T, D, generator=gen)
    k = torch.randn(2, 2, 1, D, generator=gen).expand(2, 2, T, D).contiguous()
    got = retrieve(q, k, window=w, top_k=K, block_size=bs)
    want = _group_idx(q.double().numpy(), k.double().numpy(), w, K, bs, 1 / math.sqrt(D))
    assert np.array_equal(got.numpy(), want)
    for i in range(T):
        n = min(K, len([b for b in range(-(-T // bs)) if b * bs <= i - w]))
        assert got[0, 0, i].tolist() == list(range(n)) + [-1] * (K - n)
    # half the keys tied, half distinct: ties still go to the lower index, order stays descending
    k2 = k.clone()
    k2[:, :, ::2] = torch.randn(2, 2, (T + 1) // 2, D, generator=gen)
    assert np.array_equal(
        retrieve(q, k2, window=w, top_k=K, block_size=bs).numpy(),
        _group_idx(q.double().numpy(), k2.double().numpy(), w, K, bs, 1 / math.sqrt(D)),
    )


@pytest.mark.parametrize("bs", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_identities(bs, dtype):
    gen = torch.Generator().manual_seed(12)
    T, D, w = 37, 8, 5
    q, k, v = (torch.randn(2, 2, T, D, generator=gen).to(dtype) for _ in range(3))
    full = flash_attention(q, k, v, backend="torch")
    sliding = flash_attention(q, k, v, window=w, backend="torch")
    assert_close(
        match_attention(q, k, v, window=w, top_k=T, block_size=bs),
        full.double(),
        dtype=dtype,
        name="top_k >= candidates = full causal",
    )
    assert_close(
        match_attention(q, k, v, window=w, top_k=0, block_size=bs),
        sliding.double(),
        dtype=dtype,
        name="top_k = 0 = sliding",
    )
    gate = torch.full((T,), 2.0, dtype=dtype, requires_grad=True)
    out = match_attention(q, k, v, window=w, top_k=0, block_size=bs, mode="gated", gate_logit=gate)
    assert_close(out, sliding.double(), dtype=dtype, name="gated, nothing retrieved = sliding")
    out.sum().backward()
    assert (gate.grad == 0).all(), "no retrieval: zero gate gradient"
    qs, ks, vs = q[:, :, :w], k[:, :, :w], v[:, :, :w]
    assert_close(
        match_attention(qs, ks, vs, window=w, top_k=3, block_size=bs),
        flash_attention(qs, ks, vs, backend="torch").double(),
        dtype=dtype,
        name="T <= w = full causal",
    )


def test_block_summaries_vs_oracle():
    # the public summaries (decode caches them): partial last block, padding, fp32 for low-precision keys
    gen = torch.Generator().manual_seed(15)
    k = torch.randn(2, 3, 11, 5, generator=gen)
    for bs in (1, 3, 4, 11, 12):
        assert_close(block_summaries(k, bs), ref.block_summaries(k.double().numpy(), bs), dtype=torch.float32)
    assert block_summaries(k.bfloat16(), 3).dtype == torch.float32
    valid = torch.arange(11)[None] >= torch.tensor([[0], [4]])  # row 1: 4 pad keys
    got = block_summaries(k, 3, key_valid=valid)
    assert_close(got[0], ref.block_summaries(k[0].double().numpy(), 3), dtype=torch.float32, name="row 0")
    kn = k[1].double().numpy()
    want = np.stack([np.zeros((3, 5)), kn[:, 4:6].mean(1), kn[:, 6:9].mean(1), kn[:, 9:].mean(1)], axis=1)
    assert_close(got[1], want, dtype=torch.float32, name="padded row: the mean of the valid keys, 0 if none")


@pytest.mark.parametrize("mode,bs,G", [("joint", 1, 1), ("gated", 1, 2), ("joint", 3, 2), ("gated", 4, 1)])
def test_decode_equals_last_row(mode, bs, G):
    # decoding token by token with incrementally updated block summaries = the rows of the full computation
    T, D, w, K = 29, 6, 4, 3
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(2, 2 * G, T, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, T, D, generator=gen, dtype=torch.float64) for _ in range(2))
    gate = torch.randn(2, 2 * G, T, generator=gen, dtype=torch.float64) if mode == "gated" else None
    full = match_attention(q, k, v, window=w, top_k=K, block_size=bs, mode=mode, gate_logit=gate)
    summ = block_summaries(k[:, :, :1], bs)
    for t in range(T):
        if t:
            summ = update_block_summaries(summ, k[:, :, : t + 1], bs)
        assert_close(summ, block_summaries(k[:, :, : t + 1], bs), name=f"summaries t={t}")
        for s in (None, summ):
            out = match_decode(
                q[:, :, t : t + 1],
                k[:, :, : t + 1],
                v[:, :, : t + 1],
                window=w,
                top_k=K,
                block_size=bs,
                mode=mode,
                summaries=s,
                gate_logit=None if gate is None else gate[:, :, t : t + 1],
            )
            assert_close(out, full[:, :, t : t + 1], name=f"decode t={t}")


@pytest.mark.parametrize("dense", [0, 10**6], ids=["gathered", "dense"])
@pytest.mark.parametrize("bs,pad", [(1, 3), (1, 4), (2, 4), (3, 6)])
def test_padding_and_longer_keys(bs, pad, dense, monkeypatch):
    monkeypatch.setattr(match, "DENSE_RETRIEVED", dense)  # both retrieved parts of the torch backend
    # left padding (any amount for tokens, a multiple of the block size for blocks): the valid rows equal
    # the unpadded computation
    T, D, w, K = 21, 4, 3, 2
    gen = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(1, 2, T, D, generator=gen, dtype=torch.float64) for _ in range(3))
    want = match_attention(q, k, v, window=w, top_k=K, block_size=bs)
    noise = [torch.randn(1, 2, pad, D, generator=gen, dtype=torch.float64) for _ in range(3)]
    qp, kp, vp = (torch.cat([n, x], dim=2) for n, x in zip(noise, (q, k, v), strict=True))
    valid = torch.arange(T + pad)[None] >= pad
    got = match_attention_kv(qp, kp, vp, window=w, top_k=K, block_size=bs, key_valid=valid, chunk=5)
    assert_close(got[:, :, pad:], want, name="padded")
    assert torch.isfinite(got).all(), "pad rows see themselves: finite"
    # T_q < T_k, bottom-right aligned: the last rows of the full computation
    last = match_attention_kv(q[:, :, -6:], k, v, window=w, top_k=K, block_size=bs, key_valid=None)
    assert_close(last, want[:, :, -6:], name="T_q < T_k")


def test_bad_inputs_raise():
    q = torch.randn(1, 4, 10, 8)
    k = torch.randn(1, 2, 10, 8)
    ok = dict(window=3, top_k=2)
    bad = [
        (dict(window=0, top_k=1), "window"),
        (dict(window=3, top_k=-1), "top_k"),
        (dict(window=3, top_k=1, block_size=0), "block_size"),
        (dict(window=3, top_k=1, block_size=4), "block_size=4 must be <= window=3"),
        (dict(**ok, mode="add"), "mode"),
        (dict(**ok, mode="gated"), "needs gate_logit"),
        (dict(**ok, mode="gated", gate_logit=torch.zeros(1, 4, 9)), "does not broadcast"),
        (dict(**ok, mode="gated", gate_logit=torch.zeros(3, 4, 10)), "does not broadcast"),
        (dict(**ok, gate_logit=torch.zeros(10)), "only used by mode='gated'"),
        (dict(**ok, scale=float("nan")), "scale"),
        (dict(**ok, backend="cuda"), "backend"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            match_attention(q, k, k, **kw)
    with pytest.raises(ValueError, match="multiple of H_kv"):
        match_attention(torch.randn(1, 3, 10, 8), k, k, **ok)
    with pytest.raises(ValueError, match="dtype"):
        match_attention(q.double(), k, k, **ok)
    with pytest.raises(ValueError, match="same shape"):
        match_attention(q, k, torch.randn(1, 2, 10, 7), **ok)
    with pytest.raises(ValueError, match="agree on B and D"):
        match_attention(q, torch.randn(1, 2, 10, 6), torch.randn(1, 2, 10, 6), **ok)
    with pytest.raises(ValueError, match="same T"):
        match_attention(q[:, :, :5], k, k, **ok)
    with pytest.raises(ValueError, match="float tensor"):
        match_attention(q.long(), k, k, **ok)
    with pytest.raises(ValueError, match="one query position"):
        match_decode(q, k, k, **ok)
    with pytest.raises(ValueError, match="summaries must be"):
        match_decode(q[:, :, -1:], k, k, window=3, top_k=2, block_size=2, summaries=torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match="key_valid"):
        match_attention_kv(q, k, k, **ok, key_valid=torch.ones(1, 9, dtype=torch.bool))
    if not torch.cuda.is_available():
        import fast.match as fm

        if importlib.util.find_spec("fast.match_triton") is None:
            with pytest.raises(ValueError, match="match_triton"):
                fm.match_attention(q, k, k, **ok, backend="triton")


# ----------------------------------------------------------------------------------------------
# tiny GPT with attention="match"


def _gpt(seed=0, **kw):
    from tiny_models.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 24, "block_size": 64, **kw})
    return GPT(cfg).double().eval()


def _match_kwargs(top_k, block_size=1, mode="joint"):
    return (("block_size", block_size), ("mode", mode), ("top_k", top_k))


@pytest.mark.parametrize("mode,bs", [("joint", 1), ("gated", 1), ("joint", 2), ("gated", 3)])
def test_gpt_generate_cache_equals_recompute(mode, bs):
    from tiny_models.gpt import generate

    m = _gpt(attention="match", window=3, attn_kwargs=_match_kwargs(2, bs, mode))
    with torch.no_grad():  # a non-trivial gate (the zero-bias init gives g ~ 0.5 everywhere)
        for blk in m.h:
            assert (blk.attn.c_gate is not None) == (mode == "gated")
            if blk.attn.c_gate is not None:
                blk.attn.c_gate.weight.normal_(0, 1.0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (1, 7, 13)]  # left padding up to 12 tokens
    kw = dict(max_new_tokens=12, eos_id=-1)  # never stop early: every step is compared
    cached = generate(m, prompts, use_cache=True, **kw)
    recomputed = generate(m, prompts, use_cache=False, **kw)
    assert cached == recomputed
    assert all(len(r) == 12 for r in cached)
    if bs == 1:  # token retrieval: a row does not depend on the other rows' padding
        assert cached == [generate(m, [p], **kw)[0] for p in prompts]


def test_gpt_match_decode_keeps_the_block_summaries_in_its_cache(monkeypatch):
    # the cache's summaries are the block means of the cached keys (padding excluded) after every step, and
    # the cached decode's logits equal a full recompute
    from fast.match import block_summaries
    from tiny_models.gpt import generate

    m = _gpt(attention="match", window=3, attn_kwargs=_match_kwargs(2, 3, "joint"), seed=2)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [1, 2]]
    kw = dict(max_new_tokens=6, eos_id=-1)
    seen = []
    real = m.forward

    def spy(idx, **k):
        out = real(idx, **k)
        if k.get("cache"):
            for c in k["cache"]:
                want = block_summaries(c["k"], 3, key_valid=k["key_valid"])
                seen.append(float((c["summ"] - want).abs().max()))
        return out

    import fast.match as fm

    given, real_decode = [], fm.match_decode

    def decode_spy(*a, summaries=None, **k):
        given.append(summaries is not None)
        return real_decode(*a, summaries=summaries, **k)

    monkeypatch.setattr(fm, "match_decode", decode_spy)
    m.forward = spy
    assert generate(m, prompts, use_cache=True, **kw) == generate(m, prompts, use_cache=False, **kw)
    assert len(seen) == 6 * m.cfg.n_layer and max(seen) == 0.0
    assert len(given) == 5 * m.cfg.n_layer and all(given)  # every decode step got the cached summaries


def test_gpt_match_logits_cache_vs_full():
    # the decode rows themselves (not only the argmax): prefill + one cached step = the full forward
    m = _gpt(attention="match", window=4, attn_kwargs=_match_kwargs(3, 2, "gated"), seed=1)
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
    full = m(ids)
    cache = [dict() for _ in range(m.cfg.n_layer)]
    pre = m(ids[:, :-1], cache=cache)
    last = m(ids[:, -1:], cache=cache)
    assert_close(pre, full[:, :-1], name="prefill")
    assert_close(last, full[:, -1:], name="cached step")


@pytest.mark.parametrize("bs", [1, 3])
def test_gpt_match_with_every_candidate_equals_full_attention(bs):
    full = _gpt(attention="full", seed=2)
    match = _gpt(attention="match", window=3, attn_kwargs=_match_kwargs(40, bs), seed=3)
    match.load_state_dict(full.state_dict())
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    assert_close(match(ids), full(ids).detach(), name="logits")


def test_gpt_match_checkpoint_round_trip(tmp_path):
    from tiny_models.model_io import load_model, save_model

    m = _gpt(attention="match", window=3, attn_kwargs=_match_kwargs(2, 1, "gated"), seed=4).float()
    path = str(tmp_path / "match.safetensors")
    save_model(m, path, step=7)
    back, meta = load_model(path)
    assert back.cfg == m.cfg and meta["step"] == 7
    assert back.h[0].attn.c_gate is not None
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(3))
    assert torch.equal(back(ids), m(ids))


def test_gpt_match_gate_trains_and_config_errors():
    from tiny_models.gpt import GPTConfig

    m = _gpt(attention="match", window=2, attn_kwargs=_match_kwargs(2, 1, "gated"), seed=5).train()
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(4))
    _, loss = m(ids, targets=ids)
    loss.backward()
    assert all(blk.attn.c_gate.weight.grad.abs().sum() > 0 for blk in m.h), "the gate gets a gradient"
    for kw in (
        dict(window=None, attn_kwargs=(("top_k", 2),)),
        dict(window=3, attn_kwargs=()),
        dict(window=3, attn_kwargs=(("top_k", 2), ("mode", "sum"))),
    ):
        with pytest.raises(ValueError, match="attention='match' needs"):
            GPTConfig(attention="match", **kw)
