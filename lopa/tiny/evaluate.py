"""Greedy block-wise threshold decoding of the tiny task, for scoring a model during and after training.

This is a small reference loop, independent of the engine: full-row forwards (no KV cache) under the same
block-causal layout as training, one block at a time; every masked position of the active block whose
probability exceeds ``threshold`` is filled, else the single most confident one (ties: lower position). The mask
token is never a candidate. It differs from the engine's cached threshold decoder in one way: the engine
commits a block in the forward that also runs the next, still all-mask block (full attention inside the window),
so the engine's numbers are the ones to report; this loop tracks training progress. Called by
``lopa.tiny.train`` (validation score at every save), the tests and the analysis scripts, which watch every fill
through ``greedy_decode``'s ``observe`` hook (``Observer``) instead of restating the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch
from torch import Tensor

from lopa.model.transformer import Transformer
from lopa.tiny.data import Layout, block_causal_mask, encode_rows
from lopa.tiny.grammar import parse
from lopa.tiny.task import Problem, extract_answer

Order = Literal["confidence", "left-to-right"]


class Observer(Protocol):
    """Called once per forward of ``greedy_decode``, before its fill is written (every tensor on the loop's device)."""

    def __call__(self, rows: Tensor, start: int, block: Tensor, fill: Tensor, tok: Tensor, conf: Tensor) -> None:
        """``rows`` (n,): the problems' indices in this forward; ``start``: the active block's first row position;
        ``block`` (n, bs): its ids before the fill; ``fill`` (n, bs) bool: the positions filled now; ``tok`` and
        ``conf`` (n, bs): every position's most likely token and its probability (-1 where already filled)."""


@torch.no_grad()
def greedy_decode(
    model: Transformer,
    problems: list[Problem],
    encode: Callable[[str], list[int]],
    layout: Layout,
    threshold: float,
    order: Order = "confidence",
    observe: Observer | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Decode every problem; returns the generated ids (up to and including the first end token) and forwards.
    ``observe`` (optional) sees every forward's fill before it is written."""
    if order not in ("confidence", "left-to-right"):
        raise ValueError(f"order must be 'confidence' or 'left-to-right', got {order!r}")
    device = next(model.parameters()).device
    ids, positions, valid = (t.to(device) for t in encode_rows(problems, encode, layout, with_answer=False))
    attn = block_causal_mask(valid, layout)  # (rows, L, L)
    rows, bs = len(problems), layout.block_size
    forwards = torch.zeros(rows, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)  # an end token is in a finished block
    for b in range(layout.num_blocks):
        start = layout.max_prompt + b * bs
        end = start + bs
        idx = torch.arange(start - 1, end - 1, device=device)  # outputs predicting the block (Dream's shift)
        for _ in range(bs):
            active = ((ids[:, start:end] == layout.mask_id).any(1) & ~done).nonzero().squeeze(1)  # (n,)
            if active.numel() == 0:
                break
            logits = model(  # later blocks are invisible under the block-causal layout, so cut the row at `end`
                ids[active, :end],
                positions[active, :end],
                attn_mask=attn[active, :end, :end],
                logits_idx=idx[None].expand(active.numel(), -1),
            ).float()  # (n, bs, vocab)
            logits[..., layout.mask_id] = float("-inf")
            conf, tok = logits.softmax(-1).max(-1)  # (n, bs)
            block = ids[active, start:end]  # (n, bs)
            conf = torch.where(block == layout.mask_id, conf, torch.full_like(conf, -1.0))
            if order == "left-to-right":  # the leftmost masked position: conf is -1 exactly where filled
                fill = torch.zeros_like(block, dtype=torch.bool)
                fill[torch.arange(len(active), device=device), (conf >= 0).float().argmax(1)] = True
            else:
                fill = conf > threshold
                none = ~fill.any(1)
                fill[none, conf[none].argmax(1)] = True
            if observe is not None:
                observe(active, start, block, fill, tok, conf)
            ids[active, start:end] = torch.where(fill, tok, block)
            forwards[active] += 1
        done |= (ids[:, start:end] == layout.end_id).any(1)
    out = []
    for row in ids[:, layout.max_prompt :].tolist():
        cut = row.index(layout.end_id) + 1 if layout.end_id in row else len(row)
        out.append(row[:cut])
    return out, forwards.tolist()


def score(
    model: Transformer,
    problems: list[Problem],
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    layout: Layout,
    threshold: float = 0.9,
    batch: int = 256,
    order: Order = "confidence",
) -> dict[str, float]:
    """Exact-answer accuracy, well-formedness (``lopa.tiny.grammar``) and tokens per forward (greedy)."""
    return tally(
        model, problems, lambda chunk: greedy_decode(model, chunk, encode, layout, threshold, order), decode, batch
    )


def tally(
    model: Transformer,
    problems: list[Problem],
    decode_chunk: Callable[[list[Problem]], tuple[list[list[int]], list[int]]],
    decode: Callable[[list[int]], str],
    batch: int,
) -> dict[str, float]:
    """Score a decoding loop: ``decode_chunk`` turns up to ``batch`` problems into (answer ids, forwards) each, in
    eval mode; returns exact-answer accuracy, well-formedness and tokens per forward over ``problems``."""
    was_training = model.training
    model.eval()
    correct = wellformed = tokens = forwards = 0
    for i in range(0, len(problems), batch):
        chunk = problems[i : i + batch]
        outs, fw = decode_chunk(chunk)
        for p, ids, f in zip(chunk, outs, fw, strict=True):
            text = decode(ids)
            correct += extract_answer(text) == p.answer
            wellformed += parse(text)
            tokens, forwards = tokens + len(ids), forwards + f
    model.train(was_training)
    n = max(len(problems), 1)
    return {"accuracy": correct / n, "wellformed": wellformed / n, "tpf": tokens / max(forwards, 1), "n": len(problems)}
