"""Model-agnostic training: one loop, one checkpoint format, and the SFT and distillation trainers.

Any causal LM works through a small protocol (``fast.training.lm``): next-token logits for token ids with
a padding mask, and the same with a KV cache for generation. Data are lists of ``(prompt ids, response
ids)``. Nothing here knows the tiny GPT or its tasks (``tiny_models/`` binds them to these trainers).

Modules: ``lm`` (the protocol, left padding), ``sampling`` (sampling and batched generation), ``data``
(SFT examples, collation), ``checkpoint`` (safetensors files with a checksum, optimizer state), ``schedule``
(warmup + cosine), ``loop`` (the step loop: logs, evaluation, checkpoints, resume, DDP set-up), ``sft``,
``methods`` (the distillation registry: which sequences, which loss), ``distill`` (the ``Distiller``),
``evaluate`` (generation-based ROUGE-L).
"""
