"""The tiny model's task generator, tokenizer and shipped checkpoint."""

from __future__ import annotations

import random
import re

import pytest
from tokenizers import Tokenizer

from lopa.tiny import default_checkpoint_dir, task
from lopa.tiny.vocab import UNK_TOKEN, build_tokenizer, save_tokenizer, special_ids

_STEP = re.compile(r"(\d+) ([-+]) (\d+) = ((?:\d+ ?)+)\.")


def _draws(n: int, seed: int = 0) -> list[task.Problem]:
    rng = random.Random(seed)
    return [task.generate(rng) for _ in range(n)]


def test_fixed_splits_are_disjoint_and_deterministic() -> None:
    sets = {s: task.fixed_set(s, 150) for s in task.SPLITS}
    questions = {s: {p.question for p in ps} for s, ps in sets.items()}
    assert all(len(q) == 150 for q in questions.values())  # no duplicates inside a split
    assert not questions["train"] & questions["validation"]
    assert not questions["train"] & questions["test"]
    assert not questions["validation"] & questions["test"]
    for s, ps in sets.items():
        assert {task.split_of(p.question) for p in ps} == {s}
    assert task.fixed_set("test", 150) == sets["test"]


def test_training_sampler_never_yields_held_out_questions() -> None:
    rng = random.Random(5)
    held_out = {p.question for p in task.fixed_set("test", 300) + task.fixed_set("validation", 300)}
    drawn = [task.sample(rng, "train") for _ in range(2000)]
    assert all(task.split_of(p.question) == "train" for p in drawn)
    assert not {p.question for p in drawn} & held_out
    # and the held-out splits are not empty corners of the space: both really occur among raw draws
    raw = {task.split_of(p.question) for p in _draws(3000)}
    assert raw == set(task.SPLITS)


def test_chain_of_thought_counts_on_correctly_and_ends_in_the_answer() -> None:
    for p in _draws(1000, seed=1):
        steps = _STEP.findall(p.chain)
        assert len(steps) == p.num_ops and " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in steps) == p.chain
        value = int(re.search(r"has (\d+) ", p.question).group(1))
        for a, op, b, counted in steps:
            assert int(a) == value  # each step continues from the previous result
            unit = 1 if op == "+" else -1
            assert [int(c) for c in counted.split()] == [value + unit * k for k in range(1, int(b) + 1)]
            value += unit * int(b)
            assert task.MIN_VALUE <= value <= task.MAX_VALUE
            assert task.MIN_OPERAND <= int(b) <= task.MAX_OPERAND
        assert value == p.answer == task.extract_answer(p.target)


def test_number_of_operations_covers_the_curriculum() -> None:
    counts = {n: 0 for n in range(1, task.MAX_OPS + 1)}
    for p in task.fixed_set("test", 90):
        counts[p.num_ops] += 1
    assert set(counts.values()) == {90 // task.MAX_OPS}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7 + 2 = 9. #### 9", 9), ("#### 12 and #### 13", 12), ("####-4", -4), ("12 + 3 = 15.", None), ("", None)],
)
def test_extract_answer(text: str, expected: int | None) -> None:
    assert task.extract_answer(text) == expected


def test_tokenizer_covers_the_task_with_single_token_numbers(tmp_path) -> None:
    tok = build_tokenizer()
    unk = tok.token_to_id(UNK_TOKEN)
    for p in _draws(500, seed=2):
        for text in (p.prompt, p.target):
            ids = tok.encode(text).ids
            assert unk not in ids
            assert tok.decode(ids) == text  # readable text back, spacing included
    for n in range(task.MAX_VALUE + 1):
        assert tok.encode(str(n)).ids == [tok.token_to_id(str(n))]
    # every operation sentence is five tokens, so the j-th equation reads the j-th sentence at a fixed offset
    for p in _draws(200, seed=3):
        sentences = re.findall(r"[A-Z][^.?]*[.?]", p.question)[1 : 1 + p.num_ops]
        assert [len(tok.encode(s).ids) for s in sentences] == [5] * p.num_ops
    ids = special_ids(tok)
    assert ids["eos_token_id"] == ids["pad_token_id"] != ids["mask_token_id"]
    reloaded = Tokenizer.from_file(str(save_tokenizer(tok, tmp_path)))
    sample = _draws(1, seed=4)[0].prompt
    assert reloaded.encode(sample).ids == tok.encode(sample).ids
    assert build_tokenizer().get_vocab() == tok.get_vocab()  # ids are stable across builds


def test_shipped_checkpoint_loads_and_answers_test_problems() -> None:
    from lopa import LLM, DecodeConfig

    path = default_checkpoint_dir()
    assert (path / "model.safetensors").is_file(), f"the shipped checkpoint is missing in {path}"
    assert sum(f.stat().st_size for f in path.iterdir()) <= 20 * 2**20
    llm = LLM()  # no model_dir: the bundled checkpoint
    problems = task.fixed_set("test", 12)
    cfg = DecodeConfig(decoder="threshold", threshold=0.9, block_size=8, max_new_tokens=24)
    outs = llm.generate([p.prompt for p in problems], cfg)
    answers = [task.extract_answer(o.text) for o in outs]
    assert answers[0] == problems[0].answer, (problems[0].prompt, outs[0].text)
    assert sum(a == p.answer for a, p in zip(answers, problems, strict=True)) >= 10
