"""The ``max_tokens`` cut of one prompt's output, applied alike to streamed and finished text."""

from __future__ import annotations

from typing import Any

from lopa.engine.output import Completion


class OutputCutter:
    """Applies the ``max_tokens`` cut to one prompt's output, incrementally and without revising text.

    Block decoders generate whole blocks, so ``max_new_tokens`` is ``max_tokens`` rounded up and the output is
    cut back here: the final text is the engine's text (which already honours stop strings and end tokens)
    truncated to the length of ``decode(token_ids[:max_tokens])``. Streaming and non-streaming apply the same
    rule, so their texts agree.
    """

    def __init__(self, tokenizer: Any, max_tokens: int | None) -> None:
        self._tokenizer = tokenizer
        self._max_tokens = max_tokens
        self._text = ""  # the engine's final text so far
        self._ids: list[int] = []
        self._limit: int | None = None  # characters allowed once the token cut is known
        self.emitted = ""

    def _limit_for(self, ids: list[int]) -> int | None:
        if self._max_tokens is None or len(ids) <= self._max_tokens:
            return None
        return len(self._tokenizer.decode(list(ids[: self._max_tokens])))

    def feed(self, text: str, token_ids: list[int]) -> str:
        """Take one stream event's new text and ids; return the text that may be shown now."""
        self._text += text
        self._ids.extend(token_ids)
        if self._limit is None:
            self._limit = self._limit_for(self._ids)
        end = len(self._text) if self._limit is None else min(len(self._text), self._limit)
        delta = self._text[len(self.emitted) : end]
        self.emitted += delta
        return delta

    def finish(self, completion: Completion) -> tuple[str, str, int]:
        """(text, finish_reason, completion_tokens) of the finished output, cut like the stream."""
        ids = completion.token_ids
        limit = self._limit_for(ids)
        if limit is None or len(completion.text) <= limit:
            text, reason = completion.text, completion.finish_reason
        else:
            text, reason = completion.text[:limit], "length"
        n_tokens = len(ids) if self._max_tokens is None else min(len(ids), self._max_tokens)
        return text, reason, n_tokens
