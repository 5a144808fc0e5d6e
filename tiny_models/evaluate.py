"""Generation-based evaluation: ROUGE-L F1 and exact match on each evaluation set, mean +- std over seeds.

    python -m tiny_models.evaluate tiny_models/checkpoints/teacher.safetensors --sets valid test --seeds 0 1 2

Greedy decoding is deterministic, so its std over seeds is 0 and it is run once; sampled decoding
(temperature ``T``, optional top-k/top-p) is run once per seed with ``torch.Generator().manual_seed(seed)``.
Scores are means over examples (ROUGE-L F1 x 100, exact match x 100 after stripping whitespace).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from fast.training.evaluate import generate_texts, score_texts
from tiny_models.gpt import EOS, GPT, PAD
from tiny_models.model_io import load_model
from tiny_models.tasks import EVAL_SETS, Example, build_dataset, decode, prompt_ids


def generate_responses(
    model: GPT,
    examples: list[Example],
    *,
    temperature=0.0,
    top_k=None,
    top_p=None,
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 48,
) -> list[str]:
    return generate_texts(
        model,
        [prompt_ids(e.prompt) for e in examples],
        decode,
        eos_id=EOS,
        pad_id=PAD,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )


def score(candidates: list[str], examples: list[Example]) -> dict[str, float]:
    """Mean ROUGE-L F1 and exact match, both x 100."""
    return score_texts(candidates, [e.response for e in examples])


def evaluate(
    model: GPT,
    sets: dict[str, list[Example]],
    *,
    temperature=0.0,
    top_k=None,
    top_p=None,
    seeds=(0,),
    max_new_tokens: int = 48,
) -> dict[str, dict[str, float]]:
    """{set: {"rougeL", "rougeL_std", "exact_match", "exact_match_std", "n"}} over ``seeds``."""
    seeds = (seeds[0],) if temperature == 0 else tuple(seeds)
    res = {}
    for name, exs in sets.items():
        runs = [
            score(
                generate_responses(
                    model,
                    exs,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    seed=s,
                    max_new_tokens=max_new_tokens,
                ),
                exs,
            )
            for s in seeds
        ]
        row = {"n": runs[0]["n"]}
        for k in ("rougeL", "exact_match"):
            vals = [r[k] for r in runs]
            row[k] = statistics.fmean(vals)
            row[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        res[name] = row
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="ROUGE-L / exact match of a checkpoint on the evaluation sets")
    p.add_argument("checkpoint")
    p.add_argument("--sets", nargs="+", default=["valid", *EVAL_SETS])
    p.add_argument("--data_seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models)"
    )
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, _ = load_model(a.checkpoint)
    ds = build_dataset(a.data_seed)
    res = evaluate(
        model,
        {s: ds[s] for s in a.sets},
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        seeds=a.seeds,
    )
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
