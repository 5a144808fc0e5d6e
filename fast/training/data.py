"""Supervised examples from (prompt ids, response ids), and batch collation.

Convention: an example's inputs are ``prompt + response + [EOS]`` without its last token; ``labels[t]``
is the target of position ``t``, ``IGNORE`` (-100) on the prompt, so the loss covers the response and EOS.
"""

from __future__ import annotations

import torch

IGNORE = -100


def sft_example(prompt: list[int], response: list[int], eos_id: int | None) -> tuple[list[int], list[int]]:
    """(input ids, labels) of prompt + response (+ EOS unless ``eos_id`` is None: a response that did not
    end); ``labels[t]`` is the target of position ``t`` or ``IGNORE``."""
    full = list(prompt) + list(response) + ([] if eos_id is None else [eos_id])
    inputs, targets = full[:-1], full[1:]
    return inputs, [IGNORE if t < len(prompt) - 1 else targets[t] for t in range(len(targets))]


def collate(examples, *, pad_id: int, block_size: int | None = None):  # list of (inputs, labels) -> [B, T] x2
    """Right-pad a batch: inputs with ``pad_id``, labels with ``IGNORE``. Longer examples are cut to
    ``block_size``."""
    if block_size is not None:
        examples = [(i[:block_size], lab[:block_size]) for i, lab in examples]
    T = max(len(i) for i, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, (i, lab) in enumerate(examples):
        x[b, : len(i)] = torch.tensor(i)
        y[b, : len(lab)] = torch.tensor(lab)
    return x, y
