"""Prompt → token ids, the same way for every engine: text or messages through the chat template, ids verbatim.

Every decoder continues a prompt and none infills one, so a prompt holding the mask token is refused here
(:class:`~lopa.errors.MaskTokenInPromptError`); so are an empty prompt and ids outside the vocabulary.
"""

from __future__ import annotations

from typing import Any

from lopa.engine.protocol import Messages, Prompt
from lopa.errors import ConfigError, MaskTokenInPromptError


def encode_prompt(tokenizer: Any, prompt: Prompt | Messages, raw: bool, vocab_size: int, mask_id: int) -> list[int]:
    """Token ids of ``prompt`` for ``tokenizer`` (a :class:`lopa.checkpoint.tokenizer.Tokenizer`): ids verbatim (each in
    ``[0, vocab_size)``), messages or text through the chat template (unless ``raw`` or it has none)."""
    if isinstance(prompt, str):
        if raw or not tokenizer.has_chat_template:
            ids = tokenizer.encode(prompt)
        else:
            ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
    elif is_messages(prompt):
        if tokenizer.has_chat_template:
            ids = tokenizer.encode(tokenizer.apply_chat_template(list(prompt)))
        else:
            ids = tokenizer.encode("\n".join(m.get("content", "") for m in prompt))  # type: ignore[union-attr]
    else:
        ids = [int(t) for t in prompt]  # type: ignore[union-attr]
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ConfigError(f"token ids must be in [0, {vocab_size}); got {bad[:5]}")
    if not ids:
        raise ConfigError("the prompt is empty: give at least one token")
    at = [i for i, t in enumerate(ids) if t == mask_id]
    if at:
        token = tokenizer.id_to_token(mask_id)
        raise MaskTokenInPromptError(
            f"the prompt contains the mask token {token!r} (id {mask_id}) at position(s) {at[:5]}; lopa "
            f"continues prompts and does not infill masked positions: remove the mask token from the prompt"
        )
    return ids


def is_ids(x: object) -> bool:
    """One prompt given as token ids (a non-empty list or tuple of ints)."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, int) for t in x)


def prompt_list(prompts: Any) -> list[Any]:
    """One prompt (a string or a non-empty list of token ids) or a sequence of them, as a list of prompts."""
    return [prompts] if isinstance(prompts, str) or is_ids(prompts) else list(prompts)


def is_messages(x: object) -> bool:
    """One prompt given as OpenAI-style messages (a non-empty list of dicts)."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)
