"""Checkpoint loading and saving: formats that load, the device named on the command line, the file modes of saved
weights, and every user-caused failure with its named error and message."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lopa.checkpoint.checks import INDEX_FILE
from lopa.checkpoint.loader import load_checkpoint, resolve_device
from lopa.checkpoint.save import save_checkpoint
from lopa.commands.main import main
from lopa.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    DeviceUnavailableError,
    TensorMismatchError,
    UnsafeWeightsError,
    UnsupportedModelError,
)
from lopa.testing import make_tiny_checkpoint

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])  # (1, 7)
POS = torch.arange(7)[None]


def _logits(ckpt_dir: Path, **kw) -> torch.Tensor:
    ck = load_checkpoint(ckpt_dir, **kw)
    with torch.no_grad():
        return ck.model(IDS, POS).float()  # (1, 7, vocab)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


# ---- what loads ----------------------------------------------------------------------------------------------
def test_loads_config_model_tokenizer(tiny_checkpoint) -> None:
    ck = tiny_checkpoint
    assert ck.config.model_type == "Dream"
    assert not ck.model.training
    assert all(not p.requires_grad for p in ck.model.parameters())
    assert ck.config.mask_token_id == ck.tokenizer.token_to_id("<|mask|>")
    assert ck.config.eos_token_id == ck.config.pad_token_id == ck.tokenizer.token_to_id("<|endoftext|>")
    assert ck.generation_config["mask_token_id"] == ck.config.mask_token_id
    assert ck.model.model.embed_tokens.weight.shape == (ck.config.vocab_size, ck.config.hidden_size)


def test_save_then_load_round_trips_the_weights(tiny_checkpoint, tmp_path: Path) -> None:
    out = save_checkpoint(tiny_checkpoint.model, tmp_path / "copy", tokenizer_dir=tiny_checkpoint.path)
    again = load_checkpoint(out)
    for (name, a), (_, b) in zip(
        tiny_checkpoint.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert again.config == tiny_checkpoint.config
    assert again.tokenizer.encode("round trip") == tiny_checkpoint.tokenizer.encode("round trip")


def test_sharded_checkpoint_equals_single_file(tmp_path: Path) -> None:
    single = make_tiny_checkpoint(tmp_path / "single", seed=4)
    sharded = make_tiny_checkpoint(tmp_path / "sharded", seed=4, shards=3)
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert not (sharded / "model.safetensors").exists()
    assert torch.equal(_logits(single), _logits(sharded))


def test_tied_head_is_not_stored_and_is_shared(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    model = load_checkpoint(path).model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tied_checkpoint_that_also_stores_the_head_loads(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    tensors = load_file(str(path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(path / "model.safetensors"))
    model = load_checkpoint(path).model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize(("dtype", "expected"), [("bfloat16", torch.bfloat16), (torch.float16, torch.float16)])
def test_dtype_is_applied_but_rope_stays_fp32(tiny_ckpt: Path, dtype, expected: torch.dtype) -> None:
    model = load_checkpoint(tiny_ckpt, dtype=dtype).model
    assert {p.dtype for p in model.parameters()} == {expected}
    assert model.rotary.inv_freq.dtype == torch.float32
    with torch.no_grad():
        assert model(IDS, POS).dtype == expected


def test_default_dtype_on_cpu_is_fp32_even_if_config_says_bf16(ckpt: Path) -> None:
    _edit_json(ckpt / "config.json", torch_dtype="bfloat16")
    assert {p.dtype for p in load_checkpoint(ckpt).model.parameters()} == {torch.float32}


def test_qwen2_field_names_and_rope_parameters_are_accepted(ckpt: Path, tiny_ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(_logits(ckpt), _logits(tiny_ckpt))


def test_legacy_rotary_tensor_is_ignored(ckpt: Path, tiny_ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, str(ckpt / "model.safetensors"))
    assert torch.equal(_logits(ckpt), _logits(tiny_ckpt))


def test_special_ids_fall_back_to_generation_config_then_tokenizer(ckpt: Path) -> None:
    _edit_json(ckpt / "config.json", mask_token_id=None, eos_token_id=None, pad_token_id=None)
    _edit_json(ckpt / "generation_config.json", mask_token_id=7, eos_token_id=[8, 9])
    ck = load_checkpoint(ckpt)
    assert (ck.config.mask_token_id, ck.config.eos_token_id) == (7, 8)
    assert {8, 9} <= ck.tokenizer.end_token_ids
    assert ck.config.pad_token_id == ck.tokenizer.token_to_id("<|endoftext|>")  # from tokenizer_config pad_token


def test_safetensors_is_preferred_over_a_pickle_next_to_it(ckpt: Path) -> None:
    (ckpt / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    assert load_checkpoint(ckpt).model is not None


# ---- what fails, and says why --------------------------------------------------------------------------------
def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_missing_required_file(ckpt: Path, name: str) -> None:
    (ckpt / name).unlink()
    with pytest.raises(CheckpointNotFoundError, match=name):
        load_checkpoint(ckpt)


def test_config_that_is_not_json(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="config.json is not valid JSON"):
        load_checkpoint(ckpt)


def test_unknown_model_type(ckpt: Path) -> None:
    _edit_json(ckpt / "config.json", model_type="llama")
    with pytest.raises(UnsupportedModelError, match="'llama' is not supported"):
        load_checkpoint(ckpt)


def test_pickle_weights_are_refused_not_loaded(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04garbage")  # would fail to unpickle if anyone tried
    with pytest.raises(UnsafeWeightsError, match=r"(?i)pytorch_model\.bin.*convert them to safetensors"):
        load_checkpoint(ckpt)


def test_no_weights_at_all(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"no \*\.safetensors"):
        load_checkpoint(ckpt)


def test_missing_tensor_is_named(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(TensorMismatchError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(ckpt)


def test_extra_tensor_is_named(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(TensorMismatchError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_norm\.weight'"):
        load_checkpoint(ckpt)


def test_shape_mismatch_names_tensor_and_shapes(ckpt: Path) -> None:
    _edit_json(ckpt / "config.json", intermediate_size=96)  # the weights were made with 128
    with pytest.raises(TensorMismatchError, match=r"mlp\.\w+_proj\.weight' has shape \(\d+, \d+\) but config"):
        load_checkpoint(ckpt)


def test_missing_layers_when_config_claims_more(ckpt: Path) -> None:
    _edit_json(ckpt / "config.json", num_hidden_layers=3)
    with pytest.raises(TensorMismatchError, match=r"num_hidden_layers=3.*missing layer\(s\) 2\b"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("content", [b"\xff" * 64, b"\x10\x00\x00\x00\x00\x00\x00\x00{bad header}"])
def test_corrupt_safetensors_header(ckpt: Path, content: bytes) -> None:
    (ckpt / "model.safetensors").write_bytes(content)
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors is not a valid safetensors file"):
        load_checkpoint(ckpt)


def test_truncated_safetensors(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="not a valid safetensors file"):
        load_checkpoint(ckpt)


def test_index_listing_a_missing_shard(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "sharded", shards=2)
    shards = sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (path / shards[-1]).unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"model-00002-of-00002\.safetensors.*incomplete"):
        load_checkpoint(path)


def test_index_without_weight_map(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "sharded", shards=2)
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CorruptCheckpointError, match="weight_map"):
        load_checkpoint(path)


def test_mask_id_nowhere_to_be_found(ckpt: Path) -> None:
    _edit_json(ckpt / "config.json", mask_token_id=None)
    _edit_json(ckpt / "generation_config.json", mask_token_id=None)
    _edit_json(ckpt / "tokenizer_config.json", mask_token=None)
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|mask|>"]
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match=r'no mask token id found.*generation_config\.json.*"mask_token_id"'):
        load_checkpoint(ckpt)


def test_mask_id_outside_vocab(ckpt: Path) -> None:
    _edit_json(ckpt / "config.json", mask_token_id=10_000)
    with pytest.raises(CorruptCheckpointError, match="mask_token_id=10000 is outside the vocabulary"):
        load_checkpoint(ckpt)


def test_unknown_dtype(tiny_ckpt: Path) -> None:
    with pytest.raises(ConfigError, match="dtype 'int8' is not supported"):
        load_checkpoint(tiny_ckpt, dtype="int8")


def _generate(ckpt, *extra: str) -> list[str]:
    return ["generate", "--model", str(ckpt), "--block-size", "8", "--max-new-tokens", "8", *extra, "hi"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_says_the_device_is_unavailable(tiny_ckpt, capsys) -> None:
    assert main(_generate(tiny_ckpt, "--device", "cuda")) == 2
    err = capsys.readouterr().err
    assert "no cuda device is available" in err and "safetensors" not in err
    with pytest.raises(DeviceUnavailableError, match="cuda"):
        load_checkpoint(tiny_ckpt, device="cuda:0")


@pytest.mark.parametrize(("device", "words"), [("tpu", "not a device torch knows"), ("meta", "meta holds no data")])
def test_unknown_or_dataless_devices_get_a_named_error(tiny_ckpt, capsys, device: str, words: str) -> None:
    assert main(_generate(tiny_ckpt, "--device", device)) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and "safetensors" not in err


def test_cpu_device_still_resolves() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="numbered"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_saved_weights_are_readable_by_others(tiny_checkpoint, tmp_path) -> None:
    old = os.umask(0o022)
    try:
        single = save_checkpoint(tiny_checkpoint.model, tmp_path / "one")
        sharded = save_checkpoint(tiny_checkpoint.model, tmp_path / "two", max_shard_bytes=200_000)
    finally:
        os.umask(old)
    files = [*single.glob("*.safetensors"), *sharded.glob("*.safetensors")]
    assert len(files) > 2
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


@pytest.mark.parametrize("umask", [0o077])
def test_weight_mode_follows_the_umask(tiny_checkpoint, tmp_path, umask: int) -> None:
    old = os.umask(umask)
    try:
        out = save_checkpoint(tiny_checkpoint.model, tmp_path / "private")
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o600
