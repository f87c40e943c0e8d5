"""Rank 0's facade of a mesh, and the one way into a mesh (:func:`join_mesh`).

:class:`BranchParallelLLM` implements the :class:`~lopa.engine.protocol.Engine` protocol on rank 0: it encodes and
validates the prompts with its own LLM, then sends each request to the other ranks (``replay.py``: they run the
same ``LLM.generate`` call) and decodes it with them. A ``forward`` message runs one plain forward on every rank
(rank 0 returns the logits: the tensor-parallel equivalence check).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lopa.config import DecodeConfig, EngineConfig
from lopa.engine.output import Completion, StreamEvent
from lopa.engine.prompt import prompt_list
from lopa.engine.protocol import Engine, Messages, Prompt
from lopa.engine.session import IteratorSession
from lopa.errors import ConfigError, DistributedError, LopaError
from lopa.llm import LLM
from lopa.parallel.faults import Fault
from lopa.parallel.mesh import Mesh, build_mesh
from lopa.parallel.process_group import DistContext, init_distributed, resolve_timeout, shutdown
from lopa.parallel.replay import RequestChannel, attach, dump_kv, plain_forward, serve, wait_acks


class BranchParallelLLM(Engine):
    """Rank 0's side: the LLM facade with branch-parallel decoding; workers must be running :func:`serve`.

    What does not decode (the tokenizer, limits, prompt checks) is rank 0's own LLM's; decoding goes through the
    group, one sequence at a time."""

    def __init__(
        self, llm: LLM, ctx: DistContext, kv_dump_dir: str | Path | None = None, mesh: Mesh | None = None
    ) -> None:
        if not ctx.is_master:
            raise DistributedError(f"BranchParallelLLM runs on rank 0; rank {ctx.rank} must call serve()")
        self.llm, self.ctx, self.kv_dump_dir = llm, ctx, kv_dump_dir
        self.monitor, self.comm, self.runner = attach(llm, ctx, mesh)
        self.channel = RequestChannel(ctx, self.comm)
        self.fault: Fault | None = None  # sent with the next request only
        self.broken = False

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        config: DecodeConfig | Sequence[DecodeConfig] | None = None,
        raw: bool = False,
        progress: bool = False,
    ) -> list[Completion]:
        """Like :meth:`LLM.generate` (one config for all prompts; no progress bar). User errors (ConfigError,
        PromptTooLongError) come before any rank is involved; a DistributedError leaves the group broken
        (``broken``), and every rank stops."""
        if config is not None and not isinstance(config, DecodeConfig):
            raise ConfigError("branch-parallel decoding takes one DecodeConfig for all prompts")
        cfg = (config or DecodeConfig()).validate()
        batch = prompt_list(prompts)
        encoded = [self.llm.encode_prompt(p, raw) for p in batch]
        for ids in encoded:
            self.llm.check_fits(ids, cfg)
        return [self._one(ids, cfg) for ids in encoded]

    def _one(self, ids: list[int], cfg: DecodeConfig) -> Completion:
        if self.broken:
            raise DistributedError("the branch-parallel group has failed earlier; start a new one")
        fault, self.fault = self.fault, None
        try:
            self.channel.send({"type": "generate", "ids": ids, "config": cfg.to_dict(), "fault": _fault_dict(fault)})
            completion = self.llm.generate(ids, cfg)[0]
        except BaseException as e:
            self.broken = True  # the workers are somewhere inside this request: the group cannot continue
            if not isinstance(e, DistributedError):
                self.monitor.report(f"rank 0 raised {type(e).__name__}: {e}")
            raise
        dump_kv(self.runner, self.kv_dump_dir, self.channel.count, self.ctx.rank)
        return completion

    # ---- the Engine protocol: rank 0 answers what does not decode alone -----------------------------------
    @property
    def tokenizer(self) -> Any:  # type: ignore[override]
        return self.llm.tokenizer

    @property
    def model_name(self) -> str:  # type: ignore[override]
        return self.llm.model_name

    @property
    def max_context(self) -> int:  # type: ignore[override]
        return self.llm.max_context

    @property
    def default_config(self) -> DecodeConfig:  # type: ignore[override]
        return self.llm.default_config

    @property
    def engine_config(self) -> EngineConfig:  # type: ignore[override]
        return self.llm.engine_config

    @property
    def end_ids(self) -> frozenset[int]:  # type: ignore[override]
        return self.llm.end_ids

    @property
    def attention_block(self) -> int | None:  # type: ignore[override]
        return self.llm.attention_block

    @property
    def generation_config(self) -> dict[str, Any]:  # type: ignore[override]
        return self.llm.generation_config

    @property
    def max_idle_cache_bytes(self) -> int | None:  # type: ignore[override]
        return self.llm.max_idle_cache_bytes

    @max_idle_cache_bytes.setter
    def max_idle_cache_bytes(self, value: int | None) -> None:
        self.llm.max_idle_cache_bytes = value

    @property
    def can_batch(self) -> bool:
        return False  # the ranks split one sequence's branches or weights

    @property
    def device_name(self) -> str:
        return self.llm.device_name

    @property
    def dtype_name(self) -> str | None:
        return self.llm.dtype_name

    def encode_prompt(self, prompt: Prompt | Messages, raw: bool = False) -> list[int]:
        return self.llm.encode_prompt(prompt, raw)

    def count_prompt_tokens(self, prompt: Prompt | Messages, raw: bool = False) -> int:
        return self.llm.count_prompt_tokens(prompt, raw)

    def check_fits(self, ids: list[int], cfg: DecodeConfig) -> None:
        self.llm.check_fits(ids, cfg)

    def decode_config(self, **changes: object) -> DecodeConfig:
        return self.llm.decode_config(**changes)

    def kv_cache_bytes(self, rows: int, positions: int) -> int:
        return self.llm.kv_cache_bytes(rows, positions)

    def kv_pool_bytes(self) -> int:
        return 0  # no KV pool: one sequence at a time

    def generate_each(
        self, prompts: Sequence[Prompt], config: DecodeConfig | Sequence[DecodeConfig] | None = None, raw: bool = False
    ) -> Iterator[tuple[int, Completion]]:
        """As :meth:`generate`, one (prompt index, Completion) at a time, in order."""
        yield from enumerate(self.generate(list(prompts), config, raw))

    def open_session(self) -> IteratorSession:
        """Prompts in flight one at a time (the group decodes one sequence at a time)."""
        return IteratorSession(self.stream, max_active=1)

    def stream(
        self, prompt: Prompt | Messages, config: DecodeConfig | None = None, raw: bool = False
    ) -> Iterator[StreamEvent]:
        """Like :meth:`LLM.stream`, decoded by the whole group. Closing the stream early still finishes the
        request here without yielding (the other ranks run it to the end, and the next request must find them
        in step), so a cancelled request costs the rest of its decoding."""
        cfg = (config or self.llm.default_config).validate()
        ids = self.llm.encode_prompt(prompt, raw)
        self.llm.check_fits(ids, cfg)
        if self.broken:
            raise DistributedError("the branch-parallel group has failed earlier; start a new one")
        finished = False
        try:
            self.channel.send({"type": "generate", "ids": ids, "config": cfg.to_dict(), "fault": None})
            events = self.llm.stream(ids, cfg)
            for event in events:  # noqa: UP028  # not `yield from`: closing us must not close `events`
                yield event
            finished = True
        except GeneratorExit:
            for _ in events:  # the consumer left: finish the request with the other ranks
                pass
            finished = True
            raise
        finally:
            if not finished:
                self.broken = True

    def forward(self, ids: list[int]) -> torch.Tensor:
        """Raw logits (L, vocab) of one plain forward over ``ids`` (no cache), computed by the whole group."""
        if self.broken:
            raise DistributedError("the branch-parallel group has failed earlier; start a new one")
        try:
            self.channel.send({"type": "forward", "ids": ids})
            return plain_forward(self.llm, ids)
        except BaseException:
            self.broken = True
            raise

    def close(self) -> None:
        """Stop the workers and leave the group (normal path only)."""
        if not self.broken:
            self.channel.send({"type": "stop"})
            wait_acks(self.ctx, "stopped", self.ctx.world_size - 1)  # the store (ours) must outlive their exit
        self.monitor.stop()
        if not self.broken:
            shutdown()


def join_mesh(
    engine: EngineConfig, kv_dump_dir: str | Path | None = None, watch: Callable[[], str | None] | None = None
) -> BranchParallelLLM | None:
    """Join the BP x TP mesh this process's environment describes (torchrun's variables, or a launcher's that
    sets the same), load this rank's shard of ``engine``'s model and wait until every rank has loaded it.

    Rank 0 gets its facade (:class:`BranchParallelLLM`); any other rank serves rank 0's requests until told to
    stop and gets None. The one way in for torchrun ranks, the ``--bp/--tp`` launcher's ranks and ``serve --tp``
    (``watch``: see :meth:`DistContext.store_barrier`)."""
    timeout = resolve_timeout(engine.dist_timeout)
    ctx = init_distributed(engine.device, timeout, engine.startup_timeout, watch=watch)
    try:
        mesh = build_mesh(ctx, engine.tp)  # WORLD_SIZE = branch groups x tp
        shard = mesh.shard if mesh.tp > 1 else None  # each rank reads only its own slices of the weights
        llm = LLM.from_config(engine.replace(device=str(ctx.device)), shard=shard)
    except LopaError as e:  # its own fault (a bad checkpoint, ...): the others must not wait for it
        if not isinstance(e, DistributedError):
            ctx.mark_failed(e)
        raise
    ctx.store_barrier("loaded", engine.startup_timeout, watch=watch)
    if not ctx.is_master:
        serve(llm, ctx, kv_dump_dir, mesh)
        return None
    return BranchParallelLLM(llm, ctx, kv_dump_dir, mesh)


def _fault_dict(fault: Fault | None) -> dict[str, Any] | None:
    return fault.to_dict() if fault is not None else None
