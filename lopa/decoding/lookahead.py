"""LoPA: lookahead branches, branch scores and the winner (docs/algorithm.md §3.4).

From the winner's prediction after its anchor fill, lookahead branch j copies the anchor and fills one more
token at the j-th most confident remaining masked position. All candidates are verified in one batched
forward; a branch's score is the mean confidence over its own masked window positions (``mean``, the
paper's), or over the positions still masked in every candidate (``shared``), 1.0 when there are none. The
winner is the highest score; ties go to lookahead branches in creation order, the anchor last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lopa.decoding.blocks import GenState
from lopa.decoding.confidence import Prediction, rank


@dataclass
class Branch:
    state: GenState
    kind: str  # "anchor" | "lookahead"
    extra_position: int = -1  # lookahead: the position it filled beyond the anchor
    extra_conf: float = 0.0
    stream: int = 0  # sampling stream: 0 for the anchor, j + 1 for lookahead j


def spawn(anchor: GenState, remaining: Prediction, k: int, end_ids: frozenset[int]) -> list[Branch]:
    """Up to k lookahead branches, in creation order, followed by the anchor itself (always last)."""
    out = []
    for j, idx in enumerate(rank(remaining.conf)[:k].tolist()):
        s = anchor.copy()
        s.fill(remaining.positions[idx : idx + 1], remaining.tokens[idx : idx + 1], end_ids)
        out.append(Branch(s, "lookahead", int(remaining.positions[idx]), float(remaining.conf[idx]), j + 1))
    out.append(Branch(anchor, "anchor"))
    return out


def score_masks(branches: list[Branch], predicted: list[Tensor], mode: str) -> list[Tensor]:
    """Per branch, a bool mask over its predicted positions saying which ones enter its score."""
    if mode == "mean" or len(branches) == 1:
        return [torch.ones(p.numel(), dtype=torch.bool) for p in predicted]
    common = set(predicted[0].tolist())
    for p in predicted[1:]:
        common &= set(p.tolist())
    shared = torch.tensor(sorted(common), dtype=torch.long)
    return [torch.isin(p, shared) for p in predicted]


def branch_score(conf: Tensor, mask: Tensor) -> float:
    """Mean confidence over the masked positions selected by ``mask``; 1.0 when none is left."""
    return float(conf[mask].mean()) if mask.any() else 1.0


def pick_winner(scores: list[float], force_anchor: bool) -> int:
    """Index of the winning branch; the anchor is the last candidate and loses every tie."""
    if force_anchor:
        return len(scores) - 1
    return int(rank(torch.tensor(scores, dtype=torch.float64))[0])
