"""What a block-causal model asks of the decoders: the decoding block and the block-aligned layout.

A block-causal model (``ModelConfig.attention == "block_causal"``, SDAR) was trained with attention blocks of
``config.block_size`` positions aligned to absolute position 0. lopa's block loop re-encodes a finished block in
the next forward and commits its K/V from there; under block-causal attention those K/V are exact only when the
decoding blocks ARE the attention blocks. So :func:`layout_block` refuses any other ``block_size`` by name, and
returns the block every generated block is aligned to (None for bidirectional models, whose layout is unchanged).
The engine reads only the config's ``attention`` / ``block_size``, never a family name.
"""

from __future__ import annotations

from lopa.config import DecodeConfig
from lopa.errors import BlockSizeError, ConfigError
from lopa.model.config import ModelConfig
from lopa.model.kv_access import attention_block


def layout_block(model: ModelConfig, cfg: DecodeConfig) -> int | None:
    """The alignment of generated blocks for ``model`` (None: bidirectional); checks ``cfg`` fits it."""
    block = attention_block(model)
    if block is None:
        return None
    if cfg.block_size != block:
        raise BlockSizeError(
            f"block_size {cfg.block_size} does not match this model: it was trained with attention blocks of "
            f"{block} positions (config.json block_size), and exact K/V caching needs the decoding block to equal "
            f"the attention block; use block_size {block}"
        )
    if cfg.max_new_tokens % block:
        raise ConfigError(
            f"max_new_tokens ({cfg.max_new_tokens}) must be a multiple of the model's attention block ({block}) "
            f"for every decoder on a block-causal model; try --max-new-tokens {-(-cfg.max_new_tokens // block) * block}"
        )
    return block


def default_block(model: ModelConfig) -> dict[str, int]:
    """The decoding default a block-causal model brings: its own attention block (empty for bidirectional)."""
    block = attention_block(model)
    return {} if block is None else {"block_size": block}
