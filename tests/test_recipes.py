"""Every method of the registry, on every batch source its recipe can produce (ground truth, fresh student
samples, SCRG-revised samples, the replay buffer, teacher samples, the teacher-mixed policy), has its loss
recomputed here by hand in float64 from the two models' logits: which sequences each term reads, which
positions it averages over, how it is normalised, and every coefficient. The replay buffer's sampling is
checked by its frequencies."""

import collections

import numpy as np
import pytest
import torch

import tiny_models.distill as distill
from fast.testing import assert_close
from fast.training.methods import METHODS, response_spans
from reference import dac_kl as ref_dac
from reference import divergences as R
from reference.span import pair_distances
from tiny_models.gpt import GPT, GPTConfig
from tiny_models.tasks import IGNORE, build_dataset, collate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# coefficients away from their defaults and from each other, so a recipe that ignores or swaps one is caught;
# minillm_alpha = 0.7 lets q / p_mix reach 1 / 0.3, so the clip at w_max = 1.2 bites
COEF = dict(
    skew_alpha=0.2, gkd_beta=0.35, w_sft=0.7, w_token=1.3, w_span=2.5, minillm_w_max=1.2, minillm_alpha=0.7
)
TINY = dict(
    n_per_family=30,
    block_size=96,
    max_new_tokens=7,
    batch_size=4,
    steps=10,
    eval_every=0,
    eval_examples=4,
    progress=False,
    threads=1,
    device="cpu",
    backend="torch",
    dac_k=8,
    dac_hidden=16,
    capacity=6,
    replay_ratio="decreasing",
    gkd_lambda=1.0,
    **COEF,
)


def _models():
    torch.manual_seed(0)
    t = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=96))
    s = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=96))
    return t, s


@pytest.fixture(scope="module")
def examples():
    return distill.as_pairs(build_dataset(0, n_per_family=30)["train"][:4])


def _plans(method, examples):
    """(Distiller, [(source, plan)]) for every source the method's recipe can produce."""
    t, s = _models()
    d = distill.Distiller(distill.DistillConfig(method=method, **TINY), t, s)
    build = METHODS[method].build
    out = []
    if method.startswith("mgsr") or method == "distillm":  # DistiLLM's adaptive sampler
        d.threshold = 0.0
        out.append(("gt", d.plan(1, examples)))
        d.threshold = 1.0  # the buffer is not full: fresh samples (SCRG-revised for MGSR), pushed
        out.append(("fresh", d.plan(2, examples)))
        d.plan(3, examples)  # fills the buffer (capacity 6 < 8 sequences)
        plan = d.plan(d.cfg.steps, examples)  # last step: the fresh share is 0, so r < 1 means replay
        out.append(("replay", plan))
    elif method == "gkd":
        out.append(("student", d.plan(1, examples)))  # gkd_lambda = 1
        d.cfg = distill.resolve(distill.DistillConfig(method=method, **{**TINY, "gkd_lambda": 0.0}))
        out.append(("gt", d.plan(1, examples)))
    else:
        out.append(("own", build(d, 1, examples)))
    return d, out


def _logits(model, seqs, block_size=96):  # -> float64 logits [B, T, V], labels [B, T]
    x, y = collate(seqs, block_size=block_size)
    with torch.no_grad():
        return model(x).double().numpy(), y.numpy()


def _log_softmax(a):
    a = a - a.max(-1, keepdims=True)
    return a - np.log(np.exp(a).sum(-1, keepdims=True))


def _ce(ls, y):  # mean over labelled positions
    m = y != IGNORE
    lp = _log_softmax(ls)
    return -np.take_along_axis(lp, np.where(m, y, 0)[..., None], -1)[..., 0][m].mean()


def _div(name, lt, ls, y, **params):  # mean of the divergence over labelled positions
    m = y != IGNORE
    return R.DIVERGENCES[name][0](lt[m], ls[m], **params).mean()


def _expected(d, plan):
    cfg = d.cfg
    seqs = plan.seqs if plan.seqs is not None else plan.gt
    ls, y = _logits(d.student, seqs)
    lt, _ = _logits(d.teacher, seqs)
    name = cfg.method
    if name == "sft":
        lg, yg = _logits(d.student, plan.gt)
        return _ce(lg, yg)
    if name == "seqkd":
        return _ce(ls, y)
    if name in ("kd", "imitkd", "seqkd-fixed"):
        return _div("forward_kl", lt, ls, y)
    if name == "rkl":
        return _div("reverse_kl", lt, ls, y)
    if name == "gkd":
        return _div("js_divergence", lt, ls, y, beta=cfg.gkd_beta)
    if name == "distillm":
        return _div(cfg.distillm_loss, lt, ls, y, alpha=cfg.skew_alpha)
    if name == "minillm":
        return _minillm(d, plan, lt, ls, y)
    # MGSR and its ablations: CE on the ground truth + token term and span term on the step's sequences
    lg, yg = _logits(d.student, plan.gt)
    m = y != IGNORE
    if cfg.token_loss == "dac_kl":
        tt = torch.tensor(lt[m])
        with torch.no_grad():
            up, lo = d.dac.bounds(tt.float())
        tok = ref_dac.dac_kl(lt[m], ls[m], up.double().numpy(), lo.double().numpy(), **d.dac.cfg).mean()
    else:
        params = {
            k: v for k, v in (("alpha", cfg.skew_alpha), ("beta", 0.5)) if k in R.PARAMS[cfg.token_loss]
        }
        tok = _div(cfg.token_loss, lt, ls, y, **params)
    loss = cfg.w_sft * _ce(lg, yg) + cfg.w_token * tok
    if cfg.w_span:
        dist = np.concatenate(
            [pair_distances(lt[b], ls[b], response_spans(y[b], cfg.span_mode)) for b in range(len(y))]
        )
        assert len(dist) > 1
        loss += cfg.w_span * dist.mean()
    return loss


def _minillm(d, plan, lt, ls, y):
    """MiniLLM's objective from scratch: rewards, clipped importance weights, length-normalised returns and
    whitened advantages of the teacher-mixed samples (their log p_mix from the rollout)."""
    m = y != IGNORE
    lq, lp = _log_softmax(ls), _log_softmax(lt)
    yy = np.where(m, y, 0)[..., None]
    lq_y, lp_y = np.take_along_axis(lq, yy, -1)[..., 0], np.take_along_axis(lp, yy, -1)[..., 0]
    total, n, rets, cells = 0.0, m.sum(), [], []
    for b in range(len(y)):
        pos = np.nonzero(m[b])[0]
        mix = np.array(plan.extra["mix_logp"][b][: len(pos)])
        r = lp_y[b, pos] - lq_y[b, pos]
        w = np.minimum(np.exp(lq_y[b, pos] - mix), d.cfg.minillm_w_max)
        ret = np.array([r[i + 1 :].mean() if i + 1 < len(r) else 0.0 for i in range(len(r))])
        rets.append(ret)
        cells.append((b, pos, w))
    mean_ret = np.concatenate(rets).sum() / n
    for (b, pos, w), ret in zip(cells, rets, strict=True):
        q = np.exp(lq[b, pos])
        rkl = (q * (lq[b, pos] - lp[b, pos])).sum(-1)  # KL(q_t || p_t)
        total += (w * rkl).sum() - (w * (ret - mean_ret) * lq_y[b, pos]).sum()
    return total / n


METHOD_NAMES = sorted(set(METHODS) - {"mgsr-scrg0", "mgsr-scrg1", "mgsr-forward_kl", "mgsr-scrg5"})


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_loss_by_hand_on_every_batch_source(method, examples):
    d, plans = _plans(method, examples)
    seen = set()
    assert d.fused  # both paths: the losses from the hidden states chunk by chunk, and on materialised logits
    for source, plan in plans:
        seen.add(plan.source)
        want = _expected(d, plan)
        for fused in (True, False):
            d.fused = fused
            loss, _ = d.objective(plan)
            assert_close(loss.detach(), want, dtype=torch.float32, name=f"{method} on {source} fused={fused}")
    adaptive = method.startswith("mgsr") or method == "distillm"
    assert not adaptive or seen == {"gt", "fresh", "replay"}, seen


def test_the_sources_differ_from_the_ground_truth(examples):
    # the check above means something only if the step's sequences are not the ground truth
    d, plans = _plans("mgsr", examples)
    for source, plan in plans[1:]:
        assert plan.seqs is not None and plan.seqs != plan.gt, source
        lens = [len(i) for i, _ in plan.seqs]
        assert lens != [len(i) for i, _ in plan.gt], source


def test_replay_draws_distinct_items_uniformly(examples):
    t, s = _models()
    d = distill.Distiller(distill.DistillConfig(method="distillm", **{**TINY, "capacity": 9}), t, s)
    d.buffer.extend(((i,), (i,)) for i in range(9))  # nine recognisable sequences
    d.threshold = 1.0
    counts = collections.Counter()
    for step in range(200):
        plan = d.plan(d.cfg.steps, examples)  # the last step: replay whenever r < 1
        assert plan.source == "replay"
        drawn = [seq[0][0] for seq in plan.seqs]
        assert len(drawn) == len(set(drawn)) == len(examples)  # without replacement, one per example
        counts.update(drawn)
        d.cfg = distill.resolve(
            distill.DistillConfig(method="distillm", **{**TINY, "capacity": 9, "seed": step})
        )
    freq = np.array([counts[i] for i in range(9)]) / (200 * len(examples))
    assert np.all(np.abs(freq - 1 / 9) < 0.04), freq  # each item about 1/9 of the draws (binomial sd ~0.01)
