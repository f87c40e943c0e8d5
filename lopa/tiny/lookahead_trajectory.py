"""LoPA's own trajectories for the tiny Dream model: every candidate LoPA over threshold verifies, as training states.

``lopa.tiny.trajectory`` records the states the base decoders visit, plus one lookahead branch one step off each.
LoPA's verification then only ever learns to rank branches of the base decoder's states, while in the engine it
ranks branches of the states its own earlier picks led to (a winner is one position further than threshold would
be, every step). On those states lopa-tiny v6 kept a branch no answer agrees with far more often than on
threshold's (``scripts/engine_verification.py``: 42% of contested steps against 5% in the one-step replay).

:func:`visit_lookahead` runs LoPA over threshold (docs/algorithm.md §3.4) with the model being trained, full-row
forwards under the block-causal layout of training:

1. the anchor fills the current block (the first with masks) from the winner's prediction: every masked position
   above τ, else the single most confident one, with the model's own tokens (a fill no phrasing agrees with takes
   the state's drawn target's tokens, as in ``trajectory.own_fill``, so the anchor always has an answer);
2. lookahead branch j (j = 1 .. k) copies the anchor and fills, with the model's token, the j-th most confident
   position the anchor left masked in the block;
3. all candidates (branches in creation order, then the anchor) go through one batched forward; a candidate's
   score is the mean confidence of its masked positions in its current block (the next one once it completes its
   block; 1.0 when it has completed the answer or a block holding an end token); the best wins, ties to the
   earlier candidate, so the anchor loses them;
4. the winner's prediction drives the next step. A winner no phrasing agrees with ends that line: the
   trajectory goes on from the anchor instead, since every later state would be one with no answer.

Every verified candidate is a recorded state: its target is a draw from the task's exact posterior given its fixed
positions, or, for one no phrasing agrees with, a flat distribution (``flat``), so that verification learns to
rank dead branches last in the states it really meets.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor

from lopa.model.transformer import Transformer
from lopa.tiny.data import Layout, block_causal_mask
from lopa.tiny.posterior import Phrasings
from lopa.tiny.trajectory import States, Visited, branch_target, confidence, draw_target, own_fill, top1


@torch.no_grad()
def visit_lookahead(
    model: Transformer,
    clean: Tensor,
    positions: Tensor,
    valid: Tensor,
    layout: Layout,
    k: int,
    phrasings: list[Phrasings],
    rng: random.Random,
    threshold: float = 0.9,
    soft_vocab: int = 0,
) -> Visited:
    """LoPA-over-threshold trajectories with ``k`` lookahead branches for the rows of ``clean`` (rows, L) (one
    ``phrasings`` entry per row; ``rng`` draws the targets); every verified candidate is recorded (module
    docstring), with the posterior's distributions as targets too when ``soft_vocab`` is given (``States``). The
    model is left in the train/eval mode it came in."""
    if k < 1:
        raise ValueError(f"k must be >= 1 (k = 0 is threshold's own trajectory), got {k}")
    if len(phrasings) != clean.shape[0]:
        raise ValueError("phrasings needs one entry per row of clean")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    clean, positions, valid = clean.to(device), positions.to(device), valid.to(device)
    p, rows = layout.max_prompt, clean.shape[0]
    attn = block_causal_mask(valid, layout)  # (rows, L, L)
    states = States(layout, soft_vocab)
    cur = clean.clone()  # (rows, L) each row's winner
    cur[:, p:] = layout.mask_id
    first = [draw_target(ph, cur[r, p:], layout, rng) for r, ph in enumerate(phrasings)]
    drawn = torch.cat([clean[:, :p], torch.tensor(first, device=device)], 1)  # (rows, L) each winner's target
    every = torch.arange(rows, device=device)
    states.add(every, cur[:, p:] == layout.mask_id, _no_window(rows, layout, device), drawn, None, phrasings)
    conf, tok = confidence(model, cur, positions, attn, layout)  # (rows, answer_len) each
    active = every
    for _ in range(layout.answer_len + layout.num_blocks):
        if active.numel() == 0:
            break
        answer = cur[active, p:]  # (n, answer_len)
        masked = answer == layout.mask_id
        block = _current_block(masked, layout)  # (n, answer_len) the first block with masks
        open_pos = masked & block
        fill = open_pos & (conf[active] > threshold)
        fill |= top1(conf[active], open_pos) & ~fill.any(1, keepdim=True)  # else its most confident position
        anchor = own_fill(phrasings, active, answer, fill, tok[active], drawn[active, p:], layout)  # (n, answer_len)
        rest = open_pos & ~fill
        owner, cands = [], []  # per candidate: its row's index in ``active``; its answer
        for i in range(active.numel()):
            if _finished(anchor[i], layout):
                continue
            ranked = torch.sort(torch.where(rest[i], conf[active[i]], -1.0), descending=True, stable=True).indices
            for pos in ranked[: min(k, int(rest[i].sum()))].tolist():
                branch = anchor[i].clone()
                branch[pos] = tok[active[i], pos]
                owner.append(i)
                cands.append(branch)
            owner.append(i)
            cands.append(anchor[i])
        if not cands:
            break
        owner_t = torch.tensor(owner, device=device)
        rows_of = active[owner_t]  # (m,) each candidate's row
        cand = torch.cat([clean[rows_of, :p], torch.stack(cands)], 1)  # (m, L)
        c_conf, c_tok = confidence(model, cand, positions[rows_of], attn[rows_of], layout)  # (m, answer_len) each
        c_masked = cand[:, p:] == layout.mask_id
        targets, flat = [], []
        for j, r in enumerate(rows_of.tolist()):
            target, is_flat = branch_target(phrasings[r], cand[j], layout, rng)
            targets.append(target)
            flat.append(is_flat)
        flat_t = torch.tensor(flat, device=device)
        window = _no_window(len(owner), layout, device)
        states.add(rows_of, c_masked, window, torch.stack(targets), flat_t, [phrasings[r] for r in rows_of.tolist()])
        scores = _scores(c_conf, cand[:, p:], layout)  # (m,)
        going = []
        for i in sorted(set(owner)):
            mine = (owner_t == i).nonzero().flatten()  # this row's candidates, the anchor last
            w = int(mine[int(scores[mine].argmax())])  # the first of the best: ties to the earlier candidate
            if flat[w]:
                w = int(mine[-1])  # a dead winner ends its line; go on from the anchor
            r = int(active[i])
            cur[r], drawn[r], conf[r], tok[r] = cand[w], targets[w], c_conf[w], c_tok[w]
            if not _finished(cand[w, p:], layout):
                going.append(r)
        active = torch.tensor(going, dtype=torch.long, device=device)
    model.train(was_training)
    return states.pool(clean, positions, valid, own=True)


def _current_block(masked: Tensor, layout: Layout) -> Tensor:
    """(n, answer_len) bool: the positions of each row's first block that still has a masked position."""
    bs, nb = layout.block_size, layout.num_blocks
    has = masked.view(-1, nb, bs).any(-1)  # (n, nb)
    first = has.float().argmax(1)  # (n,)
    in_block = torch.arange(layout.answer_len, device=masked.device) // bs
    return (in_block[None] == first[:, None]) & has.any(1, keepdim=True)


def _finished(answer: Tensor, layout: Layout) -> bool:
    """No block left to decode: every block is complete, or a complete block holds an end token."""
    blocks = answer.view(layout.num_blocks, layout.block_size)
    done = ~(blocks == layout.mask_id).any(-1)
    return bool(done.all() or (done & (blocks == layout.end_id).any(-1)).any())


def _scores(conf: Tensor, answers: Tensor, layout: Layout) -> Tensor:
    """(m,) each candidate's verification score from its forward's ``conf`` (m, answer_len): the mean confidence
    over its masked positions in its current block; 1.0 for a finished candidate."""
    masked = answers == layout.mask_id  # (m, answer_len)
    block = _current_block(masked, layout) & masked
    mean = (conf * block).sum(1) / block.sum(1).clamp_min(1)
    finished = torch.tensor([_finished(a, layout) for a in answers], device=conf.device)
    return torch.where(finished | ~block.any(1), torch.ones_like(mean), mean)


def _no_window(n: int, layout: Layout, device: torch.device) -> Tensor:
    """(n, num_blocks) all False: the states are block-causal (no window of blocks that see each other)."""
    return torch.zeros(n, layout.num_blocks, dtype=torch.bool, device=device)
