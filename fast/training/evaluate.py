"""Generation-based evaluation: ROUGE-L F1 and exact match of decoded responses (both x 100).

The same code scores the tiny models and any causal LM: prompts are token ids, ``decode`` turns generated
ids into text, and references are texts. Greedy decoding is deterministic; sampled decoding draws from one
``torch.Generator().manual_seed(seed)`` over the whole set, batch after batch.
"""

from __future__ import annotations

import torch

from fast.training.sampling import generate
from reference.rouge import rouge_l


def generate_texts(
    model,
    prompts: list[list[int]],
    decode,
    *,
    eos_id: int,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k=None,
    top_p=None,
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 48,
) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = generate(
            model,
            prompts[i : i + batch_size],
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=g,
            pad_id=pad_id,
        )
        out += [decode(t) for t in ids]
    return out


def score_texts(candidates: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-L F1 and exact match (after stripping whitespace), both x 100."""
    f1 = [rouge_l(c, r)[2] for c, r in zip(candidates, references, strict=True)]
    em = [float(c.strip() == r.strip()) for c, r in zip(candidates, references, strict=True)]
    return {"rougeL": 100 * sum(f1) / len(f1), "exact_match": 100 * sum(em) / len(em), "n": len(f1)}
