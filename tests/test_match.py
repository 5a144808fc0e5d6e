"""MATCH: the NumPy oracle against its by-definition loop, identities and finite differences; then the torch
backend of fast/match.py against the oracle; then the tiny GPT with attention="match"."""
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fast.testing import assert_close
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
    expected = np.array([[-1, -1],  # i = 0: no candidate
                         [-1, -1],  # i = 1: none
                         [0, -1],  # i = 2: {0}
                         [0, 1],  # i = 3: {0, 1}: 3 > 1
                         [0, 2],  # i = 4: {0, 1, 2}: 3, then 2 > 1
                         [0, 2]])  # i = 5: {0..3}: 3, then the tie 2 = 2 goes to the lower index 2
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


@given(T=st.integers(1, 14), D=st.integers(1, 4), w=st.integers(1, 6), K=st.integers(0, 6),
       B=st.integers(1, 4), seed=st.integers(0, 2**16))
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
    assert_close(np.where(np.isfinite(s), s, 0),
                 np.where(np.isfinite(s), sum(ref.retrieval_scores(q[g], k, window=2) for g in range(G)), 0))
    # summing scores = scoring the summed query (linearity); G = 1 is plain per-head selection
    assert np.array_equal(ref.retrieve(q, k, window=2, top_k=3, grouped=True),
                          ref.retrieve(q.sum(0), k, window=2, top_k=3))
    assert np.array_equal(ref.retrieve(q[:1], k, window=2, top_k=3, grouped=True),
                          ref.retrieve(q[0], k, window=2, top_k=3))


def test_block_summaries_partial_last_block():
    k = np.arange(14.0).reshape(7, 2)
    s = ref.block_summaries(k, 3)
    assert_close(s, np.array([[2.0, 3.0], [8.0, 9.0], [12.0, 13.0]]))


def test_bad_parameters():
    x = np.zeros((4, 2))
    for kw, msg in (({"window": 0, "top_k": 1}, "window"), ({"window": 2, "top_k": -1}, "top_k"),
                    ({"window": 2, "top_k": 1, "block_size": 0}, "block_size"),
                    ({"window": 2, "top_k": 1, "block_size": 3}, "block_size=3 must be <= window=2")):
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


@given(T=st.integers(1, 12), D=st.integers(1, 4), w=st.integers(1, 5), K=st.integers(0, 5),
       B=st.integers(1, 3), mode=st.sampled_from(ref.MODES), seed=st.integers(0, 2**16))
@example(T=12, D=2, w=3, K=2, B=2, mode="gated", seed=0)
@example(T=11, D=3, w=3, K=1, B=3, mode="joint", seed=1)
def test_oracle_vs_by_definition(T, D, w, K, B, mode, seed):
    B = min(B, w)
    q, k, v = _qkv(seed, T, D)
    gate = np.random.default_rng(seed + 1).standard_normal(T)
    kw = dict(window=w, top_k=K, block_size=B, mode=mode, gate_logit=gate if mode == "gated" else None,
              scale=0.9)
    assert_close(ref.match_attention(q, k, v, **kw), ref.match_attention_by_definition(q, k, v, **kw))


def test_merge_partials_is_one_softmax():
    q, k, v = _qkv(4, 10, 3)
    m_w = ref.window_mask(10, window=3)
    m_r = ref.candidate_mask(10, window=3) & (np.arange(10)[None, :] % 2 == 0)
    o, lse = ref.merge_partials(*ref.partial_attention(q, k, v, m_w, 0.5),
                                *ref.partial_attention(q, k, v, m_r, 0.5))
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
    assert_close(ref.match_attention(q, k, v, window=w, top_k=0, block_size=B, mode="gated", gate_logit=gate),
                 sliding, name="gated, nothing retrieved")
    # T <= w: nothing is a candidate, sliding = full causal
    qs, ks, vs = q[..., :w, :], k[..., :w, :], v[..., :w, :]
    assert_close(ref.match_attention(qs, ks, vs, window=w, top_k=2, block_size=B, mode="gated",
                                     gate_logit=gate[:w]), ref_attention(qs, ks, vs)[0], name="T <= w")


def _fd(fn, x, eps=1e-6):
    g = np.zeros_like(x)
    for pos in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[pos] += eps
        xm[pos] -= eps
        g[pos] = (fn(xp) - fn(xm)) / (2 * eps)
    return g


@pytest.mark.parametrize("mode,B,gate_shape", [("joint", 1, None), ("joint", 2, None), ("gated", 1, (2, 9)),
                                                ("gated", 3, (1, 9)), ("gated", 2, ())])
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
    assert_close(dq, _fd(lambda x: loss(q=x), q), name="dq", **tol)
    assert_close(dk, _fd(lambda x: loss(k=x), k), name="dk", **tol)
    assert_close(dv, _fd(lambda x: loss(v=x), v), name="dv", **tol)
    if mode == "joint":
        assert dg is None
    else:
        assert dg.shape == np.shape(gate)
        assert_close(dg, _fd(lambda x: loss(gate=x), np.asarray(gate, dtype=np.float64)), name="dgate", **tol)


def test_oracle_gate_gradient_is_zero_without_retrieval():
    T, D, w = 7, 2, 3
    q, k, v = _qkv(8, T, D)
    dout = np.ones((T, D))
    *_, dg = ref.match_attention_grad(q, k, v, dout, window=w, top_k=2, mode="gated", gate_logit=np.zeros(T))
    assert (dg[:w] == 0).all() and (dg[w:] != 0).all()
