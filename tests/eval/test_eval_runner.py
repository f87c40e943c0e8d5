"""The eval loop on a scripted model: scoring, files, metric identities, determinism, prompts and errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lopa.config import DecodeConfig
from lopa.errors import ConfigError
from lopa.eval.runner import TIMING_FIELDS, evaluate, read_samples
from lopa.eval.tasks import get_task
from lopa.testing import FakeLLM

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs are in 2 boxes?", "answer": "12 * 2 = 24\n#### 24"},
    {"question": "Ana had 1,500 dollars and spent 500. How much is left?", "answer": "1500 - 500 = 1000\n#### 1,000"},
    {"question": "What is 9 minus 10?", "answer": "9 - 10 = -1\n#### -1"},
]


def solver(prompt: str) -> str:
    """Answers the last question of a GSM8K prompt: right on the first three, wrong on the fourth."""
    question = prompt.rsplit("Question:", 1)[-1]
    numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", question)]
    if "buys" in question:
        return f" {numbers[0]} + {numbers[1]} = {sum(numbers)}\n#### {sum(numbers)}\n\nQuestion: invented follow-up"
    if "boxes" in question:
        return f" That makes {numbers[0] * numbers[1]} eggs."
    if "spent" in question:
        return f" The answer is ${numbers[0] - numbers[1]:,}."
    return " #### 1"


@pytest.fixture
def gsm8k_file(tmp_path: Path) -> Path:
    path = tmp_path / "gsm8k_test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS))
    return path


def run_gsm8k(path: Path, out: Path | None, llm: FakeLLM | None = None, **kw):
    task = get_task("gsm8k")
    llm = llm or FakeLLM(solver)
    config = DecodeConfig(decoder="threshold", max_new_tokens=256)
    return evaluate(llm, task, task.load_docs(path), config, progress=False, out_dir=out, **kw)


def test_gsm8k_scores_and_writes_files(gsm8k_file: Path, tmp_path: Path) -> None:
    result = run_gsm8k(gsm8k_file, tmp_path / "out")
    assert [r["correct"] for r in result.records] == [True, True, True, False]
    assert result.summary["score"] == pytest.approx(0.75)
    samples = read_samples(tmp_path / "out" / "samples.jsonl")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(samples) == 4
    for key in ("id", "prompt", "completion", "correct", "forwards", "tokens", "tpf", "latency", "extracted"):
        assert all(key in s for s in samples), key
    assert "Question: invented" not in samples[0]["completion"]  # the task's stop string reached the decoder
    assert summary["correct"] == 3 and summary["n"] == 4
    assert summary["settings"]["decode"]["decoder"] == "threshold"
    assert summary["settings"]["num_fewshot"] == 4
    assert {"device", "dtype", "versions", "model"} <= set(summary)


def test_summary_metrics_are_sums_not_means(gsm8k_file: Path) -> None:
    records = run_gsm8k(gsm8k_file, None).records
    summary = run_gsm8k(gsm8k_file, None).summary
    tokens = sum(r["tokens"] for r in records)
    seconds = sum(r["latency"] for r in records)
    assert summary["tok_s"] == pytest.approx(tokens / seconds)
    assert summary["tpf_aggregate"] == pytest.approx(tokens / sum(r["forwards"] for r in records))
    assert summary["tpf_mean"] == pytest.approx(sum(r["tokens"] / r["forwards"] for r in records) / len(records))
    # by hand from the completions, FakeLLM counting one token per character and 4 per forward (rounded up), one
    # iteration more than forwards and 4 decoded positions per forward: " 3 + 4 = 7\n#### 7\n\n" is 19 characters,
    # " That makes 24 eggs." 20, " The answer is $1,000." 22, " #### 1" 7
    assert [(r["tokens"], r["forwards"], r["iterations"]) for r in records] == [
        (19, 5, 6),
        (20, 5, 6),
        (22, 6, 7),
        (7, 2, 3),
    ]
    assert [r["tpf"] for r in records] == pytest.approx([19 / 5, 20 / 5, 22 / 6, 7 / 2])
    assert [r["tpf_paper"] for r in records] == pytest.approx([20 / 6, 20 / 6, 24 / 7, 8 / 3])


def test_two_runs_give_identical_per_sample_results(gsm8k_file: Path, tmp_path: Path) -> None:
    run_gsm8k(gsm8k_file, tmp_path / "a")
    run_gsm8k(gsm8k_file, tmp_path / "b")
    a, b = read_samples(tmp_path / "a" / "samples.jsonl"), read_samples(tmp_path / "b" / "samples.jsonl")
    strip = [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in a]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in b]


def test_raw_prompt_has_four_shots_and_chat_prompt_has_turns(gsm8k_file: Path) -> None:
    llm = FakeLLM(solver)
    run_gsm8k(gsm8k_file, None, llm=llm)
    prompt = llm.calls[0][0]
    assert prompt.count("Question:") == 5 and prompt.count("####") == 4
    assert prompt.endswith(f"Question: {GSM8K_ROWS[0]['question']}\nAnswer:")
    chat = FakeLLM(solver, chat_template=True)
    run_gsm8k(gsm8k_file, None, llm=chat)
    assert chat.calls[0][0].count("<|user|>") == 5 and chat.calls[0][0].count("<|assistant|>") == 5
    zero = FakeLLM(solver)
    run_gsm8k(gsm8k_file, None, llm=zero, num_fewshot=0, chat="off")
    assert zero.calls[0][0].count("Question:") == 1
    with pytest.raises(ConfigError, match="few-shot"):
        run_gsm8k(gsm8k_file, None, num_fewshot=9)


def test_prompt_too_long_is_counted_wrong_and_the_run_continues(gsm8k_file: Path) -> None:
    llm = FakeLLM(solver, max_context=1400)  # the few-shot prompts are ~1.2k characters; question 3 is longest
    result = run_gsm8k(gsm8k_file, None, llm=llm)
    errors = [r for r in result.records if "error" in r]
    assert errors and all(not r["correct"] for r in errors)
    assert result.summary["prompt_too_long"] == len(errors)
    assert result.summary["n"] == 4


def test_missing_or_bad_data_names_the_format(tmp_path: Path) -> None:
    task = get_task("gsm8k")
    with pytest.raises(ConfigError, match="grade-school-math"):
        task.load_docs(None)
    with pytest.raises(ConfigError, match="does not exist"):
        task.load_docs(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\n')
    with pytest.raises(ConfigError, match="question"):
        task.load_docs(bad)
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("nope")


def test_math_task_scores_boxed_answers(tmp_path: Path) -> None:
    path = tmp_path / "math.jsonl"
    rows = [
        {"problem": "What is 1/2 + 0?", "solution": "It is $\\boxed{\\frac12}$.", "unique_id": "a"},
        {"problem": "Interval?", "solution": "\\boxed{[2,5)}", "unique_id": "b"},
        {"problem": "Three?", "answer": "3", "solution": "", "unique_id": "c"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = {
        "1/2": "We get \\boxed{0.5}.",
        "Interval": "Final Answer: The final answer is $[2, 5)$. I hope it is correct.",
        "Three": "\\boxed{4}",
    }

    def answer(prompt: str) -> str:
        last = prompt.rsplit("Problem:", 1)[-1]
        return next(v for k, v in answers.items() if k in last)

    task = get_task("math")
    result = evaluate(FakeLLM(answer), task, task.load_docs(path), DecodeConfig(max_new_tokens=512), progress=False)
    assert [r["correct"] for r in result.records] == [True, True, False]
    assert [r["id"] for r in result.records] == ["a", "b", "c"]


def test_code_task_runs_programs_in_the_sandbox(tmp_path: Path) -> None:
    task = get_task("humaneval")
    docs = task.load_docs(None)[:3]
    solutions = {d["prompt"]: d["canonical_solution"] for d in docs}
    llm = FakeLLM(lambda prompt: solutions[prompt] if prompt != docs[1]["prompt"] else "    return None\n")
    config = DecodeConfig(decoder="threshold", max_new_tokens=512)
    result = evaluate(llm, task, docs, config, progress=False, out_dir=tmp_path)
    assert [r["status"] for r in result.records] == ["pass", "fail", "pass"]
    assert result.summary["status_counts"] == {"fail": 1, "pass": 2}
    assert result.summary["settings"]["sandbox"]["timeout_s"] > 0
    assert "def " in result.records[0]["extracted"]


# function bodies that make a HumanEval program pass without solving it, when the tests run in the solution's process
STACK_WALK = (  # find the harness's secret on the stack, print it, exit 0 before any assert fails
    "    import os, sys\n"
    "    frame = sys._getframe()\n"
    "    while frame is not None:\n"
    "        if isinstance(frame.f_locals.get('nonce'), str):\n"
    "            os.write(1, ('\\n' + frame.f_locals['nonce'] + '\\n').encode())\n"
    "            os._exit(0)\n"
    "        frame = frame.f_back\n"
    "    os._exit(0)\n"
)
EQUAL_TO_ANYTHING = (  # a result that every `candidate(...) == expected` assert accepts
    "    return type('Anything', (), {'__eq__': lambda self, other: True, '__hash__': None})()\n"
)


def test_a_forging_completion_scores_zero_through_evaluate(tmp_path: Path) -> None:
    """The loop runs each solution apart from its tests: a completion that forges a pass still scores 0."""
    task = get_task("humaneval")
    docs = task.load_docs(None)[:3]  # 0 and 1 assert `candidate(...) == expected`; 2 is the solved control
    answers = [STACK_WALK, EQUAL_TO_ANYTHING, docs[2]["canonical_solution"]]
    by_prompt = {d["prompt"]: a for d, a in zip(docs, answers, strict=True)}
    config = DecodeConfig(decoder="threshold", max_new_tokens=512)
    result = evaluate(FakeLLM(by_prompt.__getitem__), task, docs, config, progress=False)
    assert [r["correct"] for r in result.records] == [False, False, True]
    assert result.records[0]["status"] in ("fail", "error") and result.records[1]["status"] in ("fail", "error")
    assert result.summary["correct"] == 1
    # the forgeries are real: judged by the exit status of the one process that runs solution and tests, both pass
    for doc, record in zip(docs[:2], result.records[:2], strict=True):
        program = tmp_path / f"{doc['entry_point']}.py"
        sample = task.program(doc, record["completion"])  # what the old loop ran as one program
        program.write_text(f"{sample.solution}\n{sample.tests}")
        assert STACK_WALK in program.read_text() or EQUAL_TO_ANYTHING in program.read_text()
        assert subprocess.run([sys.executable, str(program)], capture_output=True, timeout=60).returncode == 0


def test_tiny_task_needs_no_data_file() -> None:
    task = get_task("tiny")
    docs = task.load_docs(None)
    assert len(docs) == task.test_size and docs[0]["prompt"].startswith("Q: ")
    right = task.score(docs[0], f" some chain #### {docs[0]['answer']}")
    assert right.correct and not task.score(docs[0], " #### 1000").correct
    assert task.decode_defaults({"block_size": 8, "max_new_tokens": 24}) == {"block_size": 8, "max_new_tokens": 24}
