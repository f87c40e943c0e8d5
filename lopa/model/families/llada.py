"""The LLaDA family (LLaDA-8B-Base / -Instruct, LLaDA-1.5, D2F-LLaDA adapters): config fields and weight names.

LLaDA is a LLaMA-style block stack (RMSNorm, SwiGLU, RoPE, no biases) run without a causal mask, i.e. the shared
:class:`~lopa.model.transformer.Transformer` with ``attention_bias=False``; only its spelling differs. Its
``config.json`` uses OLMo's field names (``d_model``, ``n_layers``, ``n_heads``, ``n_kv_heads``, ``mlp_hidden_size``,
``embedding_size``, ``weight_tying``, ...) and its tensors live under ``model.transformer.`` (table below). Options
of the OLMo code base that LLaDA checkpoints do not use (ALiBi, QK norm, sequential blocks, biases, scaled
logits...) are refused with a named error rather than run wrongly. LLaDA was trained as a masked diffusion model
from scratch: the output at position ``i`` predicts the token at ``i`` (``logit_shift = 0``).
"""

from __future__ import annotations

from typing import Any

from lopa.errors import CorruptCheckpointError, UnsupportedModelError
from lopa.model.config import ModelConfig, first_int, int_or_none
from lopa.model.families.base import Family, NameTable

# (LLaDA module name, shared module name); "{i}" is the layer index.
NAMES: NameTable = (
    ("model.transformer.wte", "model.embed_tokens"),
    ("model.transformer.ln_f", "model.norm"),
    ("model.transformer.ff_out", "lm_head"),
    ("model.transformer.blocks.{i}.attn_norm", "model.layers.{i}.input_layernorm"),
    ("model.transformer.blocks.{i}.q_proj", "model.layers.{i}.self_attn.q_proj"),
    ("model.transformer.blocks.{i}.k_proj", "model.layers.{i}.self_attn.k_proj"),
    ("model.transformer.blocks.{i}.v_proj", "model.layers.{i}.self_attn.v_proj"),
    ("model.transformer.blocks.{i}.attn_out", "model.layers.{i}.self_attn.o_proj"),
    ("model.transformer.blocks.{i}.ff_norm", "model.layers.{i}.post_attention_layernorm"),
    ("model.transformer.blocks.{i}.ff_proj", "model.layers.{i}.mlp.gate_proj"),
    ("model.transformer.blocks.{i}.up_proj", "model.layers.{i}.mlp.up_proj"),
    ("model.transformer.blocks.{i}.ff_out", "model.layers.{i}.mlp.down_proj"),
)
# field: (value lopa runs, what the field means); any other value is refused.
_FIXED: dict[str, tuple[Any, str]] = {
    "block_type": ("llama", "separate q/k/v and gate/up projections"),
    "layer_norm_type": ("rms", "RMSNorm"),
    "activation_type": ("silu", "SwiGLU with SiLU"),
    "alibi": (False, "ALiBi position biases"),
    "rope": (True, "rotary position embeddings"),
    "attention_layer_norm": (False, "QK layer norm"),
    "include_bias": (False, "biases in every linear layer"),
    "bias_for_layer_norm": (False, "layer-norm biases"),
    "layer_norm_with_affine": (True, "layer-norm weights"),
    "input_emb_norm": (False, "scaled input embeddings"),
    "scale_logits": (False, "scaled logits"),
    "block_group_size": (1, "grouped blocks"),
    "clip_qkv": (None, "clipped q/k/v"),
}
_DEFAULTS: dict[str, Any] = {  # what an absent field means in LLaDA's configuration class
    "block_type": "sequential",
    "layer_norm_type": "default",
    "activation_type": "gelu",
    "alibi": False,
    "rope": False,
    "attention_layer_norm": False,
    "include_bias": True,
    "bias_for_layer_norm": None,
    "layer_norm_with_affine": True,
    "input_emb_norm": False,
    "scale_logits": False,
    "block_group_size": 1,
    "clip_qkv": None,
}


def parse(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A LLaDA config.json as a ModelConfig; named errors for missing fields and unsupported options."""
    for key, (wanted, meaning) in _FIXED.items():
        value = d.get(key, _DEFAULTS[key])
        if key == "bias_for_layer_norm" and value is None:
            value = d.get("include_bias", _DEFAULTS["include_bias"])  # None means "same as include_bias"
        if value != wanted:
            raise UnsupportedModelError(
                f"{source}: {key}={value!r} ({meaning}) is not supported for LLaDA checkpoints; lopa runs "
                f"{key}={wanted!r} as LLaDA-8B and LLaDA-1.5 use."
            )
    required = ("d_model", "n_layers", "n_heads", "vocab_size")
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise CorruptCheckpointError(f"{source}: missing required field(s) {missing}.")
    hidden, heads = int(d["d_model"]), int(d["n_heads"])
    kv_heads = 1 if d.get("multi_query_attention") else int(d.get("n_kv_heads") or heads)
    if hidden % heads or heads % kv_heads:
        raise CorruptCheckpointError(
            f"{source}: d_model={hidden}, n_heads={heads}, n_kv_heads={kv_heads} do not divide evenly."
        )
    mlp = d.get("mlp_hidden_size") or int(d.get("mlp_ratio", 4)) * hidden
    vocab = int(d.get("embedding_size") or d["vocab_size"])  # the tensors have embedding_size rows
    if vocab < int(d["vocab_size"]):
        raise CorruptCheckpointError(f"{source}: embedding_size={vocab} is below vocab_size={d['vocab_size']}.")
    return FAMILY.make_config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(mlp),
        num_hidden_layers=int(d["n_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=int(d.get("max_sequence_length", 4096)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        rope_theta=float(d.get("rope_theta", 10000.0)),
        rope_scaling=None,
        tie_word_embeddings=bool(d.get("weight_tying", False)),
        attention_bias=bool(d.get("include_qkv_bias", False)),
        mask_token_id=int_or_none(d.get("mask_token_id")),
        eos_token_id=first_int(d.get("eos_token_id")),
        pad_token_id=int_or_none(d.get("pad_token_id")),
        bos_token_id=int_or_none(d.get("bos_token_id")),
        model_type=str(d["model_type"]),
    )


def export(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json of a LLaDA checkpoint of this shape (the fields LLaDA's own loader reads)."""
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size or cfg.rope_scaling is not None:
        raise UnsupportedModelError("a LLaDA checkpoint needs head_dim = d_model / n_heads and no rope_scaling")
    d: dict[str, Any] = {key: wanted for key, (wanted, _) in _FIXED.items()}
    d.update(
        model_type="llada",
        architectures=["LLaDAModelLM"],
        d_model=cfg.hidden_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads,
        multi_query_attention=None,
        mlp_hidden_size=cfg.intermediate_size,
        mlp_ratio=4,
        vocab_size=cfg.vocab_size,
        embedding_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        rope_full_precision=True,
        weight_tying=cfg.tie_word_embeddings,
        include_qkv_bias=cfg.attention_bias,
        flash_attention=False,
        use_cache=False,
    )
    ids = ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")
    d.update({k: getattr(cfg, k) for k in ids if getattr(cfg, k) is not None})
    return d


FAMILY = Family(
    name="llada",
    model_types=("llada", "LLaDA"),
    checkpoints=("LLaDA-8B-Base", "LLaDA-8B-Instruct", "LLaDA-1.5", "D2F-LLaDA (LoRA)"),
    logit_shift=0,
    attention="bidirectional",
    parse=parse,
    export=export,
    names=NAMES,
    mask_token="<|mdm_mask|>",
    end_tokens=("<|eot_id|>", "<|endoftext|>"),
    decode_defaults={"block_size": 32},
)
