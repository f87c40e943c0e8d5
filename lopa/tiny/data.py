"""Training and evaluation tensors for the tiny model: encoding, the block layout, and the D2F-style noise.

Row layout (shared by training and by the greedy evaluation in ``lopa.tiny.evaluate``)::

    [ left pad | prompt (P tokens) | answer block 1 | block 2 | ... ]   length = max_prompt + answer_len

Positions start at 0 on the first prompt token, as in the engine. Pad keys are invisible. Block ids: pad and
prompt are block 0, answer block b covers ``block_size`` positions. The attention layout is block-causal, which
is what the block decoders do at inference: a committed block sees only what precedes it and itself; the active
block sees the cache and itself; later blocks do not exist yet.

Noise: each answer block gets a mask ratio, never decreasing along the answer (D2F); a position is masked with
its block's probability. Half the rows imitate threshold decoding (clean blocks, one active block, all-mask later
blocks), the other half use sorted uniform ratios. In half of the threshold-like rows the active block is still
all-mask and the block before it may see it: that is the engine's forward that commits a block together with the
next, fresh one (full attention inside the window), whose logits start the fresh block. Without it the engine
lost 11 points of accuracy against this module's own block-causal decoding (88.7% vs 100% on the test split).
The loss (Dream's shifted logits: the output at ``i - 1`` predicts token ``i``) covers masked answer positions,
including the end/pad tail after the answer so the model learns to emit the end token and then pad.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lopa.tiny.posterior import FREE, Phrasings, soft_targets
from lopa.tiny.task import Problem


@dataclass(frozen=True)
class Layout:
    """Geometry of a row: prompt room, answer blocks and the special ids."""

    max_prompt: int
    block_size: int
    num_blocks: int
    end_id: int
    mask_id: int

    @property
    def answer_len(self) -> int:
        return self.block_size * self.num_blocks

    @classmethod
    def of_checkpoint(cls, generation_config: dict[str, Any], ids: dict[str, int], max_prompt: int = 32) -> Layout:
        """The layout a tiny checkpoint decodes with: its recommended blocks (``generation_config.json``; 32 and 64
        new tokens when absent), ``lopa train``'s default prompt room, and the tokenizer's end and mask ids."""
        block = int(generation_config.get("block_size", 32))
        blocks = int(generation_config.get("max_new_tokens", 64)) // block
        return cls(max_prompt, block, blocks, ids["eos_token_id"], ids["mask_token_id"])

    @property
    def length(self) -> int:
        return self.max_prompt + self.answer_len


def encode_rows(
    problems: list[Problem], encode: Callable[[str], list[int]], layout: Layout, with_answer: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded rows for ``problems``.

    Returns ids (rows, L) with the answer + end/pad tail (or all-mask answers when ``with_answer`` is False),
    positions (rows, L) and valid (rows, L) bool (False on left padding).
    """
    length, p = layout.length, layout.max_prompt
    id_rows, pos_rows, valid_rows = [], [], []  # built as lists, one tensor each at the end
    for problem in problems:
        prompt = encode(problem.prompt)
        if len(prompt) > p:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds the layout's {p}")
        pad = p - len(prompt)
        if with_answer:
            answer = encode(" " + problem.target) + [layout.end_id]
            if len(answer) > layout.answer_len:
                raise ValueError(f"answer of {len(answer)} tokens exceeds the layout's {layout.answer_len}")
            answer += [layout.end_id] * (layout.answer_len - len(answer))  # end/pad tail
        else:
            answer = [layout.mask_id] * layout.answer_len
        id_rows.append([layout.end_id] * pad + prompt + answer)
        pos_rows.append([0] * pad + list(range(length - pad)))
        valid_rows.append([False] * pad + [True] * (length - pad))
    shape = (len(problems), length)
    ids = torch.tensor(id_rows, dtype=torch.long).view(shape)  # (rows, L)
    positions = torch.tensor(pos_rows, dtype=torch.long).view(shape)  # (rows, L)
    valid = torch.tensor(valid_rows, dtype=torch.bool).view(shape)  # (rows, L)
    return ids, positions, valid


def fixed_positions(answer: Tensor, layout: Layout) -> list[int]:
    """An answer (answer_len,) as ``Phrasings`` takes it: its tokens, with ``posterior.FREE`` where it is masked."""
    return [FREE if t == layout.mask_id else t for t in answer.tolist()]


def block_ids(layout: Layout, device: torch.device | str = "cpu") -> Tensor:
    """(L,) block index of each position: 0 for pad + prompt, b for answer block b (1-based)."""
    answer = torch.arange(layout.answer_len, device=device) // layout.block_size + 1
    return torch.cat([torch.zeros(layout.max_prompt, dtype=torch.long, device=device), answer])


def block_causal_mask(valid: Tensor, layout: Layout) -> Tensor:
    """(rows, L, L) bool: query block may see key blocks up to its own, never pad keys; pads see themselves."""
    blocks = block_ids(layout, valid.device)  # (L,)
    causal = blocks[None, :] <= blocks[:, None]  # (L, L): [query, key]
    mask = causal[None] & valid[:, None, :]  # (rows, L, L)
    eye = torch.eye(layout.length, dtype=torch.bool, device=valid.device)
    return mask | eye[None]  # a pad query with no visible key would make softmax NaN


def block_ratios(rows: int, num_blocks: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mask ratios (rows, num_blocks), non-decreasing along the answer in every row, and the fresh block (rows,).

    ``fresh[r]`` is the 0-based index of an all-mask active block whose predecessor may see it (-1: none).
    """
    sorted_uniform = torch.sort(torch.rand(rows, num_blocks, generator=gen), dim=1).values
    active = torch.randint(0, num_blocks, (rows, 1), generator=gen)  # (rows, 1)
    idx = torch.arange(num_blocks)[None]  # (1, num_blocks)
    is_fresh = torch.rand(rows, 1, generator=gen) < 0.5
    partial = torch.where(is_fresh, 1.0, torch.rand(rows, 1, generator=gen).clamp_min(0.05))
    threshold_like = torch.where(idx < active, 0.0, torch.where(idx == active, partial, 1.0))
    use_threshold = torch.rand(rows, 1, generator=gen) < 0.5
    fresh = torch.where(use_threshold & is_fresh, active, -1).squeeze(1)  # (rows,)
    return torch.where(use_threshold, threshold_like, sorted_uniform), fresh


def open_fresh_blocks(mask: Tensor, valid: Tensor, fresh: Tensor, layout: Layout) -> Tensor:
    """Let the block before each row's fresh block see it, as in the engine's window (ready + active block).

    At inference a block is committed by the forward that also runs the next, still all-mask, block with full
    attention inside the window; that forward also gives the logit for the next block's first position.
    mask: (rows, L, L); valid: (rows, L); fresh: (rows,) 0-based answer block index or -1.
    """
    blocks = block_ids(layout, mask.device)  # (L,): 0 = prompt, b = answer block b (1-based)
    before = blocks[None, :] == fresh[:, None]  # (rows, L) queries: the block before the fresh one
    after = blocks[None, :] == fresh[:, None] + 1  # (rows, L) keys: the fresh block
    return mask | (before[:, :, None] & (after & valid)[:, None, :])


def open_window(mask: Tensor, window: Tensor, layout: Layout) -> Tensor:
    """Full attention among each row's window blocks, as in the engine's D2F forward over blocks in flight.

    mask: (rows, L, L); window: (rows, num_blocks) bool, True for the answer blocks of the window (answer positions
    only: left padding belongs to block 0, never in a window).
    """
    blocks = block_ids(layout, mask.device)  # (L,)
    padded = torch.cat([torch.zeros_like(window[:, :1]), window], 1)  # (rows, 1 + num_blocks): block 0 = prompt
    inside = padded.gather(1, blocks[None].expand(window.shape[0], -1))  # (rows, L)
    return mask | (inside[:, :, None] & inside[:, None, :])


def noise(ids: Tensor, layout: Layout, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Mask answer positions by block ratio.

    Returns noisy ids (rows, L), the loss mask (rows, L) bool and the fresh block per row (rows,), see
    :func:`block_ratios`.
    """
    rows = ids.shape[0]
    ratios, fresh = block_ratios(rows, layout.num_blocks, gen)  # (rows, blocks), (rows,)
    per_pos = ratios.repeat_interleave(layout.block_size, dim=1)  # (rows, answer_len)
    masked = torch.rand(rows, layout.answer_len, generator=gen) < per_pos  # (rows, answer_len)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    loss_mask[:, layout.max_prompt :] = masked
    noisy = torch.where(loss_mask, torch.full_like(ids, layout.mask_id), ids)
    return noisy, loss_mask, fresh


def training_batch(
    rng: random.Random,
    gen: torch.Generator,
    sampler: Callable[[random.Random], Problem],
    encode: Callable[[str], list[int]],
    layout: Layout,
    rows: int,
    soft_vocab: int = 0,
) -> dict[str, Tensor]:
    """One noised batch: ids, positions, attn_mask, targets and loss mask (all on CPU); with ``soft_vocab`` (the
    vocabulary size) also the task's exact posterior given each row's unmasked answer positions ("soft")."""
    problems = [sampler(rng) for _ in range(rows)]
    clean, positions, valid = encode_rows(problems, encode, layout)
    noisy, loss_mask, fresh = noise(clean, layout, gen)
    soft = None
    if soft_vocab:
        phrasings = [Phrasings(p, encode, layout.end_id, layout.answer_len) for p in problems]
        fixed = [fixed_positions(a, layout) for a in noisy[:, layout.max_prompt :]]
        soft = soft_targets(phrasings, fixed, soft_vocab)
    return training_rows(clean, noisy, positions, valid, loss_mask, fresh, layout, soft=soft)


def training_rows(
    clean: Tensor,
    noisy: Tensor,
    positions: Tensor,
    valid: Tensor,
    loss_mask: Tensor,
    fresh: Tensor,
    layout: Layout,
    window: Tensor | None = None,
    flat: Tensor | None = None,
    soft: Tensor | None = None,
) -> dict[str, Tensor]:
    """The batch dict the trainer consumes: ids (the noisy rows), positions, the block-causal attention with each
    row's fresh block opened (:func:`open_fresh_blocks`) and its window blocks, if any, seeing each other
    (:func:`open_window`), targets (the clean rows), the loss mask, and ``flat`` (rows,) bool: rows trained toward
    a flat distribution instead of their targets (:func:`masked_loss`). All (rows, L) but attn_mask (rows, L, L)
    and flat; with ``soft`` also "soft" (rows, answer_len, vocab), the target distributions."""
    attn = open_fresh_blocks(block_causal_mask(valid, layout), valid, fresh, layout)
    if window is not None:
        attn = open_window(attn, window, layout)
    batch = {
        "ids": noisy,
        "positions": positions,
        "attn_mask": attn,
        "targets": clean,
        "loss_mask": loss_mask,
        "flat": flat if flat is not None else torch.zeros(clean.shape[0], dtype=torch.bool),
    }
    if soft is not None:
        batch["soft"] = soft
    return batch


def answer_logits_idx(rows: int, layout: Layout, device: torch.device | str = "cpu") -> Tensor:
    """(rows, answer_len) window indices whose outputs predict the answer positions (Dream's shift)."""
    idx = torch.arange(layout.max_prompt - 1, layout.length - 1, device=device)  # (answer_len,)
    return idx[None].expand(rows, -1)


def masked_loss(
    logits: Tensor,
    targets: Tensor,
    loss_mask: Tensor,
    layout: Layout,
    flat: Tensor | None = None,
    weight: Tensor | None = None,
    soft: Tensor | None = None,
    dead_weight: float = 1.0,
) -> Tensor:
    """Mean cross-entropy over masked answer positions.

    logits: (rows, answer_len, vocab) from :func:`answer_logits_idx` (output ``i - 1`` predicts token ``i``);
    targets, loss_mask: (rows, L). ``flat`` (rows,) bool: rows whose masked positions are trained toward the uniform
    distribution over every token but the mask (the decoders' candidates) instead of their targets: states that no
    answer agrees with, where a decoder's verification should find nothing to be sure of. ``weight`` (rows, L)
    float: each position's factor on its cross-entropy against its target (not on a flat row's); the mean is still
    over the masked positions, so weight 1 everywhere is the plain loss. ``soft`` (rows, answer_len, vocab): a
    target distribution per position (``posterior.soft_targets``) used instead of ``targets`` wherever it is not
    all zero: the cross-entropy against the task's exact posterior rather than against one phrasing drawn from it.
    ``dead_weight``: with ``soft``, the factor on the loss where the model's most likely token (mask excluded) has
    posterior 0, a fill no correct answer can follow if a decoder makes it (1: no factor).
    """
    tgt, sel = targets[:, layout.max_prompt :], loss_mask[:, layout.max_prompt :]  # (rows, answer_len)
    no_flat = flat is None or not bool(flat.any())
    if no_flat and weight is None and soft is None:
        return torch.nn.functional.cross_entropy(logits[sel].float(), tgt[sel])
    picked = logits[sel].float()  # (n, vocab)
    ce = torch.nn.functional.cross_entropy(picked, tgt[sel], reduction="none")  # (n,)
    if soft is not None:
        dist = soft[sel].float()  # (n, vocab)
        has = dist.sum(-1) > 0  # (n,)
        ce = torch.where(has, -(dist * picked.log_softmax(-1)).sum(-1), ce)
        if dead_weight != 1.0:
            guess = picked.detach().clone()
            guess[:, layout.mask_id] = float("-inf")
            dead = has & (dist.gather(1, guess.argmax(-1, keepdim=True))[:, 0] == 0)  # (n,)
            ce = torch.where(dead, ce * dead_weight, ce)
    if weight is not None:
        ce = ce * weight[:, layout.max_prompt :][sel]
    if no_flat:
        return ce.mean()
    candidates = picked.clone()
    candidates[:, layout.mask_id] = float("-inf")
    logp = candidates.log_softmax(-1)
    keep = torch.ones(picked.shape[1], dtype=torch.bool, device=picked.device)
    keep[layout.mask_id] = False
    to_uniform = -logp[:, keep].mean(-1)  # (n,) cross-entropy against the uniform distribution
    on_flat = flat[:, None].expand_as(sel)[sel]  # (n,)
    return torch.where(on_flat, to_uniform, ce).mean()
