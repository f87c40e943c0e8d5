r"""What decoding returns, and how its tokens become text: Completion, Stats, TraceStep, Step, TextStream.

The engine loop yields a :class:`Step` after every forward. :class:`TextOutput` turns Steps into text for one
tokenizer (the final answer, the :class:`Completion`, the stop-string check), and :class:`TextStream` turns one
sequence's Steps into :class:`StreamEvent`\ s: text is never revised (only the contiguous decoded prefix of the
answer is shown), an incomplete multi-byte character is held back, and so is the tail that could still turn into a
stop string. With ``DecodeConfig.trace`` each event also carries the trace steps recorded since the previous event
(the per-step hook for live views). The facade (``lopa/llm.py``) and the sessions (``engine/session.py``) both
use these; neither calls the other for text.

Metric definitions (docs/algorithm.md §5): ``forwards`` counts model forward calls, prefill included, a
batched verification of all branches counting 1; ``tokens`` counts generated tokens up to and including the
first end token; ``tpf = tokens / forwards``; ``tpf_paper`` is every decoded position of every generated
block divided by iterations (the authors' inflated number, shown only for comparison).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from lopa.config import DecodeConfig
    from lopa.decoding.blocks import GenState

FinishReason = Literal["stop", "length"]
StopCheck = Callable[[list[int]], bool]


@dataclass
class TraceStep:
    """One iteration (= one forward): what was verified, who won, and what got filled.

    The positions that became part of the answer at this forward are the winner's lookahead fill (when a
    lookahead branch won: ``candidates[winner]["extra_position"]`` and ``["extra_token"]``, predicted by the
    previous forward and accepted by this one's verification) plus ``filled`` (the base decoder's fill from this
    forward's predictions). Over a whole trace every decoded position appears exactly once.
    """

    iteration: int  # forward index, 1-based
    candidates: list[dict[str, Any]]  # each: kind ("anchor"|"lookahead"), extra_position/_token/_conf, score
    winner: int  # index into candidates
    filled: list[int]  # absolute positions filled by the winner's anchor fill this iteration
    committed: int  # cache length after this iteration
    tokens: list[int] = field(default_factory=list)  # token ids written at ``filled``, in the same order
    seconds: float = 0.0  # wall time from the start of decoding to the end of this iteration

    def fills(self) -> list[tuple[int, int, bool]]:
        """(absolute position, token id, came from the lookahead branch) of every position this forward added."""
        out = []
        won = self.candidates[self.winner] if self.candidates else {}
        if won.get("kind") == "lookahead" and won.get("extra_position", -1) >= 0:
            out.append((int(won["extra_position"]), int(won.get("extra_token", -1)), True))
        out.extend((p, t, False) for p, t in zip(self.filled, self.tokens, strict=False))
        return out


@dataclass
class Stats:
    forwards: int = 0
    tokens: int = 0
    iterations: int = 0
    decoded_positions: int = 0  # every decoded position of every generated block (for tpf_paper)
    seconds: float = 0.0
    prompt_tokens: int = 0
    batch_size: float = 1.0  # sequences per forward this sequence took part in (mean; 1 when decoded alone)
    timing: dict[str, float] = field(default_factory=dict)  # seconds per phase (forward, scoring, ...)

    @property
    def tpf(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    @property
    def tpf_paper(self) -> float:
        return self.decoded_positions / self.iterations if self.iterations else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(tpf=self.tpf, tpf_paper=self.tpf_paper, tokens_per_second=self.tokens_per_second)
        return d


@dataclass
class Completion:
    """One prompt's result. ``token_ids`` are the generated ids, end token excluded."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stats: Stats
    prompt_token_ids: list[int] = field(default_factory=list)
    trace: list[TraceStep] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }
        if self.trace is not None:
            d["trace"] = [asdict(t) for t in self.trace]
        return d


@dataclass
class Step:
    """Progress after one iteration. ``state`` is the anchor (its decoded prefix is final)."""

    state: GenState
    stats: Stats
    done: bool = False
    stopped: bool = False  # a stop string ended decoding early
    trace: list[TraceStep] | None = None


def final_ids(state: GenState) -> list[int]:
    """The final part of the answer: generated tokens up to the first still-masked position."""
    return state.tokens[state.prompt_len : state.decoded_prefix_end()].tolist()


def answer_ids(state: GenState, end_ids: frozenset[int]) -> tuple[list[int], bool]:
    """(final generated ids before the first end token, whether an end token was produced). Never a mask."""
    ids = final_ids(state)
    for i, t in enumerate(ids):
        if t in end_ids:
            return ids[:i], True
    return ids, False


@dataclass
class StreamEvent:
    """Text that became final since the previous event ('' if none); ``completion`` on the last event.

    With ``DecodeConfig.trace`` on, ``trace`` holds the trace steps recorded since the previous event (one per
    forward), so a client can show the decoding live; it is empty otherwise.
    """

    text: str
    token_ids: list[int]
    completion: Completion | None = None
    trace: list[TraceStep] = field(default_factory=list)


class Detokenizer(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class TextOutput:
    """Steps → text for one tokenizer: the final answer, the Completion and the stop-string check."""

    def __init__(self, tokenizer: Detokenizer, end_ids: frozenset[int]) -> None:
        self.tokenizer, self.end_ids = tokenizer, end_ids

    def stop_check(self, cfg: DecodeConfig) -> StopCheck | None:
        """Whether decoded ids (end token and after excluded) spell one of ``cfg.stop``; None without stops."""
        if not cfg.stop:
            return None

        def check(out: list[int]) -> bool:
            cut = next((i for i, t in enumerate(out) if t in self.end_ids), len(out))
            text = self.tokenizer.decode(out[:cut])
            return any(s in text for s in cfg.stop)

        return check

    def answer(self, step: Step, cfg: DecodeConfig) -> tuple[list[int], str, bool, bool]:
        """(token ids, text, end token produced, stop string hit) of the final part of the answer."""
        out, end_token = answer_ids(step.state, self.end_ids)
        text = self.tokenizer.decode(out)
        cut = min((text.find(x) for x in cfg.stop if x in text), default=-1)
        if cut < 0:
            return out, text, end_token, False
        while out and len(self.tokenizer.decode(out)) > cut:  # drop the tokens that spell the stop string
            out = out[:-1]
        return out, text[:cut], False, True

    def completion(self, step: Step, cfg: DecodeConfig, prompt: list[int], seconds: float) -> Completion:
        """The Completion of a finished Step (its stats' token count and time filled in)."""
        out, text, end_token, stop_hit = self.answer(step, cfg)
        stats = step.stats
        stats.tokens = len(out) + int(end_token)  # a stop string may have cut what the engine counted
        stats.seconds = seconds
        return Completion(
            text=text,
            token_ids=out,
            finish_reason="stop" if end_token or stop_hit else "length",
            stats=stats,
            prompt_token_ids=list(prompt),
            trace=step.trace,
        )


class TextStream:
    """One sequence's Steps → StreamEvents (see the module docstring)."""

    def __init__(self, output: TextOutput, ids: list[int], cfg: DecodeConfig) -> None:
        self.output, self.ids, self.cfg = output, ids, cfg
        self.t0 = time.perf_counter()
        self.shown_text, self.shown_ids = "", 0
        self.hold = max((len(s) for s in cfg.stop), default=1) - 1
        self.traced = 0  # trace records already handed out (one per forward)

    def feed(self, step: Step) -> StreamEvent:
        cfg = self.cfg
        completion = None
        if step.done:
            completion = self.output.completion(step, cfg, self.ids, time.perf_counter() - self.t0)
            out_ids, text = completion.token_ids, completion.text
        else:
            out_ids, text, _, _ = self.output.answer(step, cfg)
            text = text.rstrip("\ufffd")  # an incomplete multi-byte character may still change
            text = text[: max(len(text) - self.hold, len(self.shown_text))] if cfg.stop else text
        delta = text[len(self.shown_text) :] if text.startswith(self.shown_text) else ""
        self.shown_text += delta
        new_ids = out_ids[self.shown_ids :]
        self.shown_ids = max(self.shown_ids, len(out_ids))
        steps = step.trace[self.traced :] if step.trace is not None else []
        self.traced += len(steps)
        return StreamEvent(delta, new_ids, completion, steps)
