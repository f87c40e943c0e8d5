"""Writing a model as a checkpoint directory of its family, which :func:`~lopa.checkpoint.loader.load_checkpoint`
(and, for Dream, transformers) can read: config.json by the family's exporter, tensors under the family's names,
optionally sharded with an index, plus generation_config.json and the tokenizer files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from lopa.checkpoint.checks import INDEX_FILE
from lopa.model.families import config_to_hf, family_named
from lopa.model.transformer import Transformer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def save_checkpoint(
    model: Transformer,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    generation_config: dict | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write ``model`` as a checkpoint directory of its family that :func:`load_checkpoint` can read.

    Tensor names and config.json are the family's own (a Dream checkpoint is also readable by transformers).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    dtype = next(model.parameters()).dtype
    hf = config_to_hf(cfg)
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    if generation_config is None:
        ids = ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id")
        generation_config = {k: getattr(cfg, k) for k in ids if getattr(cfg, k) is not None}
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the HF convention: a tied head is not stored
    state = {family_named(cfg.family).tensor_to_checkpoint(k): v for k, v in state.items()}
    for stale in [*out.glob("*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    shards = _shard(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        _readable(out / "model.safetensors")
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            _readable(out / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
    return out


def _readable(file: Path) -> None:
    """Give a weight file the mode any other file gets (0644 under umask 022); safetensors writes it 0600."""
    umask = os.umask(0)
    os.umask(umask)
    file.chmod(0o666 & ~umask)


def _shard(state: dict[str, Tensor], max_bytes: int | None) -> list[dict[str, Tensor]]:
    """Greedy split in key order; a tensor larger than max_bytes gets a shard of its own."""
    if max_bytes is None:
        return [state]
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards
