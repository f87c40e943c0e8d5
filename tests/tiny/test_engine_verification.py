"""``scripts/engine_verification.py``: its judge equals enumerating every wording of the problem (``task.render``,
not ``lopa.tiny.posterior``), its replay of a hand-written trace finds the death and the contested step where they
are, and on the bundled model the replayed fills reproduce the engine's answers."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
from pathlib import Path
from types import ModuleType

import pytest

import lopa.tiny
from lopa.engine.output import Completion, Stats, TraceStep
from lopa.tiny import task
from lopa.tiny.posterior import FREE, Phrasings
from lopa.tiny.train_loop import text_codec
from lopa.tiny.vocab import build_tokenizer, special_ids
from tests.support.wordings import agrees, all_answers

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = Path(lopa.tiny.__file__).parent / "checkpoint"
ROOM = 64
PROMPT = 10  # prompt length of the hand-written completions (any: positions are absolute)


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("engine_verification", ROOT / "scripts" / "engine_verification.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def codec():  # noqa: ANN201 - (encode, end id)
    tok = build_tokenizer()
    return text_codec(tok)[0], special_ids(tok)["eos_token_id"]


def _problem() -> task.Problem:
    return next(p for p in task.fixed_set("test", 50) if p.num_ops == 2)


def test_judge_equals_enumeration_up_to_the_first_end(script, codec) -> None:  # noqa: ANN001
    encode, end = codec
    p = _problem()
    answers = all_answers(p, encode, end, ROOM)
    phrasings = Phrasings(p, encode, end, ROOM)
    rng = random.Random(0)
    vocab = sorted({t for a in answers for t in a})
    verdicts = set()
    for _ in range(300):
        fixed = [FREE] * ROOM
        base = rng.choice(answers)
        for i in rng.sample(range(ROOM), rng.randint(1, 40)):
            fixed[i] = base[i] if rng.random() < 0.85 else rng.choice(vocab)
        cut = list(fixed)  # what the engine's answer is: nothing after the first end token counts
        if end in cut:
            first = cut.index(end)
            cut[first + 1 :] = [FREE] * (ROOM - first - 1)
        expected = any(agrees(a, cut) for a in answers)
        assert script._judge(phrasings, fixed, end) == expected
        verdicts.add(expected)
    assert verdicts == {True, False}  # both verdicts were exercised


def _completion(steps: list[TraceStep], answer: list[int], end: int) -> Completion:
    first_end = answer.index(end)
    return Completion(
        text="", token_ids=answer[:first_end], finish_reason="stop", stats=Stats(), prompt_token_ids=[0] * PROMPT,
        trace=steps,
    )  # fmt: skip


def _dead_token(answers: list[list[int]], fixed: list[int], position: int, end: int) -> int:
    """A token that no phrasing agreeing with ``fixed`` holds at ``position`` (by enumeration)."""
    held = {a[position] for a in answers if agrees(a, fixed)}
    return next(t for t in range(3, 200) if t not in held and t != end)


def _look(position: int, token: int) -> dict:
    return {"kind": "lookahead", "extra_position": PROMPT + position, "extra_token": token, "score": 0.5}


ANCHOR = {"kind": "anchor", "extra_position": -1, "extra_token": -1, "score": 0.4}


@pytest.mark.parametrize("pick", [20, 40])
def test_replay_blames_the_pick_that_kills_the_answer(script, codec, pick: int) -> None:  # noqa: ANN001
    encode, end = codec
    p = _problem()
    answers = all_answers(p, encode, end, ROOM)
    ref = answers[0]
    wrong = _dead_token(answers, ref[:10] + [FREE] * (ROOM - 10), pick, end)
    # step 1: positions 0..9 filled; step 2: a live branch (position 10) and a dead one (pick := wrong), the dead
    # one wins; its fill stays, so the engine's answer holds `wrong` there; step 3 fills everything else.
    answer = list(ref)
    answer[pick] = wrong
    steps = [
        TraceStep(1, [dict(ANCHOR)], 0, [PROMPT + i for i in range(10)], 0, ref[:10]),
        TraceStep(2, [_look(10, ref[10]), _look(pick, wrong), dict(ANCHOR)], 1, [], 0, []),
        TraceStep(3, [dict(ANCHOR)], 0, [PROMPT + i for i in range(10, ROOM) if i != pick], 0,
                  [answer[i] for i in range(10, ROOM) if i != pick]),
    ]  # fmt: skip
    r = script.replay(_completion(steps, answer, end), Phrasings(p, encode, end, ROOM), end, ROOM, 32)
    # the dead pick lies pick - 10 right of the leftmost masked position (10, block 0); 40 is in block 1
    assert r == {"died": "pick", "contested": 1, "dead_picks": [(pick - 10, pick >= 32, wrong)]}


def test_replay_blames_the_fill_and_counts_a_live_win(script, codec) -> None:  # noqa: ANN001
    encode, end = codec
    p = _problem()
    answers = all_answers(p, encode, end, ROOM)
    ref = answers[0]
    known = ref[:4] + [FREE] * (ROOM - 4)
    wrong = _dead_token(answers, known, 5, end)
    wrong_ahead = _dead_token(answers, known, 30, end)
    answer = list(ref)
    answer[5] = wrong
    steps = [
        TraceStep(1, [dict(ANCHOR)], 0, [PROMPT + i for i in range(4)], 0, ref[:4]),
        TraceStep(2, [_look(4, ref[4]), _look(30, wrong_ahead), dict(ANCHOR)], 0, [PROMPT + 5], 0, [wrong]),
        TraceStep(3, [dict(ANCHOR)], 0, [PROMPT + i for i in range(6, ROOM)], 0, ref[6:]),
    ]  # fmt: skip
    r = script.replay(_completion(steps, answer, end), Phrasings(p, encode, end, ROOM), end, ROOM, 32)
    assert r == {"died": "fill", "contested": 1, "dead_picks": []}
    steps[2] = dataclasses.replace(steps[2], tokens=[t + 1 for t in steps[2].tokens])  # fills != the answer
    with pytest.raises(AssertionError, match="reproduce"):
        script.replay(_completion(steps, answer, end), Phrasings(p, encode, end, ROOM), end, ROOM, 32)


def test_script_on_the_bundled_model(script, capsys) -> None:  # noqa: ANN001
    assert script.main([str(BUNDLED), "--n", "4", "--decoders", "d2f", "lopa-d2f-k2"]) == 0
    models = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["models"]
    base, lopa = models[f"{BUNDLED} d2f"], models[f"{BUNDLED} lopa-d2f-k2"]
    assert base["contested"] == 0  # one candidate per step: nothing to contest
    assert base["died_pick"] == 0 and base["dead_winners"] == 0 and lopa["tpf"] > base["tpf"]
    for r in (base, lopa):
        assert r["died"] == r["died_pick"] + r["died_fill"] <= r["n"] == 4
        assert 0 <= r["dead_winner"] <= 1
        assert r["dead_winner_later_block"] <= r["dead_winners"] and r["dead_winner_number"] <= r["dead_winners"]
