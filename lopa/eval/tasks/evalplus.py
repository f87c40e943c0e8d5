"""EvalPlus tasks: HumanEval+ and MBPP+ (0-shot, from the EvalPlus release files).

Their tests compare the solution with the canonical solution on every ``base_input`` and ``plus_input`` (floats
within ``atol``), which is EvalPlus's check without its per-input time limits; for MBPP+ the input types JSON loses
are restored and the match-object tasks compare only whether a result came back, as EvalPlus does.
"""

from __future__ import annotations

import json
from pathlib import Path

from lopa.eval.sandbox import Program
from lopa.eval.tasks.base import Doc, need_path, read_records, require_fields
from lopa.eval.tasks.code import CodeTask, HumanEval, defined_names

# A ``_plus`` task's tests: run the reference and the candidate on every input and compare.
_COMPARE = """
import copy as _copy, json as _json, math as _math

def _lopa_equal(got, exp, atol):
    if isinstance(exp, float) or (isinstance(got, float) and isinstance(exp, int) and not isinstance(exp, bool)):
        return isinstance(got, (int, float)) and _math.isclose(got, exp, rel_tol=1e-07, abs_tol=atol)
    if isinstance(exp, (list, tuple)) and isinstance(got, (list, tuple)) and type(got) is type(exp):
        return len(got) == len(exp) and all(_lopa_equal(g, e, atol) for g, e in zip(got, exp))
    return got == exp

_lopa_ref_ns = {{}}
exec({reference!r}, _lopa_ref_ns)
_lopa_ref, _lopa_cand = _lopa_ref_ns[{entry!r}], {entry}
{restore}
for _i, _args in enumerate(_json.loads({inputs!r})):
    _args = _lopa_restore(_args)
    _exp = _lopa_ref(*_copy.deepcopy(_args))
    _got = _lopa_cand(*_copy.deepcopy(_args))
    if {not_none!r}:  # the task asks only whether a result is returned (a regex match object)
        _exp, _got = _exp is not None, _got is not None
    assert _lopa_equal(_got, _exp, {atol!r}), f"input #{{_i}}: got {{_got!r}}, expected {{_exp!r}}"
"""

# MBPP+ stores its inputs as JSON, which has no tuples, sets or complex numbers: EvalPlus's loader restores them per
# task (evalplus/data/mbpp.py). Each rule: the task numbers it applies to, and the body of
# ``_lopa_restore(a)`` (``a``: one input's argument list) that rebuilds the types those tasks' functions expect.
_TUPLE_ALL = "def _t(x):\n    return tuple(_t(i) for i in x) if isinstance(x, list) else x\n"
MBPP_PLUS_RESTORE: list[tuple[frozenset[int], str]] = [
    (
        frozenset(
            {2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630, 726, 740, 744, 809}
        ),
        "return [tuple(x) for x in a]",
    ),  # fmt: skip
    (
        frozenset({63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780}),
        "return [[tuple(y) for y in x] for x in a]",
    ),  # fmt: skip
    (frozenset({75, 413, 444, 753}), "return [[tuple(y) for y in a[0]], a[1]]"),
    (frozenset({106, 750}), "return [a[0], tuple(a[1])]"),
    (frozenset({115}), "return [[set(y) if isinstance(y, list) and y else {} for y in a[0]]]"),
    (frozenset({124}), "return [float(a[0]), complex(a[1])]"),
    (frozenset({250, 405, 446, 617, 720, 763, 808}), "return [tuple(a[0]), *a[1:]]"),
    (frozenset({259, 401, 445}), "return [tuple(tuple(y) for y in x) for x in a]"),
    (frozenset({278}), "return [tuple(tuple(y) if isinstance(y, list) else y for y in a[0])]"),
    (frozenset({307}), "return [tuple(a[0]), *a[1:]]"),
    (frozenset({722}), "return [{k: tuple(v) for k, v in a[0].items()}, *a[1:]]"),
    (frozenset({252}), "return [complex(a[0])]"),
    (frozenset({580, 615, 791}), _TUPLE_ALL + "return _t(a)"),
]
# EvalPlus's MBPP+ oracle for these entry points compares only whether a result was returned, not its value.
MBPP_PLUS_NOT_NONE = frozenset({"check_str", "text_match_three", "text_starta_endb"})


def mbpp_plus_restore(task_id: str) -> str:
    """Source of ``_lopa_restore(a)`` for an MBPP+ task (the identity for every task whose inputs are plain JSON)."""
    number = int(task_id.rsplit("/", 1)[-1]) if task_id.rsplit("/", 1)[-1].isdigit() else -1
    body = next((code for numbers, code in MBPP_PLUS_RESTORE if number in numbers), "return a")
    return "def _lopa_restore(a):\n" + "".join(f"    {line}\n" for line in body.splitlines())


class PlusTask(CodeTask):
    """An EvalPlus task: the solution is compared with the canonical one on every base and plus input."""

    max_new_tokens = 512
    fields = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input")

    def load_docs(self, path: Path | None) -> list[Doc]:
        path = need_path(path, self)
        rows = read_records(path, self)
        require_fields(rows, self.fields, path, self)
        return rows

    def program(self, doc: Doc, completion: str) -> Program:
        entry = doc["entry_point"]
        code = self.solution(doc, completion, entry)
        canonical = doc["canonical_solution"]
        reference = canonical if entry in defined_names(canonical) else doc["prompt"] + canonical
        inputs = json.dumps(list(doc["base_input"]) + list(doc["plus_input"]))
        check = _COMPARE.format(
            reference=reference,
            entry=entry,
            inputs=inputs,
            atol=float(doc.get("atol") or 0),
            restore=self.restore(doc),
            not_none=self.not_none(doc),
        )
        return Program(code, check, (entry,))

    def restore(self, doc: Doc) -> str:
        """Source of ``_lopa_restore(args)``: the Python types a task's JSON-stored inputs stand for."""
        return "def _lopa_restore(a):\n    return a\n"

    def not_none(self, doc: Doc) -> bool:
        """True where the task's oracle compares only whether a result is returned."""
        return False


class HumanEvalPlus(PlusTask):
    name = "humaneval_plus"
    stop = HumanEval.stop
    data_help = (
        "HumanEvalPlus.jsonl(.gz) from the EvalPlus releases (github.com/evalplus/humanevalplus_release), fields "
        "task_id, prompt, entry_point, canonical_solution, base_input, plus_input, atol"
    )


class MBPPPlus(PlusTask):
    name = "mbpp_plus"
    stop = ("\nassert", '\n"""', "\nprint", "\nif __name__")
    data_help = (
        "MbppPlus.jsonl(.gz) from the EvalPlus releases (github.com/evalplus/mbppplus_release), fields task_id, "
        "prompt, entry_point, canonical_solution, base_input, plus_input, atol"
    )

    def restore(self, doc: Doc) -> str:
        return mbpp_plus_restore(str(doc["task_id"]))

    def not_none(self, doc: Doc) -> bool:
        return doc["entry_point"] in MBPP_PLUS_NOT_NONE
