"""The tiny reference loop's fill orders (``lopa.tiny.evaluate.greedy_decode``) against plain re-statements."""

from __future__ import annotations

import pytest
import torch

from lopa.model.transformer import Transformer
from lopa.tiny import task
from lopa.tiny.data import Layout, block_causal_mask, encode_rows
from lopa.tiny.evaluate import greedy_decode
from lopa.tiny.train import model_config
from lopa.tiny.vocab import build_tokenizer, special_ids


class _Args:
    hidden, layers, heads, kv_heads, intermediate = 32, 2, 2, 1, 64


def _setup() -> tuple[Transformer, Layout, object]:
    tok = build_tokenizer()
    ids = special_ids(tok)
    torch.manual_seed(0)
    model = Transformer(model_config(_Args(), tok.get_vocab_size(), ids)).eval()
    return model, Layout(32, 8, 3, ids["eos_token_id"], ids["mask_token_id"]), tok


def _left_to_right(model: Transformer, row: torch.Tensor, pos: torch.Tensor, attn: torch.Tensor, layout: Layout):
    """One problem, position by position from the left: the whole row through the model, argmax at that position
    (never the mask token), stopping after the block that holds an end token."""
    row = row.clone()
    p, bs = layout.max_prompt, layout.block_size
    for b in range(layout.num_blocks):
        end = p + (b + 1) * bs
        for i in range(p + b * bs, end):
            with torch.no_grad():
                logits = model(row[None, :end], pos[None, :end], attn_mask=attn[None, :end, :end])[0, i - 1]
            logits[layout.mask_id] = float("-inf")
            row[i] = logits.argmax()
        if (row[p + b * bs : end] == layout.end_id).any():
            break
    out = row[p:].tolist()
    return out[: out.index(layout.end_id) + 1] if layout.end_id in out else [t for t in out if t != layout.mask_id]


def test_left_to_right_fills_the_leftmost_position_each_forward() -> None:
    model, layout, tok = _setup()
    problems = task.fixed_set("validation", 3)
    encode = lambda t: tok.encode(t, add_special_tokens=False).ids  # noqa: E731
    outs, forwards = greedy_decode(model, problems, encode, layout, 0.9, order="left-to-right")
    ids, pos, valid = encode_rows(problems, encode, layout, with_answer=False)
    attn = block_causal_mask(valid, layout)
    for r in range(len(problems)):
        expected = _left_to_right(model, ids[r], pos[r], attn[r], layout)
        assert outs[r] == expected
        blocks_run = -(-len(expected) // layout.block_size)  # whole blocks, one position per forward
        assert forwards[r] == blocks_run * layout.block_size
    confident, _ = greedy_decode(model, problems, encode, layout, 2.0)  # the confidence order, one per forward
    assert confident != outs  # a random model's confidence order is not left to right


def test_unknown_order_is_refused() -> None:
    model, layout, tok = _setup()
    with pytest.raises(ValueError, match="order"):
        greedy_decode(model, task.fixed_set("validation", 1), lambda t: tok.encode(t).ids, layout, 0.9, order="random")
