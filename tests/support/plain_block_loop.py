"""A plain d2f / threshold loop written from docs/algorithm.md §2-3, for tests that need a base run built apart from
the engine's sequence state machine and decoders (``lopa.engine.sequence``, ``lopa.decoding``'s block decoders).

It shares only the forward itself with the engine: :class:`~lopa.engine.runner.Runner` (one forward over the
window, the cache, the frozen last logit) and the sampler that turns logits into (token, p, confidence). Blocks,
activation, the fill rule, the fallback, end handling and commits are its own. Threshold decoding is d2f with
τ_add = τ_act = 1 (§3.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lopa.config import DecodeConfig
from lopa.decoding.confidence import Sampler
from lopa.engine.runner import Candidate, Runner


@dataclass
class _Block:
    start: int
    end: int
    state: str  # "active" | "ready" | "cached"
    full: bool  # fully activated


def plain_block_decode(
    model: nn.Module, prompt: list[int], cfg: DecodeConfig, mask: int, end: frozenset[int]
) -> tuple[list[int], int]:
    """(generated positions after the prompt, forwards) of d2f, or of threshold when ``cfg.decoder`` says so."""
    tau_add, tau_act = (1.0, 1.0) if cfg.decoder == "threshold" else (cfg.tau_add, cfg.tau_act)
    size, max_blocks = cfg.block_size, cfg.max_new_tokens // cfg.block_size
    tokens = list(prompt)
    blocks = [_Block(0, len(prompt), "ready", True)]
    sampler = Sampler(mask, cfg.confidence, cfg.temperature, cfg.top_p, cfg.top_k, cfg.seed)
    runner = Runner(model)
    runner.begin(len(prompt) + cfg.max_new_tokens, rows=1)
    ended, forwards = False, 0

    def ratio(b: _Block) -> float:
        return sum(t != mask for t in tokens[b.start : b.end]) / (b.end - b.start)

    while True:
        # (a) a new block once the last one is decoded enough, unless an end token was filled or the limit is reached
        if not ended and len(blocks) - 1 < max_blocks and ratio(blocks[-1]) >= tau_add:
            blocks.append(_Block(len(tokens), len(tokens) + size, "active", False))
            tokens += [mask] * size
        # (b) activation
        for prev, b in zip(blocks, blocks[1:], strict=False):
            b.full = b.full or ratio(prev) >= tau_act
        if not any(b.state == "active" for b in blocks):
            return tokens[len(prompt) :], forwards
        # (c) one forward over the window: READY blocks (committed by it) then ACTIVE ones
        start = next(b.start for b in blocks if b.state != "cached")
        commit = sum(b.end - b.start for b in blocks if b.state == "ready")
        masked = [p for p in range(start, len(tokens)) if tokens[p] == mask]
        cand = Candidate(torch.tensor(tokens[start:]), torch.tensor(masked), torch.ones(len(masked), dtype=torch.bool))
        runner.verify(start, commit, [cand], sampler, forwards)
        pred = runner.prediction(0)
        runner.commit(0, commit)
        forwards += 1
        for b in blocks:
            b.state = "cached" if b.state == "ready" else b.state
        # (d) fill p > τ in every active block; a fully activated block that passes nothing takes its most
        # confident position (ties: the lower position)
        chosen: list[int] = []
        for b in (b for b in blocks if b.state == "active"):
            inside = [i for i, p in enumerate(masked) if b.start <= p < b.end]
            above = [i for i in inside if float(pred.prob[i]) > cfg.threshold]
            if not above and b.full and inside:
                above = [max(inside, key=lambda i: (float(pred.conf[i]), -i))]
            chosen += above
        for i in chosen:
            tokens[masked[i]] = int(pred.tokens[i])
            ended = ended or int(pred.tokens[i]) in end
        # (e) decoded blocks become READY in order, stopping at the first one still masked
        for b in blocks:
            if b.state == "active":
                if mask in tokens[b.start : b.end]:
                    break
                b.state = "ready"
