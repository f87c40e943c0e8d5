"""The tiny model's task (v2; models v2 to v8 train on it): word problems whose answers can be worded many ways.

A problem starts with a quantity and applies 2 or 3 operations, each stated by one sentence of the question. The
chain of thought *counts on* (or back) one number per unit, as in v1, but every piece of it is worded freely::

    Q: Kim has 48 eggs. She buys 3 more. She then eats 2. How many eggs does Kim have now? A:
    48 eggs. let us count. 48 + 3 gives 49 50 51. next, take 2 from 51: 50 49. so the answer is 49. #### 49

An answer restates the start (always the same words: see ``START``), then has an optional opener, one *step* per
operation (six wordings each, of different lengths: the counted numbers land at different offsets), an optional
filler between steps, and one of five closings, all ending in ``#### N``. Wordings are drawn uniformly and
independently, so a correct answer has thousands of phrasings (``num_phrasings``). That is the point: like
natural text, a position is uncertain until its neighbours are fixed, and a phrasing of another length shifts
every later position, so decoding order matters (v1's answers had one phrasing, and every decoder filled whole
blocks at once).

What keeps the arithmetic learnable (v1's lessons): every number is one token; each counted number is the
successor or predecessor of the previous one; every wording of a step names its operand, so the count length is
read locally. Nothing is copied from far inside the answer: a step starts from the last counted number.

``lopa.tiny.grammar.parse`` is the grammar check: an answer is **well-formed** when it parses as
opener? step (filler step)* closing with one consistent wording per step, every step counting by one from its
start for as many numbers as its operand says, each step starting where the previous one ended, and the closing
repeating the last count.

Splits are fixed and disjoint by construction: a problem belongs to the split chosen by a stable hash of its
question text (:func:`split_of`); the samplers reject problems of other splits. Evaluation sets are the first
``n`` problems of a split from fixed seeds. Called by ``lopa.tiny.data`` (training batches), ``lopa.tiny.evaluate``
and ``lopa.tiny.bench`` (scores) and the tests.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")

MIN_VALUE, MAX_VALUE = 10, 99  # every quantity in a question, chain or answer
MIN_OPERAND, MAX_OPERAND = 2, 5  # at most five counting steps per operation
MIN_OPS, MAX_OPS = 2, 3

NAMES: dict[str, str] = {
    "Kim": "She",
    "Ana": "She",
    "Lia": "She",
    "Eva": "She",
    "Mia": "She",
    "Zoe": "She",
    "Tom": "He",
    "Ben": "He",
    "Sam": "He",
    "Max": "He",
    "Joe": "He",
    "Leo": "He",
}
ITEMS: tuple[str, ...] = (
    "eggs",
    "apples",
    "pens",
    "books",
    "cards",
    "coins",
    "stamps",
    "marbles",
    "cookies",
    "shells",
    "stickers",
    "candies",
)
# question sentences per operation; each renders to exactly five tokens: pronoun, two words, number or word, "."
ADD_SENTENCES = ("{p} buys {n} more.", "{p} finds {n} more.", "{p} gets {n} more.")
SUB_SENTENCES = ("{p} gives away {n}.", "{p} then eats {n}.", "{p} then sells {n}.", "{p} then loses {n}.")

# answer wordings: {v} = the step's start, {n} = its operand, {c} = the counted numbers, {r} = the result.
# Every answer opens with the same restatement of the start: the first position of an answer is predicted before
# any of it is decoded (Dream's shift: from the prompt's last output, which a cached block never sees again), so
# it must not be a choice point.
START = "{v} {item} ."
OPENERS = ("", "let us count .", "we count on .", "step by step .")
ADD_STEPS = (
    "{v} + {n} = {c} .",
    "{v} + {n} gives {c} .",
    "{v} plus {n} : {c} .",
    "add {n} to {v} : {c} .",
    "count up {n} from {v} : {c} .",
    "then {n} more : {c} .",
)
SUB_STEPS = (
    "{v} - {n} = {c} .",
    "{v} - {n} gives {c} .",
    "{v} minus {n} : {c} .",
    "take {n} from {v} : {c} .",
    "count down {n} from {v} : {c} .",
    "then {n} less : {c} .",
)
FILLERS = ("", "next ,", "and")
CLOSINGS = (
    "#### {r}",
    "so the answer is {r} . #### {r}",
    "answer : {r} #### {r}",
    "{name} has {r} {item} now . #### {r}",
    "in all {r} . #### {r}",
)

# split buckets of the question hash (out of 100): the rest is train
_BUCKETS: dict[Split, range] = {"test": range(0, 3), "validation": range(3, 6)}
_ANSWER_RE = re.compile(r"####\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    """One word problem: the question (without ``Q:``/``A:``), its operations and one phrasing of the answer."""

    question: str
    name: str
    item: str
    start: int
    ops: tuple[tuple[str, int], ...]  # ("+" or "-", operand) per question sentence
    wording: tuple[int, ...]  # opener, then (step form, filler before it) per op, then closing

    @property
    def answer(self) -> int:
        return self.start + sum(n if s == "+" else -n for s, n in self.ops)

    @property
    def num_ops(self) -> int:
        return len(self.ops)

    @property
    def prompt(self) -> str:
        """Plain-text prompt as the model sees it (the tiny model has no chat template)."""
        return f"Q: {self.question} A:"

    @property
    def target(self) -> str:
        """This problem's phrasing of the answer (before the end token), as readable text."""
        return render(self, self.wording)


def _step_text(symbol: str, form: int, value: int, n: int) -> str:
    unit = 1 if symbol == "+" else -1
    counted = " ".join(str(value + unit * k) for k in range(1, n + 1))
    template = (ADD_STEPS if symbol == "+" else SUB_STEPS)[form]
    return template.format(v=value, n=n, c=counted)


def render(p: Problem, wording: tuple[int, ...]) -> str:
    """The answer text of ``p`` under ``wording`` (see :func:`random_wording` for its layout)."""
    parts = [START.format(v=p.start, item=p.item), OPENERS[wording[0]]]
    value = p.start
    for j, (symbol, n) in enumerate(p.ops):
        form, filler = wording[1 + 2 * j], wording[2 + 2 * j]
        if j:
            parts.append(FILLERS[filler])
        parts.append(_step_text(symbol, form, value, n))
        value += n if symbol == "+" else -n
    parts.append(CLOSINGS[wording[-1]].format(r=value, name=p.name, item=p.item))
    text = " ".join(x for x in parts if x)
    return text.replace(" .", ".").replace(" :", ":").replace(" ,", ",")  # as the tokenizer decodes it


def random_wording(rng: random.Random, num_ops: int) -> tuple[int, ...]:
    """Uniform wording: (opener, form₁, filler₁ (unused), form₂, filler₂, ..., closing)."""
    out = [rng.randrange(len(OPENERS))]
    for j in range(num_ops):
        out += [rng.randrange(len(ADD_STEPS)), rng.randrange(len(FILLERS)) if j else 0]
    return (*out, rng.randrange(len(CLOSINGS)))


def all_wordings(num_ops: int) -> Iterator[tuple[int, ...]]:
    """Every wording of a problem with ``num_ops`` operations (distinct wordings give distinct texts)."""
    first = [(f, 0) for f in range(len(ADD_STEPS))]
    later = [(f, g) for f in range(len(ADD_STEPS)) for g in range(len(FILLERS))]
    steps = [first] + [later] * (num_ops - 1)
    for opener in range(len(OPENERS)):
        for combo in itertools.product(*steps):
            for closing in range(len(CLOSINGS)):
                yield (opener, *[x for pair in combo for x in pair], closing)


def num_phrasings(num_ops: int) -> int:
    """How many distinct answer texts a problem with ``num_ops`` operations has."""
    return len(OPENERS) * len(ADD_STEPS) ** num_ops * len(FILLERS) ** (num_ops - 1) * len(CLOSINGS)


def split_of(question: str) -> Split:
    """The split a question belongs to: a stable hash, so train / validation / test never share a question."""
    bucket = int.from_bytes(hashlib.blake2b(question.encode(), digest_size=8).digest(), "big") % 100
    for split, buckets in _BUCKETS.items():
        if bucket in buckets:
            return split
    return "train"


def generate(rng: random.Random, num_ops: int | None = None) -> Problem:
    """Draw one problem from any split (``num_ops`` None = uniform over MIN_OPS..MAX_OPS), with a random wording."""
    k = num_ops if num_ops is not None else rng.randint(MIN_OPS, MAX_OPS)
    name = rng.choice(tuple(NAMES))
    pronoun, item = NAMES[name], rng.choice(ITEMS)
    while True:  # rejection: keep every intermediate value inside [MIN_VALUE, MAX_VALUE]
        start = value = rng.randint(MIN_VALUE, MAX_VALUE)
        ops: list[tuple[str, int]] = []
        sentences = [f"{name} has {start} {item}."]
        for _ in range(k):
            n = rng.randint(MIN_OPERAND, MAX_OPERAND)
            symbol = "+" if rng.random() < 0.5 else "-"
            value += n if symbol == "+" else -n
            ops.append((symbol, n))
            template = rng.choice(ADD_SENTENCES if symbol == "+" else SUB_SENTENCES)
            sentences.append(template.replace("{p}", pronoun).replace("{n}", str(n)))
            if not MIN_VALUE <= value <= MAX_VALUE:
                break
        if len(ops) == k and MIN_VALUE <= value <= MAX_VALUE:
            break
    sentences.append(f"How many {item} does {name} have now?")
    return Problem(" ".join(sentences), name, item, start, tuple(ops), random_wording(rng, k))


def sample(rng: random.Random, split: Split, num_ops: int | None = None) -> Problem:
    """Draw one problem of ``split`` (rejection on the question hash)."""
    while True:
        p = generate(rng, num_ops)
        if split_of(p.question) == split:
            return p


_EVAL_SEEDS: dict[Split, int] = {"train": 11, "validation": 22, "test": 33}


def fixed_set(split: Split, n: int) -> list[Problem]:
    """The first ``n`` distinct problems of a split from its fixed seed, ops balanced (deterministic)."""
    return drawn_set(split, n, _EVAL_SEEDS[split])


FRESH_EXCLUDES = 600  # a fresh set never repeats the first 600 problems of its split's fixed set (lopa bench --full)


def fresh_set(split: Split, n: int, seed: int) -> list[Problem]:
    """``n`` distinct problems of a split drawn from ``seed``, none of them among the first ``FRESH_EXCLUDES`` of
    :func:`fixed_set` (so a fresh-set figure is measured on problems the default bench never showed)."""
    return drawn_set(split, n, seed, exclude={p.question for p in fixed_set(split, FRESH_EXCLUDES)})


def drawn_set(split: Split, n: int, seed: int, exclude: set[str] | None = None) -> list[Problem]:
    """The first ``n`` distinct problems of a split drawn from ``seed`` whose question is not in ``exclude``, two-
    and three-operation problems alternating."""
    rng = random.Random(seed)
    seen: set[str] = set(exclude or ())
    out: list[Problem] = []
    while len(out) < n:
        p = sample(rng, split, num_ops=MIN_OPS + len(out) % (MAX_OPS - MIN_OPS + 1))
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def extract_answer(text: str) -> int | None:
    """The integer after the first ``####`` in generated text, or None when there is none."""
    m = _ANSWER_RE.search(text)
    return int(m.group(1)) if m else None
