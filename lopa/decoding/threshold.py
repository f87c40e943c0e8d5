"""Fast-dLLM threshold decoding: one block at a time; fill every masked position of the current block whose
p(chosen) > τ, or its ``min_fill`` most confident positions if fewer pass (1 by default: the single most
confident one; SDAR's ``low_confidence_dynamic`` with ``min_fill = block_size // denoising_steps``). The
committed prefix is cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lopa.decoding.base import add_extra, fill_block, in_block
from lopa.decoding.blocks import GenState
from lopa.decoding.confidence import Prediction


@dataclass(frozen=True)
class ThresholdDecoder:
    block_size: int
    max_blocks: int
    threshold: float
    extra_fill: int = 0
    min_fill: int = 1
    name: str = "threshold"

    def prepare(self, state: GenState) -> None:
        if not state.active_blocks() and not state.end_seen and state.generated_blocks < self.max_blocks:
            state.add_block(self.block_size, fully_activated=True)

    def select(self, state: GenState, pred: Prediction) -> Tensor:
        keep = torch.zeros(pred.positions.numel(), dtype=torch.bool)
        active = state.active_blocks()
        if active:
            keep = fill_block(pred, active[0], self.threshold, fallback=True, min_fill=self.min_fill)
            keep = add_extra(keep, pred, in_block(pred, active[0]), self.extra_fill)
        return keep
