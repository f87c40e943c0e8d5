"""Greedy block-causal threshold decoding of the tiny task for the block model, exact, without a KV cache.

SDAR's ``low_confidence_dynamic`` decoding, block by block over the row layout of ``lopa.tiny.block_data``
(prompt at its real positions, blocks aligned to absolute position 0): the block holding the end of the prompt
is decoded with the prompt fixed in it; each step fills every masked position of the active block whose
probability exceeds ``threshold``, or else the ``min_fill`` most confident ones (ties: lower position); the mask
token is never a candidate; decoding stops after a block that holds the end token. Each step is one full-row
forward under the block-causal mask, cut at the end of the active block: the finished blocks it re-encodes are
exactly what an exact K/V cache holds (a block never sees later ones), so the tokens and the forward count
(one per step; the engine folds a finished block's K/V into the next block's first forward) are those of an
exact cached decoder. Called by ``lopa.tiny.block_train`` (validation) and the tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lopa.model.dream import DreamModel
from lopa.tiny.block_data import BlockLayout, block_causal_mask, encode_rows
from lopa.tiny.grammar import parse
from lopa.tiny.task import Problem, extract_answer


@torch.no_grad()
def greedy_decode(
    model: DreamModel,
    problems: list[Problem],
    encode: Callable[[str], list[int]],
    layout: BlockLayout,
    threshold: float,
    min_fill: int = 1,
) -> tuple[list[list[int]], list[int]]:
    """Decode every problem; returns the generated ids (up to and including the first end token) and forwards."""
    device = next(model.parameters()).device
    ids, prompt_mask = (t.to(device) for t in encode_rows(problems, encode, layout, with_answer=False))
    rows, bs, length = len(problems), layout.block_size, layout.length
    positions = torch.arange(length, device=device)[None].expand(rows, -1)  # (rows, L)
    attn = block_causal_mask(length, bs, device)  # (L, L)
    forwards = torch.zeros(rows, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)  # an end token is in a finished block
    for b in range(layout.num_blocks):
        start, end = b * bs, (b + 1) * bs
        while True:
            active = ((ids[:, start:end] == layout.mask_id).any(1) & ~done).nonzero().squeeze(1)  # (n,)
            if active.numel() == 0:
                break
            n = active.numel()
            logits = model(  # later blocks are invisible under block-causal attention: cut the row at `end`
                ids[active, :end],
                positions[active, :end],
                attn_mask=attn[None, :end, :end].expand(n, -1, -1),
                logits_idx=torch.arange(start, end, device=device)[None].expand(n, -1),
            ).float()  # (n, bs, vocab): no shift, output i predicts token i
            logits[..., layout.mask_id] = float("-inf")
            conf, tok = logits.softmax(-1).max(-1)  # (n, bs)
            block = ids[active, start:end]  # (n, bs)
            conf = torch.where(block == layout.mask_id, conf, torch.full_like(conf, -1.0))
            fill = conf > threshold
            short = fill.sum(1) < min_fill
            if short.any():  # the min_fill most confident masked positions (stable sort: lower position first)
                order = conf[short].sort(dim=1, descending=True, stable=True)
                top = torch.zeros_like(fill[short])
                top.scatter_(1, order.indices[:, :min_fill], True)
                fill[short] = top & (conf[short] >= 0)
            ids[active, start:end] = torch.where(fill, tok, block)
            forwards[active] += 1
        done |= (ids[:, start:end] == layout.end_id).any(1)
    out = []
    for r, row in enumerate(ids.tolist()):
        gen = row[int(prompt_mask[r].sum()) :]
        cut = gen.index(layout.end_id) + 1 if layout.end_id in gen else len(gen)
        out.append(gen[:cut])
    return out, forwards.tolist()


def score(
    model: DreamModel,
    problems: list[Problem],
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    layout: BlockLayout,
    threshold: float = 0.9,
    batch: int = 256,
) -> dict[str, float]:
    """Exact-answer accuracy, well-formedness (``lopa.tiny.grammar``) and tokens per forward (greedy)."""
    was_training = model.training
    model.eval()
    correct = wellformed = tokens = forwards = 0
    for i in range(0, len(problems), batch):
        chunk = problems[i : i + batch]
        outs, fw = greedy_decode(model, chunk, encode, layout, threshold)
        for p, ids, f in zip(chunk, outs, fw, strict=True):
            text = decode(ids)
            correct += extract_answer(text) == p.answer
            wellformed += parse(text)
            tokens, forwards = tokens + len(ids), forwards + f
    model.train(was_training)
    n = max(len(problems), 1)
    return {"accuracy": correct / n, "wellformed": wellformed / n, "tpf": tokens / max(forwards, 1), "n": len(problems)}
