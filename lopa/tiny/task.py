"""The tiny model's task: short grade-school word problems with a chain of thought and a ``#### N`` answer.

A problem starts with a quantity and applies 1 or 2 operations, each stated by one sentence of the question.
The chain of thought *counts on* (or back) from the current quantity, one number per unit, the way children
add small numbers::

    Q: Kim has 48 eggs. She buys 3 more. She then eats 2. How many eggs does Kim have now? A:
    48 + 3 = 49 50 51. 51 - 2 = 50 49. #### 49

Design choices, made so that a ~1M-parameter model learns the task in well under an hour of CPU training
(measured; see the model card):

- every number is one token, so copying a number is copying one token;
- each chain step is a successor or predecessor of the previous number: one small table (about 180 facts) that
  every step of every problem trains. Two earlier designs failed on the arithmetic, not the format: whole-number
  results (a table of ~1.6k sums) reached 29% correct results after 3.5k steps, and digit tokens with carries
  left the units digit at chance (10%) after 2k steps;
- every operation sentence is exactly five tokens, so the j-th equation reads the j-th sentence at a fixed offset.

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

MIN_VALUE, MAX_VALUE = 10, 99  # every quantity in a question, chain or answer
MIN_START, MAX_START = MIN_VALUE, MAX_VALUE
MIN_OPERAND, MAX_OPERAND = 2, 5  # at most five counting steps per operation
MAX_OPS = 2

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
    n = rng.randint(MIN_OPERAND, MAX_OPERAND)
    if rng.random() < 0.5:
        if value + n > MAX_VALUE:
            return None
        return "+", n, value + n, rng.choice(ADD_SENTENCES).replace("{n}", str(n))
    if value - n < MIN_VALUE:
        return None
    return "-", n, value - n, rng.choice(SUB_SENTENCES).replace("{n}", str(n))


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
            unit = 1 if symbol == "+" else -1
            counted = " ".join(str(value + unit * k) for k in range(1, n + 1))  # counting on (or back)
            steps.append(f"{value} {symbol} {n} = {counted}.")
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
