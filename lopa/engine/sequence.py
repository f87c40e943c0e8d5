"""One prompt's decoding as a state machine, so a loop can drive one sequence or many at once.

A sequence alternates two calls around every model forward (docs/algorithm.md §3):

- :meth:`plan` prepares its candidates (append a block, update activation, spawn nothing new) and returns the
  :class:`Plan` the runner verifies: the window start, how many positions the forward commits, and one
  :class:`~lopa.engine.runner.Candidate` per branch (lopa's lookahead branches first, the anchor last). It
  returns None once the sequence is finished; :attr:`final` then holds the last Step.
- :meth:`advance` takes the branch scores of that forward and a runner view (``prediction(i)``,
  ``commit(i, n)``, ``timing``), picks the winner, commits its READY span, applies the base decoder's fill
  and spawns the next lookahead branches. It returns the Step of this iteration (``done`` when a stop string
  ended decoding or, for vanilla, an end token did).

The single-sequence loop (``engine.decode``) and the batched scheduler (``engine/scheduler.py``) both drive
these objects, so a sequence does exactly the same work, forward for forward, whether it runs alone or in a
batch. Vanilla decoding (whole answer masked, no cache) is :class:`VanillaSequence`; on a block-causal model
(``align``) every decoder, vanilla included, is a :class:`BlockSequence` over block-aligned blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from lopa.config import DecodeConfig
from lopa.decoding.base import BlockDecoder
from lopa.decoding.blocks import GenState
from lopa.decoding.confidence import ORDER_TO_CONFIDENCE, Prediction, Sampler
from lopa.decoding.d2f import D2FDecoder
from lopa.decoding.lookahead import Branch, pick_winner, score_masks, spawn
from lopa.decoding.threshold import ThresholdDecoder
from lopa.decoding.vanilla import select_one
from lopa.engine.output import Stats, Step, StopCheck, TraceStep, answer_ids, final_ids
from lopa.engine.runner import Candidate


@dataclass
class Plan:
    """What one sequence asks the next forward to verify."""

    window_start: int  # first position not in the cache (0 for vanilla: no cache)
    commit_len: int  # leading window positions whose K/V this forward commits
    cands: list[Candidate]  # lookahead branches first, the anchor last
    iteration: int  # this sequence's forward count so far (seeds sampling)


class RunnerView(Protocol):
    """What :meth:`advance` needs from a runner after the forward of its plan."""

    timing: dict[str, float]

    def prediction(self, index: int) -> Prediction: ...

    def commit(self, index: int, n: int) -> None: ...


def make_decoder(cfg: DecodeConfig) -> BlockDecoder:
    """The block decoder that fills positions: lopa's base, or the decoder itself. Vanilla on a block-causal model
    is threshold with a τ nothing passes: one position per forward, block by block."""
    max_blocks = cfg.max_new_tokens // cfg.block_size
    if cfg.decoder == "vanilla":
        return ThresholdDecoder(cfg.block_size, max_blocks, float("inf"), name="vanilla")
    if cfg.base_decoder == "threshold":
        return ThresholdDecoder(cfg.block_size, max_blocks, cfg.threshold, cfg.extra_fill, cfg.min_fill)
    return D2FDecoder(cfg.block_size, max_blocks, cfg.threshold, cfg.tau_add, cfg.tau_act, cfg.extra_fill, cfg.min_fill)


def sampler_for(cfg: DecodeConfig, mask_id: int, confidence: str | None = None) -> Sampler:
    return Sampler(mask_id, confidence or cfg.confidence, cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed)


def iteration_cap(cfg: DecodeConfig) -> int:
    """Safety cap on iterations; every iteration fills >= 1 position, so it is never reached normally."""
    return cfg.max_iterations or cfg.max_new_tokens + cfg.max_new_tokens // max(cfg.block_size, 1) + 8


def new_sequence(
    prompt: list[int],
    cfg: DecodeConfig,
    mask_id: int,
    end_ids: frozenset[int],
    stop: StopCheck | None = None,
    align: int | None = None,
) -> BlockSequence | VanillaSequence:
    """The state machine that decodes ``prompt`` with ``cfg``. ``align``: the attention block of a block-causal
    model (:func:`lopa.engine.block_layout.layout_block`): generated blocks are aligned to its multiples, and vanilla
    decodes block by block over the exact cache (a :class:`BlockSequence` filling one position per forward)."""
    if cfg.decoder == "vanilla" and align is None:
        return VanillaSequence(prompt, cfg, mask_id, end_ids, stop)
    return BlockSequence(prompt, cfg, mask_id, end_ids, stop, align)


class BlockSequence:
    """Threshold, d2f, and lopa over either (plain threshold / d2f are lopa with k = 0)."""

    uses_cache = True

    def __init__(
        self,
        prompt: list[int],
        cfg: DecodeConfig,
        mask_id: int,
        end_ids: frozenset[int],
        stop: StopCheck | None,
        align: int | None = None,
    ) -> None:
        self.cfg, self.end_ids, self.stop = cfg, end_ids, stop
        confidence = ORDER_TO_CONFIDENCE[cfg.order] if cfg.decoder == "vanilla" else None
        self.decoder, self.sampler, self.k = make_decoder(cfg), sampler_for(cfg, mask_id, confidence), cfg.num_branches
        # aligned: the prompt's tail shares the first block, so the last block ends max_new_tokens after the
        # prompt's whole blocks (the answer gets max_new_tokens - P % align positions; never more than asked)
        tail = len(prompt) % align if align else 0
        self.max_len, self.rows = len(prompt) - tail + cfg.max_new_tokens, self.k + 1
        self.stats = Stats(prompt_tokens=len(prompt))
        self.trace: list[TraceStep] | None = [] if cfg.trace else None
        self.branches = [Branch(GenState.from_prompt(prompt, mask_id, align), "anchor")]
        self.final: Step | None = None
        self.t0 = 0.0  # trace times count from the first plan (a batch may admit the sequence later)

    @property
    def anchor(self) -> GenState:
        return self.branches[-1].state

    def plan(self) -> Plan | None:
        if self.final is not None:
            return None
        if not self.stats.forwards:
            self.t0 = time.perf_counter()
        for b in self.branches:
            self.decoder.prepare(b.state)
        anchor = self.anchor
        if not anchor.active_blocks() or self.stats.forwards >= iteration_cap(self.cfg):
            self.final = finish(anchor, self.stats, self.trace, self.end_ids)
            return None
        start, commit_len = anchor.window_start, anchor.ready_len
        predicted = [b.state.masked_positions(start) for b in self.branches]  # each (m_i,)
        masks = score_masks(self.branches, predicted, self.cfg.branch_score)
        cands = [
            Candidate(b.state.tokens[start:], p, m, b.stream)
            for b, p, m in zip(self.branches, predicted, masks, strict=True)
        ]
        return Plan(start, commit_len, cands, self.stats.forwards)

    def advance(self, plan: Plan, scores: list[float], runner: RunnerView) -> Step:
        self.stats.forwards += 1
        w = pick_winner(scores, self.cfg.force_anchor)
        winner, pred = self.branches[w].state, runner.prediction(w)
        runner.commit(w, plan.commit_len)
        winner.mark_cached()
        keep = self.decoder.select(winner, pred)  # the anchor fill, from the winner's own logits
        winner.fill(pred.positions[keep], pred.tokens[keep], self.end_ids)
        winner.promote_ready()
        if self.trace is not None:
            filled, committed = (pred.positions[keep], pred.tokens[keep]), plan.window_start + plan.commit_len
            self.trace.append(trace_step(self.stats.forwards, self.branches, scores, w, filled, committed, self.t0))
        k = self.k
        self.branches = spawn(winner, pred.subset(~keep), k, self.end_ids) if k else [Branch(winner, "anchor")]
        self.stats.timing = dict(runner.timing)
        if self.stop is not None and self.stop(final_ids(winner)):
            self.final = finish(winner, self.stats, self.trace, self.end_ids, stopped=True)
            return self.final
        return Step(winner, self.stats, trace=self.trace)


class VanillaSequence:
    """Dream's vanilla sampling: the whole answer masked, a full forward without cache, one fill per step."""

    uses_cache = False

    def __init__(
        self, prompt: list[int], cfg: DecodeConfig, mask_id: int, end_ids: frozenset[int], stop: StopCheck | None
    ) -> None:
        self.cfg, self.end_ids, self.stop = cfg, end_ids, stop
        self.sampler = sampler_for(cfg, mask_id, ORDER_TO_CONFIDENCE[cfg.order])
        self.max_len, self.rows = len(prompt) + cfg.max_new_tokens, 1
        self.state = GenState.from_prompt(prompt, mask_id)
        self.state.add_block(cfg.max_new_tokens, fully_activated=True)
        self.stats = Stats(prompt_tokens=len(prompt))
        self.trace: list[TraceStep] | None = [] if cfg.trace else None
        self.final: Step | None = None
        self.t0 = 0.0  # trace times count from the first plan (a batch may admit the sequence later)

    @property
    def anchor(self) -> GenState:
        return self.state

    def plan(self) -> Plan | None:
        if self.final is not None:
            return None
        if not self.stats.forwards:
            self.t0 = time.perf_counter()
        state = self.state
        masked = state.masked_positions(state.prompt_len)
        if not masked.numel() or self.stats.forwards >= iteration_cap(self.cfg):
            self.final = finish(state, self.stats, self.trace, self.end_ids, vanilla=True)
            return None
        cand = Candidate(state.tokens, masked, torch.ones(masked.numel(), dtype=torch.bool))
        return Plan(0, 0, [cand], self.stats.forwards)

    def advance(self, plan: Plan, scores: list[float], runner: RunnerView) -> Step:
        state, stats = self.state, self.stats
        stats.forwards += 1
        pred = runner.prediction(0)
        i = select_one(pred)
        state.fill(pred.positions[i : i + 1], pred.tokens[i : i + 1], self.end_ids)
        if self.trace is not None:
            filled = (pred.positions[i : i + 1], pred.tokens[i : i + 1])
            step = trace_step(stats.forwards, [Branch(state, "anchor")], [float(pred.conf[i])], 0, filled, 0, self.t0)
            self.trace.append(step)
        stats.timing = dict(runner.timing)
        ids = final_ids(state)
        if self.stop is not None and self.stop(ids):
            self.final = finish(state, stats, self.trace, self.end_ids, stopped=True)
            return self.final
        if any(t in self.end_ids for t in ids):
            # an end token is filled and everything before it is decoded: the rest is never read
            self.final = finish(state, stats, self.trace, self.end_ids, vanilla=True)
            return self.final
        return Step(state, stats, trace=self.trace)


def finish(
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


def trace_step(
    iteration: int,
    branches: list[Branch],
    scores: list[float],
    winner: int,
    filled: tuple[torch.Tensor, torch.Tensor],
    committed: int,
    t0: float,
) -> TraceStep:
    """The trace record of one iteration; ``filled`` is (positions, tokens) of the anchor fill, each (n,)."""
    cands = [
        {
            "kind": b.kind,
            "extra_position": b.extra_position,
            "extra_token": int(b.state.tokens[b.extra_position]) if b.extra_position >= 0 else -1,
            "extra_conf": b.extra_conf,
            "score": s,
        }
        for b, s in zip(branches, scores, strict=False)
    ]
    positions, tokens = filled
    seconds = time.perf_counter() - t0
    return TraceStep(iteration, cands, winner, positions.tolist(), committed, tokens.tolist(), seconds)
