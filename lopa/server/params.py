"""Maps an OpenAI request onto a validated :class:`~lopa.DecodeConfig` and the output cut (called by ``app.py``).

Precedence, lowest first: the server's defaults (``lopa serve`` flags), the request's ``lopa`` extra body field
(any DecodeConfig field), then the OpenAI fields ``temperature``, ``top_p``, ``seed`` and ``stop``.
``max_tokens`` becomes ``max_new_tokens``, rounded up to a multiple of ``block_size`` for the block decoders
(which generate whole blocks); the output is then cut back to ``max_tokens`` tokens by the worker. Every
problem raises :class:`~lopa.errors.ConfigError`, which the app answers with a 400.
"""

from __future__ import annotations

from typing import Any

from lopa import DecodeConfig
from lopa.errors import ConfigError, PromptTooLongError
from lopa.server.protocol import BaseRequest


def decode_config_for(req: BaseRequest, default: DecodeConfig, max_context: int) -> tuple[DecodeConfig, int | None]:
    """(config, max_tokens cut or None) for one request; raises ConfigError when anything is off."""
    overrides: dict[str, Any] = dict(req.lopa or {})
    if overrides.get("trace"):
        raise ConfigError("lopa.trace is not part of the completions API; stream a decoding trace from POST /v1/trace")
    if req.max_tokens is not None and "max_new_tokens" in overrides:
        raise ConfigError("give either 'max_tokens' or 'lopa.max_new_tokens', not both")
    merged = default.to_dict()
    merged.update(overrides)
    for name in ("temperature", "top_p", "seed"):
        value = getattr(req, name)
        if value is not None:
            merged[name] = value
    stop = req.stop_strings()
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


def _round_up(max_tokens: int, merged: dict[str, Any]) -> int:
    """max_tokens rounded up to whole blocks for the block decoders (vanilla decodes any length)."""
    block = merged.get("block_size")
    if merged.get("decoder") == "vanilla" or not isinstance(block, int) or isinstance(block, bool) or block < 1:
        return max_tokens  # a bad block_size is reported by DecodeConfig.validate with its own message
    return -(-max_tokens // block) * block
