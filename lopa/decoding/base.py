"""What every block decoder provides, and helpers they share.

A block decoder has two moves per iteration (docs/algorithm.md §3): ``prepare`` (before the forward: append
a block, update activation) and ``select`` (after it: which masked positions of the window the anchor fills,
given the prediction of that branch). The engine applies the selection, promotes READY blocks and, for
LoPA, spawns lookahead branches; decoders only decide.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from lopa.decoding.blocks import Block, GenState
from lopa.decoding.confidence import Prediction, rank


class BlockDecoder(Protocol):
    name: str

    def prepare(self, state: GenState) -> None:
        """Append a block and update activation before the forward."""

    def select(self, state: GenState, pred: Prediction) -> Tensor:
        """Bool mask over ``pred`` positions that the anchor fills this iteration."""


def in_block(pred: Prediction, block: Block) -> Tensor:
    """Bool mask (m,) of predicted positions inside ``block``."""
    return (pred.positions >= block.start) & (pred.positions < block.end)


def fill_block(pred: Prediction, block: Block, threshold: float, fallback: bool, min_fill: int = 1) -> Tensor:
    """Positions of ``block`` whose p(chosen) > threshold; with ``fallback``, when fewer than ``min_fill`` pass,
    its ``min_fill`` most confident ones instead (capped by what is masked): SDAR's ``low_confidence_dynamic``."""
    inside = in_block(pred, block)
    keep = inside & (pred.prob > threshold)
    if fallback and int(keep.sum()) < min_fill and inside.any():
        conf = torch.where(inside, pred.conf, torch.full_like(pred.conf, float("-inf")))
        keep = torch.zeros_like(keep)
        keep[rank(conf)[: min(min_fill, int(inside.sum()))]] = True
    return keep


def add_extra(keep: Tensor, pred: Prediction, eligible: Tensor, n: int) -> Tensor:
    """Also fill the ``n`` most confident eligible positions not already kept (the no-search control)."""
    if n <= 0:
        return keep
    rest = eligible & ~keep
    conf = torch.where(rest, pred.conf, torch.full_like(pred.conf, float("-inf")))
    order = rank(conf)[: int(rest.sum())][:n]
    keep = keep.clone()
    keep[order] = True
    return keep
