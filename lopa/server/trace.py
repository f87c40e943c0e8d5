"""The live trace stream's request and events (``POST /v1/trace``; the routes are :mod:`lopa.server.routes.trace`).

A trace request is a completions request for ONE prompt (``prompt``, raw like ``/v1/completions``) or one
conversation (``messages``, through the chat template like ``/v1/chat/completions``), decoded with
``DecodeConfig.trace`` on. The answer is a stream of named Server-Sent Events (docs/serve.md, "Trace stream"):
``start`` (settings, prompt length, answer positions), one ``step`` per forward (positions filled, with the
lookahead fill marked, every candidate's score and the winner, seconds since decoding started), then ``done``
(final text, usage, the text each answer position contributes) or ``error``. Positions are answer positions:
0 is the first generated position.

This module holds :class:`TraceRequest`, the event framing, :class:`StepConverter` (a TraceStep → a ``step``
event's JSON) and the text each answer position contributes. The page (``static/``: index.html, app.js,
stream.js, style.css; no build step, no network) is served from the package (``STATIC_DIR``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    model_validator,
)

from lopa.engine.output import TraceStep
from lopa.server.jobs import Job
from lopa.server.protocol import ChatMessage, InvalidFieldError, check_stop, reject_invalid_text
from lopa.server.sse import JobStreamResponse

if TYPE_CHECKING:
    from lopa import LLM

STATIC_DIR = Path(__file__).parent / "static"


_TRACE_PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
        {"type": "null"},
    ],
    "description": "a non-empty text or a non-empty list of token ids",
}


class TraceRequest(BaseModel):
    """``POST /v1/trace``: one prompt or one conversation, with the completions API's decoding fields."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    prompt: Annotated[StrictStr | list[StrictInt] | None, WithJsonSchema(_TRACE_PROMPT_SCHEMA)] = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(default=None, ge=0)
    stop: StrictStr | list[StrictStr] | None = None
    lopa: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        return reject_invalid_text(data)

    @model_validator(mode="after")
    def _one_prompt(self) -> TraceRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidFieldError("give exactly one of 'prompt' (raw text or token ids) and 'messages'")
        if self.prompt is not None and len(self.prompt) == 0:
            raise InvalidFieldError("'prompt' must not be empty")
        if self.messages is not None and not self.messages:
            raise InvalidFieldError("'messages' must not be empty")
        if isinstance(self.prompt, list) and any(t < 0 for t in self.prompt):
            raise InvalidFieldError("token ids in 'prompt' must be >= 0")
        check_stop(self.stop)
        return self


class TraceStreamResponse(JobStreamResponse):
    """``text/event-stream`` of named events (start, step, done / error)."""

    def __init__(self, events: AsyncIterator[tuple[str, dict]], job: Job) -> None:
        super().__init__(_frame(events), job)


async def _frame(events: AsyncIterator[tuple[str, dict]]) -> AsyncIterator[str]:
    async for name, data in events:
        yield f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


class StepConverter:
    """TraceStep → the JSON of a ``step`` event, in answer positions; remembers every token it has seen."""

    def __init__(self, llm: LLM, prompt_len: int) -> None:
        self._decode = llm.tokenizer.decode
        self._end_ids = llm.end_ids
        self.prompt_len = prompt_len
        self.tokens: dict[int, int] = {}  # answer position -> token id, as filled so far

    def _text(self, token: int) -> str:
        return self._decode([token], skip_special_tokens=False) if token in self._end_ids else self._decode([token])

    def step(self, s: TraceStep) -> dict[str, Any]:
        filled = []
        for position, token, lookahead in s.fills():
            pos = position - self.prompt_len
            self.tokens[pos] = token
            end = token in self._end_ids
            filled.append(
                {"position": pos, "token": token, "text": self._text(token), "lookahead": lookahead, "end": end}
            )
        candidates = []
        for c in s.candidates:
            extra = c.get("extra_position", -1) >= 0
            token = c.get("extra_token", -1)
            candidates.append(
                {
                    "kind": c["kind"],
                    "position": c["extra_position"] - self.prompt_len if extra else None,
                    "token": token if extra else None,
                    "text": self._text(token) if extra and token >= 0 else None,
                    "confidence": round(float(c.get("extra_conf", 0.0)), 6) if extra else None,
                    "score": round(float(c["score"]), 6),
                }
            )
        return {
            "forward": s.iteration,
            "seconds": round(s.seconds, 6),
            "filled": filled,
            "candidates": candidates,
            "winner": s.winner,
            "committed": max(0, s.committed - self.prompt_len),
        }

    def answer_ids(self) -> list[int]:
        """The answer's token ids up to the first end token (or the first position not filled)."""
        ids: list[int] = []
        for pos in range(len(self.tokens)):
            token = self.tokens.get(pos)
            if token is None or token in self._end_ids:
                break
            ids.append(token)
        return ids

    def pieces(self) -> list[str]:
        """The text each answer position adds to the decoded answer, up to the first end token (or a gap).

        ``"".join(pieces)`` equals ``decode(answer ids)``; a position whose token completes a multi-byte
        character carries the whole character, the ones before it ''. Linear in the answer length: each
        position's text is the growth of a short window that starts at an earlier character boundary (the
        way streaming detokenizers work), not of the whole prefix; when the window's pieces do not add up to
        the decoded answer (a tokenizer that rewrites earlier text), the exact quadratic rule is used instead.
        """
        ids = self.answer_ids()
        out = windowed_pieces(self._decode, ids)
        if "".join(out) != self._decode(ids):
            out = prefix_pieces(self._decode, ids)
        return out


def windowed_pieces(decode: Callable[[list[int]], str], ids: list[int]) -> list[str]:
    """Pieces from ``decode`` of a window ``ids[start:n]``; the window starts at the previous clean boundary.

    A clean boundary is a position after which the decoded text ends in no partial character (no U+FFFD).
    The start moves there each time one is reached, so the window holds a few tokens and every decode is
    short; both the shown text and the new text are decoded from the same start, so a tokenizer that treats
    the first token of a text specially (a dropped leading space) affects both alike.
    """
    out: list[str] = []
    start = read = 0  # window start; the latest clean boundary
    shown = ""  # the text shown so far, decoded from ``start``
    for n in range(1, len(ids) + 1):
        raw = decode(ids[start:n])
        text = raw if n == len(ids) else raw.rstrip("\ufffd")
        if text.startswith(shown):
            out.append(text[len(shown) :])
            shown = text
        else:  # rewritten earlier text: the caller's check falls back to prefix_pieces
            out.append("")
        if not raw.endswith("\ufffd"):
            start, read = read, n
            shown = decode(ids[start:n]) if start < n else ""
    return out


def prefix_pieces(decode: Callable[[list[int]], str], ids: list[int]) -> list[str]:
    """Pieces from decoding every prefix (quadratic in ``len(ids)``): the rule :func:`windowed_pieces` follows."""
    out, shown = [], ""
    for n in range(1, len(ids) + 1):
        text = decode(ids[:n])
        if n < len(ids):
            text = text.rstrip("\ufffd")
        if text.startswith(shown):
            out.append(text[len(shown) :])
            shown = text
        else:  # the tokenizer rewrote earlier text (rare): give it to this position, keep the sum exact
            out.append("")
    if ids and "".join(out) != decode(ids):
        out[-1] += decode(ids)[len("".join(out)) :]
    return out
