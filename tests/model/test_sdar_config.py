"""SDAR config.json parsing and the release's chat template.

- The parser refuses by name what the forward cannot run (sliding window, an unknown RoPE type, a non-SiLU
  activation, attention biases, a missing or bad block_size, shared experts, MoE fields missing or out of range)
  and ignores the release's training / serving switches (the same ModelConfig with or without them).
- The release's chat template (Qwen3's: thinking, tools, tool calls and responses) renders through lopa's jinja
  environment exactly as transformers renders it, ``enable_thinking`` and ``tools`` included.
"""

from __future__ import annotations

import pytest

from lopa.checkpoint.loader import load_checkpoint
from lopa.errors import CorruptCheckpointError, UnsupportedModelError
from lopa.model.config import ModelConfig
from lopa.model.families import config_from_hf, config_to_hf
from lopa.model.moe import MoEConfig
from tests.support.sdar_checkpoints import chat_template, moe_config, release_config, write_release_checkpoint

EXPERTS = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
IGNORED = (
    "use_cache", "torch_dtype", "fuse_cross_entropy", "attn_implementation", "ep_size", "use_deepep", "debug",
    "micro_forward", "skip_checkpoint", "max_window_layers", "initializer_range", "attention_dropout", "auto_map",
    "transformers_version", "sliding_window",
)  # fmt: skip


def parse(d: dict) -> ModelConfig:
    return config_from_hf(d, source="config.json")


@pytest.mark.parametrize(
    "change,error,words",
    [
        ({"use_sliding_window": True, "sliding_window": 4096}, UnsupportedModelError, "use_sliding_window"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, UnsupportedModelError, "longrope"),
        ({"hidden_act": "gelu"}, UnsupportedModelError, "hidden_act 'gelu'"),
        ({"attention_bias": True}, UnsupportedModelError, "o_proj"),
        ({"block_size": 0}, CorruptCheckpointError, "block_size must be a positive integer"),
        ({"block_size": "4"}, CorruptCheckpointError, "block_size must be a positive integer"),
    ],
)
def test_what_lopa_cannot_run_is_refused_by_name(change, error, words):
    with pytest.raises(error, match=words):
        parse(release_config(**change))


def test_a_missing_block_size_is_refused():
    d = release_config()
    del d["block_size"]
    with pytest.raises(CorruptCheckpointError, match="needs block_size"):
        parse(d)


def test_switches_that_do_not_change_the_forward_are_ignored():
    d = release_config()
    stripped = {k: v for k, v in d.items() if k not in IGNORED}
    assert len(stripped) == len(d) - len(IGNORED)
    flipped = {**d, "use_cache": True, "torch_dtype": "float32", "fuse_cross_entropy": False, "debug": True}
    assert parse(d) == parse(stripped) == parse(flipped)


def test_head_dim_defaults_to_sdar_config_default():
    d = release_config()
    del d["head_dim"]
    assert parse(d).head_dim == 128  # SDARConfig's default, not hidden_size / heads (= 80 here)


def test_moe_fields_are_parsed_and_exported_back():
    cfg = parse(moe_config({**EXPERTS, "decoder_sparse_step": 2, "mlp_only_layers": [5, 1]}))
    assert cfg.family == "sdar" and cfg.model_type == "sdar_moe"
    assert cfg.moe == MoEConfig(8, 2, 32, norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=(1, 5))
    assert [cfg.moe.is_sparse(i) for i in range(6)] == [False, False, False, True, False, False]
    out = config_to_hf(cfg)
    assert out["model_type"] == "sdar_moe" and out["architectures"] == ["SDARMoeForCausalLM"]
    assert parse(out) == cfg
    assert "num_experts" not in config_to_hf(parse(release_config()))


@pytest.mark.parametrize(
    "change,words",
    [
        ({"num_experts": None}, r"needs \['num_experts'\]"),
        ({"num_experts_per_tok": 9}, "exceeds num_experts=8"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size must be a positive integer"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step must be a positive integer"),
        ({"mlp_only_layers": [36]}, r"layer\(s\) \[36\], outside 0..35"),
        ({"mlp_only_layers": "1"}, "mlp_only_layers must be a list"),
    ],
)
def test_bad_moe_fields_are_refused_by_name(change, words):
    with pytest.raises(CorruptCheckpointError, match=words):
        parse(moe_config({**EXPERTS, **change}))


def test_shared_experts_are_refused():
    with pytest.raises(UnsupportedModelError, match="shared experts"):
        parse(moe_config({**EXPERTS, "shared_expert_intermediate_size": 64}))


# ---- the chat template -------------------------------------------------------------------------------------
TOOLS = [{
    "type": "function",
    "function": {"name": "add", "description": "Add two numbers", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"],
    }},
}]  # fmt: skip
CONVERSATIONS = {
    "plain": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "history-with-thinking": [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>\nsmall sum\n</think>\n\n2"},
        {"role": "user", "content": "and 2+2?"},
    ],
    "tool-calls": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Add 2 and 3, then 4 and 5."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}},
            {"type": "function", "function": {"name": "add", "arguments": '{"a": 4, "b": 5}'}},
        ]},
        {"role": "tool", "content": "5"},
        {"role": "tool", "content": "9"},
        {"role": "assistant", "content": "5 and 9.", "reasoning_content": "both sums done"},
    ],
}  # fmt: skip
OPTIONS = {
    "gen": dict(add_generation_prompt=True),
    "no-thinking": dict(add_generation_prompt=True, enable_thinking=False),
    "tools": dict(add_generation_prompt=True, tools=TOOLS),
    "no-prompt": dict(add_generation_prompt=False),
}


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    ckpt = write_release_checkpoint(tmp_path_factory.mktemp("sdar-chat") / "ckpt")
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(ckpt / "tokenizer.json"), chat_template=chat_template()
    )
    return load_checkpoint(ckpt).tokenizer, theirs


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_release_template_renders_as_transformers_does(both, conversation, option):
    ours, theirs = both
    messages, kwargs = CONVERSATIONS[conversation], OPTIONS[option]
    want = theirs.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours.apply_chat_template(messages, **kwargs) == want
    if option == "no-thinking":
        assert want.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    if option == "tools":
        assert '"name": "add"' in want and "<tools>" in want
    if conversation == "tool-calls":
        assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in want
        assert "<tool_response>\n5\n</tool_response>\n<tool_response>\n9\n</tool_response>" in want
