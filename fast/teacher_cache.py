"""An offline teacher: its sparse log-probabilities written once for fixed sequences, read by the trainer
instead of running the teacher.

    python -m fast.teacher_cache --teacher path/to/teacher --data train.jsonl --kind topk --k 8 \\
        --out cache/train [--chat_template] [--block_size 512] [--device cuda]

For batches whose sequences never change (the ground truth; SeqKD's teacher-generated dataset) the teacher
runs once. Per labelled position (a response token) the cache stores ``k`` entries:

* ``kind="topk"``: the ids and log-probabilities of the teacher's ``k`` most likely tokens, and the log of
  the remaining mass. The loss is the forward KL over ``k + 1`` buckets (the ``k`` tokens and "the rest"),
  ``sum_i p_i log(p_i / q_i) + p_rest log(p_rest / q_rest)`` -- exact when the tail is empty, biased
  otherwise (it cannot see how the tail's mass is spread).
* ``kind="sampled"``: random-sampling KD (Anshumann et al., "Sparse Logit Sampling", ACL 2025, arXiv
  2503.16870): ``k`` tokens drawn with replacement from a proposal ``r ∝ p^(1/τ)`` (``τ = 1``: the teacher
  itself), merged into distinct ids with weights ``w = (count / k) · p / r``. The loss ``-sum_j w_j log q_j``
  is an unbiased estimate of the cross-entropy ``-sum_v p_v log q_v`` and of its gradient, which is the
  forward KL's gradient (the two differ by the teacher's entropy, a constant in q).

Only the forward KL can be computed from a sparse teacher. Reverse KL, JSD, TV, the skew KLs, DAC-KL (its
band is a quantile of the whole distribution) and the span term (probability correlations over the whole
vocabulary) need every probability: the trainer refuses a cache for them with a ``ValueError``.

Files: ``{out}-00000.safetensors``, ... (``shard_rows`` positions each): ``ids [n, k] int32`` (-1: unused),
``vals [n, k] fp32`` (log-probabilities, or weights), ``rest [n] fp32`` (top-k: log remaining mass),
``seq_rows [m, 2] int64`` (each sequence's first row and row count) and ``seq_keys [m, 16] uint8`` (a
digest of the sequence's inputs and labels, the lookup key); metadata ``kind``, ``k``, ``vocab``.
Storage: ``8 k + 4`` bytes per labelled token (top-k), ``8 k`` (sampled).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os

import numpy as np
import torch

KINDS = ("topk", "sampled")


def seq_key(inputs, labels) -> bytes:
    """A 16-byte digest of one sequence (its input ids and labels): the cache's lookup key."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(inputs, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.digest()


def topk_entries(t_logits, k: int):  # [N, V] -> ids [N, k] int32, log-probs [N, k] fp32, log rest [N] fp32
    lp = t_logits.float().log_softmax(-1)
    vals, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    if vals.shape[-1] == lp.shape[-1]:  # every token kept: no tail (not a rounding residue)
        return ids.int(), vals, torch.full(vals.shape[:-1], -math.inf, device=vals.device)
    kept = torch.logsumexp(vals, -1)
    rest = torch.log(-torch.expm1(kept.clamp_max(0.0)))  # log(1 - the top-k's mass); -inf: nothing left
    return ids.int(), vals, rest


def sampled_entries(t_logits, k: int, generator: torch.Generator, proposal_temperature: float = 1.0):
    """ids [N, k] int32 (-1 pads merged duplicates), weights [N, k] fp32: ``k`` draws from ``r ∝
    p^(1/τ)``, merged, with importance weights ``(count / k) p / r``."""
    lp = t_logits.double().log_softmax(-1)
    lr = (lp / proposal_temperature).log_softmax(-1)
    draws = torch.multinomial(lr.exp().cpu(), k, replacement=True, generator=generator).to(
        lp.device
    )  # [N, k]
    ids = torch.full(draws.shape, -1, dtype=torch.int64, device=lp.device)
    w = torch.zeros(draws.shape, dtype=torch.float64, device=lp.device)
    srt = draws.sort(-1).values
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    for n in range(srt.shape[0]):  # merge duplicates row by row (k is small)
        uniq, counts = srt[n][first[n]], torch.bincount(srt[n]).index_select(0, srt[n][first[n]])
        ratio = (lp[n, uniq] - lr[n, uniq]).exp()
        ids[n, : len(uniq)] = uniq
        w[n, : len(uniq)] = counts.double() / k * ratio
    return ids.int(), w.float()


def sparse_kd_loss(s_logits, ids, vals, rest, kind: str):  # [N, V], [N, k], [N, k], [N] -> [N]
    """Per-row distillation loss from a sparse teacher, differentiable in the student logits: the top-k
    bucketed forward KL (``kind="topk"``), or the sampled cross-entropy estimate ``-sum_j w_j log q_j``
    (``kind="sampled"``: the forward KL plus the teacher's entropy, a constant in q, so the same gradient
    in expectation)."""
    lq = s_logits.float().log_softmax(-1)
    ok = ids >= 0
    lq_k = lq.gather(-1, ids.long().clamp_min(0))  # [N, k]
    zero = torch.zeros_like(lq_k)
    if kind == "topk":
        p = torch.where(ok, vals.exp(), zero)
        kl = torch.where(ok, p * (vals - lq_k), zero).sum(-1)
        q_kept = torch.logsumexp(torch.where(ok, lq_k, torch.full_like(lq_k, -math.inf)), -1)
        lq_rest = torch.log(-torch.expm1(q_kept.clamp_max(-1e-7)))  # log(1 - q of the top-k), kept finite
        p_rest = rest.exp()
        tail = torch.where(p_rest > 0, p_rest * (rest - lq_rest), torch.zeros_like(p_rest))
        return kl + tail
    if kind == "sampled":
        return -torch.where(ok, vals * lq_k, zero).sum(-1)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------------------------------
# writing and reading


@torch.no_grad()
def write_cache(
    out: str,
    teacher,
    sequences,
    *,
    kind: str,
    k: int,
    pad_id: int = 0,
    block_size=None,
    batch_size: int = 16,
    shard_rows: int = 1 << 20,
    seed: int = 0,
    proposal_temperature: float = 1.0,
) -> dict:
    """Run ``teacher`` (a causal LM, ``fast.training.lm``) over ``sequences`` (``(inputs, labels)`` pairs,
    labels -100 where untrained) and write the cache shards; returns a summary (rows, bytes per token)."""
    from safetensors.torch import save_file

    from fast.training.data import IGNORE, collate
    from fast.training.lm import device_of, logits_of

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for old in glob.glob(f"{out}-*.safetensors"):
        os.remove(old)
    g = torch.Generator().manual_seed(seed)
    dev = device_of(teacher)
    teacher.eval()
    buf = {"ids": [], "vals": [], "rest": [], "seq_rows": [], "seq_keys": []}
    rows, shard, total_rows, vocab = 0, 0, 0, None

    def flush():
        nonlocal buf, rows, shard
        if not buf["seq_rows"]:
            return
        tensors = {
            "ids": torch.cat(buf["ids"]),
            "vals": torch.cat(buf["vals"]),
            "rest": torch.cat(buf["rest"]),
            "seq_rows": torch.tensor(buf["seq_rows"], dtype=torch.int64).reshape(-1, 2),
            "seq_keys": torch.tensor(
                np.frombuffer(b"".join(buf["seq_keys"]), dtype=np.uint8).reshape(-1, 16)
            ),
        }
        meta = {"kind": kind, "k": str(k), "vocab": str(vocab)}
        save_file(
            {n: t.contiguous().cpu() for n, t in tensors.items()}, f"{out}-{shard:05d}.safetensors", meta
        )
        buf = {n: [] for n in buf}
        rows, shard = 0, shard + 1

    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        x, y = collate(chunk, pad_id=pad_id, block_size=block_size)
        logits = logits_of(teacher, x.to(dev)).float()
        vocab = logits.shape[-1]
        for b, (inputs, labels) in enumerate(chunk):
            m = y[b] != IGNORE
            lt = logits[b][m.to(dev)]
            if kind == "topk":
                ids, vals, rest = topk_entries(lt, k)
            else:
                ids, vals = sampled_entries(lt, k, g, proposal_temperature)
                rest = torch.full((len(ids),), -math.inf)
            if ids.shape[1] < k:  # a vocabulary smaller than k
                pad = k - ids.shape[1]
                ids = torch.nn.functional.pad(ids, (0, pad), value=-1)
                vals = torch.nn.functional.pad(vals, (0, pad))
            buf["seq_rows"].append((rows, len(ids)))
            buf["seq_keys"].append(seq_key(inputs, labels))
            for n, t in (("ids", ids), ("vals", vals), ("rest", rest)):
                buf[n].append(t.cpu())
            rows += len(ids)
            total_rows += len(ids)
        if rows >= shard_rows:
            flush()
    flush()
    per_token = 8 * k + (4 if kind == "topk" else 0)
    return {
        "kind": kind,
        "k": k,
        "sequences": len(sequences),
        "rows": total_rows,
        "shards": shard,
        "bytes_per_token": per_token,
        "bytes": per_token * total_rows,
        "vocab": vocab,
    }


class TeacherCache:
    """The shards of one cache in memory; ``rows(inputs, labels)``: that sequence's ``(ids, vals, rest)``."""

    def __init__(self, prefix: str):
        from safetensors import safe_open

        paths = sorted(glob.glob(f"{prefix}-*.safetensors"))
        if not paths:
            raise ValueError(f"no teacher cache at {prefix}-*.safetensors")
        self.index, parts = {}, {"ids": [], "vals": [], "rest": []}
        base = 0
        for path in paths:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata()
                t = {n: f.get_tensor(n) for n in f.keys()}
            self.kind, self.k, self.vocab = meta["kind"], int(meta["k"]), int(meta["vocab"])
            for key, (start, n) in zip(t["seq_keys"].numpy(), t["seq_rows"].tolist(), strict=True):
                self.index[key.tobytes()] = (base + start, n)
            for n in parts:
                parts[n].append(t[n])
            base += len(t["ids"])
        self.ids, self.vals, self.rest = (torch.cat(parts[n]) for n in ("ids", "vals", "rest"))

    def rows(self, inputs, labels):
        key = seq_key(inputs, labels)
        if key not in self.index:
            raise ValueError(
                "a sequence of the batch is not in the teacher cache (the cache was written for "
                "other data, or this method trains on sequences that change)"
            )
        start, n = self.index[key]
        return self.ids[start : start + n], self.vals[start : start + n], self.rest[start : start + n]


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fast.training.data import sft_example
    from fast.training.hf_distill import read_jsonl

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--data", required=True, help="JSONL of {prompt, response}: the fixed sequences")
    p.add_argument("--out", required=True, help="path prefix of the shards")
    p.add_argument("--kind", default="topk", choices=KINDS)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--block_size", type=int, default=512)
    p.add_argument("--chat_template", action="store_true")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--proposal_temperature", type=float, default=1.0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(a.teacher)
    pairs, _ = read_jsonl(a.data, tok, block_size=a.block_size, chat_template=a.chat_template)
    seqs = [sft_example(pr, r, tok.eos_token_id) for pr, r in pairs]
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher).to(a.device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    summary = write_cache(
        a.out,
        teacher,
        seqs,
        kind=a.kind,
        k=a.k,
        pad_id=pad,
        block_size=a.block_size,
        batch_size=a.batch_size,
        seed=a.seed,
        proposal_temperature=a.proposal_temperature,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
