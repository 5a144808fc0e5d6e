"""The task generators' documented statistics, checked by value over many seeded draws.

* ``tiny_models/recall.py``: MQAR's vocabularies, pairing, one query per key at an even offset and its gap
  distribution against the analytic one for several ``power_a`` (one pair: the power law itself; two pairs:
  the without-replacement inclusion probabilities); MAD's vocabularies, noise rate, noise tokens and motif
  sizes; Shakespeare recall's facts, queries, link and ``min_distance``.
* ``tiny_models/tasks.py``: the hash split recomputed, per-family caps, held-out templates and families.
* ``tiny_models/train.py``: the language-modelling text split (training windows never reach the validation
  text).

Tolerances are stated next to each check: about five standard errors of the empirical statistic.
"""

import collections
import itertools
import math
import random
import re
import zlib

import numpy as np
import pytest
import torch

from tiny_models import tasks
from tiny_models import train as train_mod
from tiny_models.recall import (
    FILLER,
    IGNORE,
    mad_fuzzy_recall,
    mad_in_context_recall,
    mad_noisy_recall,
    mad_recall,
    mqar,
    shakespeare_recall,
)

# ----------------------------------------------------------------------------------------------------
# MQAR


def _gap_law(space: int, a: float) -> np.ndarray:
    """p(g) ∝ a x^(a - 1) at x = g + 1, g = 0 .. space - 1 (the docstring's law)."""
    x = np.arange(1, space + 1, dtype=np.float64)
    w = a * x ** (a - 1)
    return w / w.sum()


def test_mqar_vocabularies_pairing_and_queries():
    V, P, T, n = 16, 3, 40, 400
    x, y = mqar(n, seq_len=T, num_kv_pairs=P, vocab_size=V, seed=11)
    keys, values = x[:, 0 : 2 * P : 2], x[:, 1 : 2 * P : 2]
    # the documented ranges, and every token of them is used somewhere in 400 examples
    assert set(keys.unique().tolist()) == set(range(1, V // 2))
    assert set(values.unique().tolist()) == set(range(V // 2, V))
    for b in range(n):
        assert len(set(keys[b].tolist())) == P and len(set(values[b].tolist())) == P
        pos = torch.nonzero(y[b] != IGNORE).flatten().tolist()
        assert len(pos) == P and all(t >= 2 * P and (t - 2 * P) % 2 == 0 for t in pos)
        asked = [int(x[b, t]) for t in pos]
        assert sorted(asked) == sorted(keys[b].tolist())  # every key exactly once
        pair = dict(zip(keys[b].tolist(), values[b].tolist(), strict=True))
        assert [int(y[b, t]) for t in pos] == [pair[k] for k in asked]  # label = the paired value
        others = [t for t in range(2 * P, T) if t not in pos]
        assert all(int(x[b, t]) == FILLER for t in others)
    assert bool((y[:, : 2 * P] == IGNORE).all())
    # the pairing is fresh per example: key 1 is paired with several values across examples
    with_one = {int(values[b][keys[b] == 1]) for b in range(n) if bool((keys[b] == 1).any())}
    assert len(with_one) == V // 2


@pytest.mark.parametrize("a", [1.0, 0.5, 0.01])
def test_mqar_gap_distribution_one_pair(a):
    # one pair: its gap g follows p(g) exactly; compare the empirical mean and P(g = 0) to the analytic
    # values within 5 standard errors
    S, n = 30, 3000
    x, y = mqar(n, seq_len=2 + 2 * S, num_kv_pairs=1, vocab_size=16, seed=3, power_a=a)
    pos = torch.nonzero(y != IGNORE)
    assert len(pos) == n
    g = ((pos[:, 1] - 2) // 2).double().numpy()
    p = _gap_law(S, a)
    mean = float((np.arange(S) * p).sum())
    sd = math.sqrt(float(((np.arange(S) - mean) ** 2 * p).sum()))
    assert abs(g.mean() - mean) < 5 * sd / math.sqrt(n), (g.mean(), mean)
    p0 = float(p[0])
    assert abs((g == 0).mean() - p0) < 5 * math.sqrt(p0 * (1 - p0) / n) + 1e-9, ((g == 0).mean(), p0)
    if a == 1.0:
        assert mean == pytest.approx((S - 1) / 2)  # uniform
    if a == 0.01:
        assert mean < 10 and p0 > 0.2  # small a favours small gaps (early queries)


def test_mqar_gaps_without_replacement_inclusion_probabilities():
    # two pairs: gaps drawn without replacement with weights p (successive draws, Plackett-Luce); the
    # probability that gap g is used is p_g + sum_{h != g} p_h p_g / (1 - p_h)
    S, n, a = 6, 6000, 0.3
    p = _gap_law(S, a)
    incl = np.zeros(S)
    for g, h in itertools.permutations(range(S), 2):
        incl[g] += p[g] * p[h] / (1 - p[g])
        incl[h] += p[g] * p[h] / (1 - p[g])
    assert incl.sum() == pytest.approx(2.0)
    x, y = mqar(n, seq_len=4 + 2 * S, num_kv_pairs=2, vocab_size=16, seed=5, power_a=a)
    pos = torch.nonzero(y != IGNORE)
    gaps = ((pos[:, 1] - 4) // 2).numpy()
    freq = np.bincount(gaps, minlength=S) / n
    tol = 5 * np.sqrt(incl * (1 - incl) / n)
    assert np.all(np.abs(freq - incl) < tol), (freq, incl)
    assert incl[0] > 0.5 > 1 / 3 > incl[-1]  # far from the uniform 2 / 6


# ----------------------------------------------------------------------------------------------------
# MAD


def _runs(row, kind_of):
    """Maximal runs of one token kind: [(kind, [tokens])]."""
    out = []
    for t in row:
        k = kind_of(int(t))
        if out and out[-1][0] == k:
            out[-1][1].append(int(t))
        else:
            out.append((k, [int(t)]))
    return out


def test_mad_in_context_vocabulary_and_uniform_keys():
    n, T = 200, 64
    x, y = mad_in_context_recall(n, seed=2, seq_len=T)
    keys, values = x[:, 0::2], x[:, 1::2]
    assert set(keys.unique().tolist()) == set(range(8)) and set(values.unique().tolist()) == set(range(8, 16))
    # keys drawn uniformly with replacement: each of the 8 keys ~ 1/8 of the slots (5 standard errors)
    freq = np.bincount(keys.flatten().numpy(), minlength=8) / keys.numel()
    assert np.all(np.abs(freq - 1 / 8) < 5 * math.sqrt((1 / 8) * (7 / 8) / keys.numel()))
    for b in range(n):
        first = {}
        for j in range(T // 2):
            k, v = int(keys[b, j]), int(values[b, j])
            assert first.setdefault(k, v) == v  # one value per key within an example
            lab = int(y[b, 2 * j])
            assert lab == (v if j > 0 and k in {int(kk) for kk in keys[b, :j]} else IGNORE)
            assert int(y[b, 2 * j + 1]) == IGNORE
        # the last pair repeats an earlier key, so every example has a target
        assert int(keys[b, -1]) in {int(kk) for kk in keys[b, :-1]}


@pytest.mark.parametrize("frac", [None, 0.5])
def test_mad_noisy_rate_and_noise_tokens(frac):
    # seq_len 128, single-token pairs: 63 drawn pairs + the final repeated one; each drawn pair is noise
    # with probability frac_noise, and a noise pair is two tokens of 16..31. None: the default, MAD's
    # documented baseline of 20 % noise pairs
    n = 300
    x, y = mad_noisy_recall(n, seed=4, seq_len=128, **({} if frac is None else {"frac_noise": frac}))
    frac = 0.2 if frac is None else frac
    pairs = x.reshape(n, 64, 2).numpy()
    noise = pairs >= 16
    assert np.array_equal(noise[..., 0], noise[..., 1]), "noise replaces whole pairs"
    assert not noise[:, 63].any(), "the final repeated pair is a real pair"
    rate = noise[:, :63, 0].mean()
    assert abs(rate - frac) < 5 * math.sqrt(frac * (1 - frac) / (63 * n)), rate
    tok = pairs[noise]
    assert set(np.unique(tok).tolist()) == set(range(16, 32)), "every noise token, only noise tokens"
    real = pairs[~noise[..., 0]]
    assert set(np.unique(real[:, 0]).tolist()) == set(range(8))
    assert set(np.unique(real[:, 1]).tolist()) == set(range(8, 16))
    lab = y[y != IGNORE]
    assert bool(((lab >= 8) & (lab < 16)).all())
    assert not bool(((y != IGNORE) & (x >= 16)).any()), "no target after a noise token"


@pytest.mark.parametrize("test", [True, False])
def test_mad_fuzzy_vocabulary_and_motif_sizes(test):
    # vocab 16, motifs: 7 keys (0..6), 7 values (7..13), pad 15; token 14 is unused
    n = 200
    x, _ = mad_fuzzy_recall(n, seed=6, seq_len=96, test=test)
    assert set(x.unique().tolist()) == set(range(14)) | {15}
    kind = lambda t: "pad" if t == 15 else ("key" if t < 7 else "value")  # noqa: E731
    ksz, vsz = collections.Counter(), collections.Counter()
    for row in x:
        runs = _runs(row, kind)
        body = [r for r in runs if r[0] != "pad"]
        assert all(r[0] == "pad" for r in runs[: len(runs) - len(body)]), "padding on the left only"
        # key, value alternate (the input drops the example's last token: the final value may be cut)
        assert [r[0] for r in body] == ["key", "value"] * (len(body) // 2) + ["key"] * (len(body) % 2)
        for k, toks in body[:-1]:
            assert len(set(toks)) == len(toks), "tokens inside a motif are distinct"
            (ksz if k == "key" else vsz)[len(toks)] += 1
    nk, nv = sum(ksz.values()), sum(vsz.values())
    if test:
        assert set(ksz) == {3}
    else:  # 1..3 tokens, uniform (within 0.04, several standard errors at ~4000 motifs)
        assert set(ksz) == {1, 2, 3} and all(abs(ksz[s] / nk - 1 / 3) < 0.04 for s in (1, 2, 3)), ksz
    assert set(vsz) == {1, 2, 3} and all(abs(vsz[s] / nv - 1 / 3) < 0.04 for s in (1, 2, 3)), vsz


# ----------------------------------------------------------------------------------------------------
# Shakespeare recall (on a lowercase text: no digit or key letter occurs in the passage itself)

_WORDS = "the of and to a in that is was he for it with as his on be at by i this had not".split()
TEXT = " ".join(random.Random(0).choice(_WORDS) for _ in range(3000))
KEY = "[BCDFGHJKLMNPQRSTVWXZ]"


@pytest.mark.parametrize("link", [" is ", "="])
def test_shakespeare_facts_queries_and_link(link):
    n, F, Q, T = 300, 3, 2, 120
    x, y = shakespeare_recall(n, seq_len=T, num_facts=F, num_queries=Q, seed=1, text=TEXT, link=link)
    fact = re.compile(f" ({KEY}{{3}}){re.escape(link)}([0-9]{{3}})\\.")
    flen = len(f" ABC{link}123.")
    queried = collections.Counter()
    first_query_planted_first = 0
    for b in range(n):
        s = bytes(x[b].tolist()).decode()
        found = [(m.start(), m.group(1), m.group(2)) for m in fact.finditer(s)]
        assert len(found) == F + Q
        planted, queries = found[:F], found[F:]
        assert [q[0] for q in queries] == [T - (Q - i) * flen for i in range(Q)], "queries end the example"
        keys = [k for _, k, _ in planted]
        assert len(set(keys)) == F and all(len(set(k)) == 3 for k in keys)
        facts = {k: v for _, k, v in planted}
        assert len({k for _, k, _ in queries}) == Q and all(facts[k] == v for _, k, v in queries)
        for _, k, _ in queries:
            queried[keys.index(k)] += 1
        first_query_planted_first += keys.index(queries[0][1]) == 0
        # labels: the three digits of each query, at the positions that predict them
        lab = torch.nonzero(y[b] != IGNORE).flatten().tolist()
        assert len(lab) == 3 * Q
        assert [int(y[b, t]) for t in lab] == [int(x[b, t + 1]) for t in lab]
        assert "".join(chr(int(y[b, t])) for t in lab) == "".join(v for _, _, v in queries)
    # which facts are asked is random: each with probability Q / F (5 standard errors)
    for i in range(F):
        assert abs(queried[i] / n - Q / F) < 5 * math.sqrt((Q / F) * (1 - Q / F) / n), queried
    assert abs(first_query_planted_first / n - 1 / F) < 5 * math.sqrt((1 / F) * (1 - 1 / F) / n)


def test_shakespeare_min_distance_is_a_tight_lower_bound():
    n, F, T, D = 300, 3, 120, 30
    flen = len(" ABC is 123.")
    fact = re.compile(f" {KEY}{{3}} is [0-9]{{3}}\\.")
    gaps = []
    for md in (0, D):
        x, _ = shakespeare_recall(n, seq_len=T, num_facts=F, seed=2, text=TEXT, min_distance=md)
        g = []
        for b in range(n):
            s = bytes(x[b].tolist()).decode()
            ends = [m.end() for m in fact.finditer(s)]
            g.append((T - F * flen) - ends[F - 1])  # last planted fact's end to the first query
        gaps.append(g)
    assert min(gaps[0]) == 0
    assert min(gaps[1]) == D, "every fact at least min_distance bytes before the queries, and no more"


# ----------------------------------------------------------------------------------------------------
# instruction tasks

# a phrase of each family's 4th template (held out for ``unseen_templates``), in no other template
FOURTH = {
    "reverse": "read from right to left",
    "sort_numbers": "from lowest to highest",
    "count_letter": "How many '",
    "add_word_problem": "Start with ",
    "subtract_word_problem": "Subtract ",
    "fact_lookup": "Given that ",
    "uppercase": "Shout this",
    "number_to_words": "Give the English name",
    "repeat_word": "Echo the word",
    "larger_number": "Pick the larger",
}


@pytest.fixture(scope="module")
def two_caps():
    return (
        tasks.build_dataset(0, n_per_family=80, n_eval_per_family=3),
        tasks.build_dataset(0, n_per_family=80, n_eval_per_family=12),
    )


def test_eval_sets_are_the_documented_four():
    assert tasks.EVAL_SETS == ("test", "unseen_templates", "longer", "unseen_families")
    assert set(tasks.FAMILIES) == set(FOURTH) | {"acronym", "last_word"}
    assert set(tasks.HELDOUT_FAMILIES) == {"acronym", "last_word"}


def test_hash_split_recomputed_and_per_family_caps(two_caps):
    small, big = two_caps
    for ds in two_caps:
        for split, (lo, hi) in {"train": (0, 90), "valid": (90, 95), "test": (95, 100)}.items():
            assert all(lo <= zlib.crc32(e.prompt.encode()) % 100 < hi for e in ds[split]), split
    assert small["train"] == big["train"]  # the pool does not depend on the evaluation size
    n = len(big["train"]) + len(big["valid"]) + len(big["test"])
    assert abs(len(big["train"]) / n - 0.9) < 0.03  # 90 / 5 / 5 by hash
    for split in ("valid", "test"):
        for fam in tasks.TRAIN_FAMILIES:
            a = [e for e in small[split] if e.family == fam]
            b = [e for e in big[split] if e.family == fam]
            assert len(b) < 12, "the larger cap does not bind in this fixture"
            assert a == b[:3], (split, fam)  # at most 3 per family, the first ones, in order
    for ds, cap in ((small, 3), (big, 12)):
        for split in ("unseen_templates", "longer"):
            count = collections.Counter(e.family for e in ds[split])
            assert count == {f: cap for f in tasks.TRAIN_FAMILIES}, split
        assert collections.Counter(e.family for e in ds["unseen_families"]) == {
            "acronym": 2 * cap,
            "last_word": 2 * cap,
        }
        for split, exs in ds.items():
            assert len({e.prompt for e in exs}) == len(exs), f"{split}: distinct prompts"


def test_held_out_templates_and_families_are_really_held_out(two_caps):
    _, ds = two_caps
    for split, exs in ds.items():
        for e in exs:
            if e.family in FOURTH:
                fourth = FOURTH[e.family] in e.prompt
                assert fourth == (split == "unseen_templates"), (split, e.prompt)
                assert (e.template == 3) == fourth
            else:
                assert split == "unseen_families", (split, e.family)
    seen = {e.prompt for s in ("train", "valid", "test", "longer", "unseen_templates") for e in ds[s]}
    assert not seen & {e.prompt for e in ds["unseen_families"]}


# ----------------------------------------------------------------------------------------------------
# language-modelling text: training windows and validation windows


def test_text_data_validation_is_the_last_twentieth_and_disjoint(monkeypatch):
    letters = "abcdefghijklmnopqrstuvwxyz"
    r = random.Random(1)
    text = "".join(r.choice(letters) for _ in range(4000))  # every 33-byte window is unique
    monkeypatch.setattr(train_mod, "shakespeare_text", lambda n: text[:n])
    cfg = train_mod.TrainConfig(data="shakespeare", block_size=32, text_chars=4000, eval_examples=16)
    data = train_mod.TextData(cfg)
    n_val = 4000 // 20
    assert len(data.ids) == 4000 - n_val
    assert bytes(data.ids.tolist()).decode() == text[: 4000 - n_val]
    assert len(data) == len(data.ids) - 32 - 1
    train_ends = []
    for inp, lab in data.get(range(len(data))):
        w = bytes([*inp, lab[-1]]).decode()
        assert len(inp) == len(lab) == 32 and inp[1:] == lab[:-1]
        train_ends.append(text.index(w) + 33)
    assert 4000 - n_val - 1 <= max(train_ends) <= 4000 - n_val  # up to the end of the training text
    assert len(data.valid) == 16
    for inp, lab in data.valid:
        w = bytes([*inp, lab[-1]]).decode()
        assert len(inp) == 32 and text.index(w) >= 4000 - n_val, "validation windows lie in the held-out tail"


def _size(fam, prompt, response):
    """What makes an input of each trained family longer (the family's own measure, tiny_models/tasks.py)."""
    ints = [int(x) for x in re.findall(r"\d+", prompt)]
    words = re.findall(r"[a-z]+", response.lower())
    vocab = set(tasks.WORDS) | set(tasks.LONG_WORDS)
    return {
        "reverse": lambda: len(response),
        "sort_numbers": lambda: len(ints),
        "count_letter": lambda: max(len(w) for w in re.findall(r"[a-z]+", prompt) if w in vocab),
        "add_word_problem": lambda: min(ints),
        "subtract_word_problem": lambda: max(ints),
        "fact_lookup": lambda: prompt.count(" lives in "),
        "uppercase": lambda: len(words),
        "number_to_words": lambda: ints[0],
        "repeat_word": lambda: len(words),
        "larger_number": lambda: min(ints),
    }[fam]()


def test_longer_inputs_are_longer_than_every_training_input_of_their_family():
    # the documented property of the ``longer`` set, by value, with each family's own measure of length
    ds = tasks.build_dataset(0, n_per_family=300, n_eval_per_family=60)
    for fam in tasks.TRAIN_FAMILIES:
        train = [_size(fam, e.prompt, e.response) for e in ds["train"] if e.family == fam]
        longer = [_size(fam, e.prompt, e.response) for e in ds["longer"] if e.family == fam]
        assert train and longer, fam
        assert min(longer) > max(train), (fam, min(longer), max(train))


def test_generator_defaults_are_their_documented_baselines():
    # each wrapper's docstring states its baseline (MAD's and Zoology's settings); called with its defaults it
    # must draw exactly what the stated values draw
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # noqa: E731
    assert same(
        mqar(8, seq_len=64, num_kv_pairs=4, vocab_size=32, seed=1),
        mqar(8, seq_len=64, num_kv_pairs=4, vocab_size=32, seed=1, power_a=0.01, random_filler=False),
    )
    assert same(
        mad_in_context_recall(8, seed=1), mad_recall(8, seed=1, seq_len=128, vocab_size=16, frac_noise=0.0)
    )
    assert same(
        mad_noisy_recall(8, seed=1),
        mad_recall(8, seed=1, seq_len=128, vocab_size=32, noise_vocab_size=16, frac_noise=0.2),
    )
    assert same(
        mad_fuzzy_recall(8, seed=1),
        mad_recall(8, seed=1, seq_len=128, vocab_size=16, k_motif_size=3, v_motif_size=3),
    )
