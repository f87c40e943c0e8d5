"""The decoding loop: one model forward per iteration, for every decoder (docs/algorithm.md §3).

Block decoders (threshold, d2f, and lopa over either) share one loop: prepare every candidate (append a
block, update activation), verify all candidates in one forward, pick the winner, commit its READY blocks,
apply the base decoder's fill to the winner with the winner's own predictions (the next anchor), and spawn
up to k lookahead branches from its remaining masked positions. Plain threshold / d2f are the k = 0 case:
the anchor is the only candidate. Vanilla decoding has its own small loop (no cache, one fill per step).

Both loops are generators that yield a :class:`Step` after every iteration, so callers can stream final text,
cancel between forwards, or just run to the end with :func:`run`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lopa.config import DecodeConfig
from lopa.decoding.base import BlockDecoder
from lopa.decoding.confidence import ORDER_TO_CONFIDENCE, Sampler
from lopa.decoding.d2f import D2FDecoder
from lopa.decoding.lopa import Branch, pick_winner, score_masks, spawn
from lopa.decoding.threshold import ThresholdDecoder
from lopa.decoding.vanilla import select_one
from lopa.engine.runner import Candidate, Runner
from lopa.outputs import Stats, TraceStep
from lopa.state import GenState

StopCheck = Callable[[list[int]], bool]


@dataclass
class Step:
    """Progress after one iteration. ``state`` is the anchor (its decoded prefix is final)."""

    state: GenState
    stats: Stats
    done: bool = False
    stopped: bool = False  # a stop string ended decoding early
    trace: list[TraceStep] | None = None


def make_decoder(cfg: DecodeConfig) -> BlockDecoder:
    """The block decoder that fills positions: lopa's base, or the decoder itself."""
    max_blocks = cfg.max_new_tokens // cfg.block_size
    if cfg.base_decoder == "threshold":
        return ThresholdDecoder(cfg.block_size, max_blocks, cfg.threshold, cfg.extra_fill)
    return D2FDecoder(cfg.block_size, max_blocks, cfg.threshold, cfg.tau_add, cfg.tau_act, cfg.extra_fill)


def sampler_for(cfg: DecodeConfig, mask_id: int, confidence: str | None = None) -> Sampler:
    return Sampler(mask_id, confidence or cfg.confidence, cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed)


def iteration_cap(cfg: DecodeConfig) -> int:
    """Safety cap on iterations; every iteration fills >= 1 position, so it is never reached normally."""
    return cfg.max_iterations or cfg.max_new_tokens + cfg.max_new_tokens // max(cfg.block_size, 1) + 8


def decode(
    runner: Runner,
    prompt: list[int],
    cfg: DecodeConfig,
    mask_id: int,
    end_ids: frozenset[int],
    stop: StopCheck | None = None,
) -> Iterator[Step]:
    """Decode one prompt with ``cfg``; yields a Step after every forward, the last one with done=True."""
    if cfg.decoder == "vanilla":
        yield from _decode_vanilla(runner, prompt, cfg, mask_id, end_ids, stop)
    else:
        yield from _decode_blocks(runner, prompt, cfg, mask_id, end_ids, stop)


def run(steps: Iterator[Step]) -> Step:
    """Drive a decode generator to its end and return the final Step."""
    last = None
    for last in steps:  # noqa: B007
        pass
    assert last is not None
    return last


def _decode_blocks(
    runner: Runner,
    prompt: list[int],
    cfg: DecodeConfig,
    mask_id: int,
    end_ids: frozenset[int],
    stop: StopCheck | None,
) -> Iterator[Step]:
    decoder, sampler, k = make_decoder(cfg), sampler_for(cfg, mask_id), cfg.num_branches
    runner.begin(len(prompt) + cfg.max_new_tokens, rows=k + 1)
    stats, trace = Stats(prompt_tokens=len(prompt)), [] if cfg.trace else None
    branches = [Branch(GenState.from_prompt(prompt, mask_id), "anchor")]
    while True:
        for b in branches:
            decoder.prepare(b.state)
        anchor = branches[-1].state
        if not anchor.active_blocks() or stats.forwards >= iteration_cap(cfg):
            break
        start, commit_len = anchor.window_start, anchor.ready_len
        predicted = [b.state.masked_positions(start) for b in branches]  # each (m_i,)
        masks = score_masks(branches, predicted, cfg.branch_score)
        cands = [
            Candidate(b.state.tokens[start:], p, m, b.stream)
            for b, p, m in zip(branches, predicted, masks, strict=True)
        ]
        scores = runner.verify(start, commit_len, cands, sampler, stats.forwards)
        stats.forwards += 1
        w = pick_winner(scores, cfg.force_anchor)
        winner, pred = branches[w].state, runner.prediction(w)
        runner.commit(w, commit_len)
        winner.mark_cached()
        keep = decoder.select(winner, pred)  # the anchor fill, from the winner's own logits
        winner.fill(pred.positions[keep], pred.tokens[keep], end_ids)
        winner.promote_ready()
        if trace is not None:
            trace.append(_trace_step(stats.forwards, branches, scores, w, pred.positions[keep], start + commit_len))
        branches = spawn(winner, pred.subset(~keep), k, end_ids) if k else [Branch(winner, "anchor")]
        stats.timing = dict(runner.timing)
        if stop is not None and stop(_final_ids(winner)):
            yield _finish(winner, stats, trace, end_ids, stopped=True)
            return
        yield Step(winner, stats, trace=trace)
    yield _finish(branches[-1].state, stats, trace, end_ids)


def _decode_vanilla(
    runner: Runner,
    prompt: list[int],
    cfg: DecodeConfig,
    mask_id: int,
    end_ids: frozenset[int],
    stop: StopCheck | None,
) -> Iterator[Step]:
    sampler = sampler_for(cfg, mask_id, ORDER_TO_CONFIDENCE[cfg.order])
    runner.begin(len(prompt) + cfg.max_new_tokens, rows=1, use_cache=False)
    state = GenState.from_prompt(prompt, mask_id)
    state.add_block(cfg.max_new_tokens, fully_activated=True)
    stats, trace = Stats(prompt_tokens=len(prompt)), [] if cfg.trace else None
    while state.masked_positions(state.prompt_len).numel() and stats.forwards < iteration_cap(cfg):
        masked = state.masked_positions(state.prompt_len)
        cand = Candidate(state.tokens, masked, torch.ones(masked.numel(), dtype=torch.bool))
        runner.verify(0, 0, [cand], sampler, stats.forwards)
        stats.forwards += 1
        pred = runner.prediction(0)
        i = select_one(pred)
        state.fill(pred.positions[i : i + 1], pred.tokens[i : i + 1], end_ids)
        if trace is not None:
            trace.append(
                _trace_step(
                    stats.forwards, [Branch(state, "anchor")], [float(pred.conf[i])], 0, pred.positions[i : i + 1], 0
                )
            )
        stats.timing = dict(runner.timing)
        ids = _final_ids(state)
        if stop is not None and stop(ids):
            yield _finish(state, stats, trace, end_ids, stopped=True)
            return
        if any(t in end_ids for t in ids):
            break  # an end token is filled and everything before it is decoded: the rest is never read
        yield Step(state, stats, trace=trace)
    yield _finish(state, stats, trace, end_ids, vanilla=True)


def _final_ids(state: GenState) -> list[int]:
    """The final part of the answer: generated tokens up to the first still-masked position."""
    return state.tokens[state.prompt_len : state.decoded_prefix_end()].tolist()


def answer_ids(state: GenState, end_ids: frozenset[int]) -> tuple[list[int], bool]:
    """(final generated ids before the first end token, whether an end token was produced). Never a mask."""
    ids = _final_ids(state)
    for i, t in enumerate(ids):
        if t in end_ids:
            return ids[:i], True
    return ids, False


def _finish(
    state: GenState,
    stats: Stats,
    trace: list[TraceStep] | None,
    end_ids: frozenset[int],
    stopped: bool = False,
    vanilla: bool = False,
) -> Step:
    ids, ended = answer_ids(state, end_ids)
    stats.tokens = len(ids) + int(ended)  # what the user receives, the end token counting 1
    stats.iterations = stats.forwards + 1  # the authors count the final, forward-less round too
    stats.decoded_positions = state.length - state.prompt_len if not vanilla else stats.forwards
    return Step(state, stats, done=True, stopped=stopped, trace=trace)


def _trace_step(
    iteration: int, branches: list[Branch], scores: list[float], winner: int, filled: torch.Tensor, committed: int
) -> TraceStep:
    cands = [
        {"kind": b.kind, "extra_position": b.extra_position, "extra_conf": b.extra_conf, "score": s}
        for b, s in zip(branches, scores, strict=False)
    ]
    return TraceStep(iteration, cands, winner, filled.tolist(), committed)
