"""tiny_models/gpt.py against the NumPy oracle reference/gpt.py, and KV-cache generation against no cache."""

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fast.attention import attention_mask
from fast.testing import assert_close
from fast.training.sampling import filter_logits, sample_next
from reference import attention as ref_attention
from reference import gpt as ref
from tiny_models.gpt import (
    ATTENTION,
    GPT,
    PAD,
    GPTConfig,
    generate,
    register_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(dtype=torch.float64, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    cfg = GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 24, **kw})
    m = GPT(cfg)
    with torch.no_grad():  # LayerNorm starts at (1, 0): perturb so the oracle's use of them is tested too
        for name, p in m.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m.to(dtype=dtype, device=DEVICE).eval()


def _np_params(m):
    return {k: v.detach().cpu().double().numpy() for k, v in m.state_dict().items()}


MODES = [("full", None), ("sliding", 1), ("sliding", 3), ("sliding", 64)]


@pytest.mark.parametrize("attention,window", MODES)
@given(t=st.integers(1, 40), seed=st.integers(0, 2**16))
@example(t=1, seed=0)
@example(t=37, seed=1)
def test_logits_equal_numpy_fp64(attention, window, t, seed):
    m = _model(attention=attention, window=window, seed=seed % 7)
    ids = np.random.default_rng(seed).integers(0, m.cfg.vocab_size, size=t)
    got = m(torch.tensor(ids, device=DEVICE)[None])[0].detach().cpu().numpy()
    want = ref.gpt(ids, _np_params(m), **ref.config_kwargs(m.cfg))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("attention,window", MODES)
def test_logits_equal_numpy_fp32(attention, window):
    m = _model(torch.float32, attention=attention, window=window, n_layer=3, n_embd=48, n_head=4)
    ids = np.random.default_rng(3).integers(0, 256, size=53)
    got = m(torch.tensor(ids, device=DEVICE)[None])[0].detach().double().cpu().numpy()
    want = ref.gpt(ids, _np_params(m), **ref.config_kwargs(m.cfg))  # the fp32 weights, exactly, in fp64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention,window", MODES)
def test_greedy_generation_equals_numpy(attention, window):
    m = _model(attention=attention, window=window, n_embd=32)
    prompt = [256, 72, 105, 33, 10]
    got = generate(m, [prompt], max_new_tokens=12, eos_id=-1)[0]
    want = ref.greedy_generate(prompt, _np_params(m), 12, eos=-1, **ref.config_kwargs(m.cfg))
    assert got == want


def test_window_convention_counts_w_keys_including_self():
    # query i sees keys j with i - w < j <= i: w = 2 -> each row has itself and one predecessor
    mask = attention_mask(4, 4, window=2, key_valid=None, device="cpu")[0, 0]
    want = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, want)
    assert np.array_equal(ref_attention.attention_mask(4, causal=True, window=2), want.numpy())
    # bottom-right alignment for decoding: one query at key index 3
    assert torch.equal(attention_mask(1, 4, window=2, key_valid=None, device="cpu")[0, 0], want[3:])


def test_window_one_is_identity_attention():
    # w = 1: every query sees only itself, so attention returns v unchanged
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(ATTENTION["sliding"](q, k, v, window=1), v, rtol=0, atol=1e-12)


def test_pad_query_rows_are_not_nan():
    q, k, v = (torch.randn(2, 1, 3, 4) for _ in range(3))
    valid = torch.tensor([[False, True, True], [True, True, True]])
    out = ATTENTION["full"](q, k, v, key_valid=valid)
    assert torch.isfinite(out).all()
    # the convention that makes it so: a pad query sees itself (and, causally, nothing else)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])


# ----------------------------------------------------------------------------------------------------
# generation


PROMPTS = [[256, 1, 2, 3, 4, 5, 6, 7], [256, 9], [256, 40, 41, 42, 43]]


@pytest.mark.parametrize("attention,window", [("full", None), ("sliding", 3)])
@pytest.mark.parametrize(
    "sampling",
    [
        dict(),
        dict(temperature=1.0),
        dict(temperature=0.8, top_k=5),
        dict(temperature=1.3, top_p=0.9),
        dict(temperature=1.0, top_k=20, top_p=0.5),
    ],
)
def test_cached_equals_uncached(attention, window, sampling):
    m = _model(attention=attention, window=window, n_embd=32)
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(11) if sampling else None
        runs.append(
            generate(m, PROMPTS, max_new_tokens=10, generator=g, use_cache=use_cache, eos_id=-1, **sampling)
        )
    assert runs[0] == runs[1]
    assert all(len(r) == 10 for r in runs[0])


def test_batched_rows_equal_single_rows():
    # left padding + per-row positions: a row's greedy output does not depend on its neighbours
    m = _model(n_embd=32)
    batched = generate(m, PROMPTS, max_new_tokens=8, eos_id=-1)
    single = [generate(m, [p], max_new_tokens=8, eos_id=-1)[0] for p in PROMPTS]
    assert batched == single


@pytest.mark.parametrize("attention,window", [("full", None), ("sliding", 3)])
def test_left_padded_row_has_the_logits_of_the_unpadded_row(attention, window):
    # pad keys are masked out: a left-padded row's logits at its real positions equal the row run alone
    m = _model(attention=attention, window=window, n_embd=32)
    p, n_pad = PROMPTS[2], 4
    idx = torch.tensor([[PAD] * n_pad + p])
    valid = idx != PAD
    pos = (valid.long().cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        padded = m(idx, pos=pos, key_valid=valid)[0, n_pad:]
        alone = m(torch.tensor([p]))[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generated_tokens_take_the_next_rope_positions(use_cache, monkeypatch):
    # step t of a row whose prompt has n tokens sits at RoPE position n + t (positions count real tokens)
    m = _model(n_embd=32)
    seen = []
    real = m.forward

    def spy(idx, **kw):
        seen.append(kw["pos"].clone())
        return real(idx, **kw)

    monkeypatch.setattr(m, "forward", spy)
    generate(m, PROMPTS, max_new_tokens=4, eos_id=-1, use_cache=use_cache)
    L = max(map(len, PROMPTS))
    assert len(seen) == 4
    for step, pos in enumerate(seen):
        for b, prompt in enumerate(PROMPTS):
            n = len(prompt)
            assert pos[b, -1].item() == n - 1 + step, (step, b, pos[b].tolist())
            if not use_cache or step == 0:
                assert pos[b, L - n :].tolist() == list(range(n + step)), (step, b, pos[b].tolist())


def test_eos_stops_each_row():
    m = _model(n_embd=32)
    run = lambda eos: generate(
        m, PROMPTS, max_new_tokens=10, temperature=1.0, eos_id=eos, generator=torch.Generator().manual_seed(5)
    )  # one uniform per row per step
    free = run(-1)
    # stop token: the first token of row 0 that appears after something else (so row 0 stops mid-way)
    k, eos = next((i, t) for i, t in enumerate(free[0]) if i > 0 and t not in free[0][:i])
    out = run(eos)
    for row_free, row in zip(free, out, strict=True):
        assert row == (row_free[: row_free.index(eos)] if eos in row_free else row_free)
    assert out[0] == free[0][:k]


def test_sampling_is_reproducible_with_generator_and_differs_across_seeds():
    m = _model(n_embd=32)
    a = generate(
        m, PROMPTS, max_new_tokens=12, temperature=1.5, generator=torch.Generator().manual_seed(1), eos_id=-1
    )
    b = generate(
        m, PROMPTS, max_new_tokens=12, temperature=1.5, generator=torch.Generator().manual_seed(1), eos_id=-1
    )
    c = generate(
        m, PROMPTS, max_new_tokens=12, temperature=1.5, generator=torch.Generator().manual_seed(2), eos_id=-1
    )
    assert a == b and a != c


def test_top_k_keeps_ties_and_top_p_by_hand():
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, 0.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=1))
    assert kept.tolist() == [[True, False, True, False, False]]  # both maxima survive top-1
    # probs of [log .5, log .3, log .15, log .05]: top_p=0.7 keeps .5 and .3 (mass before .3 is .5 < .7)
    lp = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(filter_logits(lp, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(lp, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(lp, top_p=1.0)).all()


def test_sampling_frequencies_follow_probabilities():
    probs = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    logits = probs.log().expand(20000, 3)
    draws = sample_next(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).double() / 20000
    assert torch.allclose(freq, probs, atol=0.015)  # 3 sigma of a binomial with n = 20000 is < 0.011


def test_greedy_is_argmax_lowest_id_on_ties():
    assert sample_next(torch.tensor([[1.0, 5.0, 5.0]]), temperature=0.0).tolist() == [1]


# ----------------------------------------------------------------------------------------------------
# the attention hook and bad input


def test_register_attention_routes_every_layer():
    calls = []

    def spy(q, k, v, *, window, key_valid, scale, top_k):  # [B,H,Tq,D] x3 -> [B,H,Tq,D]
        calls.append((tuple(q.shape), top_k))
        return ATTENTION["full"](q, k, v, key_valid=key_valid, scale=scale)

    register_attention("spy_test", spy, overwrite=True)
    try:
        base = _model(n_embd=32)
        m = _model(n_embd=32, attention="spy_test", attn_kwargs=(("top_k", 4),))
        m.load_state_dict(base.state_dict())
        x = torch.randint(0, 256, (2, 9), device=DEVICE)
        torch.testing.assert_close(m(x), base(x), rtol=0, atol=0)
        assert calls == [((2, 2, 9, 16), 4)] * 2
        with pytest.raises(ValueError, match="already registered"):
            register_attention("full", spy)
    finally:
        ATTENTION.pop("spy_test", None)


@pytest.mark.parametrize("window", [None, 3])
def test_gpt_with_the_triton_attention_kernel_matches_sdpa(window):
    # What the model runs on CUDA (fast.attention.flash_attention, Triton), here through the interpreter on
    # the model's own q/k/v layout (a view of the fused qkv projection after RoPE), against the SDPA path.
    from fast.attention import flash_attention

    def triton_attn(q, k, v, *, window, key_valid, scale):  # [B,H,T,D] x3 -> [B,H,T,D]
        assert key_valid is None
        return flash_attention(q, k, v, causal=True, window=window, scale=scale, backend="triton")

    register_attention("triton_test", triton_attn, overwrite=True)
    try:
        kw = {"n_embd": 32, "window": window, "attention": "full" if window is None else "sliding"}
        base = _model(dtype=torch.float32, **kw)
        m = _model(dtype=torch.float32, **{**kw, "attention": "triton_test"})
        m.load_state_dict(base.state_dict())
        x = torch.randint(0, 256, (2, 21), device=DEVICE)
        with torch.no_grad():
            assert_close(m(x), base(x), dtype=torch.float32, name="logits")
    finally:
        ATTENTION.pop("triton_test", None)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(n_embd=6, n_head=2), "even for RoPE"),
        (dict(attention="sliding"), "needs a window"),
        (dict(attention="sliding", window=0), "window must be >= 1"),
        (dict(attention="nope"), "unknown attention 'nope'"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kw)


def test_bad_generation_args():
    m = _model(n_embd=32)
    with pytest.raises(ValueError, match="explicit torch.Generator"):
        generate(m, PROMPTS, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(m, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p must be in"):
        filter_logits(torch.zeros(1, 3), top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        filter_logits(torch.zeros(1, 3), top_k=0)
    with pytest.raises(ValueError, match="implements attention 'full' and 'sliding'"):
        ref.config_kwargs(_FakeCfg())


class _FakeCfg:  # stands in for a config whose attention only the torch side has (e.g. MATCH)
    attention = "match"


def test_loss_ignores_masked_labels():
    m = _model(n_embd=32)
    x = torch.randint(0, 256, (2, 7), device=DEVICE)
    y = x.clone()
    y[:, :4] = -100
    logits, loss = m(x, targets=y)
    want = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, logits.size(-1)), y[:, 4:].reshape(-1))
    assert_close(loss, want, dtype="float32", name="masked-label loss")


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_frequencies_follow_the_tempered_distribution(temperature):
    # softmax(logits / T): at T=0.5 the probabilities sharpen to p^2 / sum p^2, at T=2 flatten to
    # sqrt(p) / sum
    probs = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    tempered = probs ** (1.0 / temperature)
    tempered = tempered / tempered.sum()
    logits = probs.log().expand(20000, 3)
    draws = sample_next(logits, temperature=temperature, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=3).double() / 20000
    assert torch.allclose(freq, tempered, atol=0.015)  # 3 sigma of a binomial with n = 20000 is < 0.011
    assert not torch.allclose(freq, probs, atol=0.05)  # and visibly not the untempered distribution
