"""fast/teacher_cache.py: the sparse teacher's losses (top-k bucketed forward KL, exact when nothing is
left in the tail; the sampled estimate unbiased for the forward KL's gradient), shards written and read
back by sequence, the trainer's cached KD equal to plain KD when the cache is exact, and the methods a
sparse teacher cannot serve refused."""

import math

import numpy as np
import pytest
import torch

import tiny_models.distill as distill
from fast.divergences import divergence
from fast.teacher_cache import TeacherCache, sampled_entries, sparse_kd_loss, topk_entries, write_cache
from fast.testing import assert_close
from tiny_models.gpt import GPT, PAD, GPTConfig
from tiny_models.tasks import build_dataset, example_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _logits(N, V, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(N, V, generator=g, dtype=torch.float64)


def test_topk_with_every_token_is_the_forward_kl():
    t, s = _logits(7, 13, 0), _logits(7, 13, 1).requires_grad_()
    ids, vals, rest = topk_entries(t, 13)
    assert torch.all(torch.isneginf(rest) | (rest < -30))
    got = sparse_kd_loss(s, ids, vals, rest, "topk")
    want = divergence("forward_kl", t, s, reduction="none", backend="torch")
    assert_close(got, want, dtype=torch.float32, name="loss")
    go = torch.randn(7, dtype=torch.float64)
    (g1,) = torch.autograd.grad((got * go).sum(), s)
    (g2,) = torch.autograd.grad((want * go).sum(), s)
    assert_close(g1, g2, dtype=torch.float32, name="grad")


def test_topk_buckets_by_hand():
    # k + 1 buckets: the k tokens and the rest, KL over them in float64
    t, s = _logits(5, 11, 2), _logits(5, 11, 3)
    ids, vals, rest = topk_entries(t, 3)
    got = sparse_kd_loss(s, ids, vals, rest, "topk")
    p, q = t.softmax(-1).numpy(), s.softmax(-1).numpy()
    for n in range(5):
        top = np.argsort(-p[n])[:3]
        assert sorted(ids[n].tolist()) == sorted(top.tolist())
        pk, qk = p[n, top], q[n, top]
        want = (pk * np.log(pk / qk)).sum() + (1 - pk.sum()) * np.log((1 - pk.sum()) / (1 - qk.sum()))
        assert_close(got[n], want, dtype=torch.float32, name=f"row {n}")


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sampled_gradient_is_unbiased(tau):
    # the mean over many independent caches of the sampled loss's gradient is the forward KL's gradient
    t, s = _logits(3, 9, 4), _logits(3, 9, 5).requires_grad_()
    (want,) = torch.autograd.grad(divergence("forward_kl", t, s, reduction="sum", backend="torch"), s)
    g = torch.Generator().manual_seed(0)
    reps, acc = 3000, torch.zeros_like(s)
    for _ in range(reps):
        ids, w = sampled_entries(t, 4, g, proposal_temperature=tau)
        (grad,) = torch.autograd.grad(sparse_kd_loss(s, ids, w, None, "sampled").sum(), s)
        acc += grad
    err = (acc / reps - want).abs().max().item()
    assert err < 0.02, err  # a standard error of about 0.005 at 3000 draws


def test_sampled_weights_merge_duplicates():
    t = torch.tensor([[5.0, 0.0, -5.0]], dtype=torch.float64)  # nearly all mass on token 0
    ids, w = sampled_entries(t, 8, torch.Generator().manual_seed(1))
    kept = ids[0] >= 0
    assert len(set(ids[0][kept].tolist())) == int(kept.sum())  # distinct ids, -1 pads
    assert_close(w[0].sum(), torch.tensor(1.0), dtype=torch.float32, name="weights of p = r sum to 1")


def _tiny_teacher():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=96)).eval()


def test_write_read_round_trip_across_shards(tmp_path):
    exs = build_dataset(0, n_per_family=20)["train"][:9]
    seqs = [example_ids(e.prompt, e.response) for e in exs]
    summary = write_cache(
        str(tmp_path / "c"),
        _tiny_teacher(),
        seqs,
        kind="topk",
        k=5,
        pad_id=PAD,
        block_size=96,
        batch_size=4,
        shard_rows=40,
    )
    assert summary["shards"] > 1 and summary["bytes_per_token"] == 8 * 5 + 4
    cache = TeacherCache(str(tmp_path / "c"))
    assert cache.kind == "topk" and cache.k == 5 and cache.vocab == 259
    with torch.no_grad():
        logits = _tiny_teacher()(torch.tensor([seqs[4][0]])).float()[0]
    m = torch.tensor(seqs[4][1]) != -100
    ids, vals, rest = topk_entries(logits[m], 5)
    got = cache.rows(*seqs[4])
    assert torch.equal(got[0], ids)
    assert_close(got[1], vals, dtype=torch.float32, name="log-probs")
    assert_close(got[2], rest, dtype=torch.float32, name="rest")
    with pytest.raises(ValueError, match="not in the teacher cache"):
        cache.rows([1, 2, 3], [2, 3, -100])


def _kd(tmp_path, **kw):
    t = _tiny_teacher()
    torch.manual_seed(1)
    s = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=96))
    cfg = distill.DistillConfig(
        method="kd", block_size=96, batch_size=3, steps=3, backend="torch", device="cpu", fused=False, **kw
    )
    return distill.Distiller(cfg, t, s)


def test_cached_kd_equals_kd_when_the_cache_is_exact(tmp_path):
    exs = build_dataset(0, n_per_family=20)["train"][:3]
    write_cache(
        str(tmp_path / "c"),
        _tiny_teacher(),
        [example_ids(e.prompt, e.response) for e in exs],
        kind="topk",
        k=259,
        pad_id=PAD,
        block_size=96,
    )
    cached, plain = _kd(tmp_path, teacher_cache=str(tmp_path / "c")), _kd(tmp_path)
    pairs = distill.as_pairs(exs)
    for step in (1, 2):
        a, b = cached.step(step, pairs), plain.step(step, pairs)
        assert_close(torch.tensor(a["loss"]), torch.tensor(b["loss"]), dtype=torch.float32, name="loss")
    for p, q in zip(cached.student.parameters(), plain.student.parameters(), strict=True):
        assert_close(p, q, dtype=torch.float32)


def test_a_sparse_teacher_is_refused_where_it_cannot_serve(tmp_path):
    exs = build_dataset(0, n_per_family=20)["train"][:2]
    write_cache(
        str(tmp_path / "c"),
        _tiny_teacher(),
        [example_ids(e.prompt, e.response) for e in exs],
        kind="sampled",
        k=4,
        pad_id=PAD,
    )
    for method in ("mgsr", "rkl", "distillm", "seqkd"):
        cfg = distill.DistillConfig(method=method, teacher_cache=str(tmp_path / "c"), device="cpu")
        with pytest.raises(ValueError, match="teacher_cache serves method 'kd'"):
            distill.Distiller(cfg, _tiny_teacher(), _tiny_teacher())
    with pytest.raises(ValueError, match="no teacher cache"):
        _kd(tmp_path, teacher_cache=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="kind must be one of"):
        write_cache(str(tmp_path / "d"), _tiny_teacher(), [], kind="topp", k=4)
    assert math.isfinite(
        _kd(tmp_path, teacher_cache=str(tmp_path / "c")).step(1, distill.as_pairs(exs))["loss"]
    )


def test_the_command_on_a_transformers_teacher(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import json

    from test_hf_distill import FACTS, _model, _tokenizer

    import fast.teacher_cache as tc

    tok = _tokenizer()
    _model(tok, 16, 0).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in FACTS)
    )
    tc.main(
        [
            "--teacher",
            str(tmp_path / "teacher"),
            "--data",
            str(tmp_path / "d.jsonl"),
            "--out",
            str(tmp_path / "cache" / "train"),
            "--kind",
            "sampled",
            "--k",
            "3",
            "--block_size",
            "64",
        ]
    )
    cache = TeacherCache(str(tmp_path / "cache" / "train"))
    assert cache.kind == "sampled" and cache.k == 3 and cache.vocab == len(tok)
    assert len(cache.index) == len(FACTS) and transformers is not None
