"""D2F (Discrete Diffusion Forcing) pipelined block decoding: several blocks in flight.

Before the forward: append a block when the last one's decoded ratio reaches τ_add (no end token seen, limit
allows), and fully activate every block whose predecessor's ratio reaches τ_act. After it: each active block
fills positions with p(chosen) > τ_conf; a fully activated block that filled fewer than ``min_fill`` (1: nothing)
fills its ``min_fill`` most confident positions; semi-activated blocks fill only above-threshold positions. With
τ_add = τ_act = 1 this is threshold decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lopa.decoding.base import add_extra, fill_block
from lopa.decoding.blocks import GenState
from lopa.decoding.confidence import Prediction


@dataclass(frozen=True)
class D2FDecoder:
    block_size: int
    max_blocks: int
    threshold: float  # τ_conf
    tau_add: float
    tau_act: float
    extra_fill: int = 0
    min_fill: int = 1
    name: str = "d2f"

    def prepare(self, state: GenState) -> None:
        last = state.blocks[-1]
        can_add = not state.end_seen and state.generated_blocks < self.max_blocks
        if can_add and state.decoded_ratio(last) >= self.tau_add:
            state.add_block(self.block_size)
        for prev, block in zip(state.blocks, state.blocks[1:], strict=False):
            if not block.fully_activated and state.decoded_ratio(prev) >= self.tau_act:
                block.fully_activated = True

    def select(self, state: GenState, pred: Prediction) -> Tensor:
        keep = torch.zeros(pred.positions.numel(), dtype=torch.bool)
        for block in state.active_blocks():
            keep |= fill_block(pred, block, self.threshold, block.fully_activated, self.min_fill)
        return add_extra(keep, pred, torch.ones_like(keep), self.extra_fill)
