"""The checks and flag metadata the settings objects share: a field's allowed values, and its help."""

from __future__ import annotations

from lopa.errors import ConfigError


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _number(value: object) -> bool:
    """An int or float, but not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def _help(text: str, default: str | None = None) -> dict[str, str]:
    """A field's flag metadata: its help and, when the field's own default (None) means something, what."""
    return {"help": text} if default is None else {"help": text, "default": default}
