"""Operator limits on what one request may make the server allocate, checked before the request is queued.

Memory per request grows with settings a client picks: the number of lopa branches (cache rows), the prompt
length and ``max_new_tokens`` (cache positions). ``lopa serve --max-branches`` and ``--max-kv-cache-mb`` bound
them; :func:`check_request` computes the KV cache a request needs from its settings alone (rows x positions x
the model's per-position K/V bytes, however the engine later batches it) and raises
:class:`~lopa.errors.LimitExceededError`, a 400 naming the limit, when it does not fit. Called by ``app.py``.
When the engine batches (``LLM.can_batch``) the committed prefixes live in one KV pool of
``LLM.kv_pool_bytes()`` (max_num_seqs x max_model_len positions), allocated once and printed by ``lopa serve``;
what a request adds on top of its pool slot is its branch rows' window K/V, which this bound covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lopa.errors import ConfigError, LimitExceededError

if TYPE_CHECKING:
    from lopa import LLM, DecodeConfig

MIB = 1 << 20


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for. Defaults fit a 7B model on one GPU with room to spare."""

    max_branches: int = 32  # lopa.branches above this is refused
    max_kv_cache_mb: int = 4096  # KV cache of one request (all its branch rows), in MiB

    def validate(self) -> ServerLimits:
        for name in ("max_branches", "max_kv_cache_mb"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "max_branches" else 1):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be an integer >= {0 if name == 'max_branches' else 1}, got {value!r}")
        return self


def cache_rows(config: DecodeConfig) -> int:
    """KV cache rows a request decodes with: the anchor plus every lookahead branch; vanilla keeps no cache."""
    return 0 if config.decoder == "vanilla" else config.num_branches + 1


def kv_cache_bytes(llm: LLM, rows: int, positions: int) -> int:
    """Bytes of K and V for ``rows`` rows of ``positions`` positions of ``llm``'s model."""
    return llm.kv_cache_bytes(rows, positions)


def check_request(config: DecodeConfig, prompt_tokens: int, llm: LLM, limits: ServerLimits) -> None:
    """Raise LimitExceededError when the request asks for more than ``limits`` allow."""
    if config.num_branches > limits.max_branches:
        raise LimitExceededError(
            f"lopa.branches={config.num_branches} exceeds this server's limit of {limits.max_branches} branches "
            f"(lopa serve --max-branches); ask for fewer branches"
        )
    need = kv_cache_bytes(llm, cache_rows(config), prompt_tokens + config.max_new_tokens)
    if need > limits.max_kv_cache_mb * MIB:
        raise LimitExceededError(
            f"this request needs a {need / MIB:.0f} MiB KV cache ({cache_rows(config)} rows x "
            f"{prompt_tokens + config.max_new_tokens} positions: prompt {prompt_tokens} + max_new_tokens "
            f"{config.max_new_tokens}), over this server's limit of {limits.max_kv_cache_mb} MiB "
            f"(lopa serve --max-kv-cache-mb); use fewer branches, a shorter prompt or fewer tokens"
        )
