"""The single-sequence decoding loop: one model forward per iteration, for every decoder (docs/algorithm.md §3).

Block decoders (threshold, d2f, and lopa over either) share one loop: prepare every candidate (append a
block, update activation), verify all candidates in one forward, pick the winner, commit its READY blocks,
apply the base decoder's fill to the winner with the winner's own predictions (the next anchor), and spawn
up to k lookahead branches from its remaining masked positions. Plain threshold / d2f are the k = 0 case:
the anchor is the only candidate. Vanilla decoding has no cache and fills one position per step. The work of
one iteration lives in ``engine/sequence.py``; this loop only feeds one sequence's plans to a runner (the
eager, fast or branch-parallel one). ``engine/scheduler.py`` feeds many sequences to one batched forward.

:func:`decode` is a generator that yields a :class:`Step` after every iteration, so callers can stream final
text, cancel between forwards, or just run to the end with :func:`run`.
"""

from __future__ import annotations

from collections.abc import Iterator

from lopa.config import DecodeConfig
from lopa.engine.block_layout import layout_block
from lopa.engine.runner import Runner
from lopa.engine.sequence import Step, StopCheck, new_sequence


def decode(
    runner: Runner,
    prompt: list[int],
    cfg: DecodeConfig,
    mask_id: int,
    end_ids: frozenset[int],
    stop: StopCheck | None = None,
) -> Iterator[Step]:
    """Decode one prompt with ``cfg``; yields a Step after every forward, the last one with done=True."""
    seq = new_sequence(prompt, cfg, mask_id, end_ids, stop, layout_block(runner.model.config, cfg))
    runner.begin(seq.max_len, rows=seq.rows, use_cache=seq.uses_cache)
    while (plan := seq.plan()) is not None:
        scores = runner.verify(plan.window_start, plan.commit_len, plan.cands, seq.sampler, plan.iteration)
        step = seq.advance(plan, scores, runner)
        yield step
        if step.done:
            return
    assert seq.final is not None
    yield seq.final


def run(steps: Iterator[Step]) -> Step:
    """Drive a decode generator to its end and return the final Step."""
    last = None
    for last in steps:  # noqa: B007
        pass
    assert last is not None
    return last
