"""The tiny model's task: short grade-school word problems with a chain of thought and a ``#### N`` answer.

A problem starts with a quantity and applies 1 to 3 operations, each stated by one sentence of the question::

    Q: Kim has 60 eggs. She buys 12 more. She then halves them. How many eggs does Kim have now? A:
    60 + 12 = 72. 72 / 2 = 36. #### 36

Design choices, made so that a ~2M-parameter model can learn the task on a CPU:

- every number stays in ``0..MAX_VALUE`` and is one token, so copying a number is copying one token and the
  arithmetic is a small table (about 4k facts) instead of character-level carries;
- every operation sentence is exactly five tokens, so the j-th equation reads the j-th sentence at a fixed offset;
- one equation per sentence, in question order, so the chain never reorders anything.

Splits are fixed and disjoint by construction: a problem belongs to the split chosen by a stable hash of its
question text (:func:`split_of`); the samplers reject problems of other splits. The test and validation sets are
the first ``n`` problems of their split drawn from fixed seeds. Called by ``lopa.tiny.data`` (training batches),
``lopa.tiny.evaluate`` (accuracy) and the tests.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "validation", "test"]
SPLITS: tuple[Split, ...] = ("train", "validation", "test")

MAX_VALUE = 99  # every number in a question, chain or answer is in 0..MAX_VALUE
MIN_START, MAX_START = 10, 99
MIN_OPERAND, MAX_OPERAND = 2, 20
MAX_OPS = 3

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
# operation -> sentence templates; each renders to exactly five tokens: pronoun, two words, number or word, "."
ADD_SENTENCES = ("{p} buys {n} more.", "{p} finds {n} more.", "{p} gets {n} more.")
SUB_SENTENCES = ("{p} gives away {n}.", "{p} then eats {n}.", "{p} then sells {n}.", "{p} then loses {n}.")
# fixed-factor operations are stated in words, so the model maps a word to its number
FACTOR_SENTENCES: dict[str, tuple[str, int, str]] = {
    "double": ("*", 2, "{p} then doubles them."),
    "triple": ("*", 3, "{p} then triples them."),
    "halve": ("/", 2, "{p} then halves them."),
    "third": ("/", 3, "{p} keeps one third."),
}
# split buckets of the question hash (out of 100): the rest is train
_BUCKETS: dict[Split, range] = {"test": range(0, 3), "validation": range(3, 6)}
_ANSWER_RE = re.compile(r"####\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    """One word problem: the question (without ``Q:``/``A:``), the chain of thought and the final answer."""

    question: str
    chain: str
    answer: int
    num_ops: int

    @property
    def prompt(self) -> str:
        """Plain-text prompt as the model sees it (the tiny model has no chat template)."""
        return f"Q: {self.question} A:"

    @property
    def target(self) -> str:
        """The text the model should generate after the prompt (before the end token)."""
        return f"{self.chain} #### {self.answer}"


def split_of(question: str) -> Split:
    """The split a question belongs to: a stable hash, so train / validation / test never share a question."""
    bucket = int.from_bytes(hashlib.blake2b(question.encode(), digest_size=8).digest(), "big") % 100
    for split, buckets in _BUCKETS.items():
        if bucket in buckets:
            return split
    return "train"


def _operation(rng: random.Random, value: int) -> tuple[str, int, int, str] | None:
    """A random operation valid for ``value``: (symbol, operand, result, sentence template) or None."""
    kind = rng.choice(("add", "sub", "factor"))
    if kind == "add":
        n = rng.randint(MIN_OPERAND, MAX_OPERAND)
        if value + n > MAX_VALUE:
            return None
        return "+", n, value + n, rng.choice(ADD_SENTENCES).replace("{n}", str(n))
    if kind == "sub":
        n = rng.randint(MIN_OPERAND, MAX_OPERAND)
        if n > value:
            return None
        return "-", n, value - n, rng.choice(SUB_SENTENCES).replace("{n}", str(n))
    symbol, n, template = FACTOR_SENTENCES[rng.choice(tuple(FACTOR_SENTENCES))]
    result = value * n if symbol == "*" else value // n
    if result > MAX_VALUE or (symbol == "/" and value % n):
        return None
    return symbol, n, result, template


def generate(rng: random.Random, num_ops: int | None = None) -> Problem:
    """Draw one problem from any split (``num_ops`` None = uniform over 1..MAX_OPS)."""
    ops = num_ops if num_ops is not None else rng.randint(1, MAX_OPS)
    name = rng.choice(tuple(NAMES))
    pronoun, item = NAMES[name], rng.choice(ITEMS)
    while True:  # rejection: some start values admit no valid operation of the drawn kind
        value = rng.randint(MIN_START, MAX_START)
        sentences = [f"{name} has {value} {item}."]
        steps: list[str] = []
        for _ in range(ops):
            for _try in range(20):
                op = _operation(rng, value)
                if op is not None:
                    break
            else:
                break
            symbol, n, result, template = op
            sentences.append(template.replace("{p}", pronoun))
            steps.append(f"{value} {symbol} {n} = {result}.")
            value = result
        if len(steps) == ops:
            break
    sentences.append(f"How many {item} does {name} have now?")
    return Problem(" ".join(sentences), " ".join(steps), value, ops)


def sample(rng: random.Random, split: Split, num_ops: int | None = None) -> Problem:
    """Draw one problem of ``split`` (rejection on the question hash)."""
    while True:
        p = generate(rng, num_ops)
        if split_of(p.question) == split:
            return p


_EVAL_SEEDS: dict[Split, int] = {"train": 11, "validation": 22, "test": 33}


def fixed_set(split: Split, n: int) -> list[Problem]:
    """The first ``n`` distinct problems of a split from its fixed seed, ops balanced 1..MAX_OPS (deterministic)."""
    rng = random.Random(_EVAL_SEEDS[split])
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < n:
        p = sample(rng, split, num_ops=len(out) % MAX_OPS + 1)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def extract_answer(text: str) -> int | None:
    """The integer after the first ``####`` in generated text, or None when there is none."""
    m = _ANSWER_RE.search(text)
    return int(m.group(1)) if m else None
