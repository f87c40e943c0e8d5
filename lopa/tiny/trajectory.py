"""On-policy training states for the tiny Dream model: the partial answers that the decoders visit.

Random block-wise masks (``lopa.tiny.data.noise``) almost never show the model the states its own
confidence-ordered filling produces: the end tail fixed before the content, a step's numbers before its wording,
the next block's first positions guessed while the block before it is still half masked. The model is then
confidently wrong in exactly those states. A *trajectory* here runs a decoder's filling rule with the model being
trained, but at every position the model chooses to fill it writes the reference answer's token (the model picks
the order, the data picks the content) and records the answer's mask before each fill. Every recorded state is
therefore consistent with the reference answer, so cross-entropy on its masked positions trains the model's
confidence toward the task's posterior in the states decoding actually reaches (D2F, dParallel and d3LLM train on
decoding trajectories for the same reason).

Two orders, both under the block-causal layout of training (``lopa.tiny.data``), full-row forwards:

- ``threshold``: one block at a time; every masked position of the block whose probability (mask token excluded)
  exceeds τ is filled, else its single most confident one; a row stops after the block holding its end token.
- ``d2f``: D2F's pipeline (``lopa.decoding.d2f``) with its defaults: the next block joins, semi-activated, once
  the last block is ``tau_add`` decoded and no end token has been filled, and is fully activated once its
  predecessor is ``tau_act`` decoded; semi-activated blocks fill only above τ, the others also their most
  confident position when nothing passes.

With ``phrasings`` (one :class:`lopa.tiny.posterior.Phrasings` per row) the filled positions hold the *model's own*
tokens instead, the states decoding really reaches, its early end tails and numbers placed by its own guess of the
wording included. Such a state need not agree with the reference, so each one's target is a phrasing drawn from the
task's exact posterior given its fixed positions; a fill that no phrasing agrees with is replaced by that draw's
tokens at the filled positions, so every state keeps at least one consistent answer.

Two options bring the states closer to the engine's. ``window_attention``: D2F's forwards let the blocks in flight
see each other (the engine's window has full attention), so a block sees the next one's partial fills, as at
inference; block-causal trajectories never show that. ``lookahead``: after every forward, one LoPA branch of the
filled state is recorded too (one more token, the model's own, at a j-th most confident remaining position); a
branch that no phrasing agrees with is trained toward a flat distribution, so that LoPA's verification, which keeps
the branch whose remaining positions are surest, can tell it from a branch that still has an answer.

``lopa.tiny.lookahead_trajectory`` records LoPA's own trajectory instead: every candidate its verification sees.

A :class:`Visited` pool holds the states of one batch of trajectories; training rows are drawn from it by
:func:`visited_batch` with the same row layout, attention and loss as ``lopa.tiny.data.training_batch``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lopa.model.transformer import Transformer
from lopa.tiny.data import Layout, answer_logits_idx, block_causal_mask, fixed_positions, open_window, training_rows
from lopa.tiny.posterior import FREE, Phrasings, soft_targets

D2F_TAU_ADD = 0.1  # lopa.config.decode.DecodeConfig's defaults
D2F_TAU_ACT = 0.95


@dataclass(frozen=True)
class Visited:
    """States of a batch of trajectories: row ``row[s]`` of ``clean`` with its answer masked where ``masks[s]``."""

    clean: Tensor  # (rows, L) target rows (answer + end/pad tail): one per problem, or one per state (own tokens)
    positions: Tensor  # (rows, L)
    valid: Tensor  # (rows, L) bool, False on left padding
    row: Tensor  # (states,) long
    masks: Tensor  # (states, answer_len) bool: True = masked (blocks not yet in the window are all masked)
    window: Tensor  # (states, num_blocks) bool: blocks that see each other (all False: block-causal)
    flat: Tensor  # (states,) bool: no answer agrees with the state; trained toward a flat distribution
    soft: Tensor  # (states, answer_len, vocab) float16 posterior targets (--soft-targets), or (states, 0, 0): none

    def __len__(self) -> int:
        return int(self.row.numel())

    def save(self, path: Path) -> None:
        """Write the pool (safetensors), so that a resumed run draws from the same states."""
        tensors = {f.name: getattr(self, f.name).contiguous() for f in fields(self)}
        save_file(tensors, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").replace(path)

    @classmethod
    def load(cls, path: Path) -> Visited:
        """A saved pool (one written before ``window``, ``flat`` or ``soft`` existed gets their no-op values)."""
        t = load_file(str(path))
        t.setdefault("flat", torch.zeros(t["row"].shape[0], dtype=torch.bool))
        t.setdefault("window", torch.zeros(t["row"].shape[0], 0, dtype=torch.bool))
        t.setdefault("soft", torch.zeros(t["row"].shape[0], 0, 0, dtype=torch.float16))
        return cls(**t)

    @staticmethod
    def merge(pools: list[Visited]) -> Visited:
        """One pool of several (their rows renumbered)."""
        offsets = torch.tensor([0] + [p.clean.shape[0] for p in pools[:-1]]).cumsum(0).tolist()
        return Visited(
            torch.cat([p.clean for p in pools]),
            torch.cat([p.positions for p in pools]),
            torch.cat([p.valid for p in pools]),
            torch.cat([p.row + o for p, o in zip(pools, offsets, strict=True)]),
            torch.cat([p.masks for p in pools]),
            torch.cat([p.window for p in pools]),
            torch.cat([p.flat for p in pools]),
            torch.cat([p.soft for p in pools]),
        )


def confidence(
    model: Transformer, ids: Tensor, positions: Tensor, attn: Tensor, layout: Layout
) -> tuple[Tensor, Tensor]:
    """(rows, answer_len) probability of the most likely non-mask token at every answer position, and that token."""
    logits = model(ids, positions, attn_mask=attn, logits_idx=answer_logits_idx(ids.shape[0], layout, ids.device))
    logits = logits.float()  # (rows, answer_len, vocab)
    logits[..., layout.mask_id] = float("-inf")
    return logits.softmax(-1).max(-1)


def top1(conf: Tensor, allowed: Tensor) -> Tensor:
    """(rows, n) bool: the most confident allowed position of each row that has one (lower position on ties)."""
    scored = torch.where(allowed, conf, torch.full_like(conf, -1.0))
    pick = torch.zeros_like(allowed)
    has = allowed.any(1)
    pick[has, scored[has].argmax(1)] = True
    return pick


@torch.no_grad()
def visit(
    model: Transformer,
    clean: Tensor,
    positions: Tensor,
    valid: Tensor,
    layout: Layout,
    order: str = "threshold",
    threshold: float = 0.9,
    phrasings: list[Phrasings] | None = None,
    rng: random.Random | None = None,
    window_attention: bool = False,
    lookahead: int = 0,
    soft_vocab: int = 0,
) -> Visited:
    """Run trajectories in ``order`` ("threshold" or "d2f") for the rows of ``clean`` (rows, L) and record every
    state (the answer's mask before each forward). The filled positions get the reference's tokens, or with
    ``phrasings`` (one per row; ``rng`` draws the targets) the model's own (module docstring).

    ``window_attention``: the D2F order's forwards let the blocks in flight see each other, as the engine's window
    does, and its states keep that window for training. ``lookahead`` (> 0, with ``phrasings``): after every forward
    also record a LoPA branch of the filled state (:func:`_branch_states`). ``soft_vocab`` (the vocabulary size, with
    ``phrasings``): every state also gets the posterior's distributions at its masked positions (:class:`States`)."""
    if order not in ("threshold", "d2f"):
        raise ValueError(f"order must be 'threshold' or 'd2f', got {order!r}")
    if phrasings is not None and (len(phrasings) != clean.shape[0] or rng is None):
        raise ValueError("phrasings needs one entry per row of clean, and an rng")
    if lookahead < 0 or (lookahead and phrasings is None):
        raise ValueError("lookahead must be >= 0, and its branch states need phrasings (the model's own tokens)")
    if soft_vocab and phrasings is None:
        raise ValueError("soft targets need phrasings (the model's own tokens)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    clean, positions, valid = clean.to(device), positions.to(device), valid.to(device)
    p, bs, nb = layout.max_prompt, layout.block_size, layout.num_blocks
    ids = clean.clone()
    ids[:, p:] = layout.mask_id
    attn = block_causal_mask(valid, layout)  # (rows, L, L)
    rows = clean.shape[0]
    target = clean[:, p:]  # (rows, answer_len)
    in_block = torch.arange(layout.answer_len, device=device) // bs  # (answer_len,)
    blocks = in_block[None] == torch.arange(nb, device=device)[:, None]  # (nb, answer_len)
    present = torch.zeros(rows, nb, dtype=torch.bool, device=device)  # blocks in the window
    present[:, 0] = True
    full = present.clone()  # fully activated (d2f); the threshold order has one block, always full
    end_seen = torch.zeros(rows, dtype=torch.bool, device=device)
    windowed = window_attention and order == "d2f"
    states = States(layout, soft_vocab)
    for _ in range(layout.answer_len + nb):
        masked = ids[:, p:] == layout.mask_id  # (rows, answer_len)
        left = (masked[:, None, :] & blocks[None]).sum(-1)  # (rows, nb) masked positions per block
        if order == "threshold":  # the first block with masks is the window
            done_blocks = left == 0
            first = (~done_blocks).float().argmax(1)  # (rows,)
            present = torch.arange(nb, device=device)[None] == first[:, None]
            has_end = (ids[:, p:].view(rows, nb, bs) == layout.end_id).any(-1)  # a done block holds its tokens
            finished = done_blocks.all(1) | (done_blocks & has_end).any(1)
            present &= ~finished[:, None]
            full = present
        else:
            ratio = 1.0 - left.float() / bs  # (rows, nb)
            last = nb - 1 - present.flip(1).float().argmax(1)  # (rows,) index of the last block in the window
            can_add = ~end_seen & (last + 1 < nb) & (ratio.gather(1, last[:, None]).squeeze(1) >= D2F_TAU_ADD)
            add_at = (last + 1).clamp_max(nb - 1)
            present[can_add, add_at[can_add]] = True
            full[:, 1:] |= present[:, 1:] & (ratio[:, :-1] >= D2F_TAU_ACT)
        open_pos = (present.float() @ blocks.float()).bool() & masked  # (rows, answer_len) fillable now
        active = open_pos.any(1).nonzero().squeeze(1)  # (n,)
        if active.numel() == 0:
            break
        window = present[active] & windowed  # (n, nb)
        drawn = None
        if phrasings is not None:  # this state's target: a draw from the posterior given its fixed positions
            answers = [draw_target(phrasings[r], ids[r, p:], layout, rng) for r in active.tolist()]
            drawn = torch.cat([clean[active, :p], torch.tensor(answers, device=device)], 1)  # (n, L)
        states.add(
            active, masked[active], window, drawn, None, [phrasings[r] for r in active.tolist()] if phrasings else None
        )
        seen = open_window(attn[active], window, layout) if windowed else attn[active]
        conf, tok = confidence(model, ids[active], positions[active], seen, layout)  # (n, answer_len) each
        fill = open_pos[active] & (conf > threshold)
        for b in range(nb):
            in_b = blocks[b][None] & open_pos[active]  # (n, answer_len)
            need = full[active, b] & ~(fill & in_b).any(1)  # a full block that filled nothing
            fill |= top1(conf, in_b) & need[:, None]
        if phrasings is None:
            ids[active, p:] = torch.where(fill, target[active], ids[active, p:])
        else:
            ids[active, p:] = own_fill(phrasings, active, ids[active, p:], fill, tok, drawn[:, p:], layout)
            if lookahead:
                rest = open_pos[active] & ~fill  # (n, answer_len) still masked in the window
                _branch_states(states, phrasings, active, ids[active], rest, conf, tok, window, lookahead, layout, rng)
        end_seen[active] |= (fill & (ids[active, p:] == layout.end_id)).any(1)
    model.train(was_training)
    return states.pool(clean, positions, valid, own=phrasings is not None)


class States:
    """The states :func:`visit` records, collected as per-forward chunks. With ``soft_vocab`` (the vocabulary size;
    own tokens only) every state also gets the task's exact posterior at its masked positions as its target
    (``posterior.soft_targets``; none for a flat state)."""

    def __init__(self, layout: Layout, soft_vocab: int = 0) -> None:
        self.layout, self.soft_vocab = layout, soft_vocab
        self.row: list[Tensor] = []  # (n,) each
        self.masks: list[Tensor] = []  # (n, answer_len)
        self.window: list[Tensor] = []  # (n, nb)
        self.clean: list[Tensor] = []  # (n, L) own tokens: one target row per state
        self.flat: list[Tensor] = []  # (n,)
        self.soft: list[Tensor] = []  # (n, answer_len, vocab) float16

    def add(
        self,
        row: Tensor,
        masks: Tensor,
        window: Tensor,
        clean: Tensor | None,
        flat: Tensor | None = None,
        phrasings: list[Phrasings] | None = None,
    ) -> None:
        """Record n states: their rows, masks (n, answer_len), windows and, with own tokens, target rows ``clean``
        (n, L), which agree with each state's filled positions; ``phrasings`` (one per state) for soft targets."""
        flat = flat if flat is not None else torch.zeros_like(row, dtype=torch.bool)
        self.row.append(row)
        self.masks.append(masks)
        self.window.append(window)
        if clean is not None:
            self.clean.append(clean)
        self.flat.append(flat)
        if self.soft_vocab:
            if clean is None or phrasings is None:
                raise ValueError("soft targets need the model's own tokens (target rows and phrasings)")
            answers = clean[:, self.layout.max_prompt :].masked_fill(masks, FREE).tolist()  # the fixed positions
            dead = flat.tolist()
            kept = [(ph, a) for ph, a, d in zip(phrasings, answers, dead, strict=True) if not d]
            soft = torch.zeros(len(answers), self.layout.answer_len, self.soft_vocab)
            if kept:
                soft[~flat.cpu()] = soft_targets([k[0] for k in kept], [k[1] for k in kept], self.soft_vocab)
            self.soft.append(soft.half())

    def pool(self, clean: Tensor, positions: Tensor, valid: Tensor, own: bool) -> Visited:
        row, masks = torch.cat(self.row), torch.cat(self.masks)  # (states,), (states, answer_len)
        if own:  # one target row per state
            clean, positions, valid = torch.cat(self.clean), positions[row], valid[row]
            row = torch.arange(len(row), device=row.device)
        window, flat = torch.cat(self.window), torch.cat(self.flat)
        soft = torch.cat(self.soft) if self.soft else torch.zeros(len(row), 0, 0, dtype=torch.float16)
        return Visited(
            clean.cpu(), positions.cpu(), valid.cpu(), row.cpu(), masks.cpu(), window.cpu(), flat.cpu(), soft
        )


def _branch_states(
    states: States,
    phrasings: list[Phrasings],
    active: Tensor,
    filled: Tensor,
    rest: Tensor,
    conf: Tensor,
    tok: Tensor,
    window: Tensor,
    lookahead: int,
    layout: Layout,
    rng: random.Random,
) -> None:
    """Record one LoPA lookahead branch per row: the filled row (n, L) plus the model's token at its j-th most
    confident position still masked in the window (``rest``, (n, answer_len)), j drawn uniformly from 1 ..
    min(``lookahead``, positions left). The branch's target is a draw from the posterior given its fixed positions;
    a branch that no phrasing agrees with is a ``flat`` state: the model should find nothing to be sure of there, so
    that LoPA's verification (the mean confidence of a branch's masked positions) ranks it last."""
    p = layout.max_prompt
    ranked = torch.sort(torch.where(rest, conf, torch.full_like(conf, -1.0)), stable=True, dim=1, descending=True)
    keep, branches, targets, flats = [], [], [], []
    for i, r in enumerate(active.tolist()):
        n_left = int(rest[i].sum())
        if not n_left:
            continue
        pos = int(ranked.indices[i, rng.randint(1, min(lookahead, n_left)) - 1])
        branch = filled[i].clone()  # (L,)
        branch[p + pos] = tok[i, pos]
        target, flat = branch_target(phrasings[r], branch, layout, rng)
        keep.append(i)
        branches.append(branch)
        flats.append(flat)
        targets.append(target)
    if not keep:
        return
    pick = torch.tensor(keep, device=active.device)
    stacked = torch.stack(branches)  # (m, L)
    states.add(
        active[pick],
        stacked[:, p:] == layout.mask_id,
        window[pick],
        torch.stack(targets),
        torch.tensor(flats, device=active.device),
        [phrasings[r] for r in active[pick].tolist()],
    )


def branch_target(phrasings: Phrasings, row: Tensor, layout: Layout, rng: random.Random) -> tuple[Tensor, bool]:
    """A candidate row's (L,) training target and whether it is ``flat``: the row's prompt plus a phrasing drawn from
    the posterior given its fixed answer positions, or, when no phrasing agrees with it, the row itself (flat)."""
    drawn = phrasings.sample(fixed_positions(row[layout.max_prompt :], layout), rng)
    if drawn is None:
        return row, True
    return torch.cat([row[: layout.max_prompt], torch.tensor(drawn, device=row.device)]), False


def draw_target(phrasings: Phrasings, answer: Tensor, layout: Layout, rng: random.Random) -> list[int]:
    """A phrasing (answer_len ids) drawn from the posterior given ``answer``'s fixed positions; a state that no
    phrasing agrees with is refused (``ValueError``)."""
    drawn = phrasings.sample(fixed_positions(answer, layout), rng)
    if drawn is None:  # the fills below keep every state consistent, so only a foreign start gets here
        raise ValueError("a visited state agrees with no phrasing of its problem")
    return drawn


def own_fill(
    phrasings: list[Phrasings], active: Tensor, answer: Tensor, fill: Tensor, tok: Tensor, drawn: Tensor, layout: Layout
) -> Tensor:
    """(n, answer_len) answers after a forward: the model's tokens where they still fit some phrasing, else the
    state's drawn target's tokens at the filled positions."""
    out = torch.where(fill, tok, answer)
    for i, r in enumerate(active.tolist()):
        if not phrasings[r].count(fixed_positions(out[i], layout)):
            out[i] = torch.where(fill[i], drawn[i], answer[i])
    return out


def visited_batch(
    pool: Visited, layout: Layout, gen: torch.Generator, rows: int, flat_share: float = 0.0
) -> dict[str, Tensor]:
    """``rows`` states drawn uniformly from ``pool`` as training rows (the keys of ``data.training_batch``), with the
    window and flat flag of each state. ``flat_share``: each row is drawn from the pool's flat states only with this
    probability (when it has any), since a decoder seldom makes a state that no answer agrees with.

    When a state's first masked block is all-mask and so is everything after it, that block is the engine's fresh
    block in half of the draws (the block before it sees it, ``data.open_fresh_blocks``), as in the random rows.
    """
    pick = torch.randint(0, len(pool), (rows,), generator=gen)  # (rows,)
    flats = pool.flat.nonzero().flatten() if flat_share else pool.flat[:0]  # (n_flat,)
    if flats.numel():  # a share of the rows drawn from the flat states only
        from_flat = torch.rand(rows, generator=gen) < flat_share
        pick = torch.where(from_flat, flats[torch.randint(0, flats.numel(), (rows,), generator=gen)], pick)
    r, masked = pool.row[pick], pool.masks[pick]  # (rows,), (rows, answer_len)
    clean, positions, valid = pool.clean[r], pool.positions[r], pool.valid[r]  # (rows, L) each
    loss_mask = torch.zeros_like(clean, dtype=torch.bool)
    loss_mask[:, layout.max_prompt :] = masked
    noisy = torch.where(loss_mask, torch.full_like(clean, layout.mask_id), clean)
    per_block = masked.view(rows, layout.num_blocks, layout.block_size)
    first = per_block.any(-1).float().argmax(1)  # (rows,) first block with a masked position
    after = torch.arange(layout.answer_len)[None] >= (first * layout.block_size)[:, None]  # (rows, answer_len)
    opens = (masked | ~after).all(1) & (torch.rand(rows, generator=gen) < 0.5)  # all-mask from the first on
    fresh = torch.where(opens, first, torch.full_like(first, -1))
    window = pool.window[pick] if pool.window.shape[1] else None  # (rows, num_blocks); none in an older pool
    soft = pool.soft[pick].float() if pool.soft.shape[1] else None  # (rows, answer_len, vocab)
    return training_rows(clean, noisy, positions, valid, loss_mask, fresh, layout, window, pool.flat[pick], soft)
