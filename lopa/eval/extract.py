"""Answer extraction for the math tasks: GSM8K final numbers and MATH boxed answers with equivalence checking.

Called by :mod:`lopa.eval.tasks.math`. GSM8K follows lm-eval's two filters: ``strict`` (the ``#### N`` line)
and ``flexible`` (the last number); the task scores the first of ``#### N``, "the answer is N", ``\\boxed{N}``
and the last number. MATH follows the Minerva harness: the "Final Answer: The final answer is X. I hope it is
correct." line, else the last ``\\boxed{}``; answers are normalized (units, ``\\text``, ``\\left``, dfrac,
``\\frac12``) and then compared as strings, as numbers, element-wise for tuples and intervals, and finally
symbolically with sympy on a whitelisted expression (never ``eval`` of arbitrary model text).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

# ----------------------------------------------------------------------------------------------- GSM8K

_NUM = r"[-−]?\s?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-−]?\.\d+"
_STRICT = re.compile(r"####\s*\**\s*(" + _NUM + ")")
_ANSWER_IS = re.compile(r"answer is:?\s*\**\s*(?:\\\(|\$)?\s*(?:\\boxed\{)?\s*(" + _NUM + ")", re.IGNORECASE)
_BOXED_NUM = re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}")
_ANY_NUM = re.compile(_NUM)


@dataclass(frozen=True)
class GSM8KAnswer:
    strict: str | None  # from "#### N" (lm-eval strict-match)
    flexible: str | None  # the last number in the text (lm-eval flexible-extract)
    answer: str | None  # what the task scores: ####, then "the answer is", then \boxed, then the last number


def normalize_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5', '−3' -> '-3', '18.' -> '18'; None when it is not a number."""
    s = text.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "").rstrip(".").rstrip("%")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    out = format(value.normalize(), "f")
    return "0" if out in ("-0", "0") else out


def gsm8k_target(answer_field: str) -> str:
    """The reference number of a GSM8K ``answer`` field (the text after ``####``)."""
    raw = answer_field.split("####")[-1].strip()
    return normalize_number(raw) or raw


def extract_gsm8k(text: str) -> GSM8KAnswer:
    text = text.split("Question:")[0]  # the few-shot stop string: anything after it is the next question
    strict = _first(_STRICT, text)
    numbers = _ANY_NUM.findall(text)
    flexible = normalize_number(numbers[-1]) if numbers else None
    answer = strict or _first(_ANSWER_IS, text) or _first(_BOXED_NUM, text) or flexible
    return GSM8KAnswer(strict=strict, flexible=flexible, answer=answer)


def gsm8k_correct(prediction: str | None, target: str) -> bool:
    if prediction is None:
        return False
    a, b = normalize_number(prediction), normalize_number(target)
    return a is not None and a == b


def _first(pattern: re.Pattern[str], text: str) -> str | None:
    m = pattern.search(text)
    return normalize_number(m.group(1)) if m else None


# ------------------------------------------------------------------------------------------------ MATH

_FINAL = re.compile(r"Final Answer: The final answer is(.*?)\. I hope it is correct\.", re.DOTALL)
_UNITS = (
    "square units|square feet|square inches|square meters|units|dollars|cents|degrees|inches|inch|feet|ft|"
    "meters|cm|km|mph|hours|minutes|seconds|days|pounds|ways|integers|students|points|digits|edges|meals"
)
_UNIT_WORDS = re.compile(r"(\\(?:text|mbox|mathrm)\{\s*(?:" + _UNITS + r")\s*\})|(?<=[\d}\s])\s*(?:" + _UNITS + r")\b")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces handled), or ``\\boxed 5``."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:]
    if rest.startswith("\\boxed ") and not rest.startswith("\\boxed {"):
        return re.split(r"[\s$]", rest[len("\\boxed ") :].lstrip(), maxsplit=1)[0] or None
    start = rest.find("{")
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(rest)):
        depth += {"{": 1, "}": -1}.get(rest[i], 0)
        if depth == 0:
            return rest[start + 1 : i]
    return None  # unbalanced: the generation was cut off inside the box


def extract_math(text: str) -> str | None:
    """The final answer of a MATH solution: the Minerva "Final Answer" line, else the last box."""
    text = text.split("Problem:")[0]
    m = _FINAL.search(text)
    if m:
        return m.group(1).strip()
    return last_boxed(text)


def normalize_math(answer: str) -> str:
    """Minerva/Hendrycks-style normalization of a LaTeX answer to a canonical string."""
    s = answer.strip()
    boxed = last_boxed(s)
    s = boxed if boxed is not None else s
    s = s.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", "")
    s = re.sub(r"\\(?:left|right)\b", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\%", "").replace("%", "").replace("\\$", "")
    s = s.replace("$", "")
    s = _UNIT_WORDS.sub("", s)
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm|operatorname)\{(.*?)\}", r"\1", s)
    if re.fullmatch(r"\s*[a-zA-Z]\w*\s*=[^=<>]*", s):  # "x = 5" -> "5", but keep "x=1,y=2" style pairs intact
        s = s.split("=", 1)[1]
    s = s.replace(" ", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)  # \frac1{2}
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)  # \sqrt2
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)  # .5 -> 0.5
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d*", s):
        s = s.rstrip("0").rstrip(".")
    return s


def math_equiv(prediction: str | None, target: str) -> bool:
    """True when two MATH answers are the same value (string, number, tuple/interval or symbolic match)."""
    if prediction is None:
        return False
    a, b = normalize_math(prediction), normalize_math(target)
    return a == b or _equiv_normalized(a, b)


def _equiv_normalized(a: str, b: str) -> bool:
    pa, pb = _split_top_level(a), _split_top_level(b)
    if pa is not None and pb is not None:  # tuples, intervals, lists: same brackets, element-wise equal
        (oa, ea, ca), (ob, eb, cb) = pa, pb
        return (
            oa == ob
            and ca == cb
            and len(ea) == len(eb)
            and all(_scalar_equiv(x, y) for x, y in zip(ea, eb, strict=True))
        )
    return _scalar_equiv(a, b)


def _scalar_equiv(a: str, b: str) -> bool:
    if a == b:
        return True
    va, vb = _to_sympy(a), _to_sympy(b)
    if va is None or vb is None:
        return False
    try:
        if va.free_symbols or vb.free_symbols:
            import sympy

            return bool(sympy.simplify(va - vb) == 0)
        return math.isclose(float(va), float(vb), rel_tol=1e-6, abs_tol=1e-9)
    except Exception:  # noqa: BLE001 - sympy raises many types on odd input; unequal is the safe answer
        return False


def _split_top_level(s: str) -> tuple[str, list[str], str] | None:
    """'(1,2)' -> ('(', ['1', '2'], ')'); '[2,5)' -> ('[', ['2', '5'], ')'); None when not a bracketed list."""
    if len(s) < 2 or s[0] not in "([{" or s[-1] not in ")]}":
        return None
    inner, parts, depth, cur = s[1:-1], [], 0, ""
    for ch in inner:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return (s[0], parts, s[-1]) if len(parts) > 1 else None


_SAFE_NAMES = {"sqrt", "pi", "oo", "E"}
_MAX_SYMPY_CHARS = 80  # simplify() on long inputs can take seconds; long answers get the string check only


def _to_sympy(s: str):  # noqa: ANN202 - a sympy expression or None
    """Parse a normalized LaTeX answer into sympy, only when it is plain arithmetic on known names."""
    expr = _latex_to_python(s)
    if expr is None or len(expr) > _MAX_SYMPY_CHARS or not re.fullmatch(r"[0-9a-zA-Z+\-*/(). ]*", expr):
        return None
    if any(len(n) > 1 and n not in _SAFE_NAMES for n in re.findall(r"[A-Za-z_]+", expr)):
        return None  # only single-letter variables and whitelisted names reach the parser (it uses eval)
    try:
        from sympy.parsing.sympy_parser import (
            convert_xor,
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )

        transforms = standard_transformations + (implicit_multiplication_application, convert_xor)
        return parse_expr(expr, transformations=transforms, evaluate=True)
    except Exception:  # noqa: BLE001 - unparsable means "not comparable", not an error
        return None


def _latex_to_python(s: str) -> str | None:
    """Brace-aware rewrite of \\frac, \\sqrt and a few symbols into Python syntax; None on other commands."""
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", "pi").replace("\\infty", "oo")
    out, i = [], 0
    while i < len(s):
        if s.startswith("\\frac", i):
            num, i = _group(s, i + 5)
            den, i = _group(s, i)
            if num is None or den is None:
                return None
            out.append(f"(({num})/({den}))")
        elif s.startswith("\\sqrt", i):
            i += 5
            root = None
            if i < len(s) and s[i] == "[":
                end = s.find("]", i)
                if end < 0:
                    return None
                root, i = _latex_to_python(s[i + 1 : end]), end + 1
            arg, i = _group(s, i)
            if arg is None:
                return None
            out.append(f"(({arg})**(1/({root})))" if root else f"sqrt({arg})")
        elif s[i] == "\\":
            return None
        else:
            out.append({"{": "(", "}": ")", "^": "**"}.get(s[i], s[i]))
            i += 1
    return "".join(out)


def _group(s: str, i: int) -> tuple[str | None, int]:
    """The converted brace group (or single character) starting at ``s[i]``, and the index after it."""
    if i >= len(s):
        return None, i
    if s[i] != "{":
        return _latex_to_python(s[i]), i + 1
    depth = 0
    for j in range(i, len(s)):
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return _latex_to_python(s[i + 1 : j]), j + 1
    return None, len(s)
