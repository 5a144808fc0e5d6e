"""Recall task generators (tiny_models/recall.py): determinism, layout, value ranges, errors, and a
hand-written lookup oracle that solves every task (100 %), so every label is answerable from the context."""

import re

import pytest
import torch

from tiny_models.recall import (
    FILLER,
    IGNORE,
    fact_text,
    key_distance,
    mad_fuzzy_recall,
    mad_in_context_recall,
    mad_noisy_recall,
    mad_recall,
    mqar,
    recall_accuracy,
    shakespeare_recall,
)

TEXT = "Now is the winter of our discontent made glorious summer by this sun of York; " * 20

GENERATORS = {
    "mqar": lambda n, seed: mqar(n, seq_len=66, num_kv_pairs=5, vocab_size=40, seed=seed),
    "mqar_random_filler": lambda n, seed: mqar(
        n, seq_len=66, num_kv_pairs=5, vocab_size=40, seed=seed, random_filler=True
    ),
    "mad_in_context": lambda n, seed: mad_in_context_recall(n, seed=seed, seq_len=38),
    "mad_noisy": lambda n, seed: mad_noisy_recall(n, seed=seed, seq_len=38),
    "mad_fuzzy": lambda n, seed: mad_fuzzy_recall(n, seed=seed, seq_len=41),
    "mad_fuzzy_train": lambda n, seed: mad_fuzzy_recall(n, seed=seed, seq_len=41, test=False),
    "shakespeare": lambda n, seed: shakespeare_recall(n, seq_len=90, num_facts=3, seed=seed, text=TEXT),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_deterministic_by_seed_and_shapes(name):
    gen = GENERATORS[name]
    x1, y1 = gen(7, 3)
    x2, y2 = gen(7, 3)
    x3, _ = gen(7, 4)
    assert x1.dtype == y1.dtype == torch.long
    assert x1.shape == y1.shape and x1.shape[0] == 7
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert bool((y1 != IGNORE).any(dim=1).all()), "every example needs a labelled position"


# ----------------------------------------------------------------------------------------------------
# oracles: lookups written from the task definitions


def mqar_oracle(x, y, num_kv_pairs):
    pred = torch.full_like(y, IGNORE)
    for b in range(len(x)):
        ctx = {int(x[b, 2 * i]): int(x[b, 2 * i + 1]) for i in range(num_kv_pairs)}
        for t in torch.nonzero(y[b] != IGNORE).flatten().tolist():
            pred[b, t] = ctx[int(x[b, t])]
    return pred


def mad_oracle(x, y, *, m, k_motif_size):
    """Parse the stream into key runs (< m) and value runs (m .. 2m-1); predict from the map built so far."""
    pred = torch.full_like(y, IGNORE)
    for b in range(len(x)):
        kv: dict[tuple, tuple] = {}
        key: list[int] = []
        val: list[int] = []
        cur_key = None
        for t, tok in enumerate(x[b].tolist()):
            if tok < m:  # key token
                if val and cur_key is not None:
                    kv.setdefault(cur_key, tuple(val))
                key = key + [tok] if not val else [tok]
                val = []
                cur_key = tuple(key)
                if len(key) == k_motif_size and cur_key in kv:
                    pred[b, t] = kv[cur_key][0]
            elif tok < 2 * m:  # value token
                val.append(tok)
                if cur_key in kv and len(val) < len(kv[cur_key]):
                    pred[b, t] = kv[cur_key][len(val)]
            else:  # noise or pad: ends the current pair
                if val and cur_key is not None:
                    kv.setdefault(cur_key, tuple(val))
                key, val, cur_key = [], [], None
    return pred


def shakespeare_oracle(x, y, link=" is "):
    pred = torch.full_like(y, IGNORE)
    for b in range(len(x)):
        s = bytes(x[b].tolist()).decode("latin-1")
        first: dict[str, str] = {}
        for mt in re.finditer(r" ([B-Z]{3})" + re.escape(link) + r"(\d{3})\.", s):
            k, v = mt.group(1), mt.group(2)
            if k in first:  # a query: the digits are predicted from the planted fact
                for d in range(3):
                    pred[b, mt.start(2) - 1 + d] = ord(first[k][d])
            else:
                first[k] = v
    return pred


def _check_oracle(pred, y):
    mask = y != IGNORE
    assert torch.equal(pred != IGNORE, mask), "the oracle must answer exactly the labelled positions"
    assert torch.equal(pred[mask], y[mask])
    logits = torch.nn.functional.one_hot(pred.clamp_min(0), int(y.max()) + 1).float()
    assert recall_accuracy(logits, y) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("random_filler", [False, True])
def test_mqar_oracle_layout_and_ranges(seed, random_filler):
    P, T, V = 5, 66, 40
    x, y = mqar(64, seq_len=T, num_kv_pairs=P, vocab_size=V, seed=seed, random_filler=random_filler)
    _check_oracle(mqar_oracle(x, y, P), y)
    keys, values = x[:, 0 : 2 * P : 2], x[:, 1 : 2 * P : 2]
    assert bool(((keys >= 1) & (keys < V // 2)).all()) and bool(((values >= V // 2) & (values < V)).all())
    for b in range(len(x)):
        assert len(set(keys[b].tolist())) == P and len(set(values[b].tolist())) == P
    mask = y != IGNORE
    assert bool((mask[:, : 2 * P] == 0).all())
    assert torch.equal(mask.sum(1), torch.full((len(x),), P))
    q = torch.nonzero(mask)
    assert bool(((q[:, 1] - 2 * P) % 2 == 0).all()), "queries sit at even offsets of the query region"
    # each key is queried exactly once
    for b in range(len(x)):
        assert sorted(x[b][mask[b]].tolist()) == sorted(keys[b].tolist())
    if not random_filler:
        region = x[:, 2 * P :].clone()
        region[mask[:, 2 * P :]] = FILLER
        assert bool((region == FILLER).all()), "zero filler: the query region holds only queries and 0"
    else:
        assert bool(((x >= 0) & (x < V)).all())


def test_mqar_power_law_favours_early_queries():
    x, y = mqar(400, seq_len=200, num_kv_pairs=4, vocab_size=64, seed=0)
    xu, yu = mqar(400, seq_len=200, num_kv_pairs=4, vocab_size=64, seed=0, power_a=1.0)
    first = torch.nonzero(y != IGNORE)[:, 1].float().mean()
    uniform = torch.nonzero(yu != IGNORE)[:, 1].float().mean()
    assert first < uniform - 20  # a = 0.01 concentrates the gaps near 0; a = 1 is uniform (mean ~ 104)


def test_key_distance_hand_example():
    x = torch.tensor([[3, 9, 4, 8, 0, 4, 0, 3]])
    y = torch.tensor([[IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 8, IGNORE, 9]])
    assert key_distance(x, y).tolist() == [[-1, -1, -1, -1, -1, 3, -1, 7]]
    with pytest.raises(ValueError):
        key_distance(x, y[:, :4])


@pytest.mark.parametrize("seed", [0, 5])
def test_mad_in_context_and_noisy_oracle(seed):
    x, y = mad_in_context_recall(32, seed=seed, seq_len=64)
    assert x.shape == (32, 64)
    _check_oracle(mad_oracle(x, y, m=8, k_motif_size=1), y)
    assert bool(((x >= 0) & (x < 16)).all())
    lab = y[y != IGNORE]
    assert bool(((lab >= 8) & (lab < 16)).all()), "labels are values"
    xn, yn = mad_noisy_recall(32, seed=seed, seq_len=64)
    _check_oracle(mad_oracle(xn, yn, m=8, k_motif_size=1), yn)
    assert bool((xn >= 16).any()), "noise tokens (16..31) appear"
    lab = yn[yn != IGNORE]
    assert bool(((lab >= 8) & (lab < 16)).all())


@pytest.mark.parametrize("seed", [0, 5])
def test_mad_fuzzy_oracle(seed):
    x, y = mad_fuzzy_recall(32, seed=seed, seq_len=64)  # test mode: keys always 3 tokens
    assert x.shape == (32, 64)
    _check_oracle(mad_oracle(x, y, m=7, k_motif_size=3), y)
    lab = y[y != IGNORE]
    assert bool(((lab >= 7) & (lab < 14)).all())


def test_mad_fuzzy_many_examples_fit_seq_len():
    # a repeated key brings its own value motif size, not the freshly drawn one: every example must still fit
    for test in (True, False):
        x, y = mad_fuzzy_recall(300, seed=2, seq_len=50, test=test)
        assert x.shape == y.shape == (300, 50)


def test_mad_lm_targets_are_shifted_inputs():
    x, y = mad_fuzzy_recall(4, seed=1, seq_len=40, targets="lm", test=False)
    pad = 15
    real = (x[:, 1:] != pad) & (x[:, :-1] != pad)
    assert torch.equal(y[:, :-1][real], x[:, 1:][real])
    assert bool((y[x == pad] == IGNORE).all())
    x, y = mad_in_context_recall(4, seed=1, seq_len=40, targets="lm")
    assert torch.equal(y[:, :-1], x[:, 1:]) and bool((y[:, -1] == IGNORE).all())
    x_r, y_r = shakespeare_recall(3, seq_len=90, num_facts=3, seed=2, text=TEXT)
    x, y = shakespeare_recall(3, seq_len=90, num_facts=3, seed=2, text=TEXT, targets="lm")
    assert torch.equal(x, x_r)  # the same examples, every next byte labelled
    assert torch.equal(y[:, :-1], x[:, 1:]) and bool((y[:, -1] == IGNORE).all())
    assert torch.equal(y[y_r != IGNORE], y_r[y_r != IGNORE])


@pytest.mark.parametrize("seed,link", [(0, " is "), (1, " is "), (2, "="), (3, ": ")])
def test_shakespeare_oracle_and_bytes(seed, link):
    x, y = shakespeare_recall(16, seq_len=120, num_facts=3, seed=seed, text=TEXT, min_distance=30, link=link)
    assert x.shape == (16, 120)
    assert bool(((x >= 0) & (x < 256)).all())
    _check_oracle(shakespeare_oracle(x, y, link), y)
    assert torch.equal((y != IGNORE).sum(1), torch.full((16,), 9))
    lab = y[y != IGNORE]
    assert bool(((lab >= ord("0")) & (lab <= ord("9"))).all())
    flen = len(fact_text("AAA", "000", link))
    # every planted fact is at least min_distance bytes before the first query
    for b in range(16):
        s = bytes(x[b].tolist()).decode("latin-1")
        starts = [m.start() for m in re.finditer(r" [B-Z]{3}" + re.escape(link) + r"\d{3}\.", s)]
        assert len(starts) == 6
        assert starts[2] + flen + 30 <= starts[3]


@pytest.mark.parametrize("num_queries", [1, 2])
def test_shakespeare_fewer_queries_than_facts(num_queries):
    x, y = shakespeare_recall(12, seq_len=120, num_facts=3, num_queries=num_queries, seed=5, text=TEXT)
    _check_oracle(shakespeare_oracle(x, y), y)  # every query asks a planted fact
    assert torch.equal((y != IGNORE).sum(1), torch.full((12,), 3 * num_queries))
    asked = set()
    for b in range(12):
        s = bytes(x[b].tolist()).decode("latin-1")
        keys = re.findall(r" ([B-Z]{3}) is \d{3}\.", s)
        assert len(keys) == 3 + num_queries and len(set(keys[3:])) == num_queries  # distinct queried facts
        assert set(keys[3:]) <= set(keys[:3])
        asked.add(keys[:3].index(keys[3]))
    assert len(asked) > 1  # which fact is asked varies
    # the default queries every fact (num_queries = num_facts)
    x_all, y_all = shakespeare_recall(4, seq_len=120, num_facts=3, seed=5, text=TEXT)
    x_def, y_def = shakespeare_recall(4, seq_len=120, num_facts=3, num_queries=3, seed=5, text=TEXT)
    assert torch.equal(x_all, x_def) and torch.equal(y_all, y_def)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="even"):
        mqar(2, seq_len=63, num_kv_pairs=4, vocab_size=64, seed=0)
    with pytest.raises(ValueError, match="4 \\* num_kv_pairs"):
        mqar(2, seq_len=30, num_kv_pairs=8, vocab_size=64, seed=0)
    with pytest.raises(ValueError, match="too many"):
        mqar(2, seq_len=128, num_kv_pairs=8, vocab_size=16, seed=0)
    with pytest.raises(ValueError, match="power_a"):
        mqar(2, seq_len=64, num_kv_pairs=4, vocab_size=64, seed=0, power_a=0.0)
    with pytest.raises(ValueError, match="n must"):
        mqar(0, seq_len=64, num_kv_pairs=4, vocab_size=64, seed=0)
    with pytest.raises(ValueError, match="frac_noise"):
        mad_recall(2, seed=0, frac_noise=1.0, noise_vocab_size=4, vocab_size=20)
    with pytest.raises(ValueError, match="noise_vocab_size > 0"):
        mad_recall(2, seed=0, frac_noise=0.2)
    with pytest.raises(ValueError, match="targets"):
        mad_recall(2, seed=0, targets="all")
    with pytest.raises(ValueError, match="leaves"):
        mad_recall(2, seed=0, vocab_size=4, k_motif_size=3)
    with pytest.raises(ValueError, match="too short"):
        shakespeare_recall(2, seq_len=40, num_facts=3, seed=0, text=TEXT)
    with pytest.raises(ValueError, match="targets"):
        shakespeare_recall(2, seq_len=90, seed=0, text=TEXT, targets="all")
    with pytest.raises(ValueError, match="num_queries=3 exceeds num_facts=2"):
        shakespeare_recall(2, seq_len=90, num_facts=2, num_queries=3, seed=0, text=TEXT)
    for link in ("", " 1 ", " K ", "\n"):
        with pytest.raises(ValueError, match="link"):
            shakespeare_recall(2, seq_len=90, seed=0, text=TEXT, link=link)
    with pytest.raises(ValueError, match="disagree"):
        recall_accuracy(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))
