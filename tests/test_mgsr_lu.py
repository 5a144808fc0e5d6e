"""tiny_models/mgsr_lu.py: the labelled / unlabelled split and the paired table of differences to SFT(L)."""

import collections

import pytest

from tiny_models.mgsr_lu import labelled_split, table
from tiny_models.tasks import TRAIN_FAMILIES, build_dataset


def test_split_per_family_disjoint_and_seeded():
    train = build_dataset(0, n_per_family=60)["train"]
    L, U = labelled_split(train, 7, seed=3)
    counts = collections.Counter(e.family for e in L)
    assert counts == {f: 7 for f in TRAIN_FAMILIES}
    assert len(L) + len(U) == len(train)
    assert {id(e) for e in L}.isdisjoint({id(e) for e in U})
    L2, _ = labelled_split(train, 7, seed=3)
    L3, _ = labelled_split(train, 7, seed=4)
    assert [e.prompt for e in L] == [e.prompt for e in L2] and [e.prompt for e in L] != [e.prompt for e in L3]


def test_table_pairs_by_prompt_and_seed():
    def rec(seed, test, src):
        return {"seed": seed, "test": test, "sources": src}

    results = {
        ("sft", 0): rec(0, [10.0, 20.0, 30.0], {"gt": 1.0}),
        ("sft", 1): rec(1, [0.0, 0.0, 60.0], {"gt": 1.0}),
        ("kd", 0): rec(0, [12.0, 22.0, 32.0], {"gt": 1.0}),
        ("kd", 1): rec(1, [2.0, 2.0, 62.0], {"gt": 0.5, "fresh": 0.5}),
    }
    text = table(results, ["test"])
    kd = next(line for line in text.splitlines() if line.startswith("| kd |"))
    assert "| 22.0 |" in kd  # mean over seeds of the per-seed means: (22 + 22) / 2
    assert "+2.0 [+2.0, +2.0]" in kd  # every paired difference is +2
    assert "fresh 0.25, gt 0.75" in kd  # batch-source shares averaged over seeds
    with pytest.raises(KeyError):
        table({("kd", 0): results[("kd", 0)]}, ["test"])  # no floor run: no paired difference
