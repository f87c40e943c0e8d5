"""OpenAI request and response schemas for the HTTP server (pydantic models, no engine code).

The request models follow the OpenAI API (``/v1/completions``, ``/v1/chat/completions``) field by field.
Fields the engine implements are typed and mapped onto :class:`~lopa.DecodeConfig` by ``params.py``. Fields
lopa cannot honour (``n > 1``, ``logprobs``, ``tools``, penalties, ...) are accepted only at their neutral
value; anything else is rejected with a message rather than silently ignored, and unknown fields are rejected
too (``extra="forbid"``), so a typo such as ``max_token`` is an error and not a silent default. Responses are
plain dicts built by the helpers at the bottom; usage carries lopa's ``forwards`` and ``tokens_per_forward``
beside OpenAI's token counts.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    model_validator,
)

from lopa.errors import InvalidTextError

# value each unsupported field may take (its neutral value); any other value is a 400
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
}


def _neutral(name: str) -> Any:
    """An unsupported field (checked by ``_reject_unsupported``); its schema lists the only values accepted."""
    by_type: dict[str, list[Any]] = {}
    for v in _NEUTRAL[name]:
        if v is not None:
            v = int(v) if isinstance(v, float) and v.is_integer() else v
            kind = _JSON_TYPES[type(v)]
            if all(json.dumps(v) != json.dumps(seen) for seen in by_type.get(kind, [])):
                by_type.setdefault(kind, []).append(v)
    options = [{"type": kind, "enum": values} for kind, values in by_type.items()]
    return Annotated[Any, WithJsonSchema({"anyOf": [*options, {"type": "null"}]})]


_JSON_TYPES = {bool: "boolean", int: "number", float: "number", str: "string", dict: "object", list: "array"}


def _same(value: Any, neutral: Any) -> bool:
    """JSON equality: 0 == 0.0, but false is not 0 (Python's ``==`` would say it is)."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return type(value) is type(neutral) and value == neutral
    return value == neutral


_TEXT = {"type": "string", "minLength": 1}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_PROMPT_SCHEMA = {
    "anyOf": [
        _TEXT,
        _IDS,
        {"type": "array", "items": _TEXT, "minItems": 1},
        {"type": "array", "items": _IDS, "minItems": 1},
    ],
    "description": "a non-empty text, a non-empty list of token ids, or a non-empty list of either",
}


_STOP_SCHEMA = {"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "maxItems": 16}, {"type": "null"}]}


class InvalidFieldError(ValueError):
    """A field has a value this server does not implement or accept (raised inside validation)."""


def reject_invalid_text(data: Any) -> Any:
    """Raise InvalidTextError when a string (or key) anywhere in a request body holds a lone UTF-16 surrogate.

    JSON may escape one (``"\\ud800"``), but it is no Unicode character: it cannot be tokenized, nor written
    back as UTF-8 in a response, so the request is refused before anything reads it (a pydantic "before"
    validator of every request model).
    """
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str) and not _encodes(value):
            bad = next(i for i, ch in enumerate(value) if "\ud800" <= ch <= "\udfff")
            raise InvalidTextError(
                f"'{where or 'the body'}' is not valid Unicode: character {bad} is a lone UTF-16 surrogate "
                f"U+{ord(value[bad]):04X}; send text whose surrogates come in pairs"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                if not _encodes(key):
                    raise InvalidTextError(f"a key in '{where or 'the body'}' is not valid Unicode (a lone surrogate)")
                stack.append((f"{where}.{key}" if where else key, item))
        elif isinstance(value, list):
            stack.extend((f"{where}.{i}", item) for i, item in enumerate(value))
    return data


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_stop(stop: str | list[str] | None) -> None:
    """InvalidFieldError for more than 16 stop strings (the completion, chat and trace requests alike)."""
    if isinstance(stop, list) and len(stop) > 16:
        raise InvalidFieldError(f"'stop' takes at most 16 strings, got {len(stop)}")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class BaseRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(default=None, ge=0)
    stop: Annotated[StrictStr | list[StrictStr] | None, WithJsonSchema(_STOP_SCHEMA)] = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # lopa's own decoding parameters (a DecodeConfig dict), validated by DecodeConfig.from_dict
    lopa: dict[str, Any] | None = None

    # unsupported OpenAI fields: typed loosely so the check below can name them in its message
    n: _neutral("n") = None
    logprobs: _neutral("logprobs") = None
    logit_bias: _neutral("logit_bias") = None
    presence_penalty: _neutral("presence_penalty") = None
    frequency_penalty: _neutral("frequency_penalty") = None

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        return reject_invalid_text(data)

    @model_validator(mode="after")
    def _reject_unsupported(self) -> BaseRequest:
        for name in type(self).model_fields:
            if name in _NEUTRAL and not any(_same(getattr(self, name), v) for v in _NEUTRAL[name]):
                raise InvalidFieldError(
                    f"'{name}' = {getattr(self, name)!r} is not supported by lopa; leave it out of the request"
                )
        if self.stream_options is not None and not self.stream:
            raise InvalidFieldError("'stream_options' is only allowed together with 'stream': true")
        check_stop(self.stop)
        return self


class CompletionRequest(BaseRequest):
    """``POST /v1/completions``: a raw prompt (text or token ids, or a list of them) is continued."""

    prompt: Annotated[
        StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]], WithJsonSchema(_PROMPT_SCHEMA)
    ]
    best_of: _neutral("best_of") = None
    echo: _neutral("echo") = None
    suffix: _neutral("suffix") = None

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        prompts = self.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidFieldError("'prompt' must not be empty")
        if any(t < 0 for p in prompts if isinstance(p, list) for t in p):
            raise InvalidFieldError("token ids in 'prompt' must be >= 0")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts (text, or token ids used verbatim)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # "developer" is OpenAI's newer name for "system"
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def as_template_message(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(BaseRequest):
    """``POST /v1/chat/completions``: messages go through the checkpoint's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    top_logprobs: _neutral("top_logprobs") = None
    tools: _neutral("tools") = None
    tool_choice: _neutral("tool_choice") = None
    functions: _neutral("functions") = None
    function_call: _neutral("function_call") = None
    parallel_tool_calls: _neutral("parallel_tool_calls") = None
    response_format: _neutral("response_format") = None
    audio: _neutral("audio") = None
    modalities: _neutral("modalities") = None
    prediction: _neutral("prediction") = None
    reasoning_effort: _neutral("reasoning_effort") = None
    metadata: dict[str, StrictStr] | None = None
    store: StrictBool | None = None

    @model_validator(mode="after")
    def _one_token_limit(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise InvalidFieldError("give either 'max_tokens' or 'max_completion_tokens', not both")
            self.max_tokens = self.max_completion_tokens
        return self


# ---- responses ----------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_dict(prompt_tokens: int, completion_tokens: int, forwards: int, tokens_per_forward: float) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "forwards": forwards,
        "tokens_per_forward": round(tokens_per_forward, 4),
    }


def sum_usage(usages: list[dict]) -> dict:
    forwards = sum(u["forwards"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    tpf = sum(u["tokens_per_forward"] * u["forwards"] for u in usages) / forwards if forwards else 0.0
    return usage_dict(sum(u["prompt_tokens"] for u in usages), completion, forwards, tpf)


def error_body(message: str, *, type_: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error envelope; a lone surrogate echoed from the request is escaped, so the body encodes as UTF-8."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
