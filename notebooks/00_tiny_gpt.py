# %% [markdown]
# # 00 · Tiny GPT: the NumPy oracle beside torch, training curves, generations
#
# Every experiment in this repository trains or distils tiny byte-level GPTs. This notebook shows the
# three things the rest builds on:
#
# 1. the model in NumPy (`reference/gpt.py`, picoGPT style) next to the torch model (`tiny_models/gpt.py`),
#    loading the *same* weights and giving the same logits;
# 2. how the shipped teacher and student trained (`fast/train.py` logs);
# 3. what they generate on the held-out evaluation sets, scored with our ROUGE-L (`reference/rouge.py`).
#
# Conventions: pre-LN blocks, rotary positions (RoPE, rotate-half), tied embeddings, tanh-GELU. A sliding
# window `w` means query `i` sees keys `i - w < j <= i`: **w keys including itself**.

# %%
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any module with @triton.jit is imported

import json
import pathlib

import matplotlib.pyplot as plt
import numpy as np

import reference.gpt as R
from fast.train import load_model
from reference.rouge import rouge_l
from tiny_models.evaluate import generate_responses
from tiny_models.gpt import GPT, GPTConfig, attention_mask, generate
from tiny_models.tasks import EVAL_SETS, build_dataset, decode, prompt_ids

ROOT = pathlib.Path.cwd().parent if pathlib.Path.cwd().name == "notebooks" else pathlib.Path.cwd()
CKPT = ROOT / "tiny_models" / "checkpoints"
torch.manual_seed(0)
torch.set_num_threads(1)  # tiny matrices: extra OpenMP threads only add synchronisation

# %% [markdown]
# ## 1. The same network in NumPy and in torch
#
# The NumPy forward is ~40 lines of pure functions in float64. Load the student's weights into it and
# compare logits with the torch model in float64 (agreement to ~1e-12) and float32 (~1e-6).

# %%
student, _ = load_model(str(CKPT / "student.safetensors"))
teacher, _ = load_model(str(CKPT / "teacher.safetensors"))
params = {k: v.double().numpy() for k, v in student.state_dict().items()}
ds = build_dataset(0)
ex = ds["test"][0]
ids = prompt_ids(ex.prompt)

np_logits = R.gpt(ids, params, **R.config_kwargs(student.cfg))
with torch.no_grad():
    t64 = student.double()(torch.tensor(ids)[None])[0].numpy()
    t32 = student.float()(torch.tensor(ids)[None])[0].double().numpy()
print(f"prompt: {ex.prompt!r}")
print(f"max |torch fp64 - numpy| = {np.abs(t64 - np_logits).max():.2e}")
print(f"max |torch fp32 - numpy| = {np.abs(t32 - np_logits).max():.2e}")
print(
    "greedy, NumPy :",
    repr(decode(R.greedy_generate(ids, params, 30, eos=257, **R.config_kwargs(student.cfg)))),
)
print("greedy, torch :", repr(decode(generate(student, [ids], max_new_tokens=30)[0])))

# %% [markdown]
# The attention masks behind `"full"` and `"sliding"` (here `w = 3`, so each row has 3 keys, itself included):

# %%
fig, axes = plt.subplots(1, 2, figsize=(6, 3))
for ax, (title, w) in zip(axes, [("full", None), ("sliding, w = 3", 3)], strict=True):
    ax.imshow(attention_mask(8, 8, window=w, key_valid=None, device="cpu")[0, 0], cmap="Blues")
    ax.set_title(title)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
plt.tight_layout()
plt.show()

# %% [markdown]
# A sliding-window model is the same architecture with another mask; the oracle follows it too:

# %%
sw = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, attention="sliding", window=3)).double().eval()
p_sw = {k: v.numpy() for k, v in sw.state_dict().items()}
with torch.no_grad():
    diff = np.abs(sw(torch.tensor(ids)[None])[0].numpy() - R.gpt(ids, p_sw, **R.config_kwargs(sw.cfg))).max()
print(f"sliding window, max |torch - numpy| = {diff:.2e}")

# %% [markdown]
# ## 2. Training curves
#
# Both models were trained from scratch with `fast/train.py` (AdamW, warmup + cosine, clipping) on the
# synthetic instruction suite, batches of 32 examples, loss on response tokens only: the student for 800
# steps, the teacher for 800 + 800 (a second stage from the first one's weights with a fresh schedule, hence
# the bump in its curve at step 800). The CSV logs ship next to the checkpoints.


# %%
def read_csv(path):
    rows = [line.strip().split(",") for line in open(path)]
    head, rows = rows[0], rows[1:]
    col = {h: i for i, h in enumerate(head)}
    step = np.array([float(r[col["step"]]) for r in rows])
    loss = np.array([float(r[col["loss"]]) for r in rows])
    val = [(float(r[col["step"]]), float(r[col["val_loss"]])) for r in rows if r[col["val_loss"]]]
    return step, loss, np.array(val)


fig, ax = plt.subplots(figsize=(7, 4))
for name, color in [("teacher", "C0"), ("student", "C1")]:
    step, loss, val = read_csv(CKPT / f"{name}_log.csv")
    smooth = np.convolve(loss, np.ones(20) / 20, mode="valid")
    ax.plot(step[19:], smooth, color=color, label=f"{name} train (20-step mean)")
    ax.plot(val[:, 0], val[:, 1], "o--", color=color, label=f"{name} validation")
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("loss per response token (nats)")
ax.legend()
plt.show()

# %% [markdown]
# ## 3. Generations on the held-out evaluation sets
#
# Greedy decoding with the KV cache, one prompt per family-ish from each evaluation set. `unseen_families`
# asks for tasks neither model was trained on, so low scores there are expected.

# %%
picks = [(s, ds[s][j * len(ds[s]) // 3]) for s in EVAL_SETS for j in range(3)]
outs = {
    name: generate_responses(m.float(), [e for _, e in picks])
    for name, m in [("teacher", teacher), ("student", student)]
}
for i, (s, e) in enumerate(picks):
    print(f"[{s}] {e.prompt}\n   reference: {e.response}")
    for name in outs:
        print(f"   {name:8s} ROUGE-L {100 * rouge_l(outs[name][i], e.response)[2]:5.1f}: {outs[name][i]}")

# %% [markdown]
# The recorded scores on the full evaluation sets (from the model cards, `tiny_models/checkpoints/*.json`):

# %%
cards = {n: json.loads((CKPT / f"{n}.json").read_text()) for n in ("teacher", "student")}
sets = ["valid", *EVAL_SETS]
x = np.arange(len(sets))
fig, ax = plt.subplots(figsize=(8, 3.5))
for k, (name, c) in enumerate(cards.items()):
    ax.bar(
        x + 0.4 * k - 0.2,
        [c["greedy"][s]["rougeL"] for s in sets],
        0.4,
        label=f"{name} ({c['num_params']:,} params)",
    )
ax.set_xticks(x, sets)
ax.set_ylabel("ROUGE-L F1 x100 (greedy)")
ax.legend()
plt.show()
