# %% [markdown]
# # 06 · MQAR: does retrieval give a sliding window its long-range recall back?
#
# MATCH (arXiv 2606.29844) keeps sliding-window attention (SWA) and adds, for every query, the `top_k`
# out-of-window keys of the same sequence with the largest attention logit (`fast/match.py`). The claim to
# test: SWA loses long-range recall, SWA + MATCH recovers it at SWA-like cost.
#
# The probe is multi-query associative recall (MQAR, Zoology arXiv 2312.04927, `tiny_models/recall.py`):
# key-value pairs at the start of the sequence, then each key asked again later; the model must emit the
# paired value. A query whose key lies more than `w` tokens back is out of a window of `w` keys.
#
# This notebook loads the small committed checkpoints (no training):
#
# 1. the task;
# 2. three models trained from scratch, full attention, SWA and SWA + MATCH, by key-query distance;
# 3. the full-attention model with its attention swapped at inference (no retraining);
# 4. what MATCH retrieves for one query;
# 5. the committed grid (3 seeds per model).

# %%
import json
import pathlib

import matplotlib.pyplot as plt
import torch

from tiny_models.match_grid import (
    CKPT_DIR,
    DEMO_SEED,
    attended_fraction,
    by_distance,
    evaluate,
    layer_qk,
    load_run,
    make_batch,
    plugin_eval,
    plugin_variants,
    use_match_chunk,
)
from tiny_models.recall import IGNORE, key_distance, mqar

ROOT = pathlib.Path.cwd().parent if pathlib.Path.cwd().name == "notebooks" else pathlib.Path.cwd()
RESULTS = ROOT / "tiny_models" / "results" / "match"
torch.set_num_threads(1)  # tiny matrices: extra OpenMP threads only add synchronisation
use_match_chunk()  # fast.match's torch backend, 16 query rows per step (faster on a CPU at this length)

# %% [markdown]
# ## 1. The task
#
# Keys come from the lower half of the vocabulary (token 0, the filler, excluded), values from the upper
# half. Every key is queried once, at a power-law distributed gap (most queries come early). The label is
# the value at the query key's position, -100 elsewhere.

# %%
x, y = mqar(1, seq_len=32, num_kv_pairs=4, vocab_size=32, seed=0)
print("inputs  ", x[0].tolist())
print("labels  ", ["." if v == IGNORE else v for v in y[0].tolist()])
print("distance", ["." if v < 0 else v for v in key_distance(x, y)[0].tolist()])

# %% [markdown]
# ## 2. Three models trained from scratch
#
# Same width and depth; only the attention differs. Scored on fresh examples (a seed none of them saw).

# %%
runs = {
    name: load_run(str(pathlib.Path(CKPT_DIR) / f"{name}.safetensors")) for name in ("full", "swa", "match")
}
cfg = runs["full"][1]
xe, ye = make_batch(cfg, 256, DEMO_SEED)
print(
    f"T={cfg.seq_len}, {cfg.num_kv_pairs} pairs, vocab {cfg.vocab_size}, d={cfg.n_embd}, {cfg.n_layer} layers"
)
fig, ax = plt.subplots(figsize=(7, 4))
for name, (model, c) in runs.items():
    res = evaluate(model, xe, ye)
    frac = attended_fraction(c.seq_len, c.attention, c.window, c.attn_kwargs)
    label = f"{name}: {c.attention} w={c.window} {dict(c.attn_kwargs) or ''}"
    print(f"{label:70s} attended {frac:.2f}   accuracy {100 * res['acc']:.1f} %")
    bins = by_distance(res["correct"], res["dist"])
    ax.plot(
        [f"{b['lo']}-{min(b['hi'], cfg.seq_len)}" for b in bins],
        [100 * b["acc"] for b in bins],
        "o-",
        label=f"{name} ({100 * res['acc']:.0f} %)",
    )
ax.axvline(-0.5, color="gray", lw=0.5)
ax.set_xlabel("key-query distance (tokens)")
ax.set_ylabel("accuracy (%)")
ax.set_title(f"trained from scratch; window w = {runs['swa'][1].window}")
ax.legend()
plt.show()

# %% [markdown]
# ## 3. Plug-in: the full model, attention swapped at inference
#
# No retraining: the full-attention weights run with SWA, with a larger window of the same attended budget,
# and with SWA + MATCH (token retrieval, and block retrieval over mean-key block summaries).

# %%
w = runs["swa"][1].window
rows = plugin_eval(runs["full"][0], xe, ye, plugin_variants(w, top_ks=(1, 4), block_size=4))
for r in rows:
    if "error" in r:
        print(f"{r['variant']:48s} unavailable: {r['error']}")
    else:
        print(f"{r['variant']:48s} attended {r['attended']:.2f}   accuracy {100 * r['acc']:5.1f} %")

# %% [markdown]
# ## 4. What MATCH retrieves
#
# For one query in the MATCH model, the out-of-window keys with the largest logit in each layer and head,
# next to where the queried key and its value sit.

# %%
from fast.match import retrieve  # noqa: E402

model, c = runs["match"]
kw = dict(c.attn_kwargs)
b = 0
t = int(torch.nonzero((ye[b] != IGNORE) & (key_distance(xe[b : b + 1], ye[b : b + 1])[0] > c.window))[0])
src = int(t - key_distance(xe[b : b + 1], ye[b : b + 1])[0, t])
print(f"query at {t}: key {int(xe[b, t])} first seen at {src}, its value {int(xe[b, src + 1])} at {src + 1}")
for layer in range(c.n_layer):
    q, k = layer_qk(model, xe[b : b + 1], layer)
    idx = retrieve(q, k, window=c.window, top_k=kw["top_k"], block_size=kw.get("block_size", 1))
    print(f"  layer {layer}: retrieved positions per head {idx[0, :, t].tolist()}")

# %% [markdown]
# ## 5. The grid: 3 seeds per model
#
# `tiny_models/results/match/README.md` has the command, the sizes and the time it took.

# %%
grid = json.loads((RESULTS / "grid.json").read_text()) if (RESULTS / "grid.json").exists() else []
for r in grid:
    print(
        f"{r['model']:55s} P={r['pairs']:3d}  acc {100 * r['acc_mean']:5.1f} ± {100 * r['acc_std']:4.1f}"
        f"  attended {r['attended']:.2f}"
    )
if (RESULTS / "grid.png").exists():
    img = plt.imread(RESULTS / "grid.png")
    plt.figure(figsize=(9, 5))
    plt.imshow(img)
    plt.axis("off")
    plt.show()
