"""The distilled students (SFT continued for the same steps, KD, DistiLLM, MGSR) on held-out prompts, with
their ROUGE-L (part of `make demo`).

    python scripts/demo_distill.py

Reads the committed students of the grid (``tiny_models/results/mgsr/students/*.safetensors``); without them
it says so and returns.
"""

import os

import torch

from reference.rouge import rouge_l
from tiny_models.evaluate import generate_responses, score
from tiny_models.model_io import load_model  # noqa: E402
from tiny_models.tasks import EVAL_SETS, build_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDENTS = os.path.join(ROOT, "tiny_models", "results", "mgsr", "students")
CKPT = os.path.join(ROOT, "tiny_models", "checkpoints")
METHODS = ("sft", "kd", "distillm", "mgsr")  # sft: the SFT student trained on for the same steps


def main(n_per_set: int = 1, n_score: int = 60) -> None:
    found = {m: os.path.join(STUDENTS, f"{m}.safetensors") for m in METHODS}
    found = {m: p for m, p in found.items() if os.path.exists(p)}
    if not found:
        print(
            f"no distilled students in {os.path.relpath(STUDENTS, ROOT)} yet: run "
            "`python -m tiny_models.distill_grid` and commit its students (see docs/mgsr.md); skipping"
        )
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _demo(found, n_per_set, n_score)
    finally:
        torch.set_num_threads(threads)


def _demo(found, n_per_set, n_score) -> None:
    models = {"student (init)": load_model(os.path.join(CKPT, "student.safetensors"))[0]}
    models.update({m: load_model(p)[0] for m, p in found.items()})
    models["teacher"] = load_model(os.path.join(CKPT, "teacher.safetensors"))[0]
    ds = build_dataset(0)
    picks = []
    for s in EVAL_SETS:
        picks += [(s, ds[s][(2 * j + 1) * len(ds[s]) // (2 * n_per_set)]) for j in range(n_per_set)]
    outs = {name: generate_responses(m, [ex for _, ex in picks]) for name, m in models.items()}
    print("distilled students vs the initial student and the teacher, greedy decoding, ROUGE-L F1 x100\n")
    for i, (s, ex) in enumerate(picks):
        print(f"[{s}] {ex.prompt}\n    reference: {ex.response}")
        for name in models:
            print(f"    {name:15s} {100 * rouge_l(outs[name][i], ex.response)[2]:5.1f}  {outs[name][i]}")
        print()
    sets = {s: ds[s][:: max(1, len(ds[s]) // n_score)][:n_score] for s in EVAL_SETS}
    print(f"ROUGE-L (greedy) on {n_score} prompts per set (every k-th; the grid's tables use whole sets):\n")
    print("| model | " + " | ".join(sets) + " |\n|---|" + "---|" * len(sets))
    for name, m in models.items():
        row = [score(generate_responses(m, exs), exs)["rougeL"] for exs in sets.values()]
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row) + " |")


if __name__ == "__main__":
    main()
