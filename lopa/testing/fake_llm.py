"""A stand-in for :class:`lopa.LLM` that answers from a function: for testing the harness without a model.

Used by the eval tests (and usable for a dry run of a new task): it implements the
:class:`~lopa.engine.protocol.Engine` protocol (``generate``, ``stream``, ``tokenizer`` with
``has_chat_template`` / ``apply_chat_template``, ``model_name``, ``max_context``, ...) and returns
:class:`~lopa.engine.output.Completion` objects whose stats are derived from the text deterministically (one token
per character, ``chars_per_forward`` tokens per forward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from lopa.config import DecodeConfig, EngineConfig
from lopa.engine.output import Completion, Stats, StreamEvent
from lopa.engine.protocol import Engine, Messages, Prompt
from lopa.engine.session import IteratorSession
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


class FakeLLM(Engine):
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
        self.default_config = DecodeConfig()
        self.engine_config = EngineConfig(max_num_seqs=1, max_model_len=max_context)
        self.end_ids: frozenset[int] = frozenset()
        self.attention_block: int | None = None
        self.generation_config: dict[str, Any] = {}
        self.max_idle_cache_bytes: int | None = None
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

    # ---- the rest of the Engine protocol ------------------------------------------------------------------
    can_batch = False
    device_name = "cpu"
    dtype_name = None

    def generate_each(
        self, prompts: Sequence[Prompt], config: DecodeConfig | Sequence[DecodeConfig] | None = None, raw: bool = False
    ) -> Iterator[tuple[int, Completion]]:
        yield from enumerate(self.generate(list(prompts), config, raw))

    def stream(
        self, prompt: Prompt | Messages, config: DecodeConfig | None = None, raw: bool = False
    ) -> Iterator[StreamEvent]:
        """The whole answer as one event, carrying the Completion."""
        completion = self.generate([prompt], config, raw)[0]
        yield StreamEvent(completion.text, completion.token_ids, completion)

    def open_session(self) -> IteratorSession:
        return IteratorSession(self.stream, max_active=1)

    def encode_prompt(self, prompt: Prompt | Messages, raw: bool = False) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]  # type: ignore[union-attr]

    def count_prompt_tokens(self, prompt: Prompt | Messages, raw: bool = False) -> int:
        return len(self.encode_prompt(prompt, raw))

    def check_fits(self, ids: list[int], cfg: DecodeConfig) -> None:
        if len(ids) + cfg.max_new_tokens > self.max_context:
            raise PromptTooLongError(f"prompt of {len(ids)} tokens does not fit {self.max_context}")

    def decode_config(self, **changes: object) -> DecodeConfig:
        return self.default_config.replace(**changes).validate()

    def kv_cache_bytes(self, rows: int, positions: int) -> int:
        return 0  # no model, no cache

    def kv_pool_bytes(self) -> int:
        return 0

    def close(self) -> None:
        pass
