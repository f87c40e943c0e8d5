"""The tiny model's task generator, tokenizer and shipped checkpoint."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from lopa.checkpoint.bundled import default_checkpoint_dir
from lopa.tiny import task
from lopa.tiny.grammar import parse, tokens
from lopa.tiny.vocab import UNK_TOKEN, build_tokenizer, save_tokenizer, special_ids


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


def test_a_fresh_set_is_drawn_from_its_seed_and_never_repeats_the_fixed_set() -> None:
    fixed = {p.question for p in task.fixed_set("test", task.FRESH_EXCLUDES)}
    a, b = task.fresh_set("test", 300, 1), task.fresh_set("test", 300, 2)
    assert a == task.fresh_set("test", 300, 1) and a != b  # deterministic per seed, different across seeds
    for fresh in (a, b):
        questions = {p.question for p in fresh}
        assert len(questions) == 300 and not questions & fixed
        assert all(task.split_of(q) == "test" for q in questions)
        assert [p.num_ops for p in fresh[:4]] == [2, 3, 2, 3]  # ops alternate as in the fixed set


def test_training_sampler_never_yields_held_out_questions() -> None:
    rng = random.Random(5)
    held_out = {p.question for p in task.fixed_set("test", 300) + task.fixed_set("validation", 300)}
    drawn = [task.sample(rng, "train") for _ in range(2000)]
    assert all(task.split_of(p.question) == "train" for p in drawn)
    assert not {p.question for p in drawn} & held_out
    # and the held-out splits are not empty corners of the space: both really occur among raw draws
    raw = {task.split_of(p.question) for p in _draws(3000)}
    assert raw == set(task.SPLITS)


def test_every_phrasing_counts_on_correctly_and_ends_in_the_answer() -> None:
    for p in _draws(1000, seed=1):
        value = int(re.search(r"has (\d+) ", p.question).group(1))
        assert value == p.start
        runs = re.findall(r"(?:\d+ )*\d+\.", p.target)  # steps end with their counts and "." (a closing may too)
        counted = [[int(x) for x in run[:-1].split()] for run in runs]
        assert len(counted) >= p.num_ops
        for (symbol, n), numbers in zip(p.ops, counted[: p.num_ops], strict=True):
            unit = 1 if symbol == "+" else -1
            assert numbers[-n:] == [value + unit * k for k in range(1, n + 1)]  # counts on from the last result
            value += unit * n
            assert task.MIN_VALUE <= value <= task.MAX_VALUE
            assert task.MIN_OPERAND <= n <= task.MAX_OPERAND
        assert value == p.answer == task.extract_answer(p.target)
        assert p.target.endswith(f"#### {p.answer}")


def test_answers_have_many_phrasings_of_different_lengths() -> None:
    p = task.fixed_set("test", 2)[1]  # three operations
    texts = {task.render(p, w) for w in task.all_wordings(p.num_ops)}
    assert len(texts) == task.num_phrasings(p.num_ops) == 38_880
    lengths = {len(tokens(t)) for t in texts}
    assert max(lengths) - min(lengths) >= 15  # a wording of another length shifts every later position
    assert {task.extract_answer(t) for t in texts} == {p.answer}
    lens = [len(build_tokenizer().encode(" " + q.target).ids) for q in task.fixed_set("test", 600)]
    assert 30 <= sum(lens) / len(lens) <= 40 and max(lens) <= 63  # fits 64 new tokens with the end token


def test_grammar_accepts_every_generated_answer_and_rejects_mixed_wordings() -> None:
    tok = build_tokenizer()
    for p in _draws(2000, seed=6):
        assert parse(p.target), p.target
        assert parse(tok.decode(tok.encode(" " + p.target).ids)), p.target  # as the engine's text reads
    p = task.fixed_set("test", 1)[0]  # two operations: all 2,160 phrasings
    assert all(parse(task.render(p, w)) for w in task.all_wordings(p.num_ops))
    good = "48 eggs. 48 + 3 gives 49 50 51. next, take 2 from 51: 50 49. so the answer is 49. #### 49"
    assert parse(good)
    bad = [
        "48 eggs. 48 + 3 = gives 49 50 51. #### 51",  # two wordings mixed inside one step
        "48 eggs. 48 plus 3 = 49 50 51. #### 51",  # half of one wording, half of another
        "48 eggs. 48 + 3 gives 49 50. #### 50",  # counts two numbers for an operand of three
        "48 eggs. 48 + 3 gives 49 51 52. #### 52",  # skips a number
        "48 eggs. 48 + 3 gives 49 50 51. 50 - 2 = 49 48. #### 48",  # the second step does not continue the first
        "48 eggs. 47 + 3 gives 48 49 50. #### 50",  # the first step does not start from the restated start
        "48 eggs. 48 + 3 gives 49 50 51. so the answer is 51. #### 50",  # the closing disagrees with the count
        "48 eggs. 48 + 3 gives 49 50 51.",  # no closing
        "48 eggs. 48 + 3 gives 49 50 51. #### 51 #### 51",  # trailing garbage
        "48 eggs. let us count. let us count. 48 + 3 gives 49 50 51. #### 51",  # two openers
        "let by step. 48 + 3 gives 49 50 51. #### 51",  # no restated start, a garbled opener
        "48 + 3 gives 49 50 51. #### 51",  # no restated start
        "",
    ]
    for text in bad:
        assert not parse(text), text


def test_number_of_operations_covers_the_curriculum() -> None:
    counts = {n: 0 for n in range(task.MIN_OPS, task.MAX_OPS + 1)}
    for p in task.fixed_set("test", 90):
        counts[p.num_ops] += 1
    assert set(counts.values()) == {90 // len(counts)}


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
        prompt, answer = tok.encode(p.prompt).ids, tok.encode(" " + p.target).ids
        assert unk not in prompt and unk not in answer
        assert tok.decode(prompt) == p.prompt  # readable text back, spacing included
        assert tok.decode(answer) == p.target
    for n in range(task.MAX_VALUE + 1):
        assert tok.encode(str(n)).ids == [tok.token_to_id(str(n))]
    # every operation sentence of the question is five tokens
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
    recommended = llm.checkpoint.generation_config
    assert (recommended["block_size"], recommended["max_new_tokens"]) == (32, 64)
    problems = task.fixed_set("test", 12)
    for cfg in (
        DecodeConfig(decoder="threshold", threshold=0.9, block_size=32, max_new_tokens=64),
        DecodeConfig(decoder="lopa", base="threshold", branches=4, threshold=0.9, block_size=32, max_new_tokens=64),
    ):
        outs = llm.generate([p.prompt for p in problems], cfg)
        answers = [task.extract_answer(o.text) for o in outs]
        right = sum(a == p.answer for a, p in zip(answers, problems, strict=True))
        well_formed = sum(bool(parse(o.text)) for o in outs)
        assert right >= 9 and well_formed >= 8, (cfg.decoder, [o.text for o in outs])  # v7: 93-95% right on 600


LIVE_VIEW = Path(__file__).resolve().parents[2] / "lopa" / "server" / "static" / "index.html"


def test_the_live_views_default_prompt_is_answered_right_by_both_compare_settings() -> None:
    """The page a user opens first: its prompt box's text, run with the defaults of compare mode (``app.js``: the
    server's default decoder, and LoPA over it with the default k), on the bundled model."""
    from lopa import LLM

    textarea = re.search(r"<textarea[^>]*>([^<]*)</textarea>", LIVE_VIEW.read_text(encoding="utf-8"))
    assert textarea is not None
    prompt = textarea.group(1).strip()
    assert prompt.startswith("Q: Kim has 48 eggs. She buys 3 more. She then eats 2. She finds 4 more. How many")
    llm = LLM()
    a = llm.default_config
    b = llm.decode_config(decoder="lopa", base=a.decoder, branches=max(a.branches, 1))
    assert a.decoder == "threshold" and b.branches == 4
    for cfg in (a, b):
        text = llm.generate([prompt], cfg)[0].text
        assert task.extract_answer(text) == 48 + 3 - 2 + 4 and parse(text), (cfg.decoder, text)
