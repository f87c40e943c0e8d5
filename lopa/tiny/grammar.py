"""Well-formedness of a tiny-task answer: does it parse as one consistent wording per step?

Grammar (wordings from ``lopa.tiny.task``)::

    answer  := start opener? step (filler? step)* closing      start := {v} {item} "."
    step    := one of ADD_STEPS / SUB_STEPS with {v} {n} numbers and {c} a run of numbers
    closing := one of CLOSINGS with {r} a number, {name} / {item} any name / item of the task

and the numbers must agree inside the answer: a step's run counts by one (up for an add wording, down for a
subtract wording) starting right after {v}, and has exactly {n} numbers; the first step starts from the
restated start, each later step's {v} is the previous step's last number (a ``then`` wording has no {v}: it
continues from there); both {r} of the closing equal the last
number counted. The question's numbers are not checked here (exact-answer accuracy covers them), so a garbled
text that happens to end in the right ``#### N`` is caught, and a well-formed text with a wrong start is not.
Called by ``lopa.tiny.bench`` and the tests.
"""

from __future__ import annotations

import re

from lopa.tiny.task import ADD_STEPS, CLOSINGS, FILLERS, ITEMS, NAMES, OPENERS, SUB_STEPS

_TOKEN_RE = re.compile(r"####|\d+|[A-Za-z]+|[^\w\s]")


def tokens(text: str) -> list[str]:
    """Words, numbers and punctuation marks of ``text`` (how the tiny tokenizer splits it)."""
    return _TOKEN_RE.findall(text)


def _split(template: str) -> list[str]:
    return template.split()


_OPENERS = sorted((_split(o) for o in OPENERS), key=len, reverse=True)
_FILLERS = sorted((_split(f) for f in FILLERS), key=len, reverse=True)
_STEPS = [(+1, _split(t)) for t in ADD_STEPS] + [(-1, _split(t)) for t in SUB_STEPS]
_CLOSINGS = [_split(c) for c in CLOSINGS]


def _match_step(toks: list[str], i: int, unit: int, form: list[str], prev: int | None) -> tuple[int, int] | None:
    """Match one step wording at ``toks[i:]``; returns (next index, last counted number) or None."""
    v = n = None
    for slot in form:
        if slot == "{c}":
            run: list[int] = []
            while i < len(toks) and toks[i].isdigit():
                run.append(int(toks[i]))
                i += 1
            start = v if v is not None else prev
            if n is None or len(run) != n or not run:
                return None
            if start is None:  # a first step without {v}: the run itself fixes where it starts
                start = run[0] - unit
            if run != [start + unit * (k + 1) for k in range(n)]:
                return None
            last = run[-1]
            continue
        if i >= len(toks):
            return None
        tok = toks[i]
        if slot in ("{v}", "{n}"):
            if not tok.isdigit():
                return None
            if slot == "{v}":
                v = int(tok)
                if prev is not None and v != prev:
                    return None
            else:
                n = int(tok)
        elif tok != slot:
            return None
        i += 1
    return i, last


def _match_closing(toks: list[str], i: int, last: int) -> bool:
    for form in _CLOSINGS:
        j, ok = i, True
        for slot in form:
            if j >= len(toks):
                ok = False
                break
            tok = toks[j]
            if slot == "{r}":
                ok = tok.isdigit() and int(tok) == last
            elif slot == "{name}":
                ok = tok in NAMES
            elif slot == "{item}":
                ok = tok in ITEMS
            else:
                ok = tok == slot
            if not ok:
                break
            j += 1
        if ok and j == len(toks):
            return True
    return False


def _steps(toks: list[str], i: int, prev: int | None, first: bool) -> bool:
    """Steps from ``toks[i:]`` (a filler may precede every step but the first), then the closing."""
    fillers = [[]] if first else _FILLERS
    for filler in fillers:
        if toks[i : i + len(filler)] != filler:
            continue
        j = i + len(filler)
        for unit, form in _STEPS:
            matched = _match_step(toks, j, unit, form, prev)
            if matched is None:
                continue
            k, last = matched
            if _match_closing(toks, k, last) or _steps(toks, k, last, first=False):
                return True
    return False


def parse(text: str) -> bool:
    """True when ``text`` (an answer, without the prompt or end token) is well-formed under the task's grammar."""
    toks = tokens(text)
    if len(toks) < 3 or not toks[0].isdigit() or toks[1] not in ITEMS or toks[2] != ".":
        return False
    start = int(toks[0])
    return any(toks[3 : 3 + len(o)] == o and _steps(toks, 3 + len(o), start, first=True) for o in _OPENERS)
