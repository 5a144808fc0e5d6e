"""Teacher vs student on a few prompts, one per evaluation set, with ROUGE-L (part of `make demo`).

python scripts/demo_tiny.py
"""

import os

import torch

from reference.rouge import rouge_l
from tiny_models.evaluate import generate_responses
from tiny_models.model_io import load_model  # noqa: E402
from tiny_models.tasks import EVAL_SETS, build_dataset

CKPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tiny_models", "checkpoints")


def main(n_per_set: int = 2) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra OpenMP threads only add synchronisation
    try:
        _demo(n_per_set)
    finally:
        torch.set_num_threads(threads)


def _demo(n_per_set: int) -> None:
    models = {
        name: load_model(os.path.join(CKPT, f"{name}.safetensors"))[0] for name in ("teacher", "student")
    }
    ds = build_dataset(0)  # the data seed the checkpoints were trained and evaluated with
    picks = []
    for s in EVAL_SETS:  # evenly spaced picks; each set is grouped by family, so they hit different families
        picks += [(s, ds[s][(2 * j + 1) * len(ds[s]) // (2 * n_per_set)]) for j in range(n_per_set)]
    outs = {name: generate_responses(m, [ex for _, ex in picks]) for name, m in models.items()}
    print(
        f"tiny teacher ({models['teacher'].num_params():,} params) vs student "
        f"({models['student'].num_params():,} params), greedy decoding, ROUGE-L F1 x100\n"
    )
    for i, (s, ex) in enumerate(picks):
        print(f"[{s}] {ex.prompt}\n    reference: {ex.response}")
        for name in models:
            print(f"    {name:8s} {100 * rouge_l(outs[name][i], ex.response)[2]:5.1f}  {outs[name][i]}")
        print()


if __name__ == "__main__":
    main()
