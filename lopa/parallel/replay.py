"""Requests across ranks: rank 0 rings, the other ranks replay (:func:`serve`).

For each request rank 0 rings a doorbell on the store (``req/<n>`` = message size) and broadcasts the request
itself (prompt ids + DecodeConfig as JSON bytes in a uint8 tensor) through a :class:`RequestChannel`. Every worker
(:func:`serve`) waits for the doorbell, receives the request and runs exactly the same ``LLM.generate`` call with
a :class:`BranchParallelRunner`, so the engine loop, stop strings included, is replicated and the collectives line
up. The worker's Completion is dropped; rank 0 returns its own. A ``forward`` message runs one plain forward of the
given ids on every rank. A ``stop`` message ends the workers. In a BP x TP mesh every rank is set up the same way
by :func:`attach` (mesh groups, the TP all-reduce bound into the sharded model).

Idle workers wait on the store, not in a collective, so they can wait for the next request as long as rank 0
is alive (checked through its heartbeat) instead of running into the collective timeout.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lopa.config import DecodeConfig
from lopa.errors import DistributedError
from lopa.llm import LLM
from lopa.parallel.comm import Comm
from lopa.parallel.faults import Fault
from lopa.parallel.mesh import Mesh, TensorParallel, layout
from lopa.parallel.monitor import Monitor
from lopa.parallel.process_group import DistContext, shutdown
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


def wait_acks(ctx: DistContext, key: str, count: int) -> None:
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
