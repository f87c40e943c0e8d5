"""GenState: one branch's sequence and its blocks (docs/algorithm.md §2). Pure data, no model or cache.

The sequence is the prompt followed by generated blocks of ``block_size`` positions, appended one at a time.
Block states move ACTIVE → READY → CACHED and never back:

- ACTIVE: still has masks, or waits for an earlier active block;
- READY: fully decoded with no earlier active block; the next forward re-encodes it and commits its K/V;
- CACHED: committed; no longer part of the window.

The prompt is block 0 and starts READY. READY blocks always precede ACTIVE ones, so the window (READY then
ACTIVE blocks) is one contiguous span ``[window_start, len)`` and its first ``ready_len`` positions get committed.

Block-aligned layout (``align``, block-causal models): generated blocks sit at absolute multiples of ``align``.
Block 0 is then the prompt's whole blocks ``[0, P - P % align)`` (possibly empty), and the first generated block
is the aligned block holding the end of the prompt: its prompt tokens are fixed (never masked, never filled) and
only its remaining positions are generated.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor


class BlockState(enum.Enum):
    ACTIVE = "active"
    READY = "ready"
    CACHED = "cached"


@dataclass
class Block:
    start: int
    end: int
    state: BlockState = BlockState.ACTIVE
    fully_activated: bool = False  # D2F: predecessor decoded ratio reached tau_act (never reset)

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class GenState:
    """Tokens (prompt + blocks; ``mask_id`` where undecoded) and block bookkeeping of one branch."""

    tokens: Tensor  # (length,) long, on CPU
    prompt_len: int
    mask_id: int
    blocks: list[Block] = field(default_factory=list)
    end_seen: bool = False  # an end token was filled: no new blocks

    @classmethod
    def from_prompt(cls, prompt: list[int] | Tensor, mask_id: int, align: int | None = None) -> GenState:
        """The prompt as READY block 0: all of it, or (``align``) its whole blocks of ``align`` positions."""
        tokens = torch.as_tensor(prompt, dtype=torch.long).clone()
        end = len(tokens) if align is None else len(tokens) - len(tokens) % align
        return cls(tokens, len(tokens), mask_id, [Block(0, end, BlockState.READY, True)])

    def copy(self) -> GenState:
        blocks = [Block(b.start, b.end, b.state, b.fully_activated) for b in self.blocks]
        return GenState(self.tokens.clone(), self.prompt_len, self.mask_id, blocks, self.end_seen)

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return int(self.tokens.numel())

    @property
    def generated_blocks(self) -> int:
        return len(self.blocks) - 1

    def masked(self, block: Block) -> int:
        return int((self.tokens[block.start : block.end] == self.mask_id).sum())

    def decoded_ratio(self, block: Block) -> float:
        return 1.0 - self.masked(block) / block.size if block.size else 1.0

    def active_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.state is BlockState.ACTIVE]

    @property
    def window_start(self) -> int:
        """First position not in the cache."""
        for b in self.blocks:
            if b.state is not BlockState.CACHED:
                return b.start
        return self.length

    @property
    def ready_len(self) -> int:
        """Positions at the head of the window whose K/V the next forward commits."""
        return sum(b.size for b in self.blocks if b.state is BlockState.READY)

    def masked_positions(self, start: int = 0) -> Tensor:
        """Absolute positions >= start still holding the mask token, ascending. (m,)"""
        return (self.tokens[start:] == self.mask_id).nonzero().flatten() + start

    def decoded_prefix_end(self) -> int:
        """End of the contiguous decoded span after the prompt (these tokens are final)."""
        masked = self.masked_positions(self.prompt_len)
        return int(masked[0]) if masked.numel() else self.length

    # ---- transitions ---------------------------------------------------------------------------------
    def add_block(self, size: int, fully_activated: bool = False) -> None:
        """Append the block after the last one; positions it adds beyond the tokens start masked (a block-aligned
        layout's first block also holds the prompt's tail, which stays as it is)."""
        start = self.blocks[-1].end
        masks = start + size - self.length
        self.tokens = torch.cat([self.tokens, torch.full((masks,), self.mask_id, dtype=torch.long)])
        self.blocks.append(Block(start, start + size, BlockState.ACTIVE, fully_activated))

    def fill(self, positions: Tensor, tokens: Tensor, end_ids: frozenset[int]) -> None:
        """Write ``tokens`` at ``positions``; an end token stops new blocks."""
        if positions.numel() == 0:
            return
        self.tokens[positions] = tokens
        if any(int(t) in end_ids for t in tokens):
            self.end_seen = True

    def mark_cached(self) -> None:
        """The forward just committed every READY block."""
        for b in self.blocks:
            if b.state is BlockState.READY:
                b.state = BlockState.CACHED

    def promote_ready(self) -> None:
        """Fully decoded ACTIVE blocks with no earlier ACTIVE block become READY (cascading in order)."""
        for b in self.blocks:
            if b.state is BlockState.ACTIVE:
                if self.masked(b):
                    return
                b.state = BlockState.READY
