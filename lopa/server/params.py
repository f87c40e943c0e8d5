"""Maps an OpenAI request onto a validated :class:`~lopa.DecodeConfig` and the output cut (called by the routes).

Precedence, lowest first: the server's defaults (``lopa serve`` flags), the request's ``lopa`` extra body field
(any DecodeConfig field), then the OpenAI fields ``temperature``, ``top_p``, ``seed`` and ``stop``. A ``lopa`` value
that an OpenAI field overrides is still validated: an invalid one is an error, never silently dropped.
``lopa.branches`` above the operator's ``--max-branches`` is refused whatever the decoder (it is inert for the
non-lopa decoders, but a request may not ask for it).
``max_tokens`` becomes ``max_new_tokens``, rounded up to a multiple of ``block_size`` for the block decoders
(which generate whole blocks); the output is then cut back to ``max_tokens`` tokens by the worker. Every
problem raises :class:`~lopa.errors.ConfigError`, which the app answers with a 400.
"""

from __future__ import annotations

from typing import Any

from lopa import DecodeConfig
from lopa.errors import ConfigError, LimitExceededError, PromptTooLongError
from lopa.server.protocol import BaseRequest


def decode_config_for(
    req: BaseRequest, default: DecodeConfig, max_context: int, max_branches: int | None = None
) -> tuple[DecodeConfig, int | None]:
    """(config, max_tokens cut or None) for one request; raises ConfigError when anything is off."""
    overrides: dict[str, Any] = dict(req.lopa or {})
    branches = overrides.get("branches")
    asked = isinstance(branches, int) and not isinstance(branches, bool)
    if max_branches is not None and asked and branches > max_branches:
        raise LimitExceededError(
            f"lopa.branches={branches} exceeds this server's limit of {max_branches} branches "
            f"(lopa serve --max-branches), whatever the decoder; ask for fewer branches"
        )
    if overrides.get("trace"):
        raise ConfigError("lopa.trace is not part of the completions API; stream a decoding trace from POST /v1/trace")
    if req.max_tokens is not None and "max_new_tokens" in overrides:
        raise ConfigError("give either 'max_tokens' or 'lopa.max_new_tokens', not both")
    merged = default.to_dict()
    merged.update(overrides)
    for name in ("temperature", "top_p", "seed"):
        value = getattr(req, name)
        if value is not None:
            if name in overrides:  # overridden, but still checked: a bad value is an error, not dropped
                _check_one(name, overrides[name], default)
            merged[name] = value
    stop = stop_strings(req.stop)
    if stop is not None:
        merged["stop"] = list(stop)
    if req.max_tokens is not None:
        merged["max_new_tokens"] = _round_up(req.max_tokens, merged)
    try:
        config = DecodeConfig.from_dict(merged)
    except ConfigError as e:
        raise ConfigError(f"{e} (in the 'lopa' request field or the OpenAI parameters)") from e
    except (TypeError, ValueError) as e:  # a value of the wrong kind, e.g. "stop": 5 inside "lopa"
        raise ConfigError(f"invalid decoding parameters in 'lopa': {e}") from e
    if config.max_new_tokens >= max_context:
        raise PromptTooLongError(
            f"max_tokens ({config.max_new_tokens} after rounding to whole blocks) leaves no room for a prompt in "
            f"this model's context of {max_context} positions; ask for fewer tokens"
        )
    return config, req.max_tokens


def _check_one(name: str, value: Any, default: DecodeConfig) -> None:
    try:
        DecodeConfig.from_dict({**default.to_dict(), name: value})
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(
            f"invalid 'lopa.{name}' (the OpenAI '{name}' field overrides it, but it must be valid): {e}"
        ) from e


def _round_up(max_tokens: int, merged: dict[str, Any]) -> int:
    """max_tokens rounded up to whole blocks for the block decoders (vanilla decodes any length)."""
    block = merged.get("block_size")
    if merged.get("decoder") == "vanilla" or not isinstance(block, int) or isinstance(block, bool) or block < 1:
        return max_tokens  # a bad block_size is reported by DecodeConfig.validate with its own message
    return -(-max_tokens // block) * block


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...] | None:
    """A request's ``stop`` field as DecodeConfig's tuple; None when the request gives none."""
    return None if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
