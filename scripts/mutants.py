"""`make mutants`: would the tests catch a wrong kernel? Plant plausible bugs one at a time and see.

Each entry of ``MUTANTS`` is one small, plausible bug: a wrong loop bound, a wrong gradient factor, a
missing mask, a swapped convention. It names the file, an *anchor* (exact text that must occur exactly
once in that file), its replacement, and the tests that cover it. For each mutant this script

1. copies the working tree to a scratch folder (one per worker, reused),
2. replaces the anchor, runs only the covering tests (``pytest -x``, notebooks excluded),
3. restores the file and reports **killed** (the tests failed), **survived** (they passed) or **stale**
   (the anchor no longer occurs exactly once: the code moved, so the entry needs updating).

A survivor is re-run against the whole suite (``--no-full`` skips that) before it counts as survived.
A mutant listed with ``equivalent=...`` is not a bug (it changes no result the project promises); it
is run and reported but left out of the score, and the reason is printed beside it.

The score is killed / (killed + survived) over the non-equivalent mutants; the target is >= 90 %.
Writes a markdown report (``--out``, default ``benchmarks/results/mutants.md``). Runs with two
workers on a 2-core CPU in about a quarter of an hour; ``--only ID[,ID]`` runs a subset.

    python scripts/mutants.py [--only ids] [--workers 2] [--no-full] [--out PATH] [--list]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 420  # a mutant that hangs its tests (e.g. a loop that never ends) counts as killed


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]  # pytest arguments: files / node ids, optionally "-k", "expr"
    what: str
    equivalent: str = ""  # why this change is not a bug (then it does not count)


def M(id, file, find, replace, tests, what, equivalent=""):  # noqa: N802 (a table constructor)
    return Mutant(id, file, find, replace, tuple(tests.split()), what, equivalent)


T_DIV = "tests/test_divergences_fast.py"
T_DIV_TRITON = f"{T_DIV} -k triton"
T_DIV_TORCH = f"{T_DIV} -k torch"
T_GRID = "tests/test_grid_tables.py"
T_GEN = "tests/test_generators.py"

MUTANTS: list[Mutant] = [
    # ---- the tolerance helper: the root of trust -------------------------------------------------------
    M(
        "tol-nan-expected",
        "fast/testing.py",
        "    if nan_e.any():",
        "    if False and nan_e.any():",
        "tests/test_tolerances.py",
        "a NaN in the oracle's value is not reported",
    ),
    M(
        "tol-zero-ref",
        "fast/testing.py",
        "zero_ref = not np.any(np.where(fin, e, 0.0))",
        "zero_ref = not np.all(np.where(fin, e, 0.0))",
        "tests/test_tolerances.py",
        "one exact zero in the reference switches the RMS metric off",
    ),
    M(
        "tol-inf-sign",
        "fast/testing.py",
        "inf_a & inf_e & (np.sign(a) == np.sign(e))",
        "inf_a & inf_e",
        "tests/test_tolerances.py",
        "+inf accepted against -inf",
    ),
    M(
        "tol-rms-10x",
        "fast/testing.py",
        "if r > rms and not zero_ref:",
        "if r > 10 * rms and not zero_ref:",
        "tests/test_tolerances.py",
        "the RMS budget is silently 10x wider",
    ),
    # ---- divergences: Triton kernels ---------------------------------------------------------------------
    M(
        "div-fwd-kl-weight",
        "fast/divergences.py",
        "            if DIV == 0:  # forward KL\n                acc += p * (lp - lq)",
        "            if DIV == 0:  # forward KL\n                acc += q * (lp - lq)",
        T_DIV_TRITON,
        "forward KL weighted by the student instead of the teacher (kernel)",
    ),
    M(
        "div-rkl-grad-no-L",
        "fast/divergences.py",
        "                g = q * (lq - lp - c0_2)\n            elif DIV == 2:",
        "                g = q * (lq - lp)\n            elif DIV == 2:",
        T_DIV_TRITON,
        "reverse-KL gradient without its -L term (kernel backward)",
    ),
    M(
        "div-lse-tau",
        "fast/divergences.py",
        "z_a = z_a * tl.exp2((m_a - safe_a) * c) + tl.exp2((t - safe_a) * c)",
        "z_a = z_a * tl.exp2((m_a - safe_a) * c) + tl.exp2((t - safe_a) * LOG2E)",
        T_DIV_TRITON,
        "the teacher's normaliser ignores the temperature (kernel pass 1)",
    ),
    M(
        "div-jsd-mix",
        "fast/divergences.py",
        '            valid = inb & (t != float("-inf"))\n            lp =',
        "            valid = inb\n            lp =",
        T_DIV_TRITON,
        "padded vocabulary entries count as valid (kernel backward)",
    ),
    # ---- DAC-KL: Triton kernels ------------------------------------------------------------------------
    M(
        "dac-argmax-tie",
        "fast/dac_kl.py",
        "cidx = tl.where(cmax > best, cfirst, cidx)",
        "cidx = tl.where(cmax >= best, cfirst, cidx)",
        "tests/test_dac_kl.py -k triton",
        "target class: a later chunk wins a tie (convention: lowest index)",
    ),
    M(
        "dac-bwd-normalize",
        "fast/dac_kl.py",
        "dsv = w * (qb - pa)",
        "dsv = w * (qb - p * inv_b)",
        "tests/test_dac_kl.py -k triton",
        "normalised DAC-KL gradient divides the teacher by the student mass",
    ),
    M(
        "dac-bisect-steps",
        "fast/dac_kl.py",
        "for sh in tl.static_range(16, -1, -8):",
        "for sh in tl.static_range(16, 15, -8):",
        "tests/test_dac_kl.py -k triton",
        "value-threshold select stops 16 bits early",
    ),
    # ---- span: Triton kernels --------------------------------------------------------------------------
    M(
        "span-fwd-product",
        "fast/span.py",
        "e = qq - pa * pb",
        "e = qq - pa * pa",
        "tests/test_span.py",
        "span distance multiplies the wrong teacher rows",
    ),
    M(
        "span-bwd-softmax",
        "fast/span.py",
        "ds = tl.where(act, qc * (gq - dot), 0.0)",
        "ds = tl.where(act, qc * gq, 0.0)",
        "tests/test_span.py",
        "span backward forgets the softmax Jacobian's row term",
    ),
    # ---- oracles (checked against finite differences and definitions) -----------------------------------
    M(
        "ref-fkl-grad-tau",
        "reference/divergences.py",
        "return (np.exp(lq) - np.exp(lp)) / temperature",
        "return (np.exp(lq) - np.exp(lp))",
        "tests/test_divergences.py",
        "oracle forward-KL gradient forgets 1/τ",
    ),
    M(
        "ref-jsd-grad-weight",
        "reference/divergences.py",
        "g = (1 - beta) * np.where(valid, lq - np.where(valid, lm, 0.0), 0.0)",
        "g = beta * np.where(valid, lq - np.where(valid, lm, 0.0), 0.0)",
        "tests/test_divergences.py",
        "oracle JSD gradient uses β for the student's weight",
    ),
    M(
        "ref-dac-quantile",
        "reference/dac_kl.py",
        "idx = q * (n - 1)",
        "idx = q * n",
        "tests/test_dac_kl.py",
        "value quantile indexes n instead of n - 1 order statistics",
    ),
    M(
        "ref-dac-target",
        "reference/dac_kl.py",
        "c = np.argmax(t, axis=-1)",
        "c = np.argmax(s, axis=-1)",
        "tests/test_dac_kl.py",
        "the appended target class is the student's argmax",
    ),
    M(
        "ref-span-vjp",
        "reference/span.py",
        "return q * (gq - np.sum(gq * q, -1, keepdims=True))",
        "return q * gq",
        "tests/test_span.py",
        "oracle span gradient forgets the softmax row term",
    ),
    M(
        "ref-attn-window",
        "reference/attention.py",
        "        ok &= (i - j) < window\n",
        "        ok &= (i - j) <= window\n",
        "tests/test_attention.py -k torch",
        "oracle window counts w + 1 keys (the FlexAttention convention, not ours)",
    ),
    # ---- divergences: the torch backend -------------------------------------------------------------------
    M(
        "div-torch-rkl-grad",
        "fast/divergences.py",
        "torch.mul(r.sub_(loss[:, None]), q, out=y)",
        "torch.mul(r, q, out=y)",
        T_DIV_TORCH,
        "reverse-KL gradient without its -L term (torch backend)",
    ),
    # ---- attention: the Triton forward and the host-side loop bounds ---------------------------------------
    M(
        "attn-fwd-log2e",
        "fast/attention.py",
        "qk_scale = scale * LOG2E  # log2(e)",
        "qk_scale = scale * LOG2E * 1.0001  # log2(e)",
        "tests/test_attention.py -k triton",
        "forward softmax exponent off by 1e-4 relative (a mistyped log2(e))",
    ),
    M(
        "attn-bwd-lse-units",
        "fast/attention.py",
        "p = tl.math.exp2(tl.fma(s, qk_scale, -lse[:, None]))",
        "p = tl.math.exp2(tl.fma(s, qk_scale, -lse[:, None] * 0.6931471805599453))",
        "tests/test_attention.py -k triton",
        "dq reads the forward's log2-domain lse as a natural log",
    ),
    M(
        "attn-key-range",
        "fast/attention.py",
        "lo = 0 if window is None else max(0, start_m - W + 1)",
        "lo = 0 if window is None else max(0, start_m - W + 2)",
        "tests/test_attention.py -k torch",
        "the first key of the window is skipped",
    ),
    # ---- the tiny GPT ----------------------------------------------------------------------------------
    M(
        "gpt-window",
        "fast/attention.py",
        "allowed = allowed & (kj > qi - window)",
        "allowed = allowed & (kj >= qi - window)",
        "tests/test_gpt.py",
        "model window counts w + 1 keys",
    ),
    M(
        "gpt-rope-sign",
        "tiny_models/gpt.py",
        "x1 * cos - x2 * sin, x1 * sin + x2 * cos",
        "x1 * cos + x2 * sin, x1 * sin + x2 * cos",
        "tests/test_gpt.py",
        "RoPE rotates by the wrong sign",
    ),
    M(
        "gpt-pad-self",
        "fast/attention.py",
        "allowed = allowed | (kj == qi)[None, None]",
        "allowed = allowed",
        "tests/test_gpt.py",
        "a padded query row is fully masked (NaN)",
    ),
    M(
        "gpt-key-valid",
        "fast/attention.py",
        "allowed = allowed & key_valid[:, None, None, :].bool()",
        "allowed = allowed",
        "tests/test_gpt.py",
        "padding keys are attended",
    ),
    M(
        "gpt-ignore-index",
        "tiny_models/gpt.py",
        "targets.reshape(-1), ignore_index=-100)",
        "targets.reshape(-1).clamp_min(0))",
        "tests/test_gpt.py",
        "masked labels (-100) count in the loss",
    ),
    # ---- sampling and generation -------------------------------------------------------------------------
    M(
        "sample-temperature",
        "fast/training/sampling.py",
        "logits.double() / temperature",
        "logits.double()",
        "tests/test_gpt.py",
        "sampling ignores the temperature",
    ),
    M(
        "sample-top-p",
        "fast/training/sampling.py",
        "drop_sorted = mass_before >= top_p",
        "drop_sorted = mass_before > top_p",
        "tests/test_gpt.py",
        "top-p keeps one token too many",
    ),
    M(
        "sample-top-k",
        "fast/training/sampling.py",
        'logits.masked_fill(logits < kth, float("-inf"))',
        'logits.masked_fill(logits <= kth, float("-inf"))',
        "tests/test_gpt.py",
        "top-k drops the k-th token",
    ),
    M(
        "sample-greedy-tie",
        "fast/training/sampling.py",
        "        return logits.argmax(-1)\n",
        "        return logits.size(-1) - 1 - logits.flip(-1).argmax(-1)\n",
        "tests/test_gpt.py",
        "greedy picks the highest id on ties (convention: lowest)",
    ),
    M(
        "gen-positions",
        "tiny_models/gpt.py",
        "clamp_min(0)[:, -idx.shape[1] :]",
        "clamp_min(0)[:, : idx.shape[1]]",
        "tests/test_gpt.py",
        "cached decoding gives new tokens the first RoPE positions instead of the next",
    ),
    # ---- the trainer -------------------------------------------------------------------------------------
    M(
        "train-wd-groups",
        "fast/training/loop.py",
        '{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}',
        '{"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": weight_decay}',
        "tests/test_train.py",
        "weight decay on LayerNorm and biases instead of the matrices",
    ),
    M(
        "train-warmup",
        "fast/training/schedule.py",
        "return lr * step / max(warmup, 1)",
        "return lr * (step + 1) / max(warmup, 1)",
        "tests/test_train.py",
        "warmup is one step ahead",
    ),
    M(
        "train-cosine",
        "fast/training/schedule.py",
        "(1.0 + math.cos(math.pi * min(frac, 1.0)))",
        "(1.0 + math.cos(math.pi * frac))",
        "tests/test_train.py",
        "cosine schedule climbs back up after the last step",
    ),
    M(
        "train-ddp-slice",
        "fast/training/loop.py",
        "lo = (m * world + rank) * batch_size",
        "lo = (m + rank) * batch_size",
        "tests/test_train.py",
        "ranks and micro-batches overlap: some examples twice per step, some never",
    ),
    # ---- MATCH: oracle, torch backend, Triton kernels --------------------------------------------------
    M(
        "ref-match-candidates",
        "reference/match.py",
        "    return j <= i - window\n",
        "    return j < i - window\n",
        "tests/test_match.py",
        "oracle: the first out-of-window key is never a candidate",
    ),
    M(
        "ref-match-block-cand",
        "reference/match.py",
        "return np.where(first <= i - window, s, -np.inf)",
        "return np.where(first + block_size - 1 <= i - window, s, -np.inf)",
        "tests/test_match.py",
        "oracle: a block counts only when all its keys left the window",
    ),
    M(
        "match-torch-window",
        "fast/match.py",
        "(j[None, :] > pos[:, None] - window)",
        "(j[None, :] >= pos[:, None] - window)",
        "tests/test_match.py",
        "torch backend: the window holds w + 1 keys",
    ),
    M(
        "match-torch-retrieved",
        "fast/match.py",
        "(tok <= pos[:, None] - window) & (tok < Tk)",
        "(tok <= pos[:, None] - window + 1) & (tok < Tk)",
        "tests/test_match.py",
        "torch backend: a retrieved block also brings the window's first key (counted twice)",
    ),
    M(
        "match-triton-candidates",
        "fast/match_triton.py",
        "(offs_n[None, :] * BS <= pos[:, None] - W)",
        "(offs_n[None, :] * BS < pos[:, None] - W)",
        "tests/test_match_triton.py",
        "selection kernel: the newest candidate is never selectable",
    ),
    M(
        "match-triton-band-overflow",
        "fast/match_triton.py",
        "exact = tl.max(cnt, axis=0) > KG",
        "exact = tl.max(cnt, axis=0) > KG + 1",
        "tests/test_match_triton.py",
        "tensor-core selection band: a row one candidate over its slots is not sent to the exact pass",
    ),
    M(
        "match-triton-tie",
        "fast/match_triton.py",
        "ins = best > worst  # strict",
        "ins = best >= worst  # strict",
        "tests/test_match_triton.py",
        "selection kernel: a later index displaces an equal score (convention: lower index wins)",
    ),
    M(
        "match-triton-retrieved",
        "fast/match_triton.py",
        "ok = (blk >= 0) & (kpos <= pos[:, None] - W)",
        "ok = (blk >= 0) & (kpos <= pos[:, None])",
        "tests/test_match_triton.py",
        "fused forward: a selected block's keys inside the window are attended twice",
    ),
    M(
        "match-triton-gate",
        "fast/match_triton.py",
        "gate = 1.0 / (1.0 + tl.exp(-glog))",
        "gate = 1.0 / (1.0 + tl.exp(glog))",
        "tests/test_match_triton.py",
        "gated mode uses sigmoid(-gate_logit)",
    ),
    M(
        "match-triton-window-lse",
        "fast/match_triton.py",
        "lse2_w = stats[0] * LOG2E.value",
        "lse2_w = stats[0]",
        "tests/test_match_triton.py",
        "window dk/dv: the natural-log lse passed where the attention kernel reads log2 units",
    ),
    M(
        "match-bm-item-end",
        "fast/match_triton.py",
        "hi = torch.minimum(lo + item, starts[seg + 1])",
        "hi = torch.minimum(lo + item - 1, starts[seg + 1])",
        "tests/test_match_triton.py -k item",
        "work items: each item drops its last listed query",
    ),
    M(
        "match-bm-empty-slot",
        "fast/match_triton.py",
        "seg = torch.where(idx >= 0, seg, n_seg)",
        "seg = torch.where(idx >= 0, seg, n_seg - 1)",
        "tests/test_match_triton.py -k reverse_index",
        "reverse index: the empty slots are listed under the last block",
    ),
    M(
        "match-bm-window-rescale",
        "fast/match_triton.py",
        "acc = o_w.mul_(torch.exp(lse - lse_j)[..., None])",
        "acc = o_w",
        "tests/test_match_triton.py -k retrieved_paths",
        "joint block-major forward: the window output is not rescaled to the joint softmax",
    ),
    M(
        "match-bm-dk-scale",
        "fast/match_triton.py",
        "tl.atomic_add(dkw_ptr + out_off, dk * scale, mask=kv_mask)",
        "tl.atomic_add(dkw_ptr + out_off, dk, mask=kv_mask)",
        "tests/test_match_triton.py -k retrieved_paths",
        "retrieved part's dk: the softmax scale left out",
    ),
    M(
        "match-bm-negative-scale",
        "fast/match_triton.py",
        "            if scale < 0:  # the gradient w.r.t. -q\n                dq_w.neg_()\n",
        "",
        "tests/test_match_triton.py -k negative",
        "a negative scale: the window dq is the gradient w.r.t. -q, not negated back",
    ),
    M(
        "fused-piece-carry",
        "fast/fused.py",
        "                if carry is not None:\n                    G[i : i + 1] += carry\n",
        "",
        "tests/test_fused.py",
        "a span pair split between two loss pieces loses the partner row's gradient",
    ),
    M(
        "fused-piece-partner",
        "fast/fused.py",
        "                e = b + 1 if (pairs and b < n) else b\n",
        "                e = b + 1 if (pairs and b < r1) else b\n",
        "tests/test_fused.py",
        "a loss piece at the end of a chunk has no pair partner (the pair across chunks is dropped)",
    ),
    # ---- SCRG and the distillation trainer ---------------------------------------------------------------
    M(
        "ref-scrg-tie",
        "reference/scrg.py",
        "(j is None or d[i] > d[j])",
        "(j is None or d[i] >= d[j])",
        "tests/test_scrg.py",
        "oracle: the last of equal KL maxima is the error position (convention: first)",
    ),
    M(
        "ref-scrg-mismatch",
        "reference/scrg.py",
        "if y_t[i] != response[i] and (j is None",
        "if (j is None",
        "tests/test_scrg.py",
        "oracle: positions where teacher and student agree are corrected",
    ),
    M(
        "scrg-mismatch",
        "fast/scrg.py",
        "return d, y_t, live & (y_t != y_s)",
        "return d, y_t, live",
        "tests/test_scrg.py",
        "batched SCRG corrects positions where teacher and student agree",
    ),
    M(
        "distill-threshold",
        "fast/training/distill.py",
        "self.threshold = min(self.threshold + 0.1, 1.0)",
        "self.threshold = min(self.threshold + 0.1, 0.5)",
        "tests/test_distill.py",
        "DistiLLM's adaptive threshold is capped at 0.5 instead of 1",
    ),
    M(
        "distill-span-weight",
        "fast/training/methods.py",
        "loss = loss + cfg.w_span * sp / max(n_pairs, 1)",
        "loss = loss + cfg.w_span * sp",
        "tests/test_distill.py tests/test_recipes.py",
        "MGSR's span term is summed over pairs, not averaged",
    ),
    # ---- distillation recipes on every batch source (tests/test_recipes.py) ----------------------------
    M(
        "recipe-token-norm",
        "fast/training/methods.py",
        "loss = cfg.w_sft * sft / n_gt + cfg.w_token * tok / n",
        "loss = cfg.w_sft * sft / n_gt + cfg.w_token * tok / n_gt",
        "tests/test_recipes.py",
        "MGSR's token term on student samples is normalised by the ground truth's token count",
    ),
    M(
        "recipe-mgsr-skew-alpha",
        "fast/training/methods.py",
        '(("alpha", cfg.skew_alpha), ("beta", 0.5))',
        '(("alpha", 0.1), ("beta", 0.5))',
        "tests/test_recipes.py",
        "the skew-KL ablations of MGSR ignore skew_alpha",
    ),
    M(
        "recipe-gkd-beta",
        "fast/training/methods.py",
        '_JSD = _div_objective("js_divergence", beta="gkd_beta")',
        '_JSD = _div_objective("js_divergence", beta="skew_alpha")',
        "tests/test_recipes.py",
        "GKD's generalised JSD uses the skew coefficient instead of gkd_beta",
    ),
    M(
        "recipe-minillm-weight",
        "fast/training/methods.py",
        "(lq_y - mix).exp().clamp(max=d.cfg.minillm_w_max)",
        "(lq_y - mix).exp()",
        "tests/test_recipes.py",
        "MiniLLM's importance weight is not clipped at w_max",
    ),
    M(
        "recipe-minillm-advantage",
        "fast/training/methods.py",
        "adv = torch.where(mask, ret - (ret * mask).sum() / n, zero)",
        "adv = torch.where(mask, ret, zero)",
        "tests/test_recipes.py",
        "MiniLLM's returns are used as advantages without the baseline",
    ),
    M(
        "recipe-div-mask",
        "fast/training/methods.py",
        "s = divergence(name, t, logits, mask=y != IGNORE,",
        "s = divergence(name, t, logits, mask=y >= IGNORE,",
        "tests/test_recipes.py",
        "the token-level baselines also average over prompt and padding positions",
    ),
    M(
        "replay-with-replacement",
        "fast/training/methods.py",
        "size=min(len(pe), len(d.buffer)), replace=False)",
        "size=min(len(pe), len(d.buffer)), replace=True)",
        "tests/test_recipes.py",
        "the replay buffer is sampled with replacement (a sequence twice in one step)",
    ),
    M(
        "recipe-samples-from-gt",
        "fast/training/methods.py",
        "resp, ended = _student_samples(d, step, pe)",
        "resp, ended = _student_samples(d, step, examples)",
        "tests/test_distill.py",
        "the adaptive sampler samples the labelled examples' prompts instead of the prompt pool",
    ),
    # ---- padding and kernel edges (tests/test_padding.py) -----------------------------------------------
    M(
        "match-summary-padding",
        "fast/match.py",
        "if key_valid is None else key_valid.to(kc.dtype)",
        "if True else key_valid.to(kc.dtype)",
        "tests/test_padding.py",
        "block summaries average the padded keys too",
    ),
    M(
        "match-window-padding",
        "fast/match.py",
        "ok_w = ok_w & (key_valid[:, lo:hi][:, None, None, None] | (j[None, :] == pos[:, None]))",
        "ok_w = ok_w",
        "tests/test_padding.py",
        "the window part attends to padded keys",
    ),
    # ---- experiment numbers: grid tables, task generators, schedules ----------------------------------
    M(
        "dg-heldout-valid",
        "tiny_models/distill_grid.py",
        'held = [s for s in sets if s != "valid"]',
        "held = list(sets)",
        T_GRID,
        "distill grid: the held-out average includes the validation set",
    ),
    M(
        "dg-first-seed",
        "tiny_models/distill_grid.py",
        "return (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)",
        "return (vals[0], statistics.stdev(vals) if len(vals) > 1 else 0.0)",
        T_GRID,
        "distill grid: the table's mean is the first training seed's value",
    ),
    M(
        "dg-pstdev",
        "tiny_models/distill_grid.py",
        "return (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)",
        "return (statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0)",
        T_GRID,
        "distill grid: population std (n) over seeds instead of the sample std (n - 1)",
    ),
    M(
        "dg-within-first",
        "tiny_models/distill_grid.py",
        'row[mode][s]["rougeL_within"] = statistics.fmean(w)',
        'row[mode][s]["rougeL_within"] = w[0]',
        T_GRID,
        "distill grid: the sampled within-run spread is the first run's, not the mean over runs",
    ),
    M(
        "dg-avg-over-sets",
        "tiny_models/distill_grid.py",
        '_ms([statistics.fmean(r[mode][s]["rougeL"] for s in held) for r in runs])',
        '_ms([statistics.fmean(r[mode][s]["rougeL"] for r in runs) for s in held])',
        T_GRID,
        "distill grid: the held-out average's std is over sets instead of over training seeds",
    ),
    M(
        "dg-sampled-is-greedy",
        "tiny_models/distill_grid.py",
        'm = [r[mode][s]["rougeL"] for r in runs]',
        'm = [r["greedy"][s]["rougeL"] for r in runs]',
        T_GRID,
        "distill grid: the sampled ROUGE-L cells show the greedy scores",
    ),
    M(
        "dg-last-checkpoint",
        "tiny_models/distill_grid.py",
        '    path = os.path.join(out_dir, "best.safetensors")\n',
        '    path = os.path.join(out_dir, "model.safetensors")\n',
        T_GRID,
        "distill grid: the last checkpoint is scored although the best-validation one exists",
    ),
    M(
        "mg-bins-closed-right",
        "tiny_models/match_grid/reports.py",
        "m = (dist >= lo) & (dist < hi)",
        "m = (dist > lo) & (dist <= hi)",
        T_GRID,
        "MATCH grid: distance bins (lo, hi] instead of [lo, hi)",
    ),
    M(
        "mg-biased-std",
        "tiny_models/match_grid/reports.py",
        '"acc_std": float(a.std()) if len(rs) > 1 else 0.0',
        '"acc_std": float(a.std(correction=0)) if len(rs) > 1 else 0.0',
        T_GRID,
        "MATCH grid: population std of accuracy over seeds",
    ),
    M(
        "mg-merge-last-run",
        "tiny_models/match_grid/reports.py",
        '"acc": sum(v) / len(v)',
        '"acc": v[-1]',
        T_GRID,
        "MATCH grid: the distance curve is the last seed's, not the mean over seeds",
    ),
    M(
        "mg-attended-no-cap",
        "tiny_models/match_grid/plugin.py",
        "seen += min(K * bs, full - seen)",
        "seen += K * bs",
        T_GRID,
        "attended fraction counts retrieved tokens that do not exist yet (no cap)",
    ),
    M(
        "mg-budget-window",
        "tiny_models/match_grid/grid.py",
        '("sliding", w + kmax * spec.block_size, ())',
        '("sliding", w + (kmax - 1) * spec.block_size, ())',
        "tests/test_schedules.py",
        "the budget-matched SWA baseline is one block short of the largest MATCH budget",
    ),
    M(
        "mg-lr-lag",
        "tiny_models/match_grid/run.py",
        'g["lr"] = lr_at(step, cfg)',
        'g["lr"] = lr_at(step - 1, cfg)',
        "tests/test_schedules.py",
        "MATCH runs: the schedule lags one step (the first update has rate 0)",
    ),
    M(
        "mg-min-lr-frac",
        "tiny_models/match_grid/config.py",
        "return self.lr * self.min_lr_frac",
        "return self.min_lr_frac",
        "tests/test_schedules.py",
        "MATCH runs: the floor is the fraction itself, not lr * min_lr_frac",
    ),
    M(
        "sched-no-floor",
        "fast/training/schedule.py",
        "return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(frac, 1.0)))",
        "return 0.5 * lr * (1.0 + math.cos(math.pi * min(frac, 1.0)))",
        "tests/test_schedules.py",
        "the cosine decays to 0, not to min_lr",
    ),
    M(
        "sched-cosine-span",
        "fast/training/schedule.py",
        "frac = (step - warmup) / max(steps - warmup, 1)",
        "frac = (step - warmup) / max(steps, 1)",
        "tests/test_schedules.py",
        "the cosine spans the warmup too: the last step is above min_lr",
    ),
    M(
        "mqar-gaps-unweighted",
        "tiny_models/recall.py",
        "gaps = _sample_without_replacement(rng, np.arange(space), n, P, p / p.sum())",
        "gaps = _sample_without_replacement(rng, np.arange(space), n, P)",
        T_GEN,
        "MQAR gaps ignore power_a (always uniform)",
    ),
    M(
        "sampler-linear-weights",
        "tiny_models/recall.py",
        "keys = keys + np.log(p)[None, :]",
        "keys = keys + p[None, :]",
        T_GEN,
        "weighted sampling without replacement adds p, not log p, to the Gumbel keys",
    ),
    M(
        "mad-noise-odds",
        "tiny_models/recall.py",
        "if frac_noise > 0 and rng.random() < frac_noise:",
        "if frac_noise > 0 and rng.random() < frac_noise / (1 - frac_noise):",
        T_GEN,
        "MAD noisy recall: noise pairs at the odds frac / (1 - frac) instead of the rate frac",
    ),
    M(
        "mad-noise-vocab",
        "tiny_models/recall.py",
        "rng.integers(noise0, noise0 + noise_vocab_size, size=ks + vs)",
        "rng.integers(noise0, noise0 + noise_vocab_size - 1, size=ks + vs)",
        T_GEN,
        "MAD noisy recall: the last noise token is never drawn",
    ),
    M(
        "shk-min-distance",
        "tiny_models/recall.py",
        "rng.integers(0, passage_len - min_distance + 1, size=num_facts)",
        "rng.integers(0, passage_len + 1, size=num_facts)",
        T_GEN,
        "Shakespeare recall: facts may sit closer than min_distance to the queries",
    ),
    M(
        "shk-first-facts-queried",
        "tiny_models/recall.py",
        "for f in rng.permutation(num_facts)[:num_queries]:",
        "for f in range(num_queries):",
        T_GEN,
        "Shakespeare recall: always the first facts are queried, in planting order",
    ),
    M(
        "tasks-cap",
        "tiny_models/tasks.py",
        "if count.get(ex.family, 0) < n:",
        "if count.get(ex.family, 0) <= n:",
        T_GEN,
        "valid/test keep one example per family more than n_eval_per_family",
    ),
    M(
        "tasks-unseen-templates",
        "tiny_models/tasks.py",
        'splits["unseen_templates"] = _draw(seed + 1, TRAIN_FAMILIES, (3,), False, n_eval_per_family)',
        'splits["unseen_templates"] = _draw(seed + 1, TRAIN_FAMILIES, (2, 3), False, n_eval_per_family)',
        T_GEN,
        "the unseen-templates set also draws a training template",
    ),
    M(
        "text-val-overlap",
        "tiny_models/train.py",
        "self.ids, val = ids[:-n_val], ids[-n_val:]",
        "self.ids, val = ids, ids[-n_val:]",
        T_GEN,
        "language modelling trains on the validation text too",
    ),
    M(
        "kstats-shared-header",
        "fast/devtools/kernel_stats.py",
        "lp.start <= o.start and o.end <= lp.end",
        "lp.start < o.start and o.end <= lp.end",
        "tests/test_kernel_stats.py::test_nested_loops_and_two_back_edges_to_one_header "
        "tests/test_kernel_stats.py::test_loops_from_back_edges",
        "kernel stats: of two loops with one header, the longer one is also called innermost",
    ),
    M(
        "driver-accum-logged-loss",
        "fast/training/distill.py",
        "loss = loss + loss_m.detach() / cfg.grad_accum",
        "loss = loss_m.detach()",
        "tests/test_drivers_more.py",
        "the logged loss of an accumulated step is its last micro-batch's, not their mean",
    ),
    M(
        "driver-accum-grad-scale",
        "fast/training/distill.py",
        "(loss_m * (self.world / cfg.grad_accum)).backward()",
        "(loss_m * self.world).backward()",
        "tests/test_drivers_more.py",
        "an accumulated step sums its micro-batch gradients instead of averaging them",
    ),
    M(
        "driver-generate-reseed",
        "fast/training/evaluate.py",
        "            generator=g,\n",
        "            generator=torch.Generator().manual_seed(seed),\n",
        "tests/test_drivers_more.py",
        "sampled evaluation re-seeds its generator for every batch (the batches replay one another)",
    ),
    M(
        "driver-scrg-salt",
        "fast/training/distill.py",
        "_gen(self.cfg, step, self.rank, 4, self.micro)",
        "_gen(self.cfg, step, self.rank, 1, self.micro)",
        "tests/test_drivers_more.py",
        "SCRG's continuations reuse the generator that drew the samples they revise",
    ),
]


# ----------------------------------------------------------------------------------------------------------


def _tree_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    return [f for f in out if f and (ROOT / f).is_file()]


def _copy_tree(dst: pathlib.Path) -> None:
    for f in _tree_files():
        target = dst / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)


def anchor_count(m: Mutant, root: pathlib.Path = ROOT) -> int:
    path = root / m.file
    return path.read_text().count(m.find) if path.exists() else 0


def _pytest(work: pathlib.Path, args: list[str], timeout: int) -> tuple[str, float, str]:
    env = dict(os.environ, PYTHONPATH=str(work), OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not notebook", *args]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed", time.perf_counter() - t0, "timeout"
    dt = time.perf_counter() - t0
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    if p.returncode == 0:
        return "survived", dt, tail[0]
    if p.returncode == 1:
        return "killed", dt, tail[0]
    return "error", dt, f"pytest exit {p.returncode}: {tail[0]}"


def run_one(m: Mutant, work: pathlib.Path, full: bool) -> dict:
    path = work / m.file
    original = path.read_text() if path.exists() else ""
    if original.count(m.find) != 1:
        return dict(id=m.id, result="stale", seconds=0.0, detail=f"anchor found {original.count(m.find)}x")
    path.write_text(original.replace(m.find, m.replace))
    try:
        result, dt, detail = _pytest(work, list(m.tests), TIMEOUT_S)
        if result == "survived" and full:
            result, dt2, detail = _pytest(work, ["tests"], 3 * TIMEOUT_S)
            dt += dt2
            detail = "whole suite: " + detail
    finally:
        path.write_text(original)
    return dict(id=m.id, result=result, seconds=dt, detail=detail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated mutant ids")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-full", action="store_true", help="do not re-run survivors on the whole suite")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutants.md"))
    ap.add_argument("--list", action="store_true", help="list the mutants and their anchor status, run none")
    a = ap.parse_args(argv)
    todo = [m for m in MUTANTS if not a.only or m.id in a.only.split(",")]
    if a.list:
        for m in todo:
            print(f"{m.id:24s} {m.file:28s} anchor x{anchor_count(m)}  {m.what}")
        return 0
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    scratch = [pathlib.Path(tempfile.mkdtemp(prefix=f"mutants-{i}-")) for i in range(max(1, a.workers))]
    for d in scratch:
        _copy_tree(d)
    free = list(scratch)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()

    def job(m):
        work = free.pop()
        try:
            return run_one(m, work, not a.no_full)
        finally:
            free.append(work)

    bar = tqdm(total=len(todo), desc="mutants") if tqdm else None
    with cf.ThreadPoolExecutor(max_workers=len(scratch)) as ex:
        for fut in cf.as_completed([ex.submit(job, m) for m in todo]):
            r = fut.result()
            results[r["id"]] = r
            if bar:
                bar.update(1)
                bar.set_postfix_str(f"{r['id']}: {r['result']}")
    if bar:
        bar.close()
    for d in scratch:
        shutil.rmtree(d, ignore_errors=True)

    counted = [m for m in todo if not m.equivalent and results[m.id]["result"] in ("killed", "survived")]
    killed = sum(results[m.id]["result"] == "killed" for m in counted)
    score = killed / len(counted) if counted else 0.0
    n = {k: sum(r["result"] == k for r in results.values()) for k in ("killed", "survived", "stale", "error")}
    lines = [
        "# Mutation report (`make mutants`)",
        "",
        f"{len(todo)} mutants: {n['killed']} killed, {n['survived']} survived, {n['stale']} stale, "
        f"{n['error']} errors; score {killed}/{len(counted)} = {100 * score:.0f} % of the non-equivalent "
        f"mutants (target >= 90 %). Wall time {time.perf_counter() - t0:.0f} s with {len(scratch)} workers.",
        "",
        "| id | file | planted bug | result | s | detail |",
        "|---|---|---|---|---|---|",
    ]
    for m in todo:
        r = results[m.id]
        res = r["result"] + (f" (equivalent: {m.equivalent})" if m.equivalent else "")
        lines.append(f"| {m.id} | `{m.file}` | {m.what} | {res} | {r['seconds']:.0f} | {r['detail']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.out).write_text(text)
    bad = n["stale"] + n["error"]
    return 0 if (score >= 0.9 and not bad) else 1


if __name__ == "__main__":
    sys.exit(main())
