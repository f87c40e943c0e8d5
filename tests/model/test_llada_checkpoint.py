"""LLaDA checkpoints end to end: files as LLaDA spells them, save/load, shards, tied heads, errors in LLaDA names,
the chat template and end tokens, the family's decoding defaults, and LLM decoding on both runners with a LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lopa import LLM, DecodeConfig
from lopa.checkpoint.checks import INDEX_FILE
from lopa.checkpoint.loader import load_checkpoint
from lopa.checkpoint.save import save_checkpoint
from lopa.commands.flags import checkpoint_decode_defaults
from lopa.errors import AdapterError, TensorMismatchError
from lopa.testing import make_random_lora, make_tiny_checkpoint

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])  # (1, 7)
POS = torch.arange(7)[None]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  What is 2 + 2?  "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And ünïcödé 日本 🙂?"},
]


@pytest.fixture(scope="module")
def llada(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llada") / "tiny-llada", family="llada", seed=2)


def _logits(path: Path, **kw) -> torch.Tensor:
    with torch.no_grad():
        return load_checkpoint(path, **kw).model(IDS, POS)


def test_files_are_spelled_like_llada(llada: Path) -> None:
    cfg = json.loads((llada / "config.json").read_text())
    assert cfg["model_type"] == "llada" and {"d_model", "n_layers", "n_heads", "n_kv_heads"} <= set(cfg)
    keys = set(load_file(str(llada / "model.safetensors")))
    assert "model.transformer.wte.weight" in keys and "model.transformer.blocks.1.attn_out.weight" in keys
    assert not any(k.startswith("model.layers.") for k in keys)


def test_save_load_round_trip_and_shards(llada: Path, tmp_path: Path) -> None:
    ck = load_checkpoint(llada)
    again = save_checkpoint(ck.model, tmp_path / "copy", tokenizer_dir=llada)
    assert load_file(str(again / "model.safetensors")).keys() == load_file(str(llada / "model.safetensors")).keys()
    assert torch.equal(_logits(again), _logits(llada))
    assert load_checkpoint(again).config == ck.config
    sharded = make_tiny_checkpoint(tmp_path / "sharded", family="llada", seed=2, shards=3)
    assert len(set(json.loads((sharded / INDEX_FILE).read_text())["weight_map"].values())) == 3
    assert torch.equal(_logits(sharded), _logits(llada))


def test_tied_head_is_not_stored_and_is_shared(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "tied", family="llada", tie_word_embeddings=True)
    assert json.loads((path / "config.json").read_text())["weight_tying"] is True
    assert "model.transformer.ff_out.weight" not in load_file(str(path / "model.safetensors"))
    model = load_checkpoint(path).model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_missing_tensor_is_named_as_llada_spells_it(llada: Path, tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "m", family="llada", seed=2)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(TensorMismatchError, match=r"missing.*model\.transformer\.blocks\.1\.up_proj\.weight"):
        load_checkpoint(path)


def test_adapter_module_missing_from_base_is_named_as_llada_spells_it(llada: Path, tmp_path: Path) -> None:
    lora = make_random_lora(llada, tmp_path / "lora")
    tensors = load_file(str(lora / "adapter_model.safetensors"))
    for part in "AB":
        old = f"base_model.model.model.transformer.blocks.0.q_proj.lora_{part}.weight"
        tensors[old.replace("blocks.0", "blocks.7")] = tensors.pop(old)
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"model\.transformer\.blocks\.7\.q_proj.*another base"):
        load_checkpoint(llada, lora=lora)


def test_a_dream_adapter_does_not_fit_a_llada_base(llada: Path, tiny_lora: Path) -> None:
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.self_attn\.q_proj.*not a linear layer"):
        load_checkpoint(llada, lora=tiny_lora)


def test_chat_template_matches_transformers_and_both_end_tokens_end(llada: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok = load_checkpoint(llada).tokenizer
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(llada))
    ours = tok.apply_chat_template(MESSAGES)
    assert ours == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert ours.startswith("<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n")
    assert ours.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ends = {tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|endoftext|>")}
    assert None not in ends and ends <= tok.end_token_ids
    assert tok.mask_token_id == tok.token_to_id("<|mdm_mask|>")


def test_family_recommends_blocks_of_32_unless_the_checkpoint_says_otherwise(llada: Path, tmp_path: Path) -> None:
    assert checkpoint_decode_defaults(str(llada)).block_size == 32
    assert LLM(llada).default_config.block_size == 32
    path = make_tiny_checkpoint(tmp_path / "rec", family="llada")
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "block_size": 8}))
    assert checkpoint_decode_defaults(str(path)).block_size == 8


@pytest.mark.parametrize(
    "cfg",
    [
        DecodeConfig(decoder="lopa", base="d2f", branches=3, block_size=4, max_new_tokens=16, threshold=0.5),
        DecodeConfig(decoder="threshold", block_size=8, max_new_tokens=16, threshold=0.7),
    ],
    ids=["lopa", "threshold"],
)
def test_llm_with_lora_decodes_the_same_on_both_runners(llada: Path, tmp_path: Path, cfg: DecodeConfig) -> None:
    lora = make_random_lora(llada, tmp_path / "lora", targets=("q_proj", "attn_out", "ff_out"))
    eager, fast = LLM(llada, lora=lora), LLM(llada, lora=lora, enforce_eager=False)
    for prompt in ("hello", [5, 6, 7, 8, 9]):
        a, b = eager.generate(prompt, cfg)[0], fast.generate(prompt, cfg)[0]
        assert a.token_ids == b.token_ids and a.stats.forwards == b.stats.forwards
        assert eager.mask_id not in a.token_ids
    chat = eager.chat([{"role": "user", "content": "hi"}], cfg)
    assert chat.prompt_token_ids[0] == eager.tokenizer.bos_token_id  # the template's bos_token
