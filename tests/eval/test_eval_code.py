"""Program extraction and sanitizing, MBPP entry points, and HumanEval scored end to end in the sandbox."""

import ast
import json
import re
import threading
import time
from pathlib import Path

import pytest

from lopa.eval.code_extract import cut_at_stops, extract_code, longest_valid_span, sanitize
from lopa.eval.sandbox import Sandbox
from lopa.eval.sandbox.program import stdlib_names_used
from lopa.eval.tasks import get_task
from lopa.eval.tasks.code import MBPP, defined_names, mbpp_entry_point
from lopa.eval.tasks.evalplus import HumanEvalPlus, MBPPPlus, mbpp_plus_restore


def test_extract_code_prefers_the_block_defining_the_entry_point() -> None:
    text = "Example:\n```python\nprint(1)\n```\nSolution:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    assert extract_code(text, "add") == "def add(a, b):\n    return a + b\n"
    assert extract_code(text) == "print(1)\n"
    assert extract_code("no fence at all") == "no fence at all"
    assert extract_code("```python\ndef f():\n    return 1\n", "f") == "def f():\n    return 1\n"  # unclosed fence
    assert extract_code("[BEGIN]\ndef f():\n    return 1\n[DONE] trailing") == "\ndef f():\n    return 1\n"


def test_cut_at_stops_uses_the_earliest_stop() -> None:
    assert cut_at_stops("a\ndef b\nclass c", ["\nclass", "\ndef"]) == "a"
    assert cut_at_stops("nothing to cut", ["\ndef"]) == "nothing to cut"


def test_sanitize_keeps_reachable_definitions_and_drops_test_code() -> None:
    code = (
        "Here is my answer:\n"
        "import math\n"
        "LIMIT = 10\n"
        "def f(x):\n    return helper(x) + LIMIT\n"
        "def helper(x):\n    return math.floor(x)\n"
        "def unused():\n    return 0\n"
        "print(f(2.5))\n"
        "assert f(1) == 11\n"
        "if __name__ == '__main__':\n    f(3)\n"
        "Hope this helps!"
    )
    out = sanitize(code, "f")
    assert "def f(x)" in out and "def helper" in out and "LIMIT = 10" in out and "import math" in out
    assert "unused" not in out and "print(" not in out and "assert" not in out and "__main__" not in out
    namespace: dict = {}
    exec(out, namespace)  # noqa: S102 - our own fixed test code
    assert namespace["f"](2.5) == 12
    assert "unused" in sanitize(code)  # without an entry point every definition stays
    assert "unused" in sanitize(code, "f", roots=["unused"])


def test_longest_valid_span_skips_broken_lines() -> None:
    code = "def ok():\n    return 1\nthis is not python (\ndef cut_off(:\n"
    assert longest_valid_span(code) == "def ok():\n    return 1"


def test_sanitize_keeps_decorators_and_classes() -> None:
    code = "import functools\n@functools.lru_cache(None)\ndef fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\n"
    code += "class Box:\n    def get(self):\n        return fib(3)\ndef use():\n    return Box().get()\nprint(use())\n"
    out = sanitize(code, "use")
    assert "@functools.lru_cache(None)" in out and "class Box" in out and "print" not in out


def test_python_is_parsed_one_thread_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # CPython 3.11's AST conversion fails with "SystemError: AST constructor recursion depth mismatch" when two threads
    # convert at once; the evaluation parses in the generating thread and in the sandbox's worker threads. A slow
    # ast.parse that records how many calls overlap: every caller below must wait for the others.
    real_parse, inside, most = ast.parse, [0], [0]
    count = threading.Lock()

    def slow_parse(source: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - ast.parse's signature
        with count:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.05)  # releases the GIL: without the lock the other threads enter now
        try:
            return real_parse(source, *args, **kwargs)
        finally:
            with count:
                inside[0] -= 1

    monkeypatch.setattr(ast, "parse", slow_parse)
    code = "import math\ndef f(x):\n    return math.sqrt(x)\nprint(f(4))\n"
    calls = [
        lambda: stdlib_names_used("assert f(4) == math.sqrt(4)"),  # the sandbox's worker threads
        lambda: sanitize(code, "f"),  # the generating thread
        lambda: defined_names(code),
        lambda: stdlib_names_used("assert f(9) == 3"),
    ]
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    assert results == [["math"], "import math\ndef f(x):\n    return math.sqrt(x)\n", {"f"}, []]


def test_no_evaluation_code_calls_ast_parse_directly() -> None:
    # a new call site outside the lock would bring the race back
    root = Path(__file__).resolve().parents[2] / "lopa"
    direct = [
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if re.search(r"\bast\.parse\(", p.read_text(encoding="utf-8")) and p.name != "code_extract.py"
    ]
    assert direct == []


@pytest.mark.parametrize(
    ("doc", "entry"),
    [
        (
            {
                "code": "def similar_elements(a, b):\n  return 1",
                "test_list": ["assert similar_elements((3,), (3,)) == 1"],
            },
            "similar_elements",
        ),
        (
            {
                "code": "import math\ndef helper(n):\n  return n\ndef is_not_prime(n):\n  return helper(n)",
                "test_list": ["assert is_not_prime(2) == False"],
            },
            "is_not_prime",
        ),
        ({"code": "", "test_list": ["assert math.isclose(area(2), 4.0)"]}, "area"),
    ],
)
def test_mbpp_entry_point(doc: dict, entry: str) -> None:
    assert mbpp_entry_point(doc) == entry


def test_mbpp_program_scores_reference_code_and_rejects_wrong_code() -> None:
    task = MBPP()
    doc = {
        "task_id": 11,
        "text": "Write a function to add two numbers.",
        "code": "def add(a, b):\r\n  return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
        "test_setup_code": "",
    }
    good = task.program(doc, "def add(a, b):\n    return a + b\n[DONE]")
    bad = task.program(doc, "def add(a, b):\n    return a - b\n[DONE]")
    assert good.entry_points == ("add",) and good.solution.startswith("def add")
    results = Sandbox().run_many([good, bad])
    assert [r.status for r in results] == ["pass", "fail"]


def test_humaneval_canonical_solutions_pass_and_empty_completions_fail() -> None:
    """The acceptance check: 164/164 for the canonical solutions, 0/164 for empty completions."""
    task = get_task("humaneval")
    docs = task.load_docs(None)
    assert len(docs) == 164
    sandbox = Sandbox()
    # as the eval runs them: the solution and its tests in separate processes
    canonical = sandbox.run_many([task.program(d, d["canonical_solution"]) for d in docs], workers=2)
    failed = [(d["task_id"], r.status, r.detail[-200:]) for d, r in zip(docs, canonical, strict=True) if not r.passed]
    assert not failed
    empty = sandbox.run_many([task.program(d, "") for d in docs], workers=2)
    assert sum(r.passed for r in empty) == 0
    assert all(r.status in ("fail", "error") for r in empty)


def _inputs_of_humaneval_tests(doc: dict) -> list[list]:
    """The arguments HumanEval's own ``check`` calls the entry point with (the canonical solution answers)."""
    namespace: dict = {}
    exec(doc["prompt"] + doc["canonical_solution"], namespace)  # the package's reference code
    reference, calls = namespace[doc["entry_point"]], []

    def recorder(*args: object) -> object:
        calls.append(json.loads(json.dumps(list(args))))  # as a _plus file stores them (tuples become lists)
        return reference(*args)

    exec(doc["test"], namespace)
    namespace["check"](recorder)
    return calls


def test_humaneval_plus_compare_passes_canonical_solutions_on_a_sample() -> None:
    """The ``_plus`` path (the reference in the tests process, the candidate behind a proxy) on every 4th HumanEval
    problem, with the inputs of HumanEval's own tests (the EvalPlus files are not shipped by any package)."""
    task = HumanEvalPlus()
    docs = []
    for d in get_task("humaneval").load_docs(None)[::4]:
        try:
            inputs = _inputs_of_humaneval_tests(d)
        except TypeError:  # an input that JSON cannot hold
            continue
        docs.append({**d, "base_input": inputs, "plus_input": [], "atol": 1e-6})
    assert len(docs) >= 35
    results = Sandbox().run_many([task.program(d, d["canonical_solution"]) for d in docs], workers=2)
    failed = [(d["task_id"], r.status, r.detail[-200:]) for d, r in zip(docs, results, strict=True) if not r.passed]
    assert not failed
    wrong = Sandbox().run_many([task.program(d, "    return None\n") for d in docs[:8]], workers=2)
    assert not any(r.passed for r in wrong)


def _mbpp_plus_doc(number: int, entry: str, canonical: str, inputs: list) -> dict:
    return {"task_id": f"Mbpp/{number}", "prompt": "", "entry_point": entry, "canonical_solution": canonical,
            "base_input": inputs, "plus_input": [], "atol": 0}  # fmt: skip


def test_mbpp_plus_inputs_get_back_the_types_json_lost() -> None:
    """MBPP+ stores tuples as lists and complex numbers as strings: the reference and the candidate get the types
    EvalPlus restores. Without them these reference solutions raise (tuple + list, complex of a str)."""
    add = "def add_lists(test_list, test_tup):\n    return test_tup + tuple(test_list)\n"  # Mbpp/106's shape
    angle = "import cmath\ndef angle_complex(a, b):\n    return cmath.phase(a + b)\n"  # Mbpp/124's shape
    nested = "def f(t):\n    return [x for x in t if isinstance(x, tuple)]\n"  # Mbpp/580-style: tuples all the way
    docs = [
        _mbpp_plus_doc(106, "add_lists", add, [[[5, 6, 7], [9, 10]]]),
        _mbpp_plus_doc(124, "angle_complex", angle, [[0, "1j"], [2.0, "(3+4j)"]]),
        _mbpp_plus_doc(580, "f", nested, [[[1, [2, 3], [4, [5]]]]]),
    ]
    task = MBPPPlus()
    results = Sandbox().run_many([task.program(d, d["canonical_solution"]) for d in docs], workers=2)
    assert [r.status for r in results] == ["pass"] * 3, [r.detail for r in results]
    wrong = task.program(docs[0], "def add_lists(test_list, test_tup):\n    return test_tup\n")
    assert Sandbox().run(wrong).status == "fail"
    # the restore rules themselves, checked by hand
    scope: dict = {}
    exec(mbpp_plus_restore("Mbpp/580"), scope)  # noqa: S102 (a rule this module wrote)
    assert scope["_lopa_restore"]([[1, [2, [3]]], 4]) == ((1, (2, (3,))), 4)
    exec(mbpp_plus_restore("Mbpp/11"), scope)  # noqa: S102
    assert scope["_lopa_restore"]([[1, 2], "x"]) == [[1, 2], "x"]  # plain JSON inputs are left alone


def test_mbpp_plus_match_tasks_compare_only_whether_a_result_came_back() -> None:
    """EvalPlus's oracle for check_str / text_match_three / text_starta_endb: a match object or None, compared by
    whether it is None (a match object cannot be compared across the two processes by value)."""
    ref = "import re\ndef text_match_three(text):\n    return re.search('ab{3}?', text)\n"
    doc = _mbpp_plus_doc(787, "text_match_three", ref, [["ac"], ["dc"], ["abbbba"]])
    task = MBPPPlus()
    other = "import re\ndef text_match_three(text):\n    return re.search('abbb', text)\n"  # another match object
    never = "def text_match_three(text):\n    return None\n"
    results = Sandbox().run_many([task.program(doc, c) for c in (ref, other, never)], workers=2)
    assert [r.status for r in results] == ["pass", "pass", "fail"], [r.detail for r in results]
