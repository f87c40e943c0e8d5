"""A stand-in for :class:`lopa.LLM` that answers from a function: for testing the harness without a model.

Used by the eval tests (and usable for a dry run of a new task): it has the same ``generate`` signature,
``tokenizer`` (``has_chat_template``, ``apply_chat_template``), ``model_name`` and ``max_context`` as the
real facade, and returns :class:`~lopa.engine.output.Completion` objects whose stats are derived from the text
deterministically (one token per character, ``chars_per_forward`` tokens per forward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lopa.config import DecodeConfig
from lopa.engine.output import Completion, Stats
from lopa.errors import ConfigError, PromptTooLongError


class FakeTokenizer:
    def __init__(self, chat_template: bool = False) -> None:
        self.has_chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        body = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return body + "<|assistant|>"


class FakeLLM:
    """``answer(prompt) -> text``; stats: tokens = len(text), forwards = ceil(tokens / chars_per_forward),
    iterations = forwards + 1, decoded_positions = forwards * chars_per_forward (so tpf_paper differs from tpf)."""

    def __init__(
        self,
        answer: Callable[[str], str],
        chat_template: bool = False,
        chars_per_forward: int = 4,
        seconds_per_token: float = 0.001,
        max_context: int = 1_000_000,
    ) -> None:
        self.answer = answer
        self.tokenizer = FakeTokenizer(chat_template)
        self.model_name = "fake"
        self.max_context = max_context
        self.chars_per_forward = chars_per_forward
        self.seconds_per_token = seconds_per_token
        self.calls: list[tuple[str, DecodeConfig]] = []
        self.generate_calls = 0

    def generate(
        self,
        prompts: Any,
        config: DecodeConfig | Sequence[DecodeConfig] | None = None,
        raw: bool = False,
        progress: bool = False,
    ) -> list[Completion]:
        """As :meth:`lopa.LLM.generate`: one config for all prompts, or one per prompt; counts its calls."""
        self.generate_calls += 1
        batch = [prompts] if isinstance(prompts, str) else list(prompts)
        if config is None or isinstance(config, DecodeConfig):
            configs = [(config or DecodeConfig()).validate()] * len(batch)
        else:
            configs = [c.validate() for c in config]
            if len(configs) != len(batch):
                raise ConfigError(f"got {len(configs)} configs for {len(batch)} prompts")
        out = []
        for prompt, cfg in zip(batch, configs, strict=True):
            if len(prompt) + cfg.max_new_tokens > self.max_context:
                raise PromptTooLongError(f"prompt of {len(prompt)} characters does not fit {self.max_context}")
            self.calls.append((prompt, cfg))
            text = self.answer(prompt)[: cfg.max_new_tokens]
            cut = min((text.find(s) for s in cfg.stop if s in text), default=-1)
            text = text[:cut] if cut >= 0 else text
            tokens = max(len(text), 1)
            forwards = -(-tokens // self.chars_per_forward)
            stats = Stats(
                forwards=forwards,
                tokens=tokens,
                iterations=forwards + 1,  # like the engine: the final, forward-less round counts too
                decoded_positions=forwards * self.chars_per_forward,  # every position of every decoded chunk
                seconds=tokens * self.seconds_per_token,
                prompt_tokens=len(prompt),
            )
            out.append(Completion(text, self.tokenizer.encode(text), "stop", stats, self.tokenizer.encode(prompt)))
        return out
