"""Greedy block-causal threshold decoding of the tiny task for the block model, exact, without a KV cache.

SDAR's ``low_confidence_dynamic`` decoding, block by block over the row layout of ``lopa.tiny.block_data``
(prompt at its real positions, blocks aligned to absolute position 0): the block holding the end of the prompt
is decoded with the prompt fixed in it; each step fills every masked position of the active block whose
probability exceeds ``threshold``, or else the ``min_fill`` most confident ones (ties: lower position); the mask
token is never a candidate; decoding stops after a block that holds the end token. The same loop runs the
no-search control ``threshold+1`` (``extra_fill``) and LoPA over threshold (``branches``), for the comparison
the engine's bench makes. Each step is one full-row forward under the block-causal mask, cut at the end of the
active block: the finished blocks it re-encodes are exactly what an exact K/V cache holds (a block never sees
later ones), so the tokens and the forward count (one per step; the engine folds a finished block's K/V into the
next block's first forward) are those of an exact cached decoder. Called by ``lopa.tiny.block_train``
(validation), the tests and the model card's measurements.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lopa.model.transformer import Transformer
from lopa.tiny.block_data import BlockLayout, block_causal_mask, encode_rows
from lopa.tiny.evaluate import tally
from lopa.tiny.task import Problem


def _predict(model: Transformer, rows: Tensor, start: int, block_size: int, mask_id: int) -> tuple[Tensor, Tensor]:
    """One forward of ``rows`` (n, end) cut at the end of the active block ``[start, end)``, block-causal.

    Returns (confidence, token) (n, end - start): argmax token and its probability, the mask token excluded;
    confidence is -1 at positions that are not masked.
    """
    n, end = rows.shape
    device = rows.device
    logits = model(  # later blocks are invisible under block-causal attention: the row ends with the active block
        rows,
        torch.arange(end, device=device)[None].expand(n, -1),
        attn_mask=block_causal_mask(end, block_size, device)[None].expand(n, -1, -1),
        logits_idx=torch.arange(start, end, device=device)[None].expand(n, -1),
    ).float()  # (n, bs, vocab): no shift, output i predicts token i
    logits[..., mask_id] = float("-inf")
    conf, tok = logits.softmax(-1).max(-1)  # (n, bs)
    masked = rows[:, start:] == mask_id
    return torch.where(masked, conf, torch.full_like(conf, -1.0)), tok


def _base_fill(conf: Tensor, tok: Tensor, block: Tensor, threshold: float, min_fill: int, extra_fill: int) -> Tensor:
    """The threshold decoder's step on a block (n, bs): every masked position with confidence > threshold, at
    least the ``min_fill`` most confident, then ``extra_fill`` more most-confident ones (the no-search control).
    Ranking ties go to the lower position (stable sort)."""
    order = conf.sort(dim=1, descending=True, stable=True).indices  # (n, bs)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(conf.shape[1], device=conf.device).expand_as(order))
    masked = conf >= 0
    fill = (conf > threshold) | (rank < min_fill)
    fill = fill | (rank < fill.sum(1, keepdim=True) + extra_fill)  # the next most confident after the fill
    return torch.where(fill & masked, tok, block)


@torch.no_grad()
def greedy_decode(
    model: Transformer,
    problems: list[Problem],
    encode: Callable[[str], list[int]],
    layout: BlockLayout,
    threshold: float,
    min_fill: int = 1,
    extra_fill: int = 0,
    branches: int = 0,
) -> tuple[list[list[int]], list[int]]:
    """Decode every problem; returns the generated ids (up to and including the first end token) and forwards.

    ``branches`` > 0 runs LoPA over this threshold decoder (docs/algorithm.md §3.4): each iteration verifies the
    anchor and ``branches`` lookahead candidates (the anchor plus one more token at its j-th most confident masked
    position) in one batched forward, keeps the candidate of highest mean confidence over its masked positions
    (ties: lookahead branches in creation order, then the anchor) and builds the next candidates from the winner's
    logits; a block's first forward has the block alone. ``branches`` = 0 is the threshold decoder itself.
    """
    device = next(model.parameters()).device
    ids, prompt_mask = (t.to(device) for t in encode_rows(problems, encode, layout, with_answer=False))
    bs, mask_id = layout.block_size, layout.mask_id
    forwards = [0] * len(problems)
    done = torch.zeros(len(problems), dtype=torch.bool, device=device)  # an end token is in a finished block
    for b in range(layout.num_blocks):
        start, end = b * bs, (b + 1) * bs
        live = [r for r in range(len(problems)) if not done[r] and (ids[r, start:end] == mask_id).any()]
        cands = {r: [ids[r, start:end].clone()] for r in live}  # per row: [anchor, lookahead 1..k]
        while live:
            pairs = [(r, j) for r in live for j in range(len(cands[r]))]
            rows = torch.stack([torch.cat([ids[r, :start], cands[r][j]]) for r, j in pairs])  # (pairs, end)
            conf, tok = _predict(model, rows, start, bs, mask_id)  # (pairs, bs)
            at = 0
            for r in list(live):
                k, base = len(cands[r]), at
                at += k
                c, t = conf[base:at], tok[base:at]  # (k, bs): this row's candidates
                masked = c >= 0
                score = torch.where(masked, c, 0.0).sum(1) / masked.sum(1).clamp_min(1)
                score = torch.where(masked.any(1), score, 1.0)  # (k,)
                ranked = torch.cat([score[1:], score[:1]])  # lookahead branches first, the anchor last
                win = (int(ranked.argmax()) + 1) % k
                pick = slice(win, win + 1)
                anchor = _base_fill(c[pick], t[pick], cands[r][win][None], threshold, min_fill, extra_fill)[0]  # (bs,)
                forwards[r] += 1
                left = (anchor == mask_id).nonzero().squeeze(1)  # still masked, ranked by the winner's confidence
                if left.numel() == 0:
                    ids[r, start:end] = anchor
                    live.remove(r)
                    continue
                order = left[c[win, left].sort(descending=True, stable=True).indices][:branches]
                cands[r] = [anchor]
                for p in order.tolist():
                    branch = anchor.clone()
                    branch[p] = t[win, p]
                    cands[r].append(branch)
        done |= (ids[:, start:end] == layout.end_id).any(1)
    out = []
    for r, row in enumerate(ids.tolist()):
        gen = row[int(prompt_mask[r].sum()) :]
        cut = gen.index(layout.end_id) + 1 if layout.end_id in gen else len(gen)
        out.append(gen[:cut])
    return out, forwards


def score(
    model: Transformer,
    problems: list[Problem],
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    layout: BlockLayout,
    threshold: float = 0.9,
    batch: int = 256,
    extra_fill: int = 0,
    branches: int = 0,
) -> dict[str, float]:
    """Exact-answer accuracy, well-formedness (``lopa.tiny.grammar``) and tokens per forward (greedy), of
    threshold decoding (``extra_fill`` 1: the no-search control ``threshold+1``; ``branches`` k: LoPA over it)."""

    def decode_chunk(chunk: list[Problem]) -> tuple[list[list[int]], list[int]]:
        return greedy_decode(model, chunk, encode, layout, threshold, extra_fill=extra_fill, branches=branches)

    return tally(model, problems, decode_chunk, decode, batch)


SWEEP = {  # name -> (threshold, extra_fill, branches): the rows of `lopa bench`'s table this loop can run
    "threshold@0.95": (0.95, 0, 0),
    "threshold": (0.9, 0, 0),
    "threshold@0.8": (0.8, 0, 0),
    "threshold@0.7": (0.7, 0, 0),
    "threshold@0.5": (0.5, 0, 0),
    "threshold+1": (0.9, 1, 0),
    "lopa-threshold-k2": (0.9, 0, 2),
    "lopa-threshold-k4": (0.9, 0, 4),
    "lopa-threshold-k8": (0.9, 0, 8),
}
