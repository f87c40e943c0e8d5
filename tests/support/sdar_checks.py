"""Shared pieces of the block-causal (SDAR) tests: a random SDAR checkpoint whose confidences spread over (0, 1),
the prompts that cover the block-aligned layout, and a one-call greedy decode through the engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lopa.checkpoint.loader import load_checkpoint
from lopa.config import DecodeConfig
from lopa.engine.loop import decode, run
from lopa.engine.output import Step
from lopa.engine.runner import Runner
from lopa.testing import make_tiny_checkpoint


def sdar_checkpoint(path: Path, block: int, tie: bool = False, seed: int = 0, **shape: Any) -> Path:
    """A random SDAR checkpoint, sharpened so that greedy decoding is neither all-fallback nor all-above-τ: the
    head is scaled by 3 (untied only), V/O by sqrt(8) each and the MLP output by 4, so the output depends on the
    context and the confidences spread over (0, 1). ``shape``: make_tiny_checkpoint's size arguments."""
    ckpt = make_tiny_checkpoint(path, family="sdar", block_size=block, tie_word_embeddings=tie, seed=seed, **shape)
    for f in ckpt.glob("*.safetensors"):
        st = load_file(str(f))
        for name, t in st.items():
            if name == "lm_head.weight":
                st[name] = t * 3
            elif "v_proj" in name or "o_proj" in name:
                st[name] = t * 8**0.5
            elif "down_proj" in name:
                st[name] = t * 4
        save_file(st, str(f), metadata={"format": "pt"})
    return ckpt


def special_ids(ckpt: Path) -> tuple[int, int]:
    """(mask id, eos id) from the checkpoint's config.json."""
    d = json.loads((ckpt / "config.json").read_text())
    return int(d["mask_token_id"]), int(d["eos_token_id"])


def prompts_for(block: int) -> list[list[int]]:
    """Shorter than one block, exactly one block, and whole blocks plus a partial one."""
    return [[40, 41, 42][: block - 1], list(range(60, 60 + block)), [100, 7, 200, 55, 9, 13, 77, 31, 90][: block + 3]]


def load_model(ckpt: Path) -> torch.nn.Module:
    return load_checkpoint(ckpt, device="cpu", dtype=torch.float32).model


def lopa_decode(model: torch.nn.Module, prompt: list[int], cfg: DecodeConfig, mask: int, ends: set[int]) -> Step:
    """The final Step of the single-device eager engine."""
    return run(decode(Runner(model), prompt, cfg.validate(), mask, frozenset(ends)))
