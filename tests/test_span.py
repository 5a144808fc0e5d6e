"""Span-correlation loss: the rule-based span extractor on hand-written sentences, the oracle against
finite differences and a by-the-definition loop, then the torch and Triton backends against the oracle
(batched loss, gradient with a random cotangent, squared option, padding, -inf entries, +-1e4 logits,
fp16/bf16, empty span batches -> 0), and bad input."""

import numpy as np
import pytest
import torch
from _error_bounds import span_grad_scale
from hypothesis import example, given, settings
from hypothesis import strategies as st

import reference.span as R
from fast.span import pair_rows, span_loss, spans_to_tensor
from fast.testing import assert_close, central_difference, examples

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ----------------------------------------------------------------------------------------- extractor

TOKS = [
    "The",
    " quick",
    " brown",
    " fo",
    "x",
    " jump",
    "ed",
    " over",
    " the",
    " laz",
    "y",
    " dog",
    ".",
    " Un",
    "believ",
    "able",
    "!",
]


def _text(toks, spans):
    return ["".join(toks[a:b]) for a, b in spans]


def test_word_spans():
    sp = R.extract_spans(TOKS, mode="word")
    assert sp == [(3, 5), (5, 7), (9, 11), (13, 16)]
    assert _text(TOKS, sp) == [" fox", " jumped", " lazy", " Unbelievable"]


def test_phrase_spans_split_at_stop_words_and_punctuation():
    sp = R.extract_spans(TOKS, mode="phrase")
    assert _text(TOKS, sp) == [" quick brown fox jumped", " lazy dog", " Unbelievable"]
    toks = ["Paris", ",", " the", " capital", " city", " of", " France", " is", " large", " and", " old"]
    sp = R.extract_spans(toks, mode="phrase")
    assert _text(toks, sp) == [" capital city"]  # "France", "large", "old" are single tokens: no pair


def test_window_spans_and_first():
    assert R.extract_spans(TOKS, mode="window", size=5) == [(0, 5), (5, 10), (10, 15), (15, 17)]
    assert R.extract_spans(TOKS, mode="window", size=4) == [(0, 4), (4, 8), (8, 12), (12, 16)]  # (16, 17) < 2
    assert R.window_spans(7, 3, first=2) == [(2, 5), (5, 7)]
    assert R.extract_spans(TOKS, mode="word", first=4) == [(5, 7), (9, 11), (13, 16)]  # " fo" is prompt


def test_byte_offsets_and_utf8():
    text = "Café crème brûlée"
    toks = ["Ca", "fé", " cr", "ème", " br", "û", "lée"]
    tb, offs = R.offsets_from_tokens(toks)
    assert tb == text.encode("utf-8")
    assert R.extract_spans(offsets=offs, text=text, mode="word") == [(0, 2), (2, 4), (4, 7)]
    assert R.extract_spans(offsets=offs, text=text, mode="phrase") == [(0, 7)]
    sp_markers = R.extract_spans(["\u2581Ca", "fé", "\u2581cr", "ème"], mode="word")  # SentencePiece '▁'
    assert sp_markers == [(0, 2), (2, 4)]


def test_extracted_spans_are_valid_and_deterministic():
    rng = np.random.default_rng(0)
    words = ["alpha", "be", "ta", ",", " of", " the", " gam", "ma", ".", " del", "ta", " and", " x"]
    for _ in range(20):
        toks = list(rng.choice(words, size=int(rng.integers(1, 30))))
        for mode in ("word", "phrase", "window"):
            sp = R.extract_spans(toks, mode=mode, size=3)
            R.check_spans(sp, len(toks))
            assert sp == R.extract_spans(toks, mode=mode, size=3)


# ------------------------------------------------------------------------------------------- oracle


def _rand(seed, T, V, scale=3.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(T, V)) * scale, rng.normal(size=(T, V)) * scale


@pytest.mark.parametrize("squared", [False, True])
def test_reference_grad_matches_finite_differences(squared):
    t, s = _rand(1, 9, 7)
    t[:, 5] = -np.inf
    s[:, 5] = -np.inf
    spans = [(0, 3), (4, 8)]
    g = R.span_loss_grad(t, s, spans, squared)
    fd = central_difference(lambda x: R.span_loss(t, x, spans, squared), s, eps=1e-6)
    assert_close(g, fd, dtype="float32", name="dL/ds")  # FD error ~1e-10
    assert np.all(g[3] == 0) and np.all(g[8] == 0)  # positions outside every span get no gradient


def test_reference_by_the_definition():
    t, s = _rand(2, 6, 5)
    spans = [(1, 4), (4, 6)]
    p = np.exp(t - t.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(s - s.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    d = [np.linalg.norm(p[k] * p[k + 1] - q[k] * q[k + 1]) for k in (1, 2, 4)]
    assert_close(R.span_loss(t, s, spans), np.mean(d))
    assert_close(R.span_loss(t, s, spans, squared=True), np.mean(np.square(d)))
    assert R.span_loss(t, t, spans) == 0.0 and np.all(R.span_loss_grad(t, t, spans) == 0)
    assert R.span_loss(t, s, []) == 0.0


@pytest.mark.parametrize("squared", [False, True])
def test_gradient_error_scale(squared):
    """The tests' error size for the span gradient (tests/_error_bounds.span_grad_scale) is finite,
    non-negative, zero where the gradient is exactly zero (no pairs, identical pair, padded entries) and, at
    a dominant token, far larger than the gradient itself (the cancellation it measures)."""
    rng = np.random.default_rng(11)
    t, s = rng.normal(size=(6, 9)) * 3, rng.normal(size=(6, 9)) * 3
    t[:, 8] = s[:, 8] = -np.inf
    s[3, 0] = 40.0  # position 3: one dominant student token
    spans = [(0, 2), (2, 5)]
    g, mag = R.span_loss_grad(t, s, spans, squared), span_grad_scale(t, s, spans, squared)
    assert mag.shape == g.shape and np.all(np.isfinite(mag)) and np.all(mag >= 0)
    assert np.all(mag[:, 8] == 0) and np.all(mag[5] == 0)  # padded entry; a position in no pair
    assert mag[3, 0] > 1e6 * abs(g[3, 0])  # q ~ 1: |gq| (1 - q) left of terms of size |gq|
    g0, mag0 = R.span_loss_grad(t, s, [], squared), span_grad_scale(t, s, [], squared)
    assert not g0.any() and not mag0.any()
    g1, mag1 = R.span_loss_grad(t, t, spans, squared), span_grad_scale(t, t, spans, squared)  # D = 0: exact
    assert not g1.any() and np.all(np.isfinite(mag1))


# ----------------------------------------------------------------------------------- fast vs oracle


def _run(t, s, spans, backend, dtype=torch.float32, squared=False, cot=1.7):
    B = t.shape[0]
    T_ = torch.tensor(t, dtype=dtype, device=DEVICE)
    S_ = torch.tensor(s, dtype=dtype, device=DEVICE, requires_grad=True)
    loss = span_loss(T_, S_, spans_to_tensor(spans, DEVICE), squared=squared, backend=backend)
    (loss * cot).backward()  # grad_output != 1
    tr, sr = T_.double().cpu().numpy(), S_.detach().double().cpu().numpy()
    P = sum(len(R.pairs(x)) for x in spans)
    if P == 0:
        ref, rg, mag = 0.0, np.zeros_like(tr), np.zeros_like(tr)
    else:
        w = [len(R.pairs(x)) / P for x in spans]
        ref = sum(w[b] * R.span_loss(tr[b], sr[b], spans[b], squared) for b in range(B))
        rg = np.stack([w[b] * R.span_loss_grad(tr[b], sr[b], spans[b], squared) for b in range(B)]) * cot
        # the gradient's own conditioning (tests/_error_bounds.span_grad_scale): fp32 rounds each
        # cancelling term to ~eps of its size; 4 eps of that size is allowed on top of the dtype's budget.
        # Fuzzing found B=1, T=2, V=2 (a dominant token, q = 0.9996): 9e-8 off on a 1e-3 gradient
        mag = np.stack([w[b] * span_grad_scale(tr[b], sr[b], spans[b], squared) for b in range(B)]) * abs(cot)
    name = f"{backend}/{dtype}/sq={squared}"
    assert torch.isfinite(loss).all()
    assert_close(loss, ref, dtype=dtype, name=f"loss {name}")
    assert S_.grad.dtype == dtype
    assert_close(S_.grad, rg, dtype=dtype, name=f"grad {name}", slack=4 * np.finfo(np.float32).eps * mag)


SPANS = [[(0, 3), (4, 7)], [(1, 3)], []]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("squared", [False, True])
def test_fast_batched(backend, squared):
    rng = np.random.default_rng(3)
    t = rng.normal(size=(3, 7, 150)) * 3
    s = rng.normal(size=(3, 7, 150)) * 3
    t[..., 140:] = -np.inf  # padded vocabulary
    s[..., 140:] = -np.inf
    _run(t, s, SPANS, backend, squared=squared)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fast_huge_logits_and_identical_pair(backend):
    rng = np.random.default_rng(4)
    t = rng.choice([-1e4, 0.0, 1e4], size=(1, 6, 40)) + rng.normal(size=(1, 6, 40))
    s = rng.choice([-1e4, 0.0, 1e4], size=(1, 6, 40)) + rng.normal(size=(1, 6, 40))
    s[0, 4:6] = t[0, 4:6]  # the pair (4, 5) has D = 0: the zero subgradient, no NaN
    _run(t, s, [[(0, 3), (4, 6)]], backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("squared", [False, True])
def test_fast_identical_pair_inside_a_longer_span(backend, squared):
    # the middle pair (2, 3) of span (0, 5) has D = 0: unsquared, its coefficient is 0, so positions 2 and 3
    # get a gradient from one side only (the backward's dot product is then that pair's share alone)
    rng = np.random.default_rng(8)
    t, s = rng.normal(size=(1, 6, 23)) * 2, rng.normal(size=(1, 6, 23)) * 2
    s[0, 2:4] = t[0, 2:4]
    t[..., 20:] = s[..., 20:] = -np.inf
    _run(t, s, [[(0, 5)]], backend, squared=squared)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fast_low_precision(backend, dtype):
    rng = np.random.default_rng(5)
    # few-entry vocabularies so the products are O(0.1), well above the fp16 atol
    t, s = rng.normal(size=(2, 5, 6)) * 2, rng.normal(size=(2, 5, 6)) * 2
    _run(t, s, [[(0, 5)], [(2, 4)]], backend, dtype=dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_span_batch_is_zero(backend):
    t = torch.randn(2, 4, 9, device=DEVICE)
    s = torch.randn(2, 4, 9, device=DEVICE, requires_grad=True)
    all_pad = torch.full((2, 3, 2), -1, dtype=torch.int64, device=DEVICE)
    for spans in (spans_to_tensor([[], []], DEVICE), all_pad):
        loss = span_loss(t, s, spans, backend=backend)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(s.grad, torch.zeros_like(s))
        s.grad = None


def test_triton_multi_chunk_vocab():
    rng = np.random.default_rng(6)
    t = rng.normal(size=(1, 4, 1500)) * 4
    s = rng.normal(size=(1, 4, 1500)) * 4
    _run(t, s, [[(0, 4)]], "triton")


def test_triton_partial_second_chunk_with_padding():
    # a second guard on the chunked vocabulary loops: 1100 entries = one full 1024-chunk under the interpreter
    # plus a partial one that holds most of the probability mass and ends in -inf padding; two rows, several
    # spans, both distance options
    rng = np.random.default_rng(7)
    t = rng.normal(size=(2, 5, 1100)) * 2
    s = rng.normal(size=(2, 5, 1100)) * 2
    t[..., 1030:1080] += 6.0
    s[..., 1040:1090] += 6.0
    t[..., 1090:] = s[..., 1090:] = -np.inf
    for squared in (False, True):
        _run(t, s, [[(0, 2), (2, 5)], [(1, 4)]], "triton", squared=squared)


@settings(max_examples=examples(4))
@given(
    B=st.integers(1, 2),
    T=st.integers(2, 6),
    V=st.integers(1, 70),
    seed=st.integers(0, 2**16),
    squared=st.booleans(),
    backend=st.sampled_from(["torch", "triton"]),
)
@example(B=1, T=2, V=1, seed=0, squared=False, backend="triton")  # V = 1: every product is 1, loss 0
@example(B=2, T=5, V=33, seed=1, squared=True, backend="triton")
@example(B=1, T=2, V=2, seed=854, squared=False, backend="torch")  # fuzzing: a dominant token's cancellation
def test_fast_property(B, T, V, seed, squared, backend):
    rng = np.random.default_rng(seed)
    t, s = rng.normal(size=(B, T, V)) * 3, rng.normal(size=(B, T, V)) * 3
    spans = []
    for _ in range(B):  # random non-overlapping spans of >= 2 tokens
        row, a = [], int(rng.integers(0, 2))
        while a + 2 <= T:
            e = int(rng.integers(a + 2, T + 1))
            row.append((a, e))
            a = e + int(rng.integers(0, 2))
        spans.append(row)
    _run(t, s, spans, backend, squared=squared)


def test_pair_rows():
    sp = spans_to_tensor([[(0, 3), (4, 6)], [(1, 4)]])
    assert pair_rows(sp, 7).tolist() == [0, 1, 4, 8, 9]


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_input(backend):
    t = torch.zeros(2, 5, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"out of range.*T=5"):
        span_loss(t, t, spans_to_tensor([[(3, 6)], []], DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"out of range"):
        span_loss(t, t, spans_to_tensor([[(-2, 2)], []], DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"shorter than 2"):
        span_loss(t, t, spans_to_tensor([[(1, 2)], []], DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"overlap in batch 1: \(0, 3\) and \(2, 5\)"):
        span_loss(t, t, spans_to_tensor([[], [(2, 5), (0, 3)]], DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"int32/int64.*float32"):
        span_loss(t, t, spans_to_tensor([[(0, 2)], []], DEVICE).float(), backend=backend)
    with pytest.raises(ValueError, match=r"\[B=2, S, 2\]"):
        span_loss(t, t, torch.zeros(3, 1, 2, dtype=torch.int64, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=r"\[B, T, V\].*\(2, 5, 4\).*\(2, 5, 3\)"):
        span_loss(t, t[..., :3], spans_to_tensor([[], []], DEVICE), backend=backend)
    with pytest.raises(ValueError, match="overlaps"):
        R.span_loss(np.zeros((5, 3)), np.zeros((5, 3)), [(0, 3), (2, 4)])
    with pytest.raises(ValueError, match="window size"):
        R.window_spans(5, 1)
