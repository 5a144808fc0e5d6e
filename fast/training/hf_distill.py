"""Distil one transformers causal LM into another from a JSONL file, with any method of the registry.

    python -m fast.training.hf_distill --teacher path/to/teacher --student path/to/student \\
        --train data/train.jsonl --valid data/valid.jsonl --method mgsr --out_dir runs/mgsr \\
        [--chat_template] [--dtype bf16] [--grad_accum 4] [--steps 1000] [--resume 1] [--device cuda]

Every other flag is a field of ``fast.training.distill.DistillConfig`` (``--list`` prints the methods).
Data: one JSON object per line, ``{"prompt": "...", "response": "..."}``. The prompt is tokenized with the
tokenizer's special tokens (or, with ``--chat_template``, as one user turn of the tokenizer's chat template
with the generation prompt); the response without special tokens, and EOS closes it. Teacher and student
must share the tokenizer (the same vocabulary), which is checked.

Outputs in ``out_dir``: the trainer's files (``model.safetensors`` and ``state.safetensors`` for resume,
``best.safetensors`` by validation ROUGE-L, ``log.jsonl``/``log.csv``), then ``student/`` (the final student
with ``save_pretrained``, and its tokenizer) and ``eval.json``: greedy ROUGE-L and exact match of the final
student on the validation file, computed by ``fast.training.evaluate`` as for the tiny models.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from fast.training import distill
from fast.training.checkpoint import save_weights
from fast.training.cli import add_config_flags
from fast.training.evaluate import generate_texts, score_texts
from fast.training.methods import describe, resolve

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def read_jsonl(path: str, tokenizer, *, block_size: int, chat_template: bool = False):
    """(pairs of (prompt ids, response ids), reference texts) of a JSONL file; bad lines raise ``ValueError``
    naming the file and the line."""
    pairs, refs = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{where}: expected an object with 'prompt' and 'response', got {type(obj).__name__}"
                )
            for key in ("prompt", "response"):
                if not isinstance(obj.get(key), str) or not obj[key].strip():
                    raise ValueError(f"{where}: field {key!r} is missing, not a string, or empty")
            if chat_template:
                prompt = tokenizer.apply_chat_template(
                    [{"role": "user", "content": obj["prompt"]}], add_generation_prompt=True, tokenize=True
                )
                if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
                    prompt = prompt["input_ids"]
            else:
                prompt = tokenizer(obj["prompt"], add_special_tokens=True)["input_ids"]
            response = tokenizer(obj["response"], add_special_tokens=False)["input_ids"]
            if len(prompt) >= block_size:
                raise ValueError(
                    f"{where}: the prompt has {len(prompt)} tokens and the context (block_size) "
                    f"{block_size}: no room for a response"
                )
            pairs.append((list(prompt), list(response)))
            refs.append(obj["response"])
    if not pairs:
        raise ValueError(f"{path}: no examples")
    return pairs, refs


def same_tokenizer(teacher_tok, student_tok) -> None:
    vt, vs = teacher_tok.get_vocab(), student_tok.get_vocab()
    if vt != vs:
        only_t, only_s = sorted(set(vt) - set(vs))[:3], sorted(set(vs) - set(vt))[:3]
        raise ValueError(
            f"teacher and student tokenizers differ (vocabularies of {len(vt)} and {len(vs)} tokens; only "
            f"the teacher's: {only_t}, only the student's: {only_s}): distillation compares their "
            "distributions token by token, so they must share one tokenizer"
        )


def _saver(model, path, meta):
    save_weights(model, path, {k: json.dumps(v) for k, v in meta.items()})


def run(
    cfg,
    *,
    teacher_dir: str,
    student_dir: str,
    train: str,
    valid: str,
    chat_template: bool = False,
    dtype: str = "fp32",
) -> dict:
    """Load both models and the data, distil, write the final student and its evaluation; returns the
    trainer's dict with ``eval`` (the final student's greedy scores on ``valid``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    cfg = resolve(cfg)
    tok = AutoTokenizer.from_pretrained(student_dir)
    same_tokenizer(AutoTokenizer.from_pretrained(teacher_dir), tok)
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer of {student_dir} has no EOS token: responses need one to end")
    train_pairs, _ = read_jsonl(train, tok, block_size=cfg.block_size, chat_template=chat_template)
    valid_pairs, refs = read_jsonl(valid, tok, block_size=cfg.block_size, chat_template=chat_template)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=DTYPES[dtype])
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=DTYPES[dtype])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    def decode(ids):
        return tok.decode(ids, skip_special_tokens=True)

    out = distill.train(
        cfg,
        teacher,
        student,
        train_pairs,
        valid_pairs,
        decode=decode,
        save_model=_saver,
        eos_id=tok.eos_token_id,
        pad_id=pad_id,
    )
    final = os.path.join(cfg.out_dir, "student")
    student.save_pretrained(final)
    tok.save_pretrained(final)
    student.eval()
    with torch.no_grad():
        texts = generate_texts(
            student,
            [p for p, _ in valid_pairs],
            decode,
            eos_id=tok.eos_token_id,
            pad_id=pad_id,
            max_new_tokens=cfg.max_new_tokens,
        )
    scores = score_texts(texts, refs)
    with open(os.path.join(cfg.out_dir, "eval.json"), "w") as f:
        json.dump({"valid": valid, "greedy": scores, "step": out["step"], "method": cfg.method}, f, indent=1)
    return {**out, "eval": scores}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--list", action="store_true", help="print the method registry and exit")
    p.add_argument("--teacher", help="the teacher's directory (save_pretrained)")
    p.add_argument("--student", help="the student's directory (its initial weights)")
    p.add_argument("--train", help='training JSONL: {"prompt": ..., "response": ...} per line')
    p.add_argument("--valid", help="held-out JSONL: validation (loss, ROUGE-L) and the final evaluation")
    p.add_argument(
        "--chat_template", action="store_true", help="prompts as one user turn of the chat template"
    )
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    add_config_flags(p, distill.DistillConfig)
    a = vars(p.parse_args(argv))
    if a.pop("list"):
        print(describe())
        return
    paths = {k: a.pop(k) for k in ("teacher", "student", "train", "valid", "chat_template", "dtype")}
    for k in ("teacher", "student", "train", "valid"):
        if not paths[k]:
            p.error(f"--{k} is required")
    out = run(
        distill.DistillConfig(**a),
        teacher_dir=paths["teacher"],
        student_dir=paths["student"],
        train=paths["train"],
        valid=paths["valid"],
        chat_template=paths["chat_template"],
        dtype=paths["dtype"],
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps(
                {
                    "method": a["method"],
                    "step": out["step"],
                    "eval": out["eval"],
                    "elapsed_s": round(out["elapsed_s"], 1),
                }
            )
        )


if __name__ == "__main__":
    main()
