# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Distilling the tiny teacher: KD vs MGSR
#
# MGSR: *Multi-Granularity Semantic Revision for LLM distillation* (arXiv 2407.10068); the baselines include
# DistiLLM (arXiv 2402.03898) and MiniLLM (arXiv 2306.08543).
#
# `python -m tiny_models.distill` (the trainer `fast/training/distill.py`, the registry
# `fast/training/methods.py`) trains the tiny student (`tiny_models/checkpoints/student.safetensors`, 0.25M parameters)
# towards the tiny teacher (1.8M) with one of a registry of methods. Each method is a *recipe*: which
# sequences a step trains on, and with which loss. This notebook:
#
# 1. prints the registry;
# 2. shows one SCRG revision (MGSR's sequence-level step) on a student sample;
# 3. runs KD and MGSR for a few dozen steps on CPU from the same student and plots validation ROUGE-L and
#    MGSR's three loss terms;
# 4. if the grid's distilled students are committed (`tiny_models/results/mgsr/students/`), compares them.
#
# A few dozen steps on one CPU thread is a smoke run, not a result: the grid's tables
# (`tiny_models/results/mgsr/results.md`) are the comparison.

# %%
import os
import tempfile
import time

import matplotlib
import torch

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402

import tiny_models.distill as distill  # noqa: E402
from tiny_models.evaluate import evaluate  # noqa: E402
from tiny_models.model_io import load_model  # noqa: E402
from tiny_models.tasks import build_dataset, decode, prompt_ids  # noqa: E402

torch.set_num_threads(1)
T0 = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(distill.__file__)))
print(distill.describe())

# %% [markdown]
# ## One SCRG revision
#
# The student samples a response; SCRG finds, among the positions where the teacher's token differs from the
# student's, the one where the teacher's next-token distribution diverges most from the student's (forward KL),
# puts the teacher's token there, and lets the student continue.

# %%
from fast.scrg import scrg  # noqa: E402
from fast.training.methods import generate_responses  # noqa: E402
from tiny_models.gpt import EOS  # noqa: E402

teacher, _ = load_model(os.path.join(ROOT, "tiny_models/checkpoints/teacher.safetensors"))
student, _ = load_model(os.path.join(ROOT, "tiny_models/checkpoints/student.safetensors"))
ds = build_dataset(0, n_per_family=200)
ex = ds["valid"][5]
g = torch.Generator().manual_seed(3)
(sample,), (ended,) = generate_responses(
    student, [prompt_ids(ex.prompt)], max_new_tokens=32, temperature=1.0, generator=g, eos_id=EOS
)
(revised,), (pos,) = scrg(
    [prompt_ids(ex.prompt)],
    [sample + ([EOS] if ended else [])],
    teacher,
    student,
    max_new_tokens=32,
    eos_id=EOS,
    generator=g,
)
print("prompt   :", ex.prompt)
print("reference:", ex.response)
print("student  :", decode(sample))
print("revised  :", decode(revised), "  (corrected at response position", pos, ")")

# %% [markdown]
# ## KD vs MGSR, a short run
#
# Same student, same batches (seed 1), 30 steps of 8 examples, validation ROUGE-L (greedy, 32 validation
# prompts) every 10 steps. MGSR's adaptive sampler starts at threshold 0.5 here, so about half of the early
# steps train on SCRG-revised student samples.

# %%
runs = {}
with tempfile.TemporaryDirectory() as tmp:
    for method in ("kd", "mgsr"):
        cfg = distill.DistillConfig(
            method=method,
            out_dir=os.path.join(tmp, method),
            steps=30,
            batch_size=8,
            max_new_tokens=24,
            eval_every=10,
            eval_examples=32,
            n_per_family=200,
            init_threshold=0.5,
            progress=False,
            threads=1,
        )
        t = time.perf_counter()
        out = distill.train(cfg)
        runs[method] = out["records"]
        print(
            f"{method}: {time.perf_counter() - t:.1f}s, sources {sorted({r['source'] for r in out['records']})}"
        )

fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
for method, recs in runs.items():
    ev = [r for r in recs if "val_rougeL" in r]
    ax[0].plot([r["step"] for r in ev], [r["val_rougeL"] for r in ev], "o-", label=method)
ax[0].set_xlabel("step")
ax[0].set_ylabel("validation ROUGE-L (greedy)")
ax[0].legend()
for part in ("sft", "token", "span"):
    ax[1].plot(
        [r["step"] for r in runs["mgsr"]], [r.get(part, float("nan")) for r in runs["mgsr"]], label=part
    )
ax[1].set_xlabel("step")
ax[1].set_title("MGSR loss terms")
ax[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The DAC-KL diagnostics of the same run: the bounds sub-network's mean upper/lower quantile levels and the
# teacher mass kept by the band (see `docs/mgsr.md` for why the kept mass is near 0 on these peaked
# byte-level distributions with value-quantile bounds).

# %%
for r in runs["mgsr"][::10]:
    print(
        {
            k: round(r[k], 3) if isinstance(r[k], float) else r[k]
            for k in ("step", "source", "upper", "lower", "kept")
            if k in r
        }
    )

# %% [markdown]
# ## The grid's distilled students (when committed)

# %%
STUDENTS = os.path.join(ROOT, "tiny_models/results/mgsr/students")
found = {m: os.path.join(STUDENTS, f"{m}.safetensors") for m in ("sft", "kd", "distillm", "mgsr")}
found = {m: p for m, p in found.items() if os.path.exists(p)}
if not found:
    print("no distilled students committed yet: run `python -m tiny_models.distill_grid` (see docs/mgsr.md)")
else:
    test = {"test": ds["test"][::4]}
    models = {
        "student (init)": student,
        **{m: load_model(p)[0] for m, p in found.items()},
        "teacher": teacher,
    }
    scores = {m: evaluate(mod, test)["test"]["rougeL"] for m, mod in models.items()}
    plt.figure(figsize=(6, 3))
    plt.bar(list(scores), list(scores.values()), color="tab:blue")
    plt.ylabel(f"test ROUGE-L, greedy ({len(test['test'])} prompts)")
    plt.show()
    print(scores)
print(f"notebook ran in {time.perf_counter() - T0:.1f}s")
