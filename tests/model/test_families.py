"""Model families as files: each family file declares its Family, the registry finds it, and a parsed or directly
made ModelConfig carries the family's name and shift as fields."""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest

import lopa.model.families as families_pkg
from lopa.errors import CorruptCheckpointError, UnsupportedModelError
from lopa.model.config import ModelConfig, check_config
from lopa.model.families import config_from_hf, config_to_hf, families, family_for_model_type, family_named
from lopa.testing import make_tiny_checkpoint

# What each lineage is, from its release (not from lopa): Dream keeps Qwen2.5's next-token offset; LLaDA and SDAR
# predict a position from its own output; SDAR attends block-causally.
EXPECTED = {
    "dream": {"logit_shift": 1, "attention": "bidirectional", "qk_norm": False, "attention_bias": True},
    "llada": {"logit_shift": 0, "attention": "bidirectional", "qk_norm": False, "attention_bias": False},
    "sdar": {"logit_shift": 0, "attention": "block_causal", "qk_norm": True, "attention_bias": False},
}
FAMILY_DIR = Path(families_pkg.__file__).parent


def _config_json(tmp_path: Path, family: str) -> dict:
    ckpt = make_tiny_checkpoint(tmp_path / family, family=family, num_layers=1, block_size=4)
    return json.loads((ckpt / "config.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_the_parser_fills_the_family_name_and_shift(tmp_path: Path, family: str) -> None:
    cfg = config_from_hf(_config_json(tmp_path, family))
    assert cfg.family == family
    assert {k: getattr(cfg, k) for k in EXPECTED[family]} == EXPECTED[family]
    assert cfg.block_size == (4 if family == "sdar" else None)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_export_then_parse_gives_the_same_config(tmp_path: Path, family: str) -> None:
    cfg = config_from_hf(_config_json(tmp_path, family))
    exported = config_to_hf(cfg)
    assert "family" not in exported and "logit_shift" not in exported  # lopa's fields, not the checkpoint's
    assert config_from_hf(json.loads(json.dumps(exported))) == cfg


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_make_config_is_the_family_s_config(family: str) -> None:
    fam = family_named(family)
    cfg = fam.make_config(97, 32, 48, 2, 4, 2, 8)
    assert (cfg.family, cfg.logit_shift, cfg.attention) == (family, EXPECTED[family]["logit_shift"], fam.attention)
    assert family_for_model_type(cfg.model_type) is fam


def test_every_family_file_is_registered() -> None:
    files = sorted(p.stem for p in FAMILY_DIR.glob("*.py") if p.stem not in ("__init__", "base"))
    assert files == sorted(families()) == sorted(EXPECTED)


def test_a_model_config_cannot_be_made_without_its_family() -> None:
    with pytest.raises(TypeError, match="family"):
        ModelConfig(8, 8, 8, 1, 1, 1, 8)  # type: ignore[call-arg]


def test_a_shift_other_than_0_or_1_is_refused() -> None:
    cfg = family_named("dream").make_config(8, 8, 8, 1, 1, 1, 8)
    with pytest.raises(CorruptCheckpointError, match="logit_shift must be 0 or 1"):
        check_config(replace(cfg, logit_shift=2))


def test_an_unknown_family_name_lists_the_families() -> None:
    with pytest.raises(UnsupportedModelError, match=r"'mistral'.*\['dream', 'llada', 'sdar'\]"):
        family_named("mistral")


def _lopa_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lopa"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lopa"))
    return found


def test_no_import_circle_between_config_registry_and_family_files() -> None:
    config_py = FAMILY_DIR.parent / "config.py"
    assert not any(m.startswith("lopa.model.families") for m in _lopa_imports(config_py))
    for path in FAMILY_DIR.glob("*.py"):
        if path.stem != "__init__":  # family files and base import siblings, never the registry
            assert "lopa.model.families" not in _lopa_imports(path), path.name
