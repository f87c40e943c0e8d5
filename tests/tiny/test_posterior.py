"""``lopa.tiny.posterior`` against enumerating every wording of a problem with ``task.render``: the count of the
phrasings that agree with a partial answer, and the draw (only such phrasings, every one of them, uniformly)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from lopa.tiny import task
from lopa.tiny.posterior import FREE, Phrasings
from lopa.tiny.train_loop import text_codec
from lopa.tiny.vocab import build_tokenizer, special_ids
from tests.support.wordings import agrees, all_answers

ROOM = 64


@pytest.fixture(scope="module")
def codec():  # noqa: ANN201 - (encode, end id)
    tok = build_tokenizer()
    return text_codec(tok)[0], special_ids(tok)["eos_token_id"]


def _partial_states(answers: list[list[int]], rng: random.Random, n: int) -> list[list[int]]:
    """Partial answers: random positions of one phrasing fixed, some with a token of another phrasing swapped in
    (often agreeing with no phrasing), some with end tokens fixed early (the model's early end tails)."""
    states = []
    for i in range(n):
        a = rng.choice(answers)
        keep = rng.choice((0.1, 0.3, 0.6))
        fixed = [t if rng.random() < keep else FREE for t in a]
        if i % 3 == 1:
            j = rng.randrange(ROOM)
            fixed[j] = rng.choice(answers)[j]
        if i % 3 == 2:
            for j in range(rng.randrange(20, ROOM), ROOM):
                fixed[j] = a[-1]
        states.append(fixed)
    return states


@pytest.mark.parametrize("num_ops", [2, 3])
def test_count_equals_enumeration(codec, num_ops: int) -> None:  # noqa: ANN001
    encode, end = codec
    rng = random.Random(num_ops)
    p = task.sample(rng, "train", num_ops=num_ops)
    answers = all_answers(p, encode, end, ROOM)
    assert len({tuple(a) for a in answers}) == task.num_phrasings(num_ops)
    phr = Phrasings(p, encode, end, ROOM)
    assert phr.count([FREE] * ROOM) == len(answers)
    zero = nonzero = 0
    for fixed in _partial_states(answers, rng, 60 if num_ops == 2 else 12):
        expected = sum(agrees(a, fixed) for a in answers)
        assert phr.count(fixed) == expected
        drawn = phr.sample(fixed, rng)
        if expected:
            nonzero += 1
            assert drawn in answers and agrees(drawn, fixed)
        else:
            zero += 1
            assert drawn is None
    assert zero and nonzero  # both kinds of state were exercised


def test_draws_are_uniform_over_the_agreeing_phrasings(codec) -> None:  # noqa: ANN001
    encode, end = codec
    rng = random.Random(7)
    p = task.sample(rng, "train", num_ops=2)
    answers = [tuple(a) for a in all_answers(p, encode, end, ROOM)]
    fixed = [FREE] * ROOM
    fixed[23], fixed[24] = encode(f" {p.answer}")[0], end  # a text of 24 tokens: wordings of different lengths mix
    agreeing = [a for a in answers if agrees(list(a), fixed)]
    k = len(agreeing)
    assert 50 <= k <= 400
    n = 200 * k
    phr = Phrasings(p, encode, end, ROOM)
    seen = Counter(tuple(phr.sample(fixed, rng)) for _ in range(n))
    assert set(seen) == set(agreeing)
    chi2 = sum((seen[a] - 200) ** 2 / 200 for a in agreeing)  # ~ k ± sqrt(2k) when uniform
    assert chi2 < k + 6 * (2 * k) ** 0.5, chi2  # choices drawn without their ways give chi2 ~ 200 k


def test_an_answer_needs_room_for_its_end_token(codec) -> None:  # noqa: ANN001
    encode, end = codec
    p = task.sample(random.Random(3), "train", num_ops=3)
    lengths = [len(encode(" " + task.render(p, w))) for w in task.all_wordings(3)]
    room = max(lengths)  # the longest texts fill the room and leave no position for the end token
    fits = sum(n < room for n in lengths)
    assert 0 < fits < len(lengths)
    assert Phrasings(p, encode, end, room).count([FREE] * room) == fits
