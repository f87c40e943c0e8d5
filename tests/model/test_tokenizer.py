"""Tokenizer: byte-level round trips, agreement with transformers, special-id resolution, chat templates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lopa.checkpoint.tokenizer import Tokenizer
from lopa.errors import CheckpointError, ConfigError, CorruptCheckpointError
from lopa.model.config import ModelConfig
from lopa.model.families import family_named
from lopa.testing import byte_level_tokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And ünïcödé 日本 🙂?"},
]


@pytest.fixture(scope="module")
def tok(tiny_ckpt: Path) -> Tokenizer:
    return Tokenizer.from_dir(tiny_ckpt)


def _tok_dir(tmp_path: Path, tok_cfg: dict, extra_files: dict[str, str] | None = None) -> Path:
    """A directory with the tiny byte-level tokenizer and the given tokenizer_config.json."""
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    for name, text in (extra_files or {}).items():
        (tmp_path / name).write_text(text)
    return tmp_path


def _config(**ids) -> ModelConfig:
    shape = dict(vocab_size=400, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    return family_named("dream").make_config(num_key_value_heads=1, head_dim=8, **shape, **ids)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_any_text_round_trips(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_merges_make_common_text_shorter_than_bytes(tok: Tokenizer) -> None:
    text = "def f(self):\n    return the answer"
    assert len(tok.encode(text)) < len(text.encode("utf-8"))


def test_encode_adds_no_special_tokens_and_decode_can_keep_them(tok: Tokenizer) -> None:
    ids = tok.encode("hi")
    assert tok.mask_token_id not in ids and tok.eos_token_id not in ids
    with_eos = [*ids, tok.eos_token_id]
    assert tok.decode(with_eos) == "hi"
    assert tok.decode(with_eos, skip_special_tokens=False) == "hi<|endoftext|>"
    assert tok.encode("<|im_end|>") == [tok.token_to_id("<|im_end|>")]


def test_special_ids_and_end_tokens(tok: Tokenizer) -> None:
    assert tok.mask_token_id == tok.token_to_id("<|mask|>")
    assert tok.eos_token_id == tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.bos_token_id is None
    assert tok.end_token_ids == {tok.eos_token_id, tok.token_to_id("<|im_end|>")}
    assert tok.token_to_id("<|no such token|>") is None


def test_matches_transformers_encoding_and_chat_template(tok: Tokenizer, tiny_ckpt: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_ckpt))
    for text in ["Hello world", "  spaces\tand\nnewlines ", "ünïcödé 日本 🙂", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    for gen in (True, False):
        ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        theirs = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert ours == theirs
    assert ours.endswith("<|im_end|>\n")


def test_chatml_renders_roles_in_order(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(MESSAGES[1:2])
    assert text == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"


def test_template_gets_special_token_strings_and_raise_exception(tmp_path: Path) -> None:
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be the user') }}{% endif %}"
        "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}"
    )
    d = _tok_dir(tmp_path, {"chat_template": template, "bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"})
    tok = Tokenizer.from_dir(d)
    assert tok.apply_chat_template([{"role": "user", "content": 'say "é"'}]) == '<|im_start|>"say \\"é\\""<|endoftext|>'
    with pytest.raises(ConfigError, match="first message must be the user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_named_template_list_uses_default(tmp_path: Path) -> None:
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]
    tok = Tokenizer.from_dir(_tok_dir(tmp_path, {"chat_template": templates}))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "DEFAULT"


def test_chat_template_jinja_file_is_used(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_tok_dir(tmp_path, {}, {"chat_template.jinja": "{{ messages | length }} msgs"}))
    assert tok.has_chat_template
    assert tok.apply_chat_template(MESSAGES) == "4 msgs"


def test_no_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_tok_dir(tmp_path, {}))
    assert not tok.has_chat_template
    with pytest.raises(ConfigError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)


def test_bad_messages_and_bad_template(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="messages must be a list"):
        tok.apply_chat_template([{"content": "no role"}])
    bad = Tokenizer.from_dir(_tok_dir(tmp_path, {"chat_template": "{% for %}"}))
    with pytest.raises(CorruptCheckpointError, match="not valid jinja"):
        bad.apply_chat_template(MESSAGES)


def test_special_id_resolution_order(tmp_path: Path) -> None:
    d = _tok_dir(tmp_path, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "mask_token": "<|im_start|>"})
    vocab = Tokenizer.from_dir(d)
    im_start, im_end, eot = (vocab.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    # tokenizer_config strings beat the <|mask|> / <|endoftext|> names
    assert (vocab.mask_token_id, vocab.eos_token_id, vocab.pad_token_id) == (im_start, im_end, eot)
    # generation_config beats tokenizer_config; its eos list feeds end_token_ids
    gen = Tokenizer.from_dir(d, generation_config={"mask_token_id": 5, "eos_token_id": [6, 7], "bos_token_id": 8})
    assert (gen.mask_token_id, gen.eos_token_id, gen.bos_token_id) == (5, 6, 8)
    assert {6, 7} <= gen.end_token_ids
    # config.json beats generation_config
    cfg = Tokenizer.from_dir(d, _config(mask_token_id=1, eos_token_id=2), {"mask_token_id": 5, "eos_token_id": 6})
    assert (cfg.mask_token_id, cfg.eos_token_id) == (1, 2)
    assert cfg.special_tokens["eos_token"] == "<|im_end|>"  # the template still sees the configured string


def test_vocabulary_names_are_the_last_resort(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_tok_dir(tmp_path, {}))
    assert tok.mask_token_id == tok.token_to_id("<|mask|>")
    assert tok.eos_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.pad_token_id is None


def test_missing_mask_says_where_it_looked(tmp_path: Path) -> None:
    d = _tok_dir(tmp_path, {})
    data = json.loads((d / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|mask|>"]
    (d / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"no mask token id.*config\.json.*tokenizer_config\.json"):
        Tokenizer.from_dir(d)


def test_corrupt_tokenizer_files(tmp_path: Path, tiny_ckpt: Path) -> None:
    d = Path(shutil.copytree(tiny_ckpt, tmp_path / "c"))
    (d / "tokenizer_config.json").write_text("{")
    with pytest.raises(CorruptCheckpointError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.from_dir(d)
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(CorruptCheckpointError, match="tokenizer.json cannot be parsed"):
        Tokenizer.from_dir(d)
