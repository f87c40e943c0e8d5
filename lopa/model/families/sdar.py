"""The SDAR family (JetAstra's block-diffusion models on Qwen3, dense and MoE): config fields.

SDAR checkpoints are Qwen3 (RMSNorm, SwiGLU, RoPE, GQA with an explicit ``head_dim``, per-head q/k RMSNorm, no
attention biases) trained and decoded as block diffusion: attention is block-causal with blocks of the config's
``block_size`` aligned to absolute position 0 (query ``i`` sees key ``j`` iff ``j // block_size <= i //
block_size``), and the output at position ``i`` predicts the token at ``i`` (no shift). Tensor names are Qwen3's,
which are the shared transformer's names plus ``self_attn.q_norm`` / ``self_attn.k_norm``.

``model_type: "sdar"`` is dense (SDAR-1.7B / 4B / 8B); ``"sdar_moe"`` (SDAR-30B-A3B) has Qwen3-MoE layers: the
fields ``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``, ``norm_topk_prob``,
``decoder_sparse_step`` and ``mlp_only_layers`` (:mod:`lopa.model.moe`) and tensors ``mlp.gate`` /
``mlp.experts.E.{gate,up,down}_proj`` in its sparse layers.

What the forward cannot run is refused by name: a sliding window, a RoPE type it does not implement, an activation
other than SiLU, attention biases (Qwen3 puts one on ``o_proj`` too), shared experts, a missing ``block_size``.
Training and serving switches of the release (``use_cache``, ``torch_dtype``, ``attn_implementation``,
``fuse_cross_entropy``, ``ep_size``, ``use_deepep``, ``micro_forward``, ``skip_checkpoint``, ``debug``,
``max_window_layers`` with no sliding window, ``output_router_logits``, ``router_aux_loss_coef``...) do not change
the forward and are ignored.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from lopa.errors import CorruptCheckpointError, UnsupportedModelError
from lopa.model.config import ModelConfig
from lopa.model.families.base import Family
from lopa.model.families.dream import qwen2_fields
from lopa.model.moe import MoEConfig

MOE_MODEL_TYPE = "sdar_moe"
DEFAULT_HEAD_DIM = 128  # SDARConfig's (and Qwen3Config's) head_dim when config.json has none


def parse(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """An SDAR config.json (Qwen3 fields plus ``block_size`` and ``mask_token_id``; Qwen3-MoE fields for
    ``sdar_moe``) as a ModelConfig."""
    if "block_size" not in d:
        raise CorruptCheckpointError(
            f"{source}: an SDAR config.json needs block_size (the attention block the model was trained with)."
        )
    if d.get("attention_bias", False):
        raise UnsupportedModelError(
            f"{source}: attention_bias=true is not supported for SDAR checkpoints (Qwen3 then has a bias on o_proj, "
            "which lopa's attention does not have); SDAR models are released without attention biases."
        )
    fields = qwen2_fields({"head_dim": DEFAULT_HEAD_DIM, **d}, source)  # Qwen2 fields = Qwen3's spelling
    fields.update(
        attention_bias=False,
        block_size=_block_size(d["block_size"], source),
        qk_norm=True,
        moe=_moe(d, fields["num_hidden_layers"], source) if d.get("model_type") == MOE_MODEL_TYPE else None,
    )
    return FAMILY.make_config(**fields)


def _block_size(v: Any, source: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise CorruptCheckpointError(f"{source}: block_size must be a positive integer, got {v!r}.")
    return v


def _moe(d: dict[str, Any], layers: int, source: str) -> MoEConfig:
    """The Qwen3-MoE fields of an ``sdar_moe`` config.json."""
    required = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise CorruptCheckpointError(f"{source}: model_type {MOE_MODEL_TYPE!r} needs {missing} (Qwen3-MoE fields).")
    if d.get("shared_expert_intermediate_size"):
        raise UnsupportedModelError(
            f"{source}: shared experts (shared_expert_intermediate_size) are not supported; Qwen3-MoE has none."
        )
    numbers = {k: d[k] for k in (*required, "decoder_sparse_step") if k in d}
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CorruptCheckpointError(f"{source}: {key} must be a positive integer, got {value!r}.")
    if numbers["num_experts_per_tok"] > numbers["num_experts"]:
        raise CorruptCheckpointError(
            f"{source}: num_experts_per_tok={numbers['num_experts_per_tok']} exceeds num_experts="
            f"{numbers['num_experts']}."
        )
    only = d.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in only):
        raise CorruptCheckpointError(f"{source}: mlp_only_layers must be a list of layer indices, got {only!r}.")
    outside = [i for i in only if not 0 <= i < layers]
    if outside:
        raise CorruptCheckpointError(
            f"{source}: mlp_only_layers names layer(s) {outside}, outside 0..{layers - 1} (num_hidden_layers={layers})."
        )
    return MoEConfig(
        num_experts=numbers["num_experts"],
        num_experts_per_tok=numbers["num_experts_per_tok"],
        moe_intermediate_size=numbers["moe_intermediate_size"],
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        decoder_sparse_step=numbers.get("decoder_sparse_step", 1),
        mlp_only_layers=tuple(sorted(set(only))),
    )


def export(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json of an SDAR checkpoint of this shape (``sdar_moe`` with its expert fields when MoE)."""
    d = asdict(cfg)
    for name in ("extra", "family", "logit_shift", "attention", "qk_norm", "moe"):
        d.pop(name)
    moe = cfg.moe
    d["model_type"] = MOE_MODEL_TYPE if moe is not None else "sdar"
    d["architectures"] = ["SDARMoeForCausalLM" if moe is not None else "SDARForCausalLM"]
    d["hidden_act"] = "silu"
    if moe is not None:
        d.update(asdict(moe), mlp_only_layers=list(moe.mlp_only_layers))
    return {k: v for k, v in d.items() if v is not None}


FAMILY = Family(
    name="sdar",
    model_types=("sdar", "SDAR", MOE_MODEL_TYPE),
    checkpoints=("SDAR-1.7B-Chat", "SDAR-4B-Chat", "SDAR-8B-Chat", "SDAR-30B-A3B-Chat"),
    logit_shift=0,
    attention="block_causal",
    parse=parse,
    export=export,
    mask_token="<|MASK|>",
    end_tokens=("<|im_end|>", "<|endoftext|>"),
)
