"""min_fill (SDAR's low_confidence_dynamic) and the block-aligned layout, pinned on hand-written numbers."""

from __future__ import annotations

import pytest
import torch

from lopa.config import DecodeConfig
from lopa.decoding.base import fill_block
from lopa.decoding.blocks import Block, BlockState, GenState
from lopa.decoding.confidence import Prediction
from lopa.errors import ConfigError


def _pred(positions: list[int], prob: list[float]) -> Prediction:
    p = torch.tensor(prob)
    return Prediction(torch.tensor(positions), torch.arange(len(positions)), p, p.clone())


def test_min_fill_takes_the_most_confident_when_too_few_pass() -> None:
    pred = _pred([4, 5, 6, 7], [0.95, 0.3, 0.6, 0.1])
    block = Block(4, 8)
    assert fill_block(pred, block, 0.9, True, min_fill=1).tolist() == [True, False, False, False]  # one passes
    assert fill_block(pred, block, 0.9, True, min_fill=2).tolist() == [True, False, True, False]  # top 2 instead
    assert fill_block(pred, block, 0.5, True, min_fill=2).tolist() == [True, False, True, False]  # two pass
    assert fill_block(pred, block, 0.2, True, min_fill=2).tolist() == [True, True, True, False]  # all that pass
    assert fill_block(pred, block, 0.99, True, min_fill=9).tolist() == [True] * 4  # capped by what is masked
    assert fill_block(pred, block, 0.99, False, min_fill=2).tolist() == [False] * 4  # semi-activated: no fallback


def test_min_fill_is_validated_and_a_flag() -> None:
    with pytest.raises(ConfigError, match="min_fill"):
        DecodeConfig(min_fill=0).validate()
    import argparse

    from lopa.commands.flags import add_decode_arguments, decode_config_from_args

    parser = argparse.ArgumentParser()
    add_decode_arguments(parser)
    args = parser.parse_args(["--min-fill", "2"])
    assert decode_config_from_args(args, DecodeConfig()).min_fill == 2


def test_block_aligned_layout_keeps_the_prompt_tail_in_the_first_block() -> None:
    s = GenState.from_prompt([9, 8, 7, 6, 5, 4, 3], mask_id=0, align=4)
    assert [(b.start, b.end, b.state) for b in s.blocks] == [(0, 4, BlockState.READY)]
    s.add_block(4, fully_activated=True)
    s.add_block(4)
    assert [(b.start, b.end) for b in s.blocks] == [(0, 4), (4, 8), (8, 12)]
    assert s.tokens.tolist() == [9, 8, 7, 6, 5, 4, 3, 0, 0, 0, 0, 0]
    assert s.masked_positions(s.window_start).tolist() == [7, 8, 9, 10, 11]  # the prompt's tail is never predicted
    short = GenState.from_prompt([9, 8], mask_id=0, align=4)
    short.add_block(4)
    assert [(b.start, b.end) for b in short.blocks] == [(0, 0), (0, 4)] and short.tokens.tolist() == [9, 8, 0, 0]
    plain = GenState.from_prompt([9, 8], mask_id=0)  # bidirectional: unchanged
    plain.add_block(4)
    assert [(b.start, b.end) for b in plain.blocks] == [(0, 2), (2, 6)]
