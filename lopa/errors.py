"""Every error a user can cause, as a named exception.

All of them derive from :class:`LopaError`, so callers (the CLI, the server) can catch one type and show the
message. A message says what is wrong and what to do about it. The server maps :class:`LopaError` subclasses
to 4xx responses; anything else is a bug.
"""

from __future__ import annotations


class LopaError(Exception):
    """Base class of every error lopa raises on purpose."""


class ConfigError(LopaError, ValueError):
    """A decoding or engine parameter is out of range or inconsistent."""


class PromptTooLongError(ConfigError):
    """The prompt plus max_new_tokens does not fit the model's context."""


class BatchingError(ConfigError):
    """A setting cannot be combined with decoding several sequences together (e.g. branch parallelism)."""


class MaskTokenInPromptError(ConfigError):
    """The prompt contains the mask token: lopa continues prompts, it does not infill them (docs/algorithm.md)."""


class BlockSizeError(ConfigError):
    """A block-causal model is asked to decode with blocks other than the attention blocks it was trained with."""


class InvalidTextError(ConfigError):
    """Text is not valid Unicode: it holds a lone UTF-16 surrogate, or came from bytes that are not UTF-8."""


class DeviceUnavailableError(ConfigError):
    """The requested device is not a torch device, or this machine does not have it."""


class LimitExceededError(ConfigError):
    """A request asks for more than the server's operator limits allow (branches, KV cache memory)."""


class CheckpointError(LopaError):
    """A checkpoint directory cannot be loaded."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The directory or a required file in it does not exist."""


class HubModelNotFoundError(CheckpointNotFoundError):
    """A hub model id (``ORG/NAME``) is neither in the local hub cache nor downloadable (offline, no network,
    unknown repository or revision)."""


class HubNotInstalledError(CheckpointError, ImportError):
    """A hub model id was given but ``huggingface_hub`` is not installed (``pip install 'lopa[hub]'``)."""


class UnsupportedModelError(CheckpointError):
    """config.json names a model_type or feature lopa does not implement."""


class UnsafeWeightsError(CheckpointError):
    """Weights are stored in a pickle-based format (.bin / .pt) that lopa refuses to load."""


class CorruptCheckpointError(CheckpointError):
    """A file exists but cannot be parsed (bad JSON, bad safetensors header, bad shard index)."""


class TensorMismatchError(CheckpointError):
    """Tensors are missing, unexpected, or have the wrong shape."""


class AdapterError(CheckpointError):
    """A LoRA adapter cannot be applied to this base model."""


class DistributedError(LopaError, RuntimeError):
    """A branch-parallel rank died, hung, or disagreed with rank 0."""
