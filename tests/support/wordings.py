"""Every phrasing of a tiny-task problem, enumerated with ``task.render``: the independent reference that
``lopa.tiny.posterior`` and the scripts judging fills by it are checked against."""

from __future__ import annotations

from collections.abc import Callable

from lopa.tiny import task
from lopa.tiny.posterior import FREE


def all_answers(p: task.Problem, encode: Callable[[str], list[int]], end: int, room: int) -> list[list[int]]:
    """Every phrasing of ``p`` as ``room`` ids (text, end token, end/pad tail), as the training rows encode them."""
    out = []
    for w in task.all_wordings(p.num_ops):
        ids = encode(" " + task.render(p, w)) + [end]
        out.append(ids + [end] * (room - len(ids)))
    return out


def agrees(answer: list[int], fixed: list[int]) -> bool:
    """``answer`` holds every fixed position of ``fixed`` (``FREE`` where not fixed)."""
    return all(f in (FREE, t) for f, t in zip(fixed, answer, strict=True))
