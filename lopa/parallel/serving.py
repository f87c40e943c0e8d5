"""``lopa serve --tp N [--bp M]``: the server process is rank 0 of a mesh whose other ranks it starts here.

Rank 0 runs in the server process itself (the HTTP worker thread calls :meth:`BranchParallelLLM.stream`), so
the server sees an object with the LLM methods it uses. The other ranks are ``python -m lopa.parallel.rank``
processes without a launcher connection: they replay rank 0's requests. The group serves one sequence at a
time (the server's engine worker already runs one job at a time). A failed rank breaks the group: every later
request gets a DistributedError until the server is restarted; the worker ranks end when the server exits
(their heartbeat thread watches their parent) and are killed at interpreter exit.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

from lopa.errors import ConfigError
from lopa.llm import LLM
from lopa.parallel.launch import SPEC_ENV
from lopa.parallel.mesh import build_mesh
from lopa.parallel.process_group import DEFAULT_STARTUP_TIMEOUT_S, free_port, init_distributed, resolve_timeout
from lopa.parallel.replicated_llm import BranchParallelLLM


def start_serving_mesh(
    model: str | Path | None,
    *,
    tp: int,
    bp: int = 1,
    lora: str | Path | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    timeout_s: float | None = None,
    port: int | None = None,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
) -> BranchParallelLLM:
    """Start ranks 1..bp*tp-1, join as rank 0, load this rank's shard; returns rank 0's facade."""
    if tp < 1 or bp < 1:
        raise ConfigError(f"--bp and --tp must be positive, got --bp {bp} --tp {tp}")
    world, timeout = bp * tp, resolve_timeout(timeout_s)
    port = port or free_port()
    spec = {
        "model": str(model) if model is not None else None, "lora": str(lora) if lora is not None else None,
        "device": device, "dtype": dtype, "timeout_s": timeout, "startup_timeout_s": startup_timeout_s,
        "kv_dump_dir": None, "tp": tp,
    }  # fmt: skip
    mesh_env = {"WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    pkg_root = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    env.update(mesh_env, OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), **{SPEC_ENV: json.dumps(spec)})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "lopa.parallel.rank"],
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        for r in range(1, world)
    ]

    def kill() -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    def exited() -> str | None:  # a worker killed during start-up never reaches the barrier nor reports
        gone = [f"rank {r} (pid {p.pid}) exited with status {p.poll()}" for r, p in enumerate(procs, 1)]
        gone = [g for g in gone if not g.endswith("None")]
        return "; ".join(gone) + "; see its log above" if gone else None

    atexit.register(kill)
    try:
        os.environ.update(mesh_env, RANK="0", LOCAL_RANK="0")
        ctx = init_distributed(device, timeout, startup_timeout_s, watch=exited)
        mesh = build_mesh(ctx, tp)
        llm = LLM(model, lora=lora, device=ctx.device, dtype=dtype, shard=mesh.shard if tp > 1 else None)
        ctx.store_barrier("loaded", startup_timeout_s, watch=exited)
        return BranchParallelLLM(llm, ctx, mesh=mesh)
    except BaseException:
        kill()
        raise
