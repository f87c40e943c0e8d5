"""What a generation returns: Completion, its Stats and the optional per-step trace.

Metric definitions (docs/algorithm.md §5): ``forwards`` counts model forward calls, prefill included, a
batched verification of all branches counting 1; ``tokens`` counts generated tokens up to and including the
first end token; ``tpf = tokens / forwards``; ``tpf_paper`` is every decoded position of every generated
block divided by iterations (the authors' inflated number, shown only for comparison).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length"]


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
