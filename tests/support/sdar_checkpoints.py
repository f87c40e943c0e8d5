"""Tiny random SDAR checkpoints laid out like the official release, and their transformers twins.

``tests/support/sdar_release/`` holds files of JetAstra/SDAR's ``SDAR-4B-Chat`` directory as released: its
``config.json`` (every field), ``generation_config.json`` and the chat template of its ``tokenizer_config.json``.
:func:`write_release_checkpoint` writes a checkpoint directory of that layout with the sizes shrunk: the
release's config.json with every field kept (only the sizes and token ids changed), a ``tokenizer_config.json``
with the release's fields and chat template, ``special_tokens_map.json``, ``generation_config.json`` (two end
ids, as released), a byte-level tokenizer holding SDAR's special tokens, and random weights under Qwen3's tensor
names. With ``moe`` it is an ``sdar_moe`` checkpoint (SDAR-30B-A3B's layout: the Qwen3-MoE fields and tensors).

:func:`transformers_twin_dir` writes the same tensors next to a ``qwen3`` / ``qwen3_moe`` config.json, so that
transformers' own loader (and its own conversion of per-expert tensors) builds the reference model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from lopa.model.families import config_from_hf
from lopa.testing import random_model
from lopa.testing.tokenizers import byte_level_tokenizer

RELEASE = Path(__file__).parent / "sdar_release"
# SDAR-4B-Chat's added tokens, in id order (Qwen3's specials, then <|MASK|> = 151669)
SDAR_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>",
    "<think>", "</think>", "<|MASK|>",
)  # fmt: skip
_SPECIAL = 14  # the first 14 are "special": true in the release's added_tokens_decoder, the rest false
QWEN3_MOE_FIELDS = {  # Qwen3-30B-A3B's expert fields, which SDAR-30B-A3B keeps
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
}


def chat_template() -> str:
    return (RELEASE / "chat_template.jinja").read_text(encoding="utf-8")


def release_config(**overrides: Any) -> dict[str, Any]:
    """SDAR-4B-Chat's config.json with ``overrides`` applied (every other field as released)."""
    d = json.loads((RELEASE / "SDAR-4B-Chat.config.json").read_text(encoding="utf-8"))
    d.update(overrides)
    return d


def moe_config(moe: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """An ``sdar_moe`` config.json: the release's fields plus the Qwen3-MoE ones (``moe`` overrides those)."""
    return release_config(
        model_type="sdar_moe", architectures=["SDARMoeForCausalLM"], **{**QWEN3_MOE_FIELDS, **moe}, **overrides
    )


def write_release_checkpoint(
    path: Path,
    *,
    heads: int = 4,
    kv_heads: int = 2,
    layers: int = 2,
    hidden: int = 64,
    head_dim: int = 16,
    intermediate: int = 96,
    block_size: int = 4,
    tie: bool = False,
    moe: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """A random SDAR checkpoint directory in the release's layout (see the module docstring)."""
    path.mkdir(parents=True, exist_ok=True)
    tok = byte_level_tokenizer(SDAR_SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SDAR_SPECIALS}
    eos, mask = ids["<|endoftext|>"], ids["<|MASK|>"]
    sizes = dict(
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        tie_word_embeddings=tie,
        bos_token_id=eos,
        eos_token_id=eos,
        mask_token_id=mask,
        max_position_embeddings=512,
        max_window_layers=layers,
    )
    config = moe_config(moe, **sizes) if moe is not None else release_config(**sizes)
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", {
        **json.loads((RELEASE / "generation_config.json").read_text(encoding="utf-8")),
        "bos_token_id": eos, "eos_token_id": [ids["<|im_end|>"], eos], "pad_token_id": eos,
    })  # fmt: skip
    additional = [t for t in SDAR_SPECIALS[1:_SPECIAL]] + ["<|MASK|>"]
    _write_json(path / "tokenizer_config.json", {
        "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {
            str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": i < _SPECIAL}
            for i, t in enumerate(SDAR_SPECIALS)
        },
        "additional_special_tokens": additional, "bos_token": None, "chat_template": chat_template(),
        "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "mask_token": "<|MASK|>",
        "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    })  # fmt: skip
    _write_json(path / "special_tokens_map.json", {
        "additional_special_tokens": additional, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    })  # fmt: skip
    model = random_model(config_from_hf(config), seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if tie:
        state.pop("lm_head.weight")  # the convention: a tied head is not stored
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def transformers_twin_dir(ckpt: Path, out: Path) -> Path:
    """``ckpt``'s tensors (linked) with its config.json as transformers' ``qwen3`` / ``qwen3_moe``."""
    out.mkdir(parents=True, exist_ok=True)
    d = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    moe = d["model_type"] == "sdar_moe"
    d.pop("auto_map")
    d.pop("attn_implementation")
    d.update(
        model_type="qwen3_moe" if moe else "qwen3",
        architectures=["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
    )
    _write_json(out / "config.json", d)
    (out / "model.safetensors").symlink_to((ckpt / "model.safetensors").resolve())
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
