"""Text <-> token ids, the chat template, and the special ids of a checkpoint.

Built on the ``tokenizers`` package (``tokenizer.json``) and jinja2 (chat templates); transformers is not needed
at run time. :meth:`Tokenizer.from_dir` is called by the checkpoint loader; the LLM facade, the server and the
evaluation code use the resulting object.

Special ids are resolved in this order, first hit wins: ``config.json`` (via :class:`ModelConfig`),
``generation_config.json``, the token strings named in ``tokenizer_config.json`` / ``special_tokens_map.json``,
and finally the family's names for them (:mod:`lopa.model.families`: ``<|mask|>`` or ``<|mdm_mask|>`` for the mask,
``<|endoftext|>`` for eos). A checkpoint whose mask or eos id cannot be found is refused, because the decoders
cannot run without them. A turn ends at eos, at every eos id of ``generation_config.json``, and at the family's
end tokens the vocabulary has (``<|im_end|>`` for Dream; ``<|eot_id|>`` and ``<|endoftext|>`` for LLaDA).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from lopa.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    InvalidTextError,
)
from lopa.model.config import ModelConfig, first_int, read_json
from lopa.model.families import family_named

MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"
IM_END_TOKEN = "<|im_end|>"
_SPECIAL_FIELDS = ("mask", "eos", "pad", "bos")


class Tokenizer:
    """A fast tokenizer plus the checkpoint's special ids and chat template."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        mask_token_id: int,
        eos_token_id: int,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,
        extra_end_ids: Sequence[int] = (),
        end_tokens: Sequence[str] = (IM_END_TOKEN,),
    ) -> None:
        self._tok = tokenizer
        self.mask_token_id, self.eos_token_id = mask_token_id, eos_token_id
        self.pad_token_id, self.bos_token_id = pad_token_id, bos_token_id
        self.chat_template = chat_template
        # bos_token / eos_token / ... strings, exposed to the chat template like transformers does
        self.special_tokens = dict(special_tokens or {})
        ends = {eos_token_id, *extra_end_ids}
        for name in end_tokens:
            end_id = self.token_to_id(name)
            if end_id is not None:
                ends.add(end_id)
        self.end_token_ids: frozenset[int] = frozenset(ends)
        self._template: jinja2.Template | None = None

    # ---- construction --------------------------------------------------------------------------------
    @classmethod
    def from_dir(
        cls, path: Path, config: ModelConfig | None = None, generation_config: dict | None = None
    ) -> Tokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``) from a checkpoint directory."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if tok_file.exists() and not tok_file.is_file():  # a FIFO would block the reader
            raise CorruptCheckpointError(f"{tok_file} is not a regular file; a checkpoint's files must be plain files.")
        if not tok_file.is_file():
            raise CheckpointNotFoundError(
                f"{tok_file} does not exist; lopa needs the fast-tokenizer file tokenizer.json in the checkpoint "
                f"directory (save it with the tokenizer's save_pretrained, or copy it from the base model)."
            )
        try:
            hf_tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises plain Exception subclasses
            raise CorruptCheckpointError(f"{tok_file} cannot be parsed ({e}); re-save or re-download it.") from e
        tok_cfg = read_json(path / "tokenizer_config.json")
        tok_cfg = {**read_json(path / "special_tokens_map.json"), **tok_cfg}
        gen = generation_config or {}
        family = family_named(config.family) if config is not None else None
        fallback = {
            "mask": family.mask_token if family is not None else MASK_TOKEN,
            "eos": family.eos_token if family is not None else EOS_TOKEN,
        }
        strings = {f: _token_string(tok_cfg.get(f"{f}_token")) for f in _SPECIAL_FIELDS}
        ids: dict[str, int | None] = {}
        for field in _SPECIAL_FIELDS:
            found = getattr(config, f"{field}_token_id", None) if config is not None else None
            if found is None:
                found = first_int(gen.get(f"{field}_token_id"))
            if found is None and strings[field] is not None:
                found = hf_tok.token_to_id(strings[field])
            if found is None and field in fallback:
                found = hf_tok.token_to_id(fallback[field])
            ids[field] = found
        for field in ("mask", "eos"):
            if ids[field] is None:
                raise CheckpointError(
                    f"{path}: no {field} token id found (searched config.json, generation_config.json, "
                    f"tokenizer_config.json, special_tokens_map.json and the vocabulary for "
                    f'{fallback[field]!r}); add "{field}_token_id": <id> to config.json.'
                )
        for field, tok_id in ids.items():
            if tok_id is not None and strings[field] is None:
                strings[field] = hf_tok.id_to_token(tok_id)
        gen_eos = gen.get("eos_token_id")
        extra_ends = [int(i) for i in (gen_eos if isinstance(gen_eos, list) else [gen_eos]) if i is not None]
        return cls(
            hf_tok,
            mask_token_id=int(ids["mask"]),  # type: ignore[arg-type]
            eos_token_id=int(ids["eos"]),  # type: ignore[arg-type]
            pad_token_id=ids["pad"],
            bos_token_id=ids["bos"],
            chat_template=_chat_template(path, tok_cfg),
            special_tokens={f"{f}_token": s for f, s in strings.items() if s is not None},
            extra_end_ids=extra_ends,
            end_tokens=family.end_tokens if family is not None else (IM_END_TOKEN,),
        )

    # ---- text <-> ids --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (may be below the model's vocab_size)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; no special tokens are added (Dream prompts carry no BOS).

        Raises :class:`~lopa.errors.InvalidTextError` when ``text`` is not valid Unicode (a lone surrogate).
        """
        if not isinstance(text, str):
            raise ConfigError(f"a prompt must be text (str), got {type(text).__name__}")
        check_text(text)
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    # ---- chat ----------------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render OpenAI-style messages with the checkpoint's jinja template, as transformers renders it.

        ``tools`` (JSON-schema function specs) and ``template_kwargs`` (e.g. ``enable_thinking=False`` for Qwen3 /
        SDAR templates) reach the template as variables, as transformers passes them."""
        if self.chat_template is None:
            raise ConfigError(
                'this checkpoint has no chat template; send a raw prompt instead, or add "chat_template" to '
                "its tokenizer_config.json."
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ConfigError("messages must be a list of {'role': ..., 'content': ...} dicts.")
        for i, m in enumerate(messages):
            for key, value in m.items():
                if isinstance(value, str):
                    what = "the prompt" if len(messages) == 1 and key == "content" else f"the {key} of message {i + 1}"
                    check_text(value, what)
        if self._template is None:
            self._template = _compile(self.chat_template)
        try:
            return self._template.render(
                **{
                    **self.special_tokens,
                    "documents": None,
                    **template_kwargs,
                    "messages": messages,
                    "tools": tools,
                    "add_generation_prompt": add_generation_prompt,
                }
            )
        except jinja2.TemplateError as e:
            raise ConfigError(f"the chat template rejected these messages: {e}") from e


def _compile(template: str) -> jinja2.Template:
    """The jinja environment transformers uses for chat templates (sandboxed, trim/lstrip, loop controls)."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise CorruptCheckpointError(f"the checkpoint's chat template is not valid jinja: {e}") from e


def _chat_template(path: Path, tok_cfg: dict[str, Any]) -> str | None:
    """chat_template from tokenizer_config.json (string, or named list -> "default"), else chat_template.jinja."""
    tpl = tok_cfg.get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    if isinstance(tpl, str):
        return tpl
    jinja_file = path / "chat_template.jinja"
    return jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None


def _token_string(v: Any) -> str | None:
    """A special token entry is a string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def check_text(text: str, what: str = "the prompt") -> None:
    """Raise InvalidTextError when ``text`` holds a lone UTF-16 surrogate (it cannot be encoded as UTF-8).

    Python keeps undecodable input bytes as surrogates U+DC80..U+DCFF (``surrogateescape``: stdin, argv), so
    one of those is reported as the byte it stands for: the input was not UTF-8.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(text[e.start])
        if 0xDC80 <= char <= 0xDCFF:
            raise InvalidTextError(
                f"{what} is not UTF-8: byte 0x{char - 0xDC00:02X} at character {e.start} does not decode; "
                f"convert the input to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from None
        raise InvalidTextError(
            f"{what} is not valid Unicode: character {e.start} is a lone UTF-16 surrogate U+{char:04X}; "
            f"send text whose surrogates come in pairs (or unescaped characters)"
        ) from None
