"""ServerConfig: how ``lopa serve`` listens and what it admits."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from lopa.config.checks import _choice, _help, _number
from lopa.config.engine import LogLevel
from lopa.errors import ConfigError


@dataclass(frozen=True)
class ServerConfig:
    """How ``lopa serve`` listens and what it admits (the per-request limits are :meth:`limits`)."""

    host: str = field(default="127.0.0.1", metadata=_help("address to bind (0.0.0.0 = all)"))
    port: int = field(default=8000, metadata=_help("TCP port"))
    served_model_name: str | None = field(default=None, metadata=_help("model id clients send", "the checkpoint name"))
    queue_limit: int = field(
        default=64,
        metadata=_help("prompts that may wait for the engine (a request's prompts count one each); more get 503"),
    )
    max_prompts_per_request: int = field(
        default=32, metadata=_help("prompts one /v1/completions request may carry; more get 400")
    )
    max_body_bytes: int = field(default=1 << 20, metadata=_help("largest request body in bytes; more gets 413"))
    max_branches: int = field(default=32, metadata=_help("largest lopa.branches a request may ask for; more gets 400"))
    max_kv_cache_mb: int = field(
        default=4096,
        metadata=_help(
            "largest KV cache one request may need (branch rows x (prompt + max_new_tokens) positions, summed "
            "over its prompts), in MiB; more gets 400"
        ),
    )
    max_connections: int | None = field(
        default=None,
        metadata=_help(
            "open connections; over it the one waiting longest for its request headers is closed",
            "ulimit -n less 64, at most 4096",
        ),
    )
    header_timeout: float = field(default=10.0, metadata=_help("seconds a connection has to send a request's headers"))
    body_timeout: float = field(
        default=30.0, metadata=_help("seconds a request has to send its whole body; later gets 408")
    )
    api_docs: bool = field(
        default=False,
        metadata=_help("serve FastAPI's /docs and /redoc pages (their scripts load from a CDN)", "off"),
    )
    log_level: LogLevel = field(default="info", metadata=_help("uvicorn log level"))

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> ServerConfig:
        """Check every field; returns self. Messages name the field as ``create_app`` and the flags spell it."""
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if not isinstance(self.queue_limit, int) or isinstance(self.queue_limit, bool) or self.queue_limit < 1:
            raise ConfigError(f"queue_limit must be an integer >= 1, got {self.queue_limit!r}")
        body = self.max_body_bytes
        if not isinstance(body, int) or isinstance(body, bool) or body < 1024:
            raise ConfigError(f"max_body_bytes must be an integer >= 1024, got {body!r}")
        if self.max_connections is not None and (not isinstance(self.max_connections, int) or self.max_connections < 1):
            raise ConfigError(f"--max-connections must be >= 1, got {self.max_connections}")
        for name in ("header_timeout", "body_timeout"):
            value = getattr(self, name)
            if not _number(value) or not value > 0:  # also refuses nan
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0 seconds, got {value}")
        _choice("log_level", self.log_level, typing.get_args(LogLevel))
        return self
