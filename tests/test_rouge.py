"""reference/rouge.py: hand-computed cases, and equality with the rouge-score package's rougeL."""

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from reference.rouge import lcs_length, rouge_l, tokenize


def test_tokenize_like_rouge_score_default():
    # lowercase, non-[a-z0-9] runs become separators, empties dropped (convention in reference/rouge.py)
    assert tokenize("Tom's 9 APPLES, café!") == ["tom", "s", "9", "apples", "caf"]
    assert tokenize(" ,.! ") == []


def test_by_hand():
    # candidate "the cat sat" vs reference "the cat sat on the mat": LCS 3, P = 3/3, R = 3/6, F = 2/3
    p, r, f = rouge_l("the cat sat", "the cat sat on the mat")
    assert (p, r) == (1.0, 0.5) and f == pytest.approx(2 / 3, abs=1e-15)
    # LCS is a subsequence, not a substring: "a x b y c" vs "a b c" -> 3
    assert lcs_length("a x b y c".split(), "a b c".split()) == 3
    assert rouge_l("", "anything") == (0.0, 0.0, 0.0)
    assert rouge_l("a b", "c d") == (0.0, 0.0, 0.0)


ALPHABET = st.sampled_from(list("abcAB 019,.'-é\n"))
WORDS = st.lists(
    st.sampled_from(["the", "cat", "Sat", "on", "mat", "7", "dog's", "-", "", "A.B"]), max_size=12
)


@given(cand=st.text(ALPHABET, max_size=40), ref=st.text(ALPHABET, max_size=40))
@example(cand="", ref="")
@example(cand="!!", ref="a")
def test_equals_rouge_score_on_random_strings(cand, ref):
    scorer = pytest.importorskip("rouge_score.rouge_scorer").RougeScorer(["rougeL"])
    want = scorer.score(ref, cand)["rougeL"]  # rouge-score's argument order is (target, prediction)
    assert rouge_l(cand, ref) == pytest.approx((want.precision, want.recall, want.fmeasure), abs=1e-12)


@given(cand=WORDS, ref=WORDS)
def test_equals_rouge_score_on_random_sentences(cand, ref):
    scorer = pytest.importorskip("rouge_score.rouge_scorer").RougeScorer(["rougeL"])
    c, r = " ".join(cand), " ".join(ref)
    want = scorer.score(r, c)["rougeL"]
    assert rouge_l(c, r) == pytest.approx((want.precision, want.recall, want.fmeasure), abs=1e-12)


def test_evaluation_scores_are_means_over_examples():
    from tiny_models.evaluate import score
    from tiny_models.tasks import Example

    exs = [Example("f", 0, "p1", "the cat sat on the mat"), Example("f", 0, "p2", "HELLO")]
    got = score(["the cat sat", " HELLO "], exs)
    # ROUGE-L F1: 2/3 and 1; exact match (whitespace-stripped): 0 and 1
    assert (
        got["rougeL"] == pytest.approx(100 * (2 / 3 + 1) / 2) and got["exact_match"] == 50.0 and got["n"] == 2
    )
