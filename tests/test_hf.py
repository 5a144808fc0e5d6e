"""fast/hf.py: MATCH and sliding-window attention inside transformers models (tiny random configs, nothing
downloaded): with top_k covering every candidate MATCH equals eager attention, with a small top_k it does
not; cached generation equals uncached generation; "swa" equals eager attention under transformers' own
sliding-window mask; padding, GQA and bad settings."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fast.hf  # noqa: E402  (registers "match" and "swa")
from fast.testing import assert_close  # noqa: E402

V = 97


def _config(kind, **kw):
    common = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    if kind == "llama":
        return transformers.LlamaConfig(**common, **kw)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, **kw)
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=8, **kw)
    if kind == "mistral":
        return transformers.MistralConfig(**{"sliding_window": None, **common, **kw})
    raise AssertionError(kind)


def _pair(kind, impl="match", **settings):  # (eager model, `impl` model with the same weights)
    torch.manual_seed(0)
    cfg = _config(kind)
    eager = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    other = transformers.AutoModelForCausalLM.from_config(_config(kind), attn_implementation=impl).eval()
    other.load_state_dict(eager.state_dict())
    for k, v in settings.items():
        setattr(other.config, k, v)
    return eager, other


def _ids(B=2, T=29, seed=1):
    return torch.randint(3, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("block_size", [1, 4])
def test_match_with_every_candidate_equals_eager(kind, block_size):
    # top_k * block_size >= every out-of-window key: the joint softmax covers all of them (GQA: 4 / 2 heads)
    eager, m = _pair(kind, match_window=5, match_top_k=64, match_block_size=block_size)
    x = _ids()
    mask = torch.ones_like(x)
    mask[0, :6] = 0  # left padding in one row
    with torch.no_grad():
        for am in (None, mask):
            want = eager(x, attention_mask=am).logits
            got = m(x, attention_mask=am).logits
            rows = slice(None) if am is None else (1, slice(None))
            assert_close(got[rows], want[rows], dtype=torch.float32, name=f"{kind} B={block_size}")
            if am is not None:  # the padded row at its valid positions
                assert_close(got[0, 6:], want[0, 6:], dtype=torch.float32, name=f"{kind} padded row")


@pytest.mark.parametrize("mode", ["joint", "gated"])
def test_small_top_k_changes_the_output(mode):
    eager, m = _pair("llama", match_window=4, match_top_k=1, match_block_size=1, match_mode=mode)
    x = _ids()
    with torch.no_grad():
        diff = (m(x).logits - eager(x).logits).abs()
    assert diff[:, :4].max() < 1e-5  # the first w positions see no out-of-window key: nothing to retrieve
    assert diff[:, 8:].max() > 1e-3


@pytest.mark.parametrize("kind,block_size", [("llama", 1), ("qwen2", 4), ("mistral", 2)])
def test_cached_generation_equals_uncached(kind, block_size):
    _, m = _pair(kind, match_window=4, match_top_k=2, match_block_size=block_size)
    x = _ids(T=13)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = m.generate(x, use_cache=True, **kw)
        plain = m.generate(x, use_cache=False, **kw)
    assert torch.equal(cached, plain), (cached[:, 13:], plain[:, 13:])


@pytest.mark.parametrize("window", [1, 3, 8])
def test_swa_equals_eager_under_the_same_sliding_mask(window):
    # our window w (w keys including the query) is transformers' sliding_window = w (kv_idx > q_idx - w)
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(
        _config("mistral", sliding_window=window), attn_implementation="eager"
    ).eval()
    swa = transformers.AutoModelForCausalLM.from_config(_config("mistral"), attn_implementation="swa").eval()
    swa.load_state_dict(eager.state_dict())
    swa.config.match_window = window
    x = _ids(T=21)
    with torch.no_grad():
        assert_close(swa(x).logits, eager(x).logits, dtype=torch.float32, name=f"swa w={window}")
        cached = swa.generate(x[:, :9], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        plain = swa.generate(x[:, :9], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize(
    "attr,value,match",
    [
        ("match_window", 0, "match_window must be an integer >= 1, got 0"),
        ("match_top_k", -1, "match_top_k must be an integer >= 0"),
        ("match_block_size", 2.5, "match_block_size must be an integer >= 1, got 2.5"),
        ("match_mode", "soft", "match_mode must be one of"),
        ("match_gate_logit", float("nan"), "match_gate_logit must be a finite number"),
    ],
)
def test_bad_settings_raise_naming_the_attribute(attr, value, match):
    _, m = _pair("llama", **{attr: value})
    with pytest.raises(ValueError, match=match):
        m(_ids())


def test_models_the_registry_cannot_serve_are_refused():
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(
        _config("mistral", sliding_window=8), attn_implementation="match"
    ).eval()
    with pytest.raises(ValueError, match="sliding_window=8 makes the KV cache keep only the last 8 keys"):
        m(_ids())
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="serves model types"):
        fast.hf.check_model(gpt2.config)


def test_defaults_are_documented_and_valid():
    s = fast.hf.settings(_config("llama"))
    assert s == fast.hf.DEFAULTS
