# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 09 · Real models: MATCH inside a transformers model, and distilling one model into another
#
# Everything so far ran on the tiny GPT. The same code serves any transformers causal LM:
#
# 1. `fast/hf.py` registers MATCH (arXiv 2606.29844) and sliding-window attention with transformers'
#    attention registry, so `from_pretrained(path, attn_implementation="match")` retrofits a pretrained
#    Llama-, Qwen2- or Mistral-family model;
# 2. `python -m fast.training.hf_distill` distils one model into another from JSONL files with any method
#    of the registry (MGSR, arXiv 2407.10068, its ablations and every baseline).
#
# Here both run on tiny random models built on the spot (nothing is downloaded): the point is to see the
# mechanics and check them. The last section gives the commands for real checkpoints on one GPU, with
# memory estimates computed from their configs.

# %%
import copy
import json
import os
import tempfile
import time

import matplotlib
import torch
import transformers

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402

import fast.hf  # noqa: E402, F401  (registers "match" and "swa")
from fast.training import hf_distill  # noqa: E402

torch.set_num_threads(1)
T0 = time.perf_counter()

# %% [markdown]
# ## The knobs
#
# MATCH reads its settings from the model config: `match_window` (w keys including the query itself),
# `match_top_k` (retrieved tokens or blocks per query), `match_block_size` (keys per block), `match_mode`.
# **Expected effect:** with `match_top_k * match_block_size` at least the number of out-of-window keys,
# MATCH attends to every earlier key and equals full attention; below that the logits move away from full
# attention, the more the fewer keys are retrieved. Change the values below and rerun: the assertions say
# whether the claim still holds.

# %%
WINDOW = 8  # match_window
BLOCK_SIZE = 4  # match_block_size
T = 64  # prompt length

# %% [markdown]
# ## A tiny random Llama, eager and MATCH, the same weights

# %%
torch.manual_seed(0)
cfg = transformers.LlamaConfig(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
# each model gets its own copy of the config: transformers writes the attention implementation into it
eager = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
match = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="match").eval()
assert eager.config._attn_implementation == "eager" and match.config._attn_implementation == "match"
match.load_state_dict(eager.state_dict())
match.config.match_window, match.config.match_block_size = WINDOW, BLOCK_SIZE
x = torch.randint(3, 101, (2, T), generator=torch.Generator().manual_seed(1))

with torch.no_grad():
    full = eager(x).logits
    n_blocks = -(-T // BLOCK_SIZE)
    gaps = {}
    for k in (0, 1, 2, 4, 8, n_blocks):
        match.config.match_top_k = k
        gaps[k] = float((match(x).logits - full).abs().max())
for k, g in gaps.items():
    print(f"top_k={k:2d}: max |logit - full attention| = {g:.2e}")
assert gaps[n_blocks] < 1e-4, "every block retrieved: MATCH must equal full attention"
assert gaps[0] > gaps[n_blocks] and gaps[1] > 1e-3, "a small top_k must change the logits"

# %%
fig, ax = plt.subplots(figsize=(5, 3))
ks = list(gaps)
ax.semilogy(ks, [max(gaps[k], 1e-8) for k in ks], "o-")
ax.set_xlabel(f"match_top_k (blocks of {BLOCK_SIZE})")
ax.set_ylabel("max |logit difference|")
ax.set_title(f"tiny Llama, T={T}, window {WINDOW}: MATCH vs full attention", fontsize=9)
fig.tight_layout()

# %% [markdown]
# The difference falls as more blocks are retrieved and reaches rounding when all of them are (the last
# point is clipped at 1e-8 on the log axis).
#
# ## Generation with the KV cache
#
# During decoding each new query runs `fast.match.match_decode` against the cache; prefill runs the full
# op. Greedy generation with the cache must equal generation that recomputes everything at every step,
# padding included.

# %%
match.config.match_top_k = 2
prompts = x[:, :20].clone()
mask = torch.ones_like(prompts)
mask[1, :7] = 0  # a left-padded row
with torch.no_grad():
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = match.generate(prompts, use_cache=True, **kw)
    plain = match.generate(prompts, use_cache=False, **kw)
print(cached[:, 20:].tolist())
assert torch.equal(cached, plain)

# %% [markdown]
# ## Distilling one model into another from JSONL
#
# A teacher and a student must share a tokenizer. Here a byte-level BPE is trained on a few lines of text,
# two tiny Qwen2-shaped models are saved with `save_pretrained`, and the command runs a few MGSR steps.

# %%
import tokenizers  # noqa: E402

text = "the cat sat on the mat. the dog ran to the park. two plus three is five. " * 30
bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
bpe.decoder = tokenizers.decoders.ByteLevel()
bpe.train_from_iterator(
    [text],
    tokenizers.trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    ),
)
tok = transformers.PreTrainedTokenizerFast(
    tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
)
work = tempfile.mkdtemp()
for name, hidden in (("teacher", 48), ("student", 24)):
    torch.manual_seed(hidden)
    qcfg = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    transformers.Qwen2ForCausalLM(qcfg).save_pretrained(os.path.join(work, name))
    tok.save_pretrained(os.path.join(work, name))
facts = [
    ("What did the cat do?", "the cat sat on the mat"),
    ("Where did the dog go?", "to the park"),
    ("What is two plus three?", "five"),
]
for split, rows in (("train", facts * 4), ("valid", facts)):
    with open(os.path.join(work, f"{split}.jsonl"), "w") as f:
        f.writelines(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows)

argv = [
    "--teacher",
    f"{work}/teacher",
    "--student",
    f"{work}/student",
    "--train",
    f"{work}/train.jsonl",
    "--valid",
    f"{work}/valid.jsonl",
    "--method",
    "mgsr",
    "--out_dir",
    f"{work}/run",
    "--steps",
    "4",
    "--batch_size",
    "4",
    "--grad_accum",
    "2",
    "--max_new_tokens",
    "8",
    "--eval_every",
    "2",
    "--block_size",
    "64",
    "--dac_k",
    "8",
    "--dac_hidden",
    "16",
    "--progress",
    "false",
    "--device",
    "cpu",
]
print("python -m fast.training.hf_distill " + " ".join(a.replace(work, "$WORK") for a in argv))
hf_distill.main(argv)
ev = json.load(open(f"{work}/run/eval.json"))
assert ev["method"] == "mgsr" and 0 <= ev["greedy"]["rougeL"] <= 100
assert os.path.exists(f"{work}/run/student/config.json")

# %% [markdown]
# Four steps of a random student teach it nothing; what matters is that the pieces fit: the registry's
# recipe, SCRG on the student's samples, DAC-KL and the span term, the evaluation, a student saved with
# `save_pretrained`.
#
# ## Real checkpoints on one GPU
#
# The same two commands with real models. Memory below is an **estimate** from each config (bf16 weights;
# for training, bf16 AdamW moments and gradients, the `[B·T, V]` logits of teacher and student in fp32 and
# the loss's temporaries); it has not been measured here.


# %%
def estimate(params_b, layers, kv_heads, head_dim, vocab, tokens_kv=32_768, train_tokens=2_048):
    """GB: inference = weights + KV cache of tokens_kv tokens; a student's training state =
    weights + gradients + two AdamW moments (bf16), its logits, gradient and about two temporaries (fp32)."""
    w = params_b * 2
    kv = layers * kv_heads * head_dim * 2 * 2 * tokens_kv / 1e9
    logits = train_tokens * vocab * 4 / 1e9
    return {"inference": w + kv, "train_state": 4 * w, "logits_step": 4 * logits}


models = {  # (billions of parameters, layers, KV heads, head dim, vocabulary), from their configs
    "Qwen2.5-0.5B": (0.49, 24, 2, 64, 151_936),
    "Qwen2.5-1.5B": (1.54, 28, 2, 128, 151_936),
    "Llama-3.2-1B": (1.24, 16, 8, 64, 128_256),
}
for name, spec in models.items():
    e = estimate(*spec)
    print(
        f"{name:13s} MATCH inference, 32K context: ~{e['inference']:.1f} GB;  as a student: state "
        f"~{e['train_state']:.1f} GB + logits ~{e['logits_step']:.1f} GB per 2,048 tokens"
    )
teacher_w = models["Qwen2.5-1.5B"][0] * 2
student = estimate(*models["Qwen2.5-0.5B"])
total = teacher_w + student["train_state"] + 2 * student["logits_step"]  # the teacher's logits too
print(f"distil Qwen2.5-1.5B -> 0.5B, 2,048 tokens a step: ~{total:.0f} GB (estimate; MGSR's loss holds more")
print("temporaries than KD's)")

# %% [markdown]
# ```bash
# # retrofit: any Llama / Qwen2 / Mistral checkpoint (Mistral: set sliding_window to null in config.json)
# python - <<'EOF'
# import fast.hf, transformers
# m = transformers.AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B", attn_implementation="match",
#                                                       dtype="bfloat16").cuda()
# m.config.match_window, m.config.match_top_k, m.config.match_block_size = 512, 8, 64
# EOF
# # distil: teacher and student directories with the same tokenizer
# python -m fast.training.hf_distill --teacher Qwen2.5-1.5B --student Qwen2.5-0.5B --train train.jsonl \
#     --valid valid.jsonl --method mgsr --out_dir runs/mgsr --dtype bf16 --device cuda --batch_size 8 \
#     --grad_accum 4 --block_size 512 --steps 2000 --chat_template
# ```

# %%
print(f"notebook ran in {time.perf_counter() - T0:.1f}s")
