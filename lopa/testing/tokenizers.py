"""The tiny tokenizers of :mod:`lopa.testing`'s checkpoints: a byte-level BPE that encodes any text, each family's
special tokens and chat template, and the tokenizer_config entries that name them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>")
SDAR_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLADA_SPECIAL_TOKENS = (
    "<|startoftext|>",
    "<|endoftext|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|mdm_mask|>",
)
LLADA_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# family -> (special tokens, chat template, tokenizer_config entries, model_type)
FAMILY_FILES: dict[str, tuple[tuple[str, ...], str, dict[str, Any], str]] = {
    "dream": (
        SPECIAL_TOKENS,
        CHATML_TEMPLATE,
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>", "bos_token": None},
        "Dream",
    ),
    "sdar": (
        SDAR_SPECIAL_TOKENS,
        CHATML_TEMPLATE,
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|MASK|>", "bos_token": None},
        "sdar",
    ),
    "llada": (
        LLADA_SPECIAL_TOKENS,
        LLADA_TEMPLATE,
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        "llada",
    ),
}
# Frequent English and Python pieces; each becomes a chain of merges so common text takes fewer tokens.
# fmt: off
_MERGE_WORDS = (
    " the", " and", " of", " to", " in", " is", " a", " that", " for", " it", " with", " you", " on", " this",
    "ing", "ion", "er", "ed", "es", "re", " def", " return", " if", " else", " print", " import", " self",
    " =", " ==", " +", "()", "):", "    ", "        ", "\n", "\n\n", " 0", " 1", "the", "The", " answer",
)
# fmt: on


def byte_level_tokenizer(special_tokens: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """A GPT-2-style byte-level BPE: 256 byte tokens, a few merges, then the special tokens."""
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    merges: list[tuple[str, str]] = []
    for word in _MERGE_WORDS:
        chars = "".join(byte_chars[b] for b in word.encode("utf-8"))
        for i in range(1, len(chars)):
            merged = chars[: i + 1]
            if merged not in vocab:
                merges.append((chars[:i], chars[i]))
                vocab[merged] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
