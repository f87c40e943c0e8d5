"""Starting branch-parallel ranks: ``lopa generate --bp N`` (ranks on this machine), ``--branch-parallel`` (one
rank of a torchrun launch), and :class:`BranchParallelGroup` / :func:`generate_bp` for tests and benchmarks.

The launcher starts every rank as ``python -m lopa.parallel.rank`` with torchrun's environment on 127.0.0.1 and a
free port (or the one given), and talks to rank 0 over a socket pair; rank 0 owns each request. Any failure
kills every rank (SIGKILL also ends a frozen one), ``close`` and interpreter exit do too, and each rank ends
itself when the launcher disappears, so no rank outlives it.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lopa.config import DecodeConfig, EngineConfig
from lopa.engine.output import Completion
from lopa.errors import ConfigError, DistributedError, LopaError
from lopa.llm import Prompt
from lopa.parallel.faults import Fault
from lopa.parallel.process_group import DEFAULT_STARTUP_TIMEOUT_S, free_port, resolve_timeout

SPEC_ENV, FD_ENV = "LOPA_BP_SPEC", "LOPA_BP_FD"  # read by lopa.parallel.rank
STARTUP_GRACE_S = 2.0  # a worker that exits during start-up is reported this long after, unless rank 0 is faster


RANK_COMMAND = [sys.executable, "-m", "lopa.parallel.rank"]


def rank_spec(engine: EngineConfig, kv_dump_dir: str | Path | None = None) -> dict[str, Any]:
    """What a launched rank reads from ``$LOPA_BP_SPEC``: the engine settings and the K/V dump directory."""
    return {"engine": engine.to_dict(), "kv_dump_dir": str(kv_dump_dir) if kv_dump_dir is not None else None}


def rank_env(spec: dict[str, Any], world_size: int, port: int, threads: str) -> dict[str, str]:
    """The environment of a rank started on this machine (RANK / LOCAL_RANK still to set): torchrun's variables
    on 127.0.0.1, the spec, and a PYTHONPATH that imports this very lopa."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    env.update(WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=threads)
    env[SPEC_ENV] = json.dumps(spec)
    return env


class BranchParallelGroup:
    """``bp`` branch groups of ``tp`` tensor-parallel ranks (bp x tp processes) on this machine, ready to decode;
    use as a context manager (or call start / close). ``world_size`` is the number of processes."""

    def __init__(
        self,
        bp: int,
        model_dir: str | Path | None = None,
        *,
        tp: int = 1,
        lora: str | Path | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        timeout_s: float | None = None,
        port: int | None = None,
        threads: int = 1,
        kv_dump_dir: str | Path | None = None,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    ) -> None:
        if bp < 1 or tp < 1:
            raise ConfigError(f"a mesh needs at least 1 branch group and 1 tensor-parallel rank, got {bp} x {tp}")
        self.engine = EngineConfig(
            model=str(model_dir) if model_dir is not None else None, lora=str(lora) if lora is not None else None,
            device=device, dtype=dtype, tp=tp, bp=bp, dist_timeout=resolve_timeout(timeout_s), dist_port=port,
            startup_timeout=startup_timeout_s,
        ).validate()  # fmt: skip
        self.bp, self.tp, self.world_size, self.timeout_s = bp, tp, bp * tp, self.engine.dist_timeout or 0.0
        self.startup_timeout_s, self.port, self.threads = startup_timeout_s, port, threads
        self.spec = rank_spec(self.engine, kv_dump_dir)
        self.procs: list[subprocess.Popen] = []
        self._conn: Connection | None = None

    @classmethod
    def from_config(cls, engine: EngineConfig, threads: int = 1) -> BranchParallelGroup:
        """The group an EngineConfig describes (``bp`` x ``tp`` ranks; its ``model`` must be a local directory)."""
        return cls(
            engine.bp, engine.model, tp=engine.tp, lora=engine.lora, device=engine.device, dtype=engine.dtype,
            timeout_s=engine.dist_timeout, port=engine.dist_port, threads=threads,
            startup_timeout_s=engine.startup_timeout,
        )  # fmt: skip

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self) -> BranchParallelGroup:
        """Start the ranks and wait until rank 0 has loaded the model and the group is formed."""
        port = self.port or free_port()
        ours, theirs = socket.socketpair()
        base_env = rank_env(self.spec, self.world_size, port, str(self.threads))
        atexit.register(self.kill)
        for rank in range(self.world_size):
            env = dict(base_env, RANK=str(rank), LOCAL_RANK=str(rank))
            fds: tuple[int, ...] = ()
            if rank == 0:
                env[FD_ENV], fds = str(theirs.fileno()), (theirs.fileno(),)
            self.procs.append(subprocess.Popen(RANK_COMMAND, env=env, pass_fds=fds, stdin=subprocess.DEVNULL))
        theirs.close()
        self._conn = Connection(ours.detach())
        try:
            self._expect(self._wait_reply(self.startup_timeout_s, "starting", STARTUP_GRACE_S), "ready")
        except BaseException:
            self.kill()  # a rank that failed to start (bad checkpoint, ...) takes the others with it
            raise
        return self

    def generate(
        self, prompts: Prompt | Sequence[Prompt], config: DecodeConfig | None = None, raw: bool = False
    ) -> list[Completion]:
        """Decode on the group; same prompts and config as :meth:`lopa.LLM.generate`."""
        return self._call("generate", prompts, (config or DecodeConfig()).validate(), raw)

    def forward(self, ids: list[int]) -> Tensor:
        """Raw logits (L, vocab) of one plain forward over ``ids``, computed by the group (rank 0's copy)."""
        return torch.from_numpy(self._call("forward", list(ids)))

    def inject_fault(self, rank: int, action: str, iteration: int = 1) -> None:
        """Make ``rank`` die / freeze / hang at ``iteration`` of the next request (failure-path testing)."""
        if not 0 < rank < self.world_size:
            raise ConfigError(f"fault rank must be a worker rank in [1, {self.world_size}), got {rank}")
        self._call("fault", Fault(rank, action, iteration).to_dict())

    def close(self) -> None:
        """Stop every rank: politely if the group is healthy, by SIGKILL otherwise."""
        try:
            if self._conn is not None and all(p.poll() is None for p in self.procs):
                self._call("close")
                deadline = time.monotonic() + self.timeout_s
                for p in self.procs:
                    p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except (LopaError, subprocess.TimeoutExpired):
            pass  # kill() below ends whatever is left
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL every rank still running and reap them all."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        atexit.unregister(self.kill)

    def __enter__(self) -> BranchParallelGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- talking to rank 0 ---------------------------------------------------------------------------
    def _call(self, kind: str, *args: Any) -> Any:
        if self._conn is None:
            raise DistributedError("the branch-parallel group is not running; start it (or start a new one)")
        try:
            self._conn.send((kind, *args))
        except OSError as e:
            self.kill()
            raise DistributedError(f"rank 0 is gone ({e}); start a new group") from e
        return self._expect(self._wait_reply(None, kind, self.timeout_s + 5), "ok")

    def _expect(self, reply: tuple[str, Any], kind: str) -> Any:
        status, value = reply
        if status == "error":
            if isinstance(value, DistributedError) or self.procs[0].poll() is not None:
                self.kill()
            raise value
        if status != kind:
            self.kill()
            raise DistributedError(f"rank 0 answered {status!r}, expected {kind!r}")
        return value

    def _wait_reply(self, limit_s: float | None, what: str, grace_s: float) -> tuple[str, Any]:
        """Rank 0's answer; rank 0 names a failed worker itself, so a dead worker only gets ``grace_s``.

        Once the group runs, rank 0's monitor names a dead rank within about a second and the grace only guards
        against rank 0 hanging too. During start-up rank 0 has no monitor yet (it may be loading the model, or
        waiting at a barrier for the dead rank), so a worker that exits is reported after a short grace, in
        which rank 0 can still relay the worker's own error."""
        assert self._conn is not None
        start, worker_gone = time.monotonic(), None
        while True:
            try:
                if self._conn.poll(0.1):
                    return self._conn.recv()
            except (EOFError, OSError):
                pass  # rank 0 closed its end: its exit status below says why
            codes = [p.poll() for p in self.procs]
            if codes[0] is not None:
                self.kill()
                raise DistributedError(f"rank 0 exited with status {codes[0]} while {what}; see its log above")
            gone = [r for r, c in enumerate(codes) if c is not None]
            now = time.monotonic()
            if gone and worker_gone is None:
                worker_gone = now
            late = limit_s is not None and now - start > limit_s
            if late or (worker_gone is not None and now - worker_gone > grace_s):
                self.kill()
                who = ", ".join(f"rank {r} (status {codes[r]})" for r in gone) or "no rank exited"
                see = "; see its log above" if gone else ""
                raise DistributedError(f"branch-parallel group stopped answering while {what}: {who}{see}")


def generate_bp(
    model_dir: str | Path | None,
    prompts: Prompt | Sequence[Prompt],
    cfg: DecodeConfig | None,
    world_size: int,
    **kwargs: Any,
) -> list[Completion]:
    """Start ``world_size`` ranks, decode ``prompts`` with ``cfg``, stop the ranks."""
    with BranchParallelGroup(world_size, model_dir, **kwargs) as group:
        return group.generate(prompts, cfg)
