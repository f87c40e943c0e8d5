"""Operator limits on what one request may make the server allocate, checked before the request is queued.

Memory per request grows with settings a client picks: the number of prompts, the number of lopa branches
(cache rows), the prompt lengths and ``max_new_tokens`` (cache positions). ``lopa serve --max-prompts-per-request``,
``--max-branches`` and ``--max-kv-cache-mb`` bound them; :func:`check_request` computes the KV cache a request
needs from its settings alone, summed over its prompts (rows x positions x the model's per-position K/V bytes,
however the engine later batches it) and raises
:class:`~lopa.errors.LimitExceededError`, a 400 naming the limit, when it does not fit. Called by the routes.
When the engine batches (``LLM.can_batch``) the committed prefixes live in one KV pool of
``LLM.kv_pool_bytes()`` (max_num_seqs x max_model_len positions), allocated once and printed by ``lopa serve``;
what a request adds on top of its pool slot is its branch rows' window K/V, which this bound covers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lopa.config import ServerConfig
from lopa.errors import ConfigError, LimitExceededError, PromptTooLongError

if TYPE_CHECKING:
    from lopa import DecodeConfig
    from lopa.engine.protocol import Engine

MIB = 1 << 20
HEADER_TIMEOUT_S = ServerConfig.header_timeout  # a connection's time to deliver a request's headers (guard.py)
BODY_TIMEOUT_S = ServerConfig.body_timeout  # a request's time to deliver its whole body (middleware.py)


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for. Defaults fit a 7B model on one GPU with room to spare."""

    max_branches: int = ServerConfig.max_branches  # lopa.branches above this is refused
    max_kv_cache_mb: int = ServerConfig.max_kv_cache_mb  # KV cache of one request (all its branch rows), in MiB
    max_prompts_per_request: int = ServerConfig.max_prompts_per_request  # prompts in one /v1/completions request

    @classmethod
    def of(cls, config: ServerConfig) -> ServerLimits:
        """The per-request limits of a server's settings."""
        return cls(config.max_branches, config.max_kv_cache_mb, config.max_prompts_per_request)

    def validate(self) -> ServerLimits:
        for name in ("max_branches", "max_kv_cache_mb", "max_prompts_per_request"):
            value = getattr(self, name)
            low = 0 if name == "max_branches" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be an integer >= {low}, got {value!r}")
        return self


def kv_cache_bytes(llm: Engine, rows: int, positions: int) -> int:
    """Bytes of K and V for ``rows`` rows of ``positions`` positions of ``llm``'s model."""
    return llm.kv_cache_bytes(rows, positions)


def check_prompt_count(count: int, limits: ServerLimits) -> None:
    """LimitExceededError when a request carries more prompts than ``--max-prompts-per-request`` (before tokenizing)."""
    if count > limits.max_prompts_per_request:
        raise LimitExceededError(
            f"this request carries {count} prompts, over this server's limit of {limits.max_prompts_per_request} "
            f"per request (lopa serve --max-prompts-per-request); split them over several requests"
        )


def check_request(config: DecodeConfig, prompt_tokens: int | Sequence[int], llm: Engine, limits: ServerLimits) -> None:
    """Raise LimitExceededError when the request asks for more than ``limits`` allow.

    ``prompt_tokens`` is the token count of each prompt of the request (or of its one prompt); the KV cache is
    charged per prompt, so a request of many short prompts is charged for all of them.
    """
    counts = [prompt_tokens] if isinstance(prompt_tokens, int) else list(prompt_tokens)
    check_prompt_count(len(counts), limits)
    # every prompt is checked here, before the job is queued: the worker admits a request's prompts one turn at
    # a time, and a prompt found too long at its turn would fail the request after the others had run
    for i, n in enumerate(counts):
        if n + config.max_new_tokens > llm.max_context:
            which = f"prompt {i} " if len(counts) > 1 else "prompt "
            raise PromptTooLongError(
                f"{which}({n} tokens) + max_new_tokens ({config.max_new_tokens}) = {n + config.max_new_tokens} "
                f"exceeds the model's context of {llm.max_context} positions; shorten the prompt or lower max_tokens"
            )
    if config.num_branches > limits.max_branches:
        raise LimitExceededError(
            f"lopa.branches={config.num_branches} exceeds this server's limit of {limits.max_branches} branches "
            f"(lopa serve --max-branches); ask for fewer branches"
        )
    rows = config.cache_rows
    need = sum(kv_cache_bytes(llm, rows, n + config.max_new_tokens) for n in counts)
    if need > limits.max_kv_cache_mb * MIB:
        longest = max(counts)
        many = f"{len(counts)} prompts, the longest " if len(counts) > 1 else "prompt "
        raise LimitExceededError(
            f"this request needs a {need / MIB:.0f} MiB KV cache ({rows} rows x (prompt + max_new_tokens) "
            f"positions per prompt: {many}{longest} + max_new_tokens {config.max_new_tokens}), over this server's "
            f"limit of {limits.max_kv_cache_mb} MiB (lopa serve --max-kv-cache-mb); use fewer prompts or branches, "
            f"shorter prompts or fewer tokens"
        )
