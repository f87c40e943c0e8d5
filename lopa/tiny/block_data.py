"""The SDAR training objective for the tiny block-diffusion model: row layout, noise, attention mask and loss.

Row layout (shared by training and by the block-causal greedy loop in ``lopa.tiny.block_evaluate``)::

    [ prompt (P tokens) | answer | end tokens ... ]   length = max_prompt + answer room, rounded up to a block

The prompt sits at its real positions (0..P-1), the answer starts at P, and blocks are aligned to absolute
position 0, as SDAR decodes: the block holding the end of the prompt is decoded with the prompt tokens fixed in
it. No padding: the tail after the answer is end tokens (the end token is also the pad token), trained like the
answer so that the model learns to stop.

Training (SDAR's, from BD3-LM): a row is run as two copies side by side, ``[noisy | clean]``, the clean copy at
the same positions as the noisy one and without its last block (which no noisy block may see). Attention (query
row, key column):

- noisy block b sees noisy block b (block diagonal) and clean blocks < b (offset block-causal);
- clean block b sees clean blocks <= b (block-causal): the clean copy is what the cache holds at inference.

Noise: one ratio per row, ``p = (1 - eps) t + eps`` with ``t ~ U(0, 1)``; every non-prompt position of the noisy
copy is masked with probability p (at least one is). Loss: cross-entropy at the masked noisy positions, each
weighted by ``1 / p`` (the masked-diffusion ELBO), summed and divided by the batch's number of non-prompt
positions. No logit shift: the output at position i predicts the token at i.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lopa.tiny.task import Problem

NOISE_EPS = 1e-3  # smallest mask ratio (SDAR's eps)


@dataclass(frozen=True)
class BlockLayout:
    """Geometry of a row of the block model: prompt room, answer room, the attention block and the special ids."""

    max_prompt: int
    answer_room: int
    block_size: int
    end_id: int
    mask_id: int

    @property
    def length(self) -> int:
        """Row length: prompt room + answer room, rounded up to whole blocks."""
        total = self.max_prompt + self.answer_room
        return -(-total // self.block_size) * self.block_size

    @property
    def num_blocks(self) -> int:
        return self.length // self.block_size


def encode_rows(
    problems: list[Problem], encode: Callable[[str], list[int]], layout: BlockLayout, with_answer: bool = True
) -> tuple[Tensor, Tensor]:
    """Rows for ``problems``: ids (rows, L) and prompt (rows, L) bool, True on prompt positions.

    With ``with_answer`` the non-prompt positions hold the answer, its end token and an end-token tail; without,
    they are all mask. Positions are ``arange(L)`` for every row.
    """
    rows, length = len(problems), layout.length
    ids = torch.full((rows, length), layout.end_id, dtype=torch.long)  # (rows, L)
    prompt_mask = torch.zeros(rows, length, dtype=torch.bool)  # (rows, L)
    for r, p in enumerate(problems):
        prompt = encode(p.prompt)
        if len(prompt) > layout.max_prompt:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds the layout's {layout.max_prompt}")
        ids[r, : len(prompt)] = torch.tensor(prompt)
        prompt_mask[r, : len(prompt)] = True
        if with_answer:
            answer = encode(" " + p.target) + [layout.end_id]
            if len(answer) > layout.answer_room:
                raise ValueError(f"answer of {len(answer)} tokens exceeds the layout's {layout.answer_room}")
            ids[r, len(prompt) : len(prompt) + len(answer)] = torch.tensor(answer)
        else:
            ids[r, len(prompt) :] = layout.mask_id
    return ids, prompt_mask


def block_causal_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(L, L) bool [query, key]: query i sees key j iff ``j // block_size <= i // block_size``."""
    blocks = torch.arange(length, device=device) // block_size  # (L,)
    return blocks[None, :] <= blocks[:, None]


def training_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(2L - B, 2L - B) bool [query, key] over ``[noisy | clean]``, B = block_size: see the module docstring.

    The clean copy's last block is left out: no noisy block may see it, so it changes no loss.
    """
    blocks = torch.arange(length, device=device) // block_size  # (L,)
    q, k = blocks[:, None], blocks[None, :]  # (L, 1), (1, L)
    noisy_noisy = q == k  # block diagonal
    noisy_clean = k < q  # offset block-causal
    clean_clean = k <= q  # block-causal
    clean_noisy = torch.zeros(length, length, dtype=torch.bool, device=device)
    full = torch.cat([torch.cat([noisy_noisy, noisy_clean], 1), torch.cat([clean_noisy, clean_clean], 1)], 0)
    keep = 2 * length - block_size
    return full[:keep, :keep]


def noise(ids: Tensor, prompt_mask: Tensor, layout: BlockLayout, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Mask the non-prompt positions of each row with its own ratio.

    Returns noisy ids (rows, L), the loss mask (rows, L) bool (masked positions) and the ratio per row (rows,).
    A row that drew no masked position gets one, drawn uniformly among its non-prompt positions.
    """
    rows, length = ids.shape
    ratio = (1 - NOISE_EPS) * torch.rand(rows, generator=gen) + NOISE_EPS  # (rows,)
    draw = torch.rand(rows, length, generator=gen)  # (rows, L)
    masked = (draw < ratio[:, None]) & ~prompt_mask  # (rows, L)
    forced = torch.rand(rows, length, generator=gen).masked_fill(prompt_mask, -1.0).argmax(1)  # (rows,)
    none = ~masked.any(1)
    masked[none, forced[none]] = True
    noisy = torch.where(masked, torch.full_like(ids, layout.mask_id), ids)
    return noisy, masked, ratio


def training_batch(
    rng: random.Random,
    gen: torch.Generator,
    sampler: Callable[[random.Random], Problem],
    encode: Callable[[str], list[int]],
    layout: BlockLayout,
    rows: int,
) -> dict[str, Tensor]:
    """One noised batch (CPU): the two-copy ids and positions, the clean targets, loss mask, ratios and prompt."""
    problems = [sampler(rng) for _ in range(rows)]
    clean, prompt_mask = encode_rows(problems, encode, layout)
    noisy, loss_mask, ratio = noise(clean, prompt_mask, layout, gen)
    positions = torch.arange(layout.length).expand(rows, -1)  # (rows, L)
    keep = layout.length - layout.block_size
    return {
        "ids": torch.cat([noisy, clean[:, :keep]], 1),  # (rows, 2L - B): the clean copy without its last block
        "positions": torch.cat([positions, positions[:, :keep]], 1),  # (rows, 2L - B)
        "targets": clean,  # (rows, L)
        "loss_mask": loss_mask,  # (rows, L)
        "ratio": ratio,  # (rows,)
        "prompt_mask": prompt_mask,  # (rows, L)
    }


def noisy_logits_idx(rows: int, layout: BlockLayout, device: torch.device | str = "cpu") -> Tensor:
    """(rows, L) indices of the noisy copy, whose outputs the loss reads (no shift)."""
    return torch.arange(layout.length, device=device)[None].expand(rows, -1)


def weighted_loss(logits: Tensor, targets: Tensor, loss_mask: Tensor, ratio: Tensor, prompt_mask: Tensor) -> Tensor:
    """SDAR's loss: sum over masked positions of ``CE / p``, divided by the number of non-prompt positions.

    logits: (rows, L, vocab) of the noisy copy; targets, loss_mask, prompt_mask: (rows, L); ratio: (rows,).
    """
    ce = torch.nn.functional.cross_entropy(logits[loss_mask].float(), targets[loss_mask], reduction="none")  # (n,)
    weight = ratio[:, None].expand_as(loss_mask)[loss_mask]  # (n,)
    return (ce / weight).sum() / (~prompt_mask).sum()
