"""Requests across ranks: rank 0 owns each request and does all I/O; the other ranks replay it.

Rank 0 (:class:`BranchParallelLLM`) encodes and validates the prompts, then for each one rings a doorbell on the
store (``req/<n>`` = message size) and broadcasts the request itself (prompt ids + DecodeConfig as JSON bytes
in a uint8 tensor). Every worker (:func:`serve`) waits for the doorbell, receives the request and runs exactly
the same ``LLM.generate`` call with a :class:`BranchParallelRunner`, so the engine loop, stop strings included,
is replicated and the collectives line up. The worker's Completion is dropped; rank 0 returns its own. A
``forward`` message runs one plain forward of the given ids on every rank (rank 0 returns the logits: the
tensor-parallel equivalence check). A ``stop`` message ends the workers. In a BP x TP mesh every rank is set
up the same way by :func:`attach` (mesh groups, the TP all-reduce bound into the sharded model).

Idle workers wait on the store, not in a collective, so they can wait for the next request as long as rank 0
is alive (checked through its heartbeat) instead of running into the collective timeout.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lopa.config import DecodeConfig, EngineConfig
from lopa.engine.output import Completion, StreamEvent
from lopa.engine.prompt import is_ids
from lopa.engine.protocol import Engine, Messages, Prompt
from lopa.engine.session import IteratorSession
from lopa.errors import ConfigError, DistributedError, LopaError
from lopa.llm import LLM
from lopa.parallel.comm import Comm
from lopa.parallel.faults import Fault
from lopa.parallel.mesh import Mesh, TensorParallel, build_mesh, layout
from lopa.parallel.monitor import Monitor
from lopa.parallel.process_group import DistContext, init_distributed, resolve_timeout, shutdown
from lopa.parallel.runner import BranchParallelRunner

_POLL_S = (0.001, 0.05)  # doorbell polling interval: starts short, grows while idle


class RequestChannel:
    """Doorbell on the store + one broadcast per message; messages are small JSON objects."""

    def __init__(self, ctx: DistContext, comm: Comm) -> None:
        self.ctx, self.comm, self.count = ctx, comm, 0

    def send(self, msg: dict[str, Any]) -> None:
        data = torch.frombuffer(bytearray(json.dumps(msg).encode()), dtype=torch.uint8)  # (bytes,)
        self.count += 1
        self.ctx.store.set(f"req/{self.count}", str(data.numel()))
        self.comm.broadcast(data, 0, "request")

    def receive(self) -> dict[str, Any]:
        self.count += 1
        key, monitor, delay = f"req/{self.count}", self.comm.monitor, _POLL_S[0]
        monitor.stage = "idle"
        while not self.ctx.store.check([key]):  # polling: store.wait logs a warning on every timeout
            gone = monitor.unresponsive([0])
            if gone or self.ctx.store.check(["failed/0"]):
                raise monitor.failure("waiting for a request", None)
            time.sleep(delay)
            delay = min(delay * 2, _POLL_S[1])
        size = int(self.ctx.store.get(key))
        data = self.comm.broadcast(torch.empty(size, dtype=torch.uint8), 0, "request")
        return json.loads(data.numpy().tobytes().decode())


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
        batch = [prompts] if isinstance(prompts, str) or is_ids(prompts) else list(prompts)  # type: ignore[list-item]
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
            _wait_acks(self.ctx, "stopped", self.ctx.world_size - 1)  # the store (ours) must outlive their exit
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


def attach(llm: LLM, ctx: DistContext, mesh: Mesh | None) -> tuple[Monitor, Comm, BranchParallelRunner]:
    """Heartbeats, the request channel's comm, and the mesh runner installed as ``llm.runner``."""
    mesh = mesh or layout(ctx.rank, ctx.world_size, 1)
    monitor = Monitor(ctx, tp_ranks=mesh.tp_ranks)
    tp = TensorParallel(ctx, monitor, mesh)
    tp.bind(llm.model)
    cross = Comm(ctx, monitor, mesh.cross_group, mesh.cross_ranks)
    runner = BranchParallelRunner(llm.runner, cross, tp)
    llm.runner = runner  # type: ignore[assignment]  # same interface as the single-device Runner
    return monitor, Comm(ctx, monitor), runner


def plain_forward(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Raw logits (L, vocab) of ``ids`` at positions 0..L-1, no cache (float32 on the CPU)."""
    x = torch.tensor([ids], dtype=torch.long, device=llm.device)  # (1, L)
    with torch.inference_mode():
        return llm.model(x, torch.arange(len(ids), device=llm.device)[None])[0].float().cpu()


def serve(llm: LLM, ctx: DistContext, kv_dump_dir: str | Path | None = None, mesh: Mesh | None = None) -> int:
    """A worker rank's loop: replay rank 0's requests until told to stop; returns the number served."""
    monitor, comm, runner = attach(llm, ctx, mesh)
    channel, served = RequestChannel(ctx, comm), 0
    try:
        while True:
            msg = channel.receive()
            if msg["type"] == "stop":
                break
            if msg["type"] == "forward":
                plain_forward(llm, list(msg["ids"]))
                continue
            cfg = DecodeConfig.from_dict({**msg["config"], "stop": tuple(msg["config"]["stop"])})
            fault = msg.get("fault")
            runner.fault = Fault(**fault) if fault and fault["rank"] == ctx.rank else None
            llm.generate(list(msg["ids"]), cfg)
            dump_kv(runner, kv_dump_dir, channel.count, ctx.rank)
            served += 1
    except BaseException as e:
        if not isinstance(e, DistributedError):
            monitor.report(f"rank {ctx.rank} raised {type(e).__name__}: {e}")
        raise
    monitor.stop()
    shutdown()
    ctx.store.add("stopped", 1)  # rank 0 keeps the store up until every worker got here
    return served


def _wait_acks(ctx: DistContext, key: str, count: int) -> None:
    deadline = time.monotonic() + ctx.timeout_s
    while ctx.store.add(key, 0) < count and time.monotonic() < deadline:
        time.sleep(0.005)


def dump_kv(runner: BranchParallelRunner, out_dir: str | Path | None, request: int, rank: int) -> None:
    """Save this rank's committed K/V (its kv-head shard) after a request (for cross-rank equivalence checks)."""
    if out_dir is None or runner.cache is None:
        return
    k, v = runner.committed_kv()  # each (layers, local kv_heads, committed, head_dim)
    path = Path(out_dir) / f"rank{rank}-request{request}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({"k": k.contiguous().cpu(), "v": v.contiguous().cpu()}, str(tmp))
    os.replace(tmp, path)  # readers never see a half-written file


def _fault_dict(fault: Fault | None) -> dict[str, Any] | None:
    return fault.to_dict() if fault is not None else None
