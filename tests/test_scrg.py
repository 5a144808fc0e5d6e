"""SCRG: the NumPy oracle (reference/scrg.py) by its definition, and fast/scrg.py against it.

Exact token equality of fast vs oracle holds for ``teacher_token="argmax"``, ``decode="greedy"`` with float64
models. Test inputs avoid contexts made of one repeated token (e.g. prompt ``[a]`` + response
``[a, a, ...]``): there every position has the same hidden state, so the KL values tie *mathematically* and
rounding, not the lowest-index rule, decides (documented in both modules). Bitwise ties are tested separately
(table models).
"""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from fast import scrg as F
from fast.training.lm import lm_logits, positions
from fast.training.sampling import sample_next
from reference import gpt as rgpt
from reference import scrg as R
from tiny_models.gpt import BOS, EOS, GPT, GPTConfig
from tiny_models.model_io import load_model
from tiny_models.tasks import build_dataset, prompt_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = dict(teacher_token="argmax", decode="greedy")


# ------------------------------------------------------------------------------------------------
# models: random tiny GPTs (torch, float64) and their NumPy-oracle callables; position-scaled tables


@functools.lru_cache(maxsize=None)
def gpt_pair(seed, V):  # -> (teacher, student) float64 GPTs with peaked, context-dependent outputs
    out = []
    for k, (n_layer, n_embd, n_head) in enumerate(((2, 16, 2), (1, 8, 1))):
        torch.manual_seed(1000 * seed + k)
        m = GPT(GPTConfig(vocab_size=V, n_layer=n_layer, n_embd=n_embd, n_head=n_head)).double().eval()
        with torch.no_grad():  # the default init (std 0.02) is nearly uniform; make the models opinionated
            for name, p in m.named_parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 1.0 if name == "wte.weight" else p.shape[1] ** -0.5)
                else:
                    p.add_(0.1 * torch.randn_like(p))
        out.append(m)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def oracle_fn(m):  # GPT -> f(tokens) -> [V] via reference/gpt.py
    params = {k: v.detach().cpu().double().numpy() for k, v in m.state_dict().items()}
    kw = rgpt.config_kwargs(m.cfg)
    return lambda ids: rgpt.gpt(ids, params, **kw)[-1]


class Table(torch.nn.Module):
    """Logits ``W[last token] * (1 + alpha * position of the last token)``: a 'model' whose every number is
    known. ``alpha = 0`` makes equal last tokens give bitwise-equal distributions (ties)."""

    def __init__(self, W, alpha):
        super().__init__()
        self.W = torch.nn.Parameter(torch.tensor(W, dtype=torch.float64), requires_grad=False)
        self.alpha = alpha

    def forward(self, idx, pos=None, key_valid=None):  # [B, T] -> [B, T, V]
        pos = torch.arange(idx.shape[1]).expand_as(idx) if pos is None else pos
        return self.W[idx] * (1 + self.alpha * pos[..., None].double())

    def lm_logits(
        self, idx, valid, cache=None
    ):  # the protocol of fast.training.lm (no state: no cache needed)
        return self(idx, pos=positions(valid)[:, -idx.shape[1] :])

    def oracle(self, tokens):  # list[int] -> [V]
        return self.W.numpy()[tokens[-1]] * (1 + self.alpha * (len(tokens) - 1))


# hand-built tables over V = 4 (EOS = 3): rows = last token
W_TEACHER = [[0.0, 2.0, 0.5, -1.0], [0.5, 0.0, 2.5, 0.0], [1.5, 1.0, 0.0, 0.8], [0.0, 0.0, 0.0, 0.0]]
W_STUDENT = [[0.0, 1.0, 1.2, -0.5], [0.2, 1.5, 0.0, 0.0], [0.4, 2.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]]


def by_hand(prompt, response, teacher, student, max_new_tokens, eos):  # one round, argmax/greedy, Eq. 3-4
    """The definition, written out independently of reference/scrg.py: plain Python floats and math.log."""

    def dist(logits):
        z = [math.exp(x - max(logits)) for x in logits]
        return [x / sum(z) for x in z]

    def top(logits):  # lowest id among equal maxima
        return min(range(len(logits)), key=lambda v: (-logits[v], v))

    d, y_t = [], []
    for i in range(len(response)):
        lt, ls = list(teacher(prompt + response[:i])), list(student(prompt + response[:i]))
        p, q = dist(lt), dist(ls)
        d.append(sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q, strict=True) if pv > 0))
        y_t.append(top(lt))
    cands = [i for i in range(len(response)) if y_t[i] != response[i]]
    if not cands:
        return list(response), [], cands
    j = min(cands, key=lambda i: (-d[i], i))
    seq = response[:j] + [y_t[j]]
    while len(seq) < max_new_tokens and seq[-1] != eos:
        seq.append(top(list(student(prompt + seq))))
    return seq, [j], cands


# ------------------------------------------------------------------------------------------------
# the oracle by its definition


def test_hand_built_example_matches_the_definition():
    t, s = Table(W_TEACHER, 0.3), Table(W_STUDENT, 0.3)
    prompt, response = [0], [1, 2, 1, 2, 3]  # ends with EOS (3)
    want, want_pos, cands = by_hand(prompt, response, t.oracle, s.oracle, 8, 3)
    assert len(cands) >= 2 and want_pos[0] != cands[0]  # the KL argmax, not simply the first mismatch
    got = R.scrg(prompt, response, t.oracle, s.oracle, max_new_tokens=8, eos_id=3, **GREEDY)
    assert got == (want, want_pos)
    assert F.scrg([prompt], [response], t, s, max_new_tokens=8, eos_id=3, **GREEDY) == ([want], [want_pos])
    d, y_t = R.error_scores(prompt, response, t.oracle, s.oracle, teacher_token="argmax")
    fd, fy, fc = F.error_scores([prompt], [response], t, s)
    np.testing.assert_allclose(fd[0].numpy(), d, rtol=1e-12, atol=1e-14)
    assert fy[0].tolist() == y_t.tolist() and np.flatnonzero(fc[0].numpy()).tolist() == cands


def test_tie_goes_to_the_lowest_position():
    # alpha = 0: the distributions after positions with equal last tokens are bitwise equal, so are the d_i
    t, s = Table(W_TEACHER, 0.0), Table(W_STUDENT, 0.0)
    prompt, response = [0], [1, 0, 1, 0]  # positions 1 and 3 follow token 1 (d ties), 0 and 2 follow token 0
    d, y_t = R.error_scores(prompt, response, t.oracle, s.oracle, teacher_token="argmax")
    assert d[1] == d[3] and y_t[1] != response[1] and y_t[3] != response[3]
    assert d[1] == max(d[i] for i in range(4) if y_t[i] != response[i])  # the tie is at the maximum
    rev, pos = R.scrg(prompt, response, t.oracle, s.oracle, max_new_tokens=6, eos_id=3, **GREEDY)
    assert pos == [1]
    assert F.scrg([prompt], [response], t, s, max_new_tokens=6, eos_id=3, **GREEDY) == ([rev], [pos])


@pytest.mark.parametrize("ends_with_eos", [True, False])
def test_no_mismatch_returns_the_input(ends_with_eos):
    t, s = gpt_pair(3, 9)
    tf, sf = oracle_fn(t), oracle_fn(s)
    # the teacher's own greedy answer: its argmax agrees at every position. EOS := a new token it emits
    for prompt in ([4, 1, 7], [0, 8], [2, 5, 3, 6], [1, 0]):
        g = R.continue_response(tf, prompt, [], max_new_tokens=12, eos_id=-1, decode="greedy")
        k = next((k for k in range(2, 12) if g[k] not in g[:k]), None)
        if k is not None:
            break
    assert k is not None, "no prompt gave a usable greedy answer"
    eos = g[k]
    response, max_new = (g[: k + 1], 12) if ends_with_eos else (g[:k], k)  # stopped, or cut at the limit
    for fq in (1, 3):
        assert R.scrg(
            prompt, response, tf, sf, frequency=fq, max_new_tokens=max_new, eos_id=eos, **GREEDY
        ) == (response, [])
    got = F.scrg(
        [prompt, [5, 0]], [response, []], t, s, frequency=3, max_new_tokens=max_new, eos_id=eos, **GREEDY
    )
    assert got == ([response, []], [[], []])


def test_frequency_zero_is_the_identity():
    t, s = gpt_pair(0, 7)
    prompt, response = [1, 2], [3, 3, 4, 0]
    rng = np.random.default_rng(0)
    assert R.scrg(
        prompt, response, oracle_fn(t), oracle_fn(s), frequency=0, max_new_tokens=4, eos_id=0, rng=rng
    ) == (response, [])
    assert rng.random() == np.random.default_rng(0).random()  # nothing drawn
    g = torch.Generator().manual_seed(0)
    assert F.scrg([prompt], [response], t, s, frequency=0, max_new_tokens=4, eos_id=0, generator=g) == (
        [response],
        [[]],
    )


def _response(rng, V, eos, max_new_tokens):  # random tokens, EOS never inside, maybe EOS at the end
    n = int(rng.integers(0, max_new_tokens + 1))
    body = [int(x) for x in rng.choice([v for v in range(V) if v != eos], size=n)]
    return body[:-1] + [eos] if n and rng.random() < 0.5 else body


def _prompt(rng, V, n):  # n >= 2 tokens, the first two distinct: no context is one repeated token
    p = [int(x) for x in rng.integers(0, V, size=n)]
    p[1] = (p[0] + 1 + int(rng.integers(0, V - 1))) % V
    return p


@given(seed=st.integers(0, 10**6), frequency=st.integers(1, 4), greedy=st.booleans())
@example(seed=0, frequency=3, greedy=True)
@example(seed=1, frequency=1, greedy=False)
def test_oracle_properties(seed, frequency, greedy):
    rng = np.random.default_rng(seed)
    V = int(rng.integers(5, 12))
    t, s = gpt_pair(seed % 5, V)
    tf, sf = oracle_fn(t), oracle_fn(s)
    eos, max_new = int(rng.integers(0, V)), int(rng.integers(1, 10))
    prompt, response = _prompt(rng, V, int(rng.integers(2, 6))), _response(rng, V, eos, max_new)
    decode = "greedy" if greedy else "sample"
    rev, pos = R.scrg(
        prompt,
        response,
        tf,
        sf,
        frequency=frequency,
        teacher_token="argmax",
        decode=decode,
        max_new_tokens=max_new,
        eos_id=eos,
        rng=rng,
    )
    assert len(pos) <= frequency and all(a < b for a, b in zip(pos, pos[1:], strict=False))
    assert len(rev) <= max_new and eos not in rev[:-1]
    if not pos:
        assert rev == response
        return
    j = pos[0]
    assert rev[:j] == response[:j] and rev[j] != response[j]
    for j in pos:  # later rounds only touch later positions, so rev[:j] is the context the correction saw
        assert rev[j] == int(np.argmax(tf(prompt + rev[:j])))
    assert len(rev) == max_new or rev[-1] == eos  # re-generated to the end
    if greedy:  # after the last correction the suffix is the student's greedy continuation
        assert rev == R.continue_response(
            sf, prompt, rev[: pos[-1] + 1], max_new_tokens=max_new, eos_id=eos, decode="greedy"
        )


def test_reference_sampler_is_tiny_gpt_sample_next():
    logits = np.random.default_rng(0).normal(size=(40, 13)) * 3
    for temperature in (1.0, 0.7):
        g, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        want = sample_next(torch.tensor(logits), temperature=temperature, generator=g).tolist()
        u = torch.rand(40, 1, generator=g2, dtype=torch.float64).flatten().tolist()
        assert [R.sample_token(row, ui, temperature) for row, ui in zip(logits, u, strict=True)] == want


# ------------------------------------------------------------------------------------------------
# fast vs oracle


def _batch(seed, B, V, eos, max_new, teacher_row):  # prompts of different lengths, one teacher-agreeing row
    rng = np.random.default_rng(seed)
    prompts = [_prompt(rng, V, int(rng.integers(2, 7))) for _ in range(B)]
    responses = [_response(rng, V, eos, max_new) for _ in range(B)]
    if teacher_row:
        tf = oracle_fn(gpt_pair(seed % 5, V)[0])
        responses[-1] = R.continue_response(
            tf, prompts[-1], [], max_new_tokens=max_new, eos_id=eos, decode="greedy"
        )
    return prompts, responses


@given(
    seed=st.integers(0, 10**6),
    B=st.integers(1, 4),
    V=st.integers(5, 12),
    max_new=st.integers(1, 9),
    frequency=st.sampled_from([1, 2, 3]),
    teacher_row=st.booleans(),
)
@example(seed=0, B=3, V=9, max_new=8, frequency=3, teacher_row=True)
@example(seed=7, B=1, V=5, max_new=1, frequency=1, teacher_row=False)
@example(seed=11, B=4, V=11, max_new=9, frequency=1, teacher_row=False)
def test_fast_equals_oracle_greedy(seed, B, V, max_new, frequency, teacher_row):
    t, s = gpt_pair(seed % 5, V)
    eos = seed % V
    prompts, responses = _batch(seed, B, V, eos, max_new, teacher_row)
    want = [
        R.scrg(
            p,
            r,
            oracle_fn(t),
            oracle_fn(s),
            frequency=frequency,
            max_new_tokens=max_new,
            eos_id=eos,
            **GREEDY,
        )
        for p, r in zip(prompts, responses, strict=True)
    ]
    got = F.scrg(prompts, responses, t, s, frequency=frequency, max_new_tokens=max_new, eos_id=eos, **GREEDY)
    assert got == ([w[0] for w in want], [w[1] for w in want])
    if teacher_row:
        assert got[0][-1] == responses[-1] and got[1][-1] == []


def test_fast_equals_oracle_frequency_1_and_3_variety():
    # a fixed batch that covers: EOS-ended and cut responses, an empty response, a row with no correction,
    # re-generation that hits max_new_tokens, one that ends with EOS, and several corrections per row
    seen = dict(eos_end=False, cut=False, multi=False, none=False)
    for seed in range(6):
        t, s = gpt_pair(seed % 5, 9)
        prompts, responses = _batch(100 + seed, 5, 9, 4, 8, True)
        responses[0] = []
        for fq in (1, 3):
            want = [
                R.scrg(p, r, oracle_fn(t), oracle_fn(s), frequency=fq, max_new_tokens=8, eos_id=4, **GREEDY)
                for p, r in zip(prompts, responses, strict=True)
            ]
            got = F.scrg(prompts, responses, t, s, frequency=fq, max_new_tokens=8, eos_id=4, **GREEDY)
            assert got == ([w[0] for w in want], [w[1] for w in want])
            for rev, pos in zip(*got, strict=True):
                seen["none"] |= not pos
                seen["multi"] |= len(pos) > 1
                seen["eos_end"] |= bool(pos) and rev[-1] == 4
                seen["cut"] |= bool(pos) and len(rev) == 8 and rev[-1] != 4
    assert all(seen.values()), seen


def test_corrected_token_is_eos_ends_the_response():
    V = 8
    for seed in range(40):  # find a correction whose teacher token can be made the EOS id, then do so
        t, s = gpt_pair(seed % 5, V)
        rng = np.random.default_rng(seed)
        prompt, response = _prompt(rng, V, 3), [int(x) for x in rng.integers(0, V - 1, size=6)]
        rev, pos = R.scrg(
            prompt, response, oracle_fn(t), oracle_fn(s), max_new_tokens=8, eos_id=V - 1, **GREEDY
        )
        if not pos or rev[pos[0]] in response[: pos[0]]:
            continue
        j, y = pos[0], rev[pos[0]]
        cut = response[: j + 1]  # positions <= j keep their d and teacher token (causal): j stays the argmax
        want = R.scrg(prompt, cut, oracle_fn(t), oracle_fn(s), max_new_tokens=8, eos_id=y, **GREEDY)
        assert want == (response[:j] + [y], [j])  # EOS put at j ends the response: nothing re-generated
        assert F.scrg([prompt], [cut], t, s, max_new_tokens=8, eos_id=y, **GREEDY) == ([want[0]], [want[1]])
        return
    pytest.fail("no seed gave a usable case")


def test_no_cache_path_and_foreign_model_equal_the_cache_path():
    t, s = gpt_pair(2, 10)
    prompts, responses = _batch(5, 4, 10, 3, 9, False)
    kw = dict(frequency=3, max_new_tokens=9, eos_id=3, **GREEDY)
    a = F.scrg(prompts, responses, t, s, **kw)
    b = F.scrg(prompts, responses, t, s, logits_fn=lm_logits, **kw)

    class Wrapped(torch.nn.Module):  # not a tiny GPT: reached only through logits_fn
        def __init__(self, m):
            super().__init__()
            self.m = m

    fn = lambda w, idx, valid: lm_logits(w.m, idx, valid)
    c = F.scrg(prompts, responses, Wrapped(t), Wrapped(s), logits_fn=fn, **kw)
    assert a == b == c


def test_low_temperature_sampling_is_argmax():
    # the sampling path (uniform draws, inverse CDF) at temperature 1e-6 picks the argmax token
    t, s = gpt_pair(1, 9)
    prompts, responses = _batch(3, 3, 9, 2, 7, False)
    want = F.scrg(prompts, responses, t, s, frequency=2, max_new_tokens=7, eos_id=2, **GREEDY)
    got = F.scrg(
        prompts,
        responses,
        t,
        s,
        frequency=2,
        max_new_tokens=7,
        eos_id=2,
        temperature=1e-6,
        generator=torch.Generator().manual_seed(0),
    )
    assert got == want


class _TorchUniforms:  # an rng for the oracle that replays a torch.Generator's uniform stream
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def random(self):
        return float(torch.rand(1, 1, generator=self.g, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_single_row_follows_the_documented_draw_order(seed):
    # with one row the fast draw order is the oracle's: fed the same uniforms, they agree token for token
    t, s = gpt_pair(seed, 9)
    prompts, responses = _batch(seed, 1, 9, 5, 9, False)
    want = R.scrg(
        prompts[0],
        responses[0],
        oracle_fn(t),
        oracle_fn(s),
        frequency=3,
        max_new_tokens=9,
        eos_id=5,
        rng=_TorchUniforms(seed),
    )
    got = F.scrg(
        prompts,
        responses,
        t,
        s,
        frequency=3,
        max_new_tokens=9,
        eos_id=5,
        generator=torch.Generator().manual_seed(seed),
    )
    assert got == ([want[0]], [want[1]])


def test_sampling_is_deterministic_given_the_generator():
    t, s = gpt_pair(4, 11)
    prompts, responses = _batch(9, 5, 11, 0, 9, False)
    run = lambda k: F.scrg(
        prompts,
        responses,
        t,
        s,
        frequency=3,
        max_new_tokens=9,
        eos_id=0,
        generator=torch.Generator().manual_seed(k),
    )
    first = run(0)
    assert run(0) == first
    assert any(run(k) != first for k in (1, 2, 3))
    g = torch.Generator().manual_seed(0)
    F.scrg(prompts, responses, t, s, max_new_tokens=9, eos_id=0, generator=g)
    assert not torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # it drew


def test_models_keep_their_mode_and_get_no_graph():
    t, s = gpt_pair(0, 6)
    t.train()
    try:
        rev, _ = F.scrg([[1, 2]], [[3, 4]], t, s, max_new_tokens=4, eos_id=0, **GREEDY)
        assert t.training and not s.training
        d, _, _ = F.error_scores([[1, 2]], [[3, 4]], t, s)
        assert not d.requires_grad
    finally:
        t.eval()


# ------------------------------------------------------------------------------------------------
# the committed checkpoints (float64 so that fast and oracle agree to rounding)


@pytest.fixture(scope="module")
def checkpoints():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "tiny_models" / "checkpoints"
    teacher, _ = load_model(str(root / "teacher.safetensors"), dtype=torch.float64)
    student, _ = load_model(str(root / "student.safetensors"), dtype=torch.float64)
    exs = build_dataset(0, n_per_family=40, n_eval_per_family=2)["test"]
    prompts = [prompt_ids(e.prompt) for e in exs]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    prompts = [prompts[order[0]], prompts[order[len(order) // 2]], prompts[order[-1]]]  # 3 lengths
    return teacher, student, prompts


@pytest.mark.parametrize("frequency", [1, 3])
def test_checkpoints_fast_equals_oracle(checkpoints, frequency):
    teacher, student, prompts = checkpoints
    assert len({len(p) for p in prompts}) == 3 and all(p[0] == BOS for p in prompts)
    max_new = 20
    responses = F.continue_responses(
        student,
        prompts,
        [[], [], []],
        max_new_tokens=max_new,
        eos_id=EOS,
        generator=torch.Generator().manual_seed(1),
    )
    responses[2] = responses[2][:7]  # a shorter, cut response too
    tf, sf = oracle_fn(teacher), oracle_fn(student)
    want = [
        R.scrg(p, r, tf, sf, frequency=frequency, max_new_tokens=max_new, eos_id=EOS, **GREEDY)
        for p, r in zip(prompts, responses, strict=True)
    ]
    got = F.scrg(
        prompts,
        responses,
        teacher,
        student,
        frequency=frequency,
        max_new_tokens=max_new,
        eos_id=EOS,
        **GREEDY,
    )
    assert got == ([w[0] for w in want], [w[1] for w in want])
    assert any(got[1])  # at least one row was corrected


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises_value_error():
    t, s = gpt_pair(0, 7)
    g = torch.Generator().manual_seed(0)
    ok = dict(max_new_tokens=4, eos_id=0, generator=g)
    cases = [
        (([[]], [[1]], t, s), ok, "at least one token"),
        (([[1]], [[1], [2]], t, s), ok, "one response per prompt"),
        (([], [], t, s), ok, "one response per prompt"),
        (([[1, 2]], [[1]], t, gpt_pair(0, 8)[1]), ok, "vocabulary mismatch"),
        (([[1, 2]], [[1]], t, s), {**ok, "frequency": -1}, "frequency"),
        (([[1, 2]], [[1]], t, s), {**ok, "frequency": 1.5}, "frequency"),
        (([[1, 2]], [[1]], t, s), {**ok, "frequency": True}, "frequency"),
        (([[1, 2]], [[1]], t, s), {**ok, "teacher_token": "top1"}, "teacher_token"),
        (([[1, 2]], [[1]], t, s), {**ok, "decode": "beam"}, "decode"),
        (([[1, 2]], [[1]], t, s), {**ok, "generator": None}, "torch.Generator"),
        (([[1, 2]], [[1]], t, s), {**ok, "generator": None, "decode": "greedy"}, "torch.Generator"),
        (([[1, 2]], [[1]], t, s), {**ok, "temperature": 0.0}, "temperature"),
        (([[1, 2]], [[1]], t, s), {**ok, "max_new_tokens": 0}, "max_new_tokens"),
        (([[1, 2]], [[1, 2, 3, 4, 5]], t, s), ok, "more than max_new_tokens"),
        (([[1, 2]], [[0, 1]], t, s), ok, "last token"),
        (([[1, 9]], [[1]], t, s), ok, "outside"),
        (([[1, 2]], [[1, -1]], t, s), ok, "outside"),
        (([[1, 2]], [[1]], t, s), {**ok, "eos_id": 7}, "outside"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            F.scrg(*args, **kw)
    # the oracle rejects the same things
    tf, sf = oracle_fn(t), oracle_fn(s)
    rng = np.random.default_rng(0)
    ref_ok = dict(max_new_tokens=4, eos_id=0, rng=rng)
    ref_cases = [
        (([], [1], tf, sf), ref_ok, "at least one token"),
        (([1, 2], [1], tf, oracle_fn(gpt_pair(0, 8)[1])), ref_ok, "vocabulary mismatch"),
        (([1, 2], [1], tf, sf), {**ref_ok, "frequency": -1}, "frequency"),
        (([1, 2], [1], tf, sf), {**ref_ok, "teacher_token": "top1"}, "teacher_token"),
        (([1, 2], [1], tf, sf), {**ref_ok, "decode": "beam"}, "decode"),
        (([1, 2], [1], tf, sf), {**ref_ok, "rng": None}, "rng"),
        (([1, 2], [1], tf, sf), {**ref_ok, "max_new_tokens": 0}, "max_new_tokens"),
        (([1, 2], [1, 2, 3, 4, 5], tf, sf), ref_ok, "more than max_new_tokens"),
        (([1, 2], [0, 1], tf, sf), ref_ok, "last response token"),
        (([1, 9], [1], tf, sf), ref_ok, "outside"),
        (([1, 2], [1], lambda ids: np.ones((2, 7)), sf), ref_ok, "shape"),
        (([1, 2], [1], lambda ids: np.full(7, np.nan), sf), ref_ok, "NaN"),
    ]
    for args, kw, msg in ref_cases:
        with pytest.raises(ValueError, match=msg):
            R.scrg(*args, **kw)
