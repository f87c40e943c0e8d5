"""Helpers shared by the tests that compare the engine with tests/support/reference_decoder.py: graded random
checkpoints, prompts, an engine decode with its runner, and the step-for-step comparison of a decode with the
reference's."""

from __future__ import annotations

import random

import pytest
import torch

from lopa.config import DecodeConfig
from lopa.engine.loop import decode, run
from lopa.engine.runner import Runner
from lopa.engine.sequence import Step
from tests.support.engine_utils import END, EOS, MASK, peaky_model
from tests.support.reference_decoder import Commit, ReferenceTransformer, RefResult, replay

SCORE_TOL = 1e-4  # scores are means of fp32 confidences from two independent fp32 forwards
KV_TOL = 1e-5


def graded_model(seed: int, family: str) -> torch.nn.Module:
    """A random checkpoint with graded confidences (a scaled head spreads them over (0, 1), no ties); the end token
    is damped so decoding runs past a block or two."""
    model = peaky_model(seed, sharpness=5.0, family=family)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 0.3
    return model


def prompt_for(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(0, 60) for _ in range(rng.randrange(3, 10))]


def engine_decode(model: torch.nn.Module, prompt: list[int], cfg: DecodeConfig) -> tuple[Step, Runner]:
    """Final Step (with its trace) of the single-device engine, and the runner that holds its cache."""
    runner = Runner(model)
    return run(decode(runner, prompt, cfg.replace(trace=True).validate(), MASK, END)), runner


def assert_same_decode(step: Step, ref: RefResult, what: object) -> None:
    """Tokens, forwards and every step's spawned positions, scores, winner, fill and committed length agree."""
    assert step.state.tokens.tolist() == ref.tokens, what
    assert step.stats.forwards == ref.forwards, what
    assert step.trace is not None and len(step.trace) == len(ref.steps), what
    for i, (got, want) in enumerate(zip(step.trace, ref.steps, strict=True)):
        at = (what, "step", i + 1)
        spawned = [c["extra_position"] for c in got.candidates if c["kind"] == "lookahead"]
        assert spawned == want.spawned, at
        assert [c["kind"] for c in got.candidates] == ["lookahead"] * len(want.spawned) + ["anchor"], at
        scores = [c["score"] for c in got.candidates]
        assert scores == pytest.approx(want.scores, abs=SCORE_TOL, rel=0), at
        assert got.winner == want.winner, at
        assert got.filled == want.filled, at
        assert got.committed == want.committed, at


def replayed_kv(model: ReferenceTransformer, commits: list[Commit]) -> tuple[torch.Tensor, torch.Tensor]:
    """The committed K and V the winners' windows produce, recomputed from scratch: (layers, kv_heads, n, head_dim)."""
    kv, _ = replay(model, commits)
    return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


def lookahead_commits(ref: RefResult) -> int:
    """Steps whose forward committed K/V of a winning lookahead row (where committing the anchor's row differs)."""
    out, before = 0, 0
    for s in ref.steps:
        out += s.committed > before and s.winner < len(s.spawned)
        before = s.committed
    return out
