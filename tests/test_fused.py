"""fast/fused.py: the chunked lm-head + loss equals the unfused computation on materialised logits -- loss
and every gradient (the student's hidden states, its weight, the DAC-KL sub-network) -- for every
objective, on ugly shapes: N not a multiple of the chunk, one row, masked rows, spans straddling chunks, a
-inf padded vocabulary, grad_output != 1, fp32 and fp64, torch and Triton backends; and against the NumPy
oracles at small V."""

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fast.dac_kl import DACKL
from fast.divergences import PARAMS as DIV_PARAMS
from fast.divergences import divergence
from fast.fused import default_chunk_rows, default_loss_rows, fused_distill_loss
from fast.span import span_loss
from fast.testing import assert_close
from reference import divergences as R

DIVS = sorted(DIV_PARAMS)


def _inputs(N, H, Ht, V, dtype, seed, n_masked=0, n_unlabelled=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    ws = (torch.randn(V, H, generator=g, dtype=torch.float64) / math.sqrt(H)).to(dtype).requires_grad_()
    ht = torch.randn(N, Ht, generator=g, dtype=torch.float64).to(dtype)
    wt = (2 * torch.randn(V, Ht, generator=g, dtype=torch.float64) / math.sqrt(Ht)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[:n_unlabelled] = -100
    mask = torch.ones(N, dtype=torch.bool)
    mask[N - n_masked :] = False
    return hs, ws, ht, wt, labels, mask


def _dac(dtype, backend="torch"):
    return DACKL(k=8, hidden=16, backend=backend, generator=torch.Generator().manual_seed(3)).to(dtype)


def _unfused(
    hs,
    ws,
    ht,
    wt,
    *,
    objective,
    labels,
    mask,
    spans=None,
    dac=None,
    weights=(1, 1, 1),
    vocab=None,
    backend="torch",
    **params,
):
    s, t = hs @ ws.T, (ht @ wt.T).detach()
    cd = torch.float64 if hs.dtype == torch.float64 else torch.float32
    s, t = s.to(cd), t.to(cd)
    if vocab is not None:
        neg = torch.full_like(s[:, vocab:], -math.inf)
        s = torch.cat([s[:, :vocab], neg], 1)
        t = torch.cat([t[:, :vocab], neg], 1)
    ok = labels != -100
    ce = torch.nn.functional.cross_entropy(s[ok], labels[ok]) if bool(ok.any()) else s.sum() * 0.0
    if objective == "ce":
        return ce
    if objective != "mgsr":
        return divergence(objective, t, s, mask=mask, reduction="mean", backend=backend, **params)
    tok, _ = dac(t, s, mask)
    out = weights[0] * ce + weights[1] * tok
    if spans is not None:
        out = out + weights[2] * span_loss(t, s, spans, backend=backend)
    return out


def _both(objective, N, chunk, dtype=torch.float64, backend="torch", go=-1.7, seed=0, loss_rows=None, **kw):
    hs, ws, ht, wt, labels, mask = _inputs(N, 12, 20, 37, dtype, seed, n_masked=min(3, N - 1), n_unlabelled=2)
    if kw.get("vocab") is not None:  # labels are real tokens
        labels = torch.where(labels == -100, labels, labels % kw["vocab"])
    dac = _dac(dtype, backend) if objective == "mgsr" else None
    extra = {k: v for k, v in kw.items() if k != "spans"}
    spans = kw.get("spans")
    params = [hs, ws, *(dac.parameters() if dac is not None else ())]
    loss, parts = fused_distill_loss(
        hs,
        ws,
        ht,
        wt,
        objective=objective,
        labels=labels,
        mask=mask,
        spans=spans,
        dac=dac,
        chunk_rows=chunk,
        loss_rows=loss_rows,
        backend=backend,
        **extra,
    )
    got = torch.autograd.grad(loss * go, params)
    ref = _unfused(
        hs,
        ws,
        ht,
        wt,
        objective=objective,
        labels=labels,
        mask=mask,
        spans=spans,
        dac=dac,
        backend=backend,
        **extra,
    )
    want = torch.autograd.grad(ref * go, params)
    assert_close(loss, ref, dtype=dtype, name=f"{objective} loss")
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_close(a, b, dtype=dtype, name=f"{objective} grad {i}")
    return parts


@pytest.mark.parametrize("objective", ["ce", *DIVS])
@pytest.mark.parametrize(
    "N,chunk,loss_rows", [(1, 1, None), (17, 5, None), (16, 4, None), (9, 64, None), (17, 7, 3), (9, 64, 4)]
)
def test_every_objective_equals_the_unfused_loss(objective, N, chunk, loss_rows):
    # loss_rows < chunk: each chunk's logits are consumed in pieces (partial pieces at the ends)
    params = {k: v for k, v in (("alpha", 0.3), ("beta", 0.35)) if k in DIV_PARAMS.get(objective, ())}
    _both(objective, N, chunk, loss_rows=loss_rows, **params)


@given(N=st.integers(2, 30), chunk=st.integers(1, 12), piece=st.integers(1, 12), seed=st.integers(0, 2**16))
@example(N=20, chunk=3, piece=3, seed=1)  # spans straddle several chunk boundaries
@example(N=20, chunk=7, piece=2, seed=1)  # ... and the boundaries of the loss pieces inside a chunk
@example(N=2, chunk=1, piece=1, seed=0)  # one pair split across two one-row chunks
@example(N=3, chunk=2, piece=1, seed=0)  # one pair split across two one-row pieces of one chunk
def test_mgsr_with_spans_across_chunks(N, chunk, piece, seed):
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, N), size=min(3, N - 1), replace=False)).tolist()
    bounds = [0, *cuts, N]
    spans = torch.tensor([[a, b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b - a >= 2])
    spans = spans if len(spans) else None
    parts = _both(
        "mgsr", N, chunk, seed=seed, loss_rows=min(piece, chunk), spans=spans, weights=(0.7, 1.3, 2.5)
    )
    assert set(parts) >= {"sft", "token", "kept"}


@pytest.mark.parametrize("token_loss", ["forward_kl", "skew_reverse_kl"])
def test_mgsr_with_a_divergence_as_token_term(token_loss):
    hs, ws, ht, wt, labels, mask = _inputs(11, 8, 8, 23, torch.float64, 5)
    spans = torch.tensor([[2, 7], [7, 11]])
    loss, parts = fused_distill_loss(
        hs,
        ws,
        ht,
        wt,
        objective="mgsr",
        labels=labels,
        mask=mask,
        spans=spans,
        token_loss=token_loss,
        chunk_rows=3,
        weights=(0.5, 2.0, 3.0),
        alpha=0.3,
        backend="torch",
    )
    s, t = hs @ ws.T, ht @ wt.T
    p = {"alpha": 0.3} if "alpha" in DIV_PARAMS[token_loss] else {}
    want = (
        0.5 * torch.nn.functional.cross_entropy(s, labels)
        + 2.0 * divergence(token_loss, t, s, mask=mask, backend="torch", **p)
        + 3.0 * span_loss(t, s, spans, backend="torch")
    )
    assert_close(loss, want, name=token_loss)
    assert_close(parts["token"], divergence(token_loss, t, s, mask=mask, backend="torch", **p), name="part")


@pytest.mark.parametrize("objective", ["forward_kl", "mgsr"])
def test_padded_vocabulary(objective):
    spans = torch.tensor([[0, 6], [8, 13]]) if objective == "mgsr" else None
    _both(objective, 13, 4, vocab=30, spans=spans)
    _both(objective, 13, 6, loss_rows=4, vocab=30, spans=spans)


@pytest.mark.parametrize("objective", ["ce", "js_divergence", "mgsr"])
def test_fp32(objective):
    spans = torch.tensor([[1, 9]]) if objective == "mgsr" else None
    _both(objective, 14, 5, dtype=torch.float32, spans=spans, loss_rows=2)


@pytest.mark.parametrize("objective", ["forward_kl", "skew_forward_kl", "mgsr"])
def test_triton_backend(objective):
    spans = torch.tensor([[1, 6], [6, 12]]) if objective == "mgsr" else None
    _both(objective, 12, 5, dtype=torch.float32, backend="triton", spans=spans, loss_rows=3)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "js_divergence", "tv_distance"])
def test_against_the_oracle(name):
    # the NumPy oracle's per-row values and logit gradients, chained through the lm head by hand
    hs, ws, ht, wt, _, mask = _inputs(10, 6, 7, 19, torch.float64, 9, n_masked=3)
    loss, _ = fused_distill_loss(hs, ws, ht, wt, objective=name, mask=mask, chunk_rows=4, backend="torch")
    dh, dw = torch.autograd.grad(loss, [hs, ws])
    s, t = (hs @ ws.T).detach().numpy(), (ht @ wt.T).numpy()
    m = mask.numpy()
    f, grad = R.DIVERGENCES[name]
    want = f(t[m], s[m]).mean()
    ds = np.zeros_like(s)
    ds[m] = grad(t[m], s[m]) / m.sum()
    assert_close(loss, want, name="loss")
    assert_close(dh, ds @ ws.detach().numpy(), name="dh")
    assert_close(dw, ds.T @ hs.detach().numpy(), name="dW")


def test_chunk_size_rule():
    V = 151_936
    assert default_chunk_rows(2048, V, "forward_kl") == 124  # 144 MiB / (2 x 4 B x V)
    assert default_chunk_rows(2048, V, "mgsr") == 124  # the logit buffers do not depend on the objective
    assert default_loss_rows(124, V, "forward_kl") == 13  # 48 MiB / (6 x 4 B x V)
    assert default_loss_rows(124, V, "mgsr") == 4  # 48 MiB / (20 x 4 B x V)
    assert default_loss_rows(124, V, "ce") == 20  # 48 MiB / (4 x 4 B x V)
    assert default_chunk_rows(5, 259, "ce") == 5  # never more than N
    assert default_loss_rows(5, 259, "ce") == 5  # never more than the chunk
    assert default_chunk_rows(10, 10**9, "mgsr") == 1  # never less than 1
    assert default_loss_rows(1, 10**9, "mgsr") == 1


def test_bad_input_names_it():
    hs, ws, ht, wt, labels, mask = _inputs(6, 4, 5, 11, torch.float32, 0)
    kw = dict(labels=labels, mask=mask)
    with pytest.raises(ValueError, match="objective must be one of"):
        fused_distill_loss(hs, ws, ht, wt, objective="kl", **kw)
    with pytest.raises(ValueError, match=r"student_hidden must be \[N, H\] and student_weight \[V, H\]"):
        fused_distill_loss(hs, ws[:, :3], ht, wt, objective="ce", **kw)
    with pytest.raises(ValueError, match="same rows and vocabulary"):
        fused_distill_loss(hs, ws, ht, wt[:7], objective="ce", **kw)
    with pytest.raises(ValueError, match="needs labels"):
        fused_distill_loss(hs, ws, ht, wt, objective="ce", mask=mask)
    with pytest.raises(ValueError, match="needs dac"):
        fused_distill_loss(hs, ws, ht, wt, objective="mgsr", **kw)
    with pytest.raises(ValueError, match="spans must satisfy"):
        fused_distill_loss(hs, ws, ht, wt, objective="mgsr", dac=_dac(torch.float32), spans=[[4, 9]], **kw)
    with pytest.raises(ValueError, match="chunk_rows must be an integer >= 1"):
        fused_distill_loss(hs, ws, ht, wt, objective="ce", chunk_rows=0, **kw)
    with pytest.raises(ValueError, match=r"loss_rows must be an integer in \[1, chunk_rows=3\]"):
        fused_distill_loss(hs, ws, ht, wt, objective="ce", chunk_rows=3, loss_rows=4, **kw)
    with pytest.raises(ValueError, match="vocab must be an integer"):
        fused_distill_loss(hs, ws, ht, wt, objective="ce", vocab=12, **kw)


# ------------------------------------------------------------------------------------------------------
# in the trainer: fused by default where it applies, the same numbers as materialised logits


def _distillers(method, **kw):
    import tiny_models.distill as distill
    from tiny_models.gpt import GPT, GPTConfig

    cfgs = []
    for fused in (True, False):
        torch.manual_seed(0)
        t = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=96))
        s = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=96))
        cfg = distill.DistillConfig(
            method=method,
            fused=fused,
            block_size=96,
            max_new_tokens=6,
            batch_size=3,
            steps=4,
            init_threshold=1.0,
            dac_k=8,
            dac_hidden=16,
            backend="torch",
            device="cpu",
            progress=False,
            w_sft=0.7,
            w_span=2.0,
            **kw,
        )
        cfgs.append(distill.Distiller(cfg, t, s))
    return cfgs


@pytest.mark.parametrize(
    "method",
    [
        "sft",
        "kd",
        "seqkd",
        "rkl",
        "imitkd",
        "gkd",
        "minillm",
        "distillm",
        "mgsr",
        "mgsr-no-scrg",
        "mgsr-no-span",
        "mgsr-skew_reverse_kl",
        "mgsr-js_divergence",
    ],
)
def test_one_step_fused_equals_unfused(method):
    import tiny_models.distill as distill
    from tiny_models.tasks import build_dataset

    examples = distill.as_pairs(build_dataset(0, n_per_family=30)["train"][:3])
    fused, plain = _distillers(method)
    assert fused.fused and not plain.fused
    for step in (1, 2):  # fresh samples, then (for the adaptive methods) the buffer
        a, b = fused.step(step, examples), plain.step(step, examples)
        assert a["source"] == b["source"]
        assert_close(
            torch.tensor(a["loss"]), torch.tensor(b["loss"]), dtype=torch.float32, name=f"{method} loss"
        )
        for k in set(a) & set(b) - {
            "step_s",
            "time_s",
            "source",
            "step",
            "lr",
            "threshold",
            "buffer",
            "grad_norm",
        }:
            assert_close(torch.tensor(a[k]), torch.tensor(b[k]), dtype=torch.float32, name=f"{method} {k}")
    for (name, p), q in zip(fused.student.named_parameters(), plain.student.parameters(), strict=True):
        assert_close(p, q, dtype=torch.float32, name=f"{method} {name} after two steps")


def test_a_qwen2_shaped_step_at_a_real_vocabulary():
    # V = 151,936 as in Qwen2.5: one MGSR step of a tiny random Qwen2 pair on CPU, fused by default
    transformers = pytest.importorskip("transformers")
    from fast.training.distill import DistillConfig, Distiller

    V = 151_936
    models = []
    for hidden in (16, 8):
        torch.manual_seed(hidden)
        cfg = transformers.Qwen2Config(
            vocab_size=V,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            eos_token_id=1,
            pad_token_id=0,
            tie_word_embeddings=True,
        )
        models.append(transformers.Qwen2ForCausalLM(cfg))
    g = torch.Generator().manual_seed(0)
    examples = [
        (torch.randint(2, V, (6,), generator=g).tolist(), torch.randint(2, V, (5,), generator=g).tolist())
        for _ in range(2)
    ]
    d = Distiller(
        DistillConfig(
            method="mgsr-no-scrg",
            block_size=32,
            max_new_tokens=4,
            batch_size=2,
            steps=2,
            init_threshold=0.0,
            dac_k=8,
            dac_hidden=16,
            backend="torch",
            device="cpu",
        ),
        *models,
    )
    assert d.fused
    before = [p.detach().clone() for p in models[1].parameters()]
    rec = d.step(1, examples)
    assert math.isfinite(rec["loss"]) and rec["source"] == "gt"
    assert any(not torch.equal(a, b) for a, b in zip(before, models[1].parameters(), strict=True))


def test_the_benchmark_script_prints_its_row(capsys):
    # a smoke run at a tiny vocabulary: each case in a fresh process; an implementation left out reads
    # "not run" and its ratios "-"
    from benchmarks.fused_loss import main

    argv = ["--device", "cpu", "--V", "300", "--N", "9", "--H", "16", "--rep", "1"]
    main([*argv, "--objectives", "mgsr", "--impls", "fused"])
    row = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| mgsr"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["mgsr", "9", "16", "9 / 9"]
    assert cells[4] == "not run" and float(cells[5]) > 0 and cells[6] == "-" and cells[9] == "-"
    assert cells[7] == "not run" and cells[8].endswith("s (CPU)")
