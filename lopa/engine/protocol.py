"""The ``Engine`` protocol: what the server, the eval harness and the commands may use of a loaded model.

Three classes implement it and say so by inheriting it: :class:`lopa.LLM` (one process),
:class:`~lopa.parallel.replicated_llm.BranchParallelLLM` (rank 0 of a branch/tensor-parallel mesh, decoding
through the whole group) and the test stand-in ``FakeLLM``. Callers read only these names, never probe an object
for attributes: a name missing here is a name they may not use.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lopa.config import DecodeConfig, EngineConfig
    from lopa.engine.output import Completion, StreamEvent

Prompt = str | Sequence[int]
Messages = list[dict[str, str]]


class Tokenizes(Protocol):
    """The tokenizer surface an engine's callers use (``lopa.checkpoint.tokenizer.Tokenizer`` has more)."""

    has_chat_template: bool

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str: ...


class Session(Protocol):
    """Many prompts in flight, stepped together (``engine/session.py``)."""

    @property
    def has_work(self) -> bool: ...

    @property
    def capacity(self) -> int: ...

    def add(self, prompt: Any, config: DecodeConfig | None = None, raw: bool = False) -> int: ...

    def step(self) -> list[tuple[int, StreamEvent | Exception]]: ...

    def cancel(self, rid: int) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """A loaded model ready to decode (see the module docstring). Not thread-safe: serialize calls."""

    tokenizer: Tokenizes
    model_name: str  # the id clients see (``--served-model-name`` overrides it in the server)
    max_context: int  # prompt + max_new_tokens at most (``EngineConfig.max_model_len``, resolved)
    default_config: DecodeConfig  # engine defaults + the checkpoint's recommendations
    engine_config: EngineConfig  # how it was loaded and sized, resolved for its device
    end_ids: frozenset[int]
    attention_block: int | None  # a block-causal model's attention block (answers align to it); None: bidirectional
    generation_config: dict[str, Any]  # the checkpoint's generation_config.json ({} when it has none)
    max_idle_cache_bytes: int | None  # a KV cache above this is freed after its request (None: kept)

    @property
    def can_batch(self) -> bool:
        """Whether :meth:`open_session` decodes prompts together (one forward for all of them)."""
        ...

    @property
    def device_name(self) -> str:
        """Where the model runs (``cpu``, ``cuda:0``, ...)."""
        ...

    @property
    def dtype_name(self) -> str | None:
        """The model's dtype (``float32``, ...), None when there is no model."""
        ...

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        config: DecodeConfig | Sequence[DecodeConfig] | None = None,
        raw: bool = False,
        progress: bool = False,
    ) -> list[Completion]: ...

    def generate_each(
        self, prompts: Sequence[Prompt], config: DecodeConfig | Sequence[DecodeConfig] | None = None, raw: bool = False
    ) -> Iterator[tuple[int, Completion]]: ...

    def stream(
        self, prompt: Prompt | Messages, config: DecodeConfig | None = None, raw: bool = False
    ) -> Iterator[StreamEvent]: ...

    def open_session(self) -> Session: ...

    def encode_prompt(self, prompt: Prompt | Messages, raw: bool = False) -> list[int]: ...

    def count_prompt_tokens(self, prompt: Prompt | Messages, raw: bool = False) -> int: ...

    def check_fits(self, ids: list[int], cfg: DecodeConfig) -> None: ...

    def decode_config(self, **changes: object) -> DecodeConfig: ...

    def kv_cache_bytes(self, rows: int, positions: int) -> int: ...

    def kv_pool_bytes(self) -> int: ...

    def close(self) -> None:
        """Release what the engine holds beyond memory (a mesh's ranks); a no-op for one process."""
        ...
