"""LLM: the public facade. Loads a checkpoint once, turns prompts into Completions.

``generate`` decodes its prompts together: every iteration ONE forward verifies the candidates of all running
sequences (continuous batching, ``max_num_seqs`` at a time, see ``engine/scheduler.py``); a single prompt, or
a branch-parallel runner, decodes one sequence at a time. ``stream`` yields the text that became final after
every forward, so a caller can send it at once and cancel between forwards by closing the iterator;
``open_session`` gives the same per-sequence events for many prompts at once (the server's engine worker).
Text is never revised: decoded positions are final, and only the contiguous decoded
prefix of the answer is ever shown. Parameters are validated by :meth:`DecodeConfig.validate`; prompt length
is checked here against the model's context, and a prompt holding the mask token is refused here
(:class:`~lopa.errors.MaskTokenInPromptError`): every decoder continues a prompt, none infills one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from lopa.checkpoint.bundled import BUNDLED_MODEL_NAME, default_checkpoint_dir
from lopa.checkpoint.hub import model_name_for, resolve_model
from lopa.checkpoint.loader import load_checkpoint
from lopa.config import DecodeConfig, EngineConfig
from lopa.engine.block_layout import default_block, layout_block
from lopa.engine.fast import make_runner
from lopa.engine.loop import decode, run
from lopa.engine.output import Completion, StreamEvent, TextOutput, TextStream
from lopa.engine.prompt import encode_prompt, prompt_list
from lopa.engine.protocol import Engine, Messages, Prompt
from lopa.engine.runner import Runner
from lopa.engine.session import BatchSession, IteratorSession
from lopa.errors import ConfigError, PromptTooLongError
from lopa.model.families import family_named
from lopa.model.kv_access import attention_block
from lopa.model.tp import TPShard

if TYPE_CHECKING:
    from lopa.engine.scheduler import Scheduler

log = logging.getLogger("lopa")
__all__ = ["BUNDLED_MODEL_NAME", "LLM"]


class LLM(Engine):
    """A loaded model (any supported family) ready to decode. Not thread-safe: serialize calls."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        lora: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        enforce_eager: bool | None = None,
        max_num_seqs: int | None = None,
        max_model_len: int | None = None,
        shard: TPShard | None = None,
        revision: str | None = None,
    ) -> None:
        """The arguments are :class:`~lopa.config.EngineConfig`'s fields (see :meth:`from_config`):
        ``max_num_seqs`` (sequences decoded together) and ``max_model_len`` (the longest prompt + max_new_tokens
        served) size the KV pool, allocated on first batched use. ``model_dir``: a checkpoint directory or a
        Hugging Face hub id (``ORG/NAME``, at ``revision``), see ``lopa/checkpoint/hub.py``."""
        path = resolve_model(model_dir, revision) if model_dir is not None else default_checkpoint_dir()
        asked = EngineConfig(
            model=None if model_dir is None else str(model_dir), revision=revision,
            lora=None if lora is None else str(lora), device=str(device),
            dtype=str(dtype).replace("torch.", "") if dtype is not None else None,  # type: ignore[arg-type]
            enforce_eager=enforce_eager, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
        ).validate()  # fmt: skip
        self.checkpoint = load_checkpoint(path, lora=lora, device=device, dtype=dtype, shard=shard)
        if shard is not None and shard.size > 1:
            enforce_eager = True  # tensor-parallel all-reduces are timed collectives: no CUDA graph around them
        self.tokenizer = self.checkpoint.tokenizer
        self.model = self.checkpoint.model
        self.config = self.checkpoint.config
        self.generation_config = self.checkpoint.generation_config
        self.device = next(self.model.parameters()).device
        self.model_name = BUNDLED_MODEL_NAME if model_dir is None else model_name_for(model_dir, path)
        self.engine_config = asked.resolve(self.device.type, self.config.max_position_embeddings)
        self.max_context: int = self.engine_config.max_model_len  # type: ignore[assignment]  # resolved: an int
        self.mask_id = int(self.tokenizer.mask_token_id)
        self.end_ids = frozenset(self.tokenizer.end_token_ids)
        self.attention_block = attention_block(self.config)
        self.output = TextOutput(self.tokenizer, self.end_ids)  # Steps -> text, Completions, stop checks
        self.default_config = DecodeConfig.recommended(
            {**family_named(self.config.family).decode_defaults, **default_block(self.config), **self.generation_config}
        )
        self.runner = make_runner(self.model, self.device, enforce_eager)  # None: fast path on CUDA, eager on CPU
        self._scheduler: Scheduler | None = None
        self.shard = shard
        # after a request, a KV cache larger than this is freed rather than kept for reuse (None: always kept)
        self.max_idle_cache_bytes: int | None = None

    @classmethod
    def from_config(cls, config: EngineConfig, shard: TPShard | None = None) -> LLM:
        """The LLM an EngineConfig describes (its mesh fields are for ``lopa.parallel.join_mesh``)."""
        c = config.validate()
        return cls(
            c.model, lora=c.lora, device=c.device, dtype=c.dtype, enforce_eager=c.enforce_eager,
            max_num_seqs=c.max_num_seqs, max_model_len=c.max_model_len, shard=shard, revision=c.revision,
        )  # fmt: skip

    @property
    def max_num_seqs(self) -> int:
        return self.engine_config.max_num_seqs  # type: ignore[return-value]  # resolved: an int

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def dtype_name(self) -> str | None:
        return str(next(self.model.parameters()).dtype).replace("torch.", "")

    def close(self) -> None:
        """Nothing to release beyond memory (the Engine protocol's hook for a mesh's ranks)."""

    def decode_config(self, **changes: object) -> DecodeConfig:
        """This checkpoint's recommended settings with ``changes`` applied (what the CLI's flags do), validated."""
        return self.default_config.replace(**changes).validate()

    # ---- prompts -------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt | Messages, raw: bool = False) -> list[int]:
        """Token ids of a prompt: ids verbatim, messages or text through the chat template (unless raw); see
        :func:`lopa.engine.prompt.encode_prompt` (a mask token in it is refused)."""
        return encode_prompt(self.tokenizer, prompt, raw, self.config.vocab_size, self.mask_id)

    def count_prompt_tokens(self, prompt: Prompt | Messages, raw: bool = False) -> int:
        return len(self.encode_prompt(prompt, raw))

    def kv_cache_bytes(self, rows: int, positions: int) -> int:
        """Bytes of the K and V cache for ``rows`` branch rows of ``positions`` positions of this model."""
        c, element = self.config, next(self.model.parameters()).element_size()
        return 2 * c.num_hidden_layers * rows * c.num_key_value_heads * positions * c.head_dim * element

    def check_fits(self, ids: list[int], cfg: DecodeConfig) -> None:
        """Raise PromptTooLongError unless the prompt plus max_new_tokens fits the model's context."""
        layout_block(self.config, cfg)  # a block-causal model decodes only with its own attention block
        need = len(ids) + cfg.max_new_tokens
        if need > self.max_context:
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({cfg.max_new_tokens}) = {need} exceeds the model's "
                f"context of {self.max_context} positions; shorten the prompt or lower max_new_tokens"
            )

    # ---- decoding ------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        config: DecodeConfig | Sequence[DecodeConfig] | None = None,
        raw: bool = False,
        progress: bool = False,
    ) -> list[Completion]:
        """Decode the prompts (a string, a list of token ids, or a list of those) together, ``max_num_seqs`` at a
        time. ``config`` is one DecodeConfig for all, or one per prompt. Every prompt is validated first."""
        batch = prompt_list(prompts)
        out: list[Completion | None] = [None] * len(batch)
        bar = tqdm(total=len(batch), desc="generate", unit="prompt", disable=not progress)
        for index, completion in self.generate_each(batch, config, raw):
            out[index] = completion
            bar.update()
        return [c for c in out if c is not None]

    def generate_each(
        self, prompts: Sequence[Prompt], config: DecodeConfig | Sequence[DecodeConfig] | None = None, raw: bool = False
    ) -> Iterator[tuple[int, Completion]]:
        """As :meth:`generate`, yielding (prompt index, Completion) as each prompt finishes (the order in which
        they finish). Every prompt is validated before the first one is decoded."""
        batch = list(prompts)
        configs = self._configs(config, len(batch))
        encoded = [self.encode_prompt(p, raw) for p in batch]  # validate every prompt before decoding any
        for ids, cfg in zip(encoded, configs, strict=True):
            self.check_fits(ids, cfg)
        if len(encoded) == 1 or not self.can_batch:
            for index, (ids, cfg) in enumerate(zip(encoded, configs, strict=True)):
                yield index, self._complete(ids, cfg)
            return
        session = self.open_session()
        rids = [session.add(ids, cfg) for ids, cfg in zip(encoded, configs, strict=True)]
        index_of = {rid: i for i, rid in enumerate(rids)}
        done: set[int] = set()
        try:
            while session.has_work:
                for rid, event in session.step():
                    if isinstance(event, Exception):
                        raise event
                    if event.completion is not None:
                        done.add(rid)
                        yield index_of[rid], event.completion
        finally:
            for rid in rids:
                if rid not in done:
                    session.cancel(rid)

    def _configs(self, config: DecodeConfig | Sequence[DecodeConfig] | None, n: int) -> list[DecodeConfig]:
        if config is None or isinstance(config, DecodeConfig):
            return [(config or self.default_config).validate()] * n
        configs = list(config)
        if len(configs) != n:
            raise ConfigError(f"got {len(configs)} configs for {n} prompts; give one config, or one per prompt")
        return [c.validate() for c in configs]

    # ---- batching ------------------------------------------------------------------------------------
    @property
    def can_batch(self) -> bool:
        """Whether prompts decode together: a single-device runner, no tensor parallelism (the pooled forward
        runs whole attention heads on one device) and max_num_seqs > 1."""
        sharded = self.shard is not None and self.shard.size > 1
        return isinstance(self.runner, Runner) and not sharded and self.max_num_seqs > 1

    @property
    def scheduler(self) -> Scheduler:
        """The continuous-batching scheduler; its KV pool is allocated (and its size logged) on first use."""
        if self._scheduler is None:
            from lopa.engine.batch import BatchRunner
            from lopa.engine.fast import FastRunner
            from lopa.engine.fast_batch import FastBatchRunner
            from lopa.engine.scheduler import Scheduler

            kind = FastBatchRunner if isinstance(self.runner, FastRunner) else BatchRunner  # same choice as runner
            runner = kind(self.model, self.max_num_seqs, self.max_context, self.device)
            self._scheduler = Scheduler(runner, self.mask_id, self.end_ids)
        return self._scheduler

    def kv_pool_bytes(self) -> int:
        """Memory of the batched engine's KV pool (max_num_seqs x max_model_len positions), allocated or not."""
        from lopa.model.cache import KVPool

        cfg, p = self.config, next(self.model.parameters())
        layers, kv, dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
        return KVPool.bytes_needed(layers, self.max_num_seqs, self.max_context, kv, dim, p.dtype)

    def open_session(self) -> BatchSession | IteratorSession:
        """Many prompts in flight, stepped together (see lopa.engine.session). One session at a time per LLM."""
        if self.can_batch:
            return BatchSession(self, self.scheduler, self.output)
        return IteratorSession(self.stream, max_active=1)

    def chat(self, messages: Messages, config: DecodeConfig | None = None) -> Completion:
        """Decode the assistant's reply to OpenAI-style messages."""
        cfg = (config or self.default_config).validate()
        ids = self.encode_prompt(messages)
        self.check_fits(ids, cfg)
        return self._complete(ids, cfg)

    def stream(
        self, prompt: Prompt | Messages, config: DecodeConfig | None = None, raw: bool = False
    ) -> Iterator[StreamEvent]:
        """Yield final text after every forward; the last event carries the Completion."""
        cfg = (config or self.default_config).validate()
        ids = self.encode_prompt(prompt, raw)
        self.check_fits(ids, cfg)
        text_stream = TextStream(self.output, ids, cfg)
        try:
            for step in decode(self.runner, ids, cfg, self.mask_id, self.end_ids, self.output.stop_check(cfg)):
                yield text_stream.feed(step)
        finally:
            self._trim_cache()

    def _trim_cache(self) -> None:
        """Free a KV cache one large request grew past ``max_idle_cache_bytes`` (the next request allocates)."""
        cache = getattr(self.runner, "cache", None)
        limit = self.max_idle_cache_bytes
        if limit is None or cache is None or not hasattr(self.runner, "release"):
            return
        if 2 * cache.k.numel() * cache.k.element_size() > limit:
            self.runner.release()

    def _complete(self, ids: list[int], cfg: DecodeConfig) -> Completion:
        """Decode one prompt to its end (no text is assembled before the last Step)."""
        t0 = time.perf_counter()
        try:
            step = run(decode(self.runner, ids, cfg, self.mask_id, self.end_ids, self.output.stop_check(cfg)))
        finally:
            self._trim_cache()
        return self.output.completion(step, cfg, ids, time.perf_counter() - t0)
