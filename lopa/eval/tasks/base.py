"""What a benchmark task is: its documents, how a prompt is rendered, and how a completion is scored.

Every task module subclasses :class:`Task`; :mod:`lopa.eval.runner` drives them. A task renders the final
prompt text itself (so few-shot turns, chat templates and response prefixes live in one place) and the runner
sends that text verbatim (``raw=True``). Math tasks score in-process with :meth:`Task.score`; code tasks return
a :class:`~lopa.eval.sandbox.Program` (solution, tests, entry points) from :meth:`Task.program`, which the
runner executes in the sandbox.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lopa.errors import ConfigError

if TYPE_CHECKING:
    from lopa.eval.sandbox import Program

Doc = dict[str, Any]
Messages = list[dict[str, str]]


class ChatTokenizer(Protocol):
    has_chat_template: bool

    def apply_chat_template(self, messages: Messages) -> str: ...


@dataclass(frozen=True)
class Score:
    """The outcome of one sample: correct or not, what was extracted, and extra per-sample fields."""

    correct: bool
    extracted: str | None
    extra: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class. Subclasses set the class attributes and implement ``load_docs``, ``turns`` and scoring."""

    name: str = ""
    stop: tuple[str, ...] = ()
    max_new_tokens: int = 256  # used unless --max-new-tokens is given
    chat_default: bool = True  # use the chat template when the checkpoint has one (--chat auto)
    is_code: bool = False
    num_fewshot: int = 0
    data_help: str = ""  # where to get the data file and its format; shown when --data is missing or bad
    response_prefix: str = ""  # chat mode: text the assistant turn starts with (part of the completion)

    def load_docs(self, path: Path | None) -> list[Doc]:
        raise NotImplementedError

    def stops(self, chat: bool) -> tuple[str, ...]:
        """Stop strings for the prompt style in use."""
        return self.stop

    def shots(self) -> list[tuple[str, str]]:
        """Few-shot (question text, answer text) pairs, in order."""
        return []

    def question(self, doc: Doc) -> str:
        raise NotImplementedError

    def raw_prompt(self, doc: Doc, shots: list[tuple[str, str]]) -> str:
        """The completion-style prompt: shots then the question, joined like lm-eval (blank line between)."""
        parts = [q + a for q, a in shots] + [self.question(doc)]
        return "\n\n".join(parts)

    def chat_turns(self, doc: Doc, shots: list[tuple[str, str]]) -> Messages:
        """Few-shot as multi-turn (lm-eval's --fewshot_as_multiturn): user question / assistant answer pairs."""
        turns: Messages = []
        for q, a in shots:
            turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a.strip()}]
        return turns + [{"role": "user", "content": self.question(doc)}]

    def render(self, doc: Doc, tokenizer: ChatTokenizer, chat: bool, num_fewshot: int | None = None) -> str:
        """The exact prompt text sent to the model."""
        k = self.num_fewshot if num_fewshot is None else num_fewshot
        shots = self.shots()
        if k > len(shots):
            raise ConfigError(f"task {self.name} has {len(shots)} few-shot examples; --num-fewshot {k} is too many")
        shots = shots[:k]
        if chat and tokenizer.has_chat_template:
            return tokenizer.apply_chat_template(self.chat_turns(doc, shots)) + self.response_prefix
        return self.raw_prompt(doc, shots)

    def completion_text(self, completion: str, chat: bool) -> str:
        """What is scored: the generated text, after the response prefix when one was sent."""
        return self.response_prefix + completion if chat else completion

    def decode_defaults(self, generation_config: dict[str, Any]) -> dict[str, Any]:
        """DecodeConfig fields this task sets unless the user gives them (the checkpoint's generation config
        is passed for tasks tied to one model)."""
        return {"max_new_tokens": self.max_new_tokens}

    def doc_id(self, doc: Doc, index: int) -> str:
        return str(doc.get("task_id", doc.get("id", index)))

    def score(self, doc: Doc, completion: str) -> Score:  # math-style tasks
        raise NotImplementedError

    def program(self, doc: Doc, completion: str) -> Program:  # code tasks: the solution and the task's tests
        raise NotImplementedError

    def target(self, doc: Doc) -> str | None:
        """Reference answer shown in the per-sample file (None for code tasks)."""
        return None


def read_records(path: Path, task: Task) -> list[Doc]:
    """Rows of a .jsonl / .jsonl.gz / .json (list) file; a missing or unreadable file names the expected data."""
    if not path.exists():
        raise ConfigError(f"data file {path} does not exist. {task.name} needs: {task.data_help}")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
        if path.suffix == ".json":
            rows = json.loads(text)
            rows = rows if isinstance(rows, list) else rows.get("data", rows.get("test", []))
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"cannot read {path} as {task.name} data ({e}). Expected: {task.data_help}") from e
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{path} holds no JSON objects. Expected: {task.data_help}")
    return rows


def require_fields(rows: list[Doc], fields: tuple[str, ...], path: Path, task: Task) -> None:
    missing = [f for f in fields if f not in rows[0]]
    if missing:
        raise ConfigError(f"{path}: rows lack field(s) {missing} (found {sorted(rows[0])}). Expected: {task.data_help}")


def need_path(path: Path | None, task: Task) -> Path:
    if path is None:
        raise ConfigError(f"task {task.name} needs --data PATH (nothing is downloaded): {task.data_help}")
    return path
