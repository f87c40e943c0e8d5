"""The task registry: name -> task object, used by ``lopa eval``, ``lopa sweep`` and the lm-eval adapter."""

from __future__ import annotations

from lopa.errors import ConfigError
from lopa.eval.tasks.base import Doc, Score, Task
from lopa.eval.tasks.code import MBPP, HumanEval
from lopa.eval.tasks.evalplus import HumanEvalPlus, MBPPPlus
from lopa.eval.tasks.math import GSM8K, MATH, Tiny

TASKS: dict[str, type[Task]] = {t.name: t for t in (Tiny, GSM8K, MATH, HumanEval, MBPP, HumanEvalPlus, MBPPPlus)}

__all__ = ["TASKS", "Doc", "Score", "Task", "get_task"]


def get_task(name: str) -> Task:
    """A fresh task object by name; unknown names list the known ones."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]()
