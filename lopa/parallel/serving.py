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
import os
import subprocess

from lopa.config import EngineConfig
from lopa.parallel.launch import RANK_COMMAND, rank_env, rank_spec
from lopa.parallel.process_group import free_port, resolve_timeout
from lopa.parallel.replicated_llm import BranchParallelLLM, join_mesh


def start_serving_mesh(engine: EngineConfig) -> BranchParallelLLM:
    """Start ranks 1..bp*tp-1, join as rank 0, load this rank's shard; returns rank 0's facade. ``engine.model``
    must be a local directory (or None: the bundled model)."""
    engine = engine.replace(dist_timeout=resolve_timeout(engine.dist_timeout)).validate()
    world, port = engine.world_size, engine.dist_port or free_port()
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    env = rank_env(rank_spec(engine), world, port, threads)
    procs = [
        subprocess.Popen(RANK_COMMAND, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdin=subprocess.DEVNULL)
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
        os.environ.update(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0")
        os.environ["LOCAL_RANK"] = "0"
        group = join_mesh(engine, watch=exited)
        assert group is not None  # rank 0
        return group
    except BaseException:
        kill()
        raise
