"""Tiny random-weight checkpoints of either family (``config.json``, safetensors weights or shards,
``generation_config.json``, a byte-level tokenizer from :mod:`lopa.testing.tokenizers`), LoRA adapters for them, and
random in-memory models. Deterministic in ``seed``; see :mod:`lopa.testing` for what the checkpoints hold."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lopa.checkpoint.lora import is_targeted, linear_weight_shapes
from lopa.checkpoint.save import save_checkpoint
from lopa.errors import ConfigError
from lopa.model.config import ModelConfig
from lopa.model.families import config_from_hf, family_named
from lopa.model.transformer import Transformer
from lopa.testing.tokenizers import (
    FAMILY_FILES,
    byte_level_tokenizer,
)


def make_tiny_checkpoint(
    path: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    max_position_embeddings: int = 2048,
    chat_template: bool = True,
    seed: int = 0,
    shards: int = 1,
    rope_scaling: dict[str, Any] | None = None,
    family: str = "dream",
    block_size: int = 4,
) -> Path:
    """Write a random-weight checkpoint directory of ``family`` ("dream", "llada" or "sdar") at ``path`` and
    return it. ``block_size`` is the attention block of an "sdar" checkpoint (ignored by the others)."""
    if family not in FAMILY_FILES:
        raise ConfigError(f"unknown family {family!r}; choose from {sorted(FAMILY_FILES)}.")
    specials, template, names, model_type = FAMILY_FILES[family]
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = byte_level_tokenizer(specials)
    tok.save(str(out / "tokenizer.json"))
    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "model_max_length": max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        tok_cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    eos, mask = tok.token_to_id("<|endoftext|>"), tok.token_to_id(specials[-1])
    bos = tok.token_to_id(names["bos_token"]) if names.get("bos_token") else None
    if rope_scaling is not None:
        rope_scaling = {**rope_scaling, "rope_type": rope_scaling.get("rope_type", rope_scaling.get("type"))}
        rope_scaling.pop("type", None)
    config = family_named(family).make_config(
        vocab_size=tok.get_vocab_size(with_added_tokens=True),  # = tokenizer size, so every sampled id decodes
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=family == "dream",  # LLaDA and SDAR (Qwen3) have no biases
        mask_token_id=mask,
        eos_token_id=eos,
        pad_token_id=eos,
        bos_token_id=bos,
        model_type=model_type,
        block_size=block_size if family == "sdar" else None,
        qk_norm=family == "sdar",
    )
    model = random_model(config, seed)
    shard_bytes = _shard_limit(model, shards) if shards > 1 else None
    generation = {"eos_token_id": eos, "pad_token_id": eos, "mask_token_id": mask}
    save_checkpoint(model, out, generation_config=generation, max_shard_bytes=shard_bytes)
    return out


def _shard_limit(model: Transformer, shards: int) -> int:
    """The smallest max_shard_bytes for which save_checkpoint's greedy split makes at most ``shards`` files."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    sizes = [t.numel() * t.element_size() for t in state.values()]

    def count(limit: int) -> int:
        n, used = 1, 0
        for size in sizes:
            if used and used + size > limit:
                n, used = n + 1, 0
            used += size
        return n

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if count(mid) <= shards else (mid + 1, hi)
    return lo


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A Transformer whose every parameter is drawn from a seeded generator (independent of the global RNG).

    Scales keep activations and logits O(1), and norms/biases are non-trivial so a forward that ignores them
    would be caught by an equivalence test.
    """
    model = Transformer(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:  # embedding (hidden, in rows) and linear weights (out, in): 1/sqrt(fan_in) keeps O(1) outputs
                p.copy_(noise / math.sqrt(p.shape[-1]))
    return model.eval()


def make_random_lora(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    r: int = 4,
    alpha: int = 8,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
) -> Path:
    """Write a peft-format LoRA adapter with random (non-zero) A and B for the checkpoint at ``base_dir``.

    ``targets`` are module names as the checkpoint's family spells them (LLaDA: q_proj, k_proj, v_proj, attn_out,
    ff_proj, up_proj, ff_out), matched as peft matches ``target_modules``: LLaDA's ``ff_out`` is also its
    (untied) LM head.
    """
    cfg = config_from_hf(json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8")))
    with torch.device("meta"):
        shapes = linear_weight_shapes(Transformer(cfg))  # shared module name -> (out, in), in model order
    fam = family_named(cfg.family)
    chosen = {
        fam.to_checkpoint(name): shape
        for name, shape in shapes.items()
        if is_targeted(fam.to_checkpoint(name), list(targets)) and not (name == "lm_head" and cfg.tie_word_embeddings)
    }
    unknown = [t for t in targets if not any(is_targeted(n, [t]) for n in chosen)]
    if unknown:
        known = sorted({fam.to_checkpoint(n).rsplit(".", 1)[-1] for n in shapes})
        raise ConfigError(f"unknown LoRA target(s) {unknown}; choose from {known}.")
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (out_f, in_f) in chosen.items():
        prefix = f"base_model.model.{name}"
        # peft initialises B to zero; a random B makes the merge observable in tests.
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) / math.sqrt(in_f)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * (0.2 / math.sqrt(r))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2) + "\n", encoding="utf-8")
    return out
