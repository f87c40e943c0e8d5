"""LoRA merge at load: equals peft's merge_and_unload, and refuses adapters that do not fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lopa.checkpoint.loader import load_checkpoint
from lopa.checkpoint.lora import merge_lora
from lopa.errors import AdapterError, CheckpointNotFoundError, UnsafeWeightsError
from lopa.testing import make_random_lora, make_tiny_checkpoint, transformers_bidirectional_logits, transformers_twin

peft = pytest.importorskip("peft")

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])  # (1, 10)
POS = torch.arange(10)[None]


def _ours(base: Path, lora: Path | None) -> torch.Tensor:
    with torch.no_grad():
        return load_checkpoint(base, lora=lora).model(IDS, POS)  # (1, 10, vocab)


def _peft_merged(base: Path, lora: Path) -> torch.Tensor:
    hf = transformers_twin(load_checkpoint(base).model)
    merged = peft.PeftModel.from_pretrained(hf, str(lora)).merge_and_unload()
    return transformers_bidirectional_logits(merged, IDS)


def _edit_config(lora: Path, **changes) -> None:
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg.update(changes)
    (lora / "adapter_config.json").write_text(json.dumps(cfg))


def test_merge_equals_peft_merge_and_unload(tiny_ckpt: Path, tiny_lora: Path) -> None:
    ours = _ours(tiny_ckpt, tiny_lora)
    assert (ours - _ours(tiny_ckpt, None)).abs().max() > 1e-2  # the adapter really changes the model
    assert (ours - _peft_merged(tiny_ckpt, tiny_lora)).abs().max() <= 1e-4


def test_all_targets_with_rslora_equal_peft(tiny_ckpt: Path, tmp_path: Path) -> None:
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora = make_random_lora(tiny_ckpt, tmp_path / "all", r=8, alpha=16, targets=targets, seed=3)
    plain = _ours(tiny_ckpt, lora)
    _edit_config(lora, use_rslora=True)
    rs = _ours(tiny_ckpt, lora)
    assert (rs - plain).abs().max() > 1e-3  # alpha / sqrt(r) differs from alpha / r
    assert (rs - _peft_merged(tiny_ckpt, lora)).abs().max() <= 1e-4


def test_alpha_pattern_equals_peft(tiny_ckpt: Path, lora: Path) -> None:
    _edit_config(lora, alpha_pattern={"v_proj": 32})
    assert (_ours(tiny_ckpt, lora) - _peft_merged(tiny_ckpt, lora)).abs().max() <= 1e-4


def test_regex_target_modules_merge_like_a_list(tiny_ckpt: Path, tiny_lora: Path, lora: Path) -> None:
    _edit_config(lora, target_modules=r".*\.(q_proj|v_proj)")
    assert torch.equal(_ours(tiny_ckpt, lora), _ours(tiny_ckpt, tiny_lora))


def test_merge_happens_in_fp32_then_casts(tiny_ckpt: Path, tiny_lora: Path) -> None:
    ck = load_checkpoint(tiny_ckpt, lora=tiny_lora, dtype="bfloat16")
    assert {p.dtype for p in ck.model.parameters()} == {torch.bfloat16}
    fp32 = load_checkpoint(tiny_ckpt, lora=tiny_lora).model
    w16 = ck.model.model.layers[0].self_attn.q_proj.weight
    w32 = fp32.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w16, w32.to(torch.bfloat16))  # one rounding, not two


# ---- refusals ------------------------------------------------------------------------------------------------
def test_adapter_for_another_base_is_refused(tiny_ckpt: Path, tmp_path: Path) -> None:
    other = make_tiny_checkpoint(tmp_path / "wide", hidden_size=96, num_heads=4, num_kv_heads=2)
    foreign = make_random_lora(other, tmp_path / "foreign")
    with pytest.raises(AdapterError, match=r"q_proj.*do not fit.*another base"):
        load_checkpoint(tiny_ckpt, lora=foreign)


def test_adapter_module_missing_from_base_is_named(tiny_ckpt: Path, lora: Path) -> None:
    tensors = load_file(str(lora / "adapter_model.safetensors"))
    for part in "AB":
        tensors[f"base_model.model.model.layers.7.self_attn.q_proj.lora_{part}.weight"] = tensors.pop(
            f"base_model.model.model.layers.0.self_attn.q_proj.lora_{part}.weight"
        )
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"model\.layers\.7\.self_attn\.q_proj.*another base"):
        load_checkpoint(tiny_ckpt, lora=lora)


def test_adapter_tensor_that_is_not_lora_is_named(tiny_ckpt: Path, lora: Path) -> None:
    tensors = load_file(str(lora / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 8)
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="lora_embedding_A"):
        load_checkpoint(tiny_ckpt, lora=lora)


def test_half_a_pair_is_refused(tiny_ckpt: Path, lora: Path) -> None:
    tensors = load_file(str(lora / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"layers\.1\.self_attn\.v_proj.*not its partner"):
        load_checkpoint(tiny_ckpt, lora=lora)


def test_module_outside_target_modules_is_refused(tiny_ckpt: Path, lora: Path) -> None:
    _edit_config(lora, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match=r"v_proj.*not in target_modules"):
        load_checkpoint(tiny_ckpt, lora=lora)


def test_pickled_adapter_is_refused(tiny_ckpt: Path, lora: Path) -> None:
    (lora / "adapter_model.safetensors").unlink()
    (lora / "adapter_model.bin").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UnsafeWeightsError, match=r"adapter_model\.bin.*convert it to adapter_model\.safetensors"):
        load_checkpoint(tiny_ckpt, lora=lora)


@pytest.mark.parametrize("missing", ["dir", "adapter_config.json", "adapter_model.safetensors"])
def test_missing_adapter_pieces(tiny_ckpt: Path, lora: Path, missing: str) -> None:
    if missing == "dir":
        shutil.rmtree(lora)
    else:
        (lora / missing).unlink()
    with pytest.raises(CheckpointNotFoundError, match="LoRA adapter directory" if missing == "dir" else missing):
        load_checkpoint(tiny_ckpt, lora=lora)


def test_non_lora_peft_type_is_refused(tiny_ckpt: Path, lora: Path) -> None:
    _edit_config(lora, peft_type="IA3")
    with pytest.raises(AdapterError, match="'IA3' is not supported"):
        load_checkpoint(tiny_ckpt, lora=lora)


def test_a_bad_adapter_leaves_the_model_untouched(tiny_checkpoint, tmp_path: Path, lora: Path) -> None:
    model = load_checkpoint(tiny_checkpoint.path).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = load_file(str(lora / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"  # the last module merged
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"layers\.1\.self_attn\.v_proj"):
        merge_lora(model, lora)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adapter_whose_declared_rank_disagrees_with_its_tensors_is_refused(ckpt: Path, lora: Path) -> None:
    r = json.loads((lora / "adapter_config.json").read_text())["r"]
    _edit_config(lora, r=r * 2)
    with pytest.raises(AdapterError, match=rf"r={r * 2}.*rank {r}"):
        load_checkpoint(ckpt, lora=lora)


def test_adapter_rank_pattern_is_checked_too(ckpt: Path, lora: Path) -> None:
    r = json.loads((lora / "adapter_config.json").read_text())["r"]
    _edit_config(lora, rank_pattern={"q_proj": r + 1})
    with pytest.raises(AdapterError, match="q_proj"):
        load_checkpoint(ckpt, lora=lora)


def test_adapter_with_nan_is_refused(ckpt: Path, lora: Path) -> None:
    tensors = load_file(str(lora / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(lora / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="NaN"):
        load_checkpoint(ckpt, lora=lora)
