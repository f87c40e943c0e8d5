"""The tiny model's tokenizer: one token per word, per punctuation mark and per number 0..199.

Built with the ``tokenizers`` library as a WordLevel model behind the ``Whitespace`` pre-tokenizer (words and
runs of punctuation become separate tokens, so ``"eggs."`` is ``eggs`` ``.``), and saved as ``tokenizer.json``
so the normal loader reads it like any Hugging Face tokenizer. Decoding re-joins tokens with spaces and removes
the space before ``. , ? ! :``. Numbers are single tokens because copying and combining whole numbers is what the
task needs; a multi-token number was the blocker of an earlier character-level attempt.

Special tokens (ids fixed by their order here): ``<|endoftext|>`` is both the end token and the pad token (as
in Dream), ``<|mask|>`` is the diffusion mask, ``<unk>`` catches words outside the task. Called by
``lopa.tiny.train`` (building a checkpoint) and ``lopa.tiny.data`` (encoding problems).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from lopa.tiny import task

END_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (END_TOKEN, MASK_TOKEN, UNK_TOKEN)
MAX_NUMBER_TOKEN = 199

_PROMPT_WORDS = ["Q", ":", "A", ":", "has", ".", "How", "many", "does", "have", "now", "?", "####"]
_CHAIN_SYMBOLS = ["+", "-", "*", "/", "=", ","]


def _words() -> list[str]:
    """Every non-number, non-special token the task can produce, in a fixed order (ids must be stable)."""
    templates = list(task.ADD_SENTENCES) + list(task.SUB_SENTENCES)
    pieces = " ".join(templates).replace("{p}", "").replace("{n}", "").replace(".", " . ").split()
    answer = task.OPENERS + task.ADD_STEPS + task.SUB_STEPS + task.FILLERS + task.CLOSINGS
    words = [w for w in " ".join(answer).split() if not w.startswith("{")]
    ordered = (
        _PROMPT_WORDS + _CHAIN_SYMBOLS + sorted(set(task.NAMES.values())) + list(task.NAMES) + list(task.ITEMS) + pieces
    ) + words
    seen: dict[str, None] = {}
    for w in ordered:
        seen.setdefault(w, None)
    return list(seen)


def build_vocab() -> dict[str, int]:
    """token -> id: special tokens, numbers 0..MAX_NUMBER_TOKEN, then the task's words."""
    tokens = list(SPECIAL_TOKENS) + [str(i) for i in range(MAX_NUMBER_TOKEN + 1)] + _words()
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer() -> Tokenizer:
    """The WordLevel tokenizer of the tiny model (deterministic: same vocabulary and ids on every call)."""
    tok = Tokenizer(models.WordLevel(vocab=build_vocab(), unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's decoder joins with spaces and cleans " ." -> "." (its prefix never occurs in this vocabulary);
    # the Replace step does the same for ":" so that "Q:" and "A:" read back as typed
    tok.decoder = decoders.Sequence(
        [decoders.WordPiece(prefix="\u2581\u2581", cleanup=True), decoders.Replace(" :", ":")]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """The special ids a Dream config.json carries, read from the tokenizer."""
    end, mask = tok.token_to_id(END_TOKEN), tok.token_to_id(MASK_TOKEN)
    return {"eos_token_id": end, "pad_token_id": end, "mask_token_id": mask}


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> Path:
    """Write ``tokenizer.json`` into ``out_dir`` and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    return path
