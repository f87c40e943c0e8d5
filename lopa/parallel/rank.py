"""Entry point of one rank started by :class:`lopa.parallel.launch.BranchParallelGroup`
(``python -m lopa.parallel.rank``).

The launcher sets torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), the group's
settings as JSON in ``LOPA_BP_SPEC`` (``{"engine": EngineConfig.to_dict(), "kv_dump_dir": ...}``, see
:func:`~lopa.parallel.launch.rank_spec`) and, for rank 0 only, ``LOPA_BP_FD``: one end of a socket pair to the
launcher. Each rank joins the BP x TP mesh through :func:`~lopa.parallel.replicated_llm.join_mesh` and loads only
its tensor-parallel shard.
Rank 0 answers the launcher's messages (``generate``, ``forward``, ``fault``, ``close``) with ``("ok", value)`` or
``("error", exception)``; the other ranks serve rank 0. Ranks always leave through ``os._exit``: after a failure,
the process group's background threads may never finish, and a rank must not wait for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

from lopa.config import EngineConfig
from lopa.errors import DistributedError, LopaError
from lopa.parallel.faults import Fault
from lopa.parallel.launch import FD_ENV, SPEC_ENV
from lopa.parallel.process_group import DistContext
from lopa.parallel.replicated_llm import BranchParallelLLM, join_mesh


def main() -> int:
    spec: dict[str, Any] = json.loads(os.environ[SPEC_ENV])
    conn = Connection(int(os.environ[FD_ENV])) if FD_ENV in os.environ else None
    ctx: DistContext | None = None
    try:
        bp = join_mesh(EngineConfig.from_dict(spec["engine"]), spec["kv_dump_dir"])
        if bp is None:  # a worker rank: it served rank 0's requests until told to stop
            return 0
        ctx = bp.ctx
        if conn is None:
            raise DistributedError("rank 0 of a launched group needs the launcher's connection ($LOPA_BP_FD)")
        conn.send(("ready", os.getpid()))
        return _answer_launcher(bp, conn)
    except LopaError as e:
        _report(ctx, conn, e)
        return 2
    except BaseException as e:  # a bug: keep the traceback, tell the others, stop
        traceback.print_exc()
        _report(ctx, conn, DistributedError(f"rank {os.environ.get('RANK')} crashed: {type(e).__name__}: {e}"))
        return 1


def _answer_launcher(bp: BranchParallelLLM, conn: Connection) -> int:
    while True:
        try:
            kind, *args = conn.recv()
        except EOFError:  # the launcher is gone: nobody wants the answers
            return 1
        if kind == "close":
            bp.close()
            conn.send(("ok", None))
            return 0
        try:
            if kind == "fault":
                bp.fault = Fault(**args[0])
                conn.send(("ok", None))
            elif kind == "generate":
                conn.send(("ok", bp.generate(*args)))
            elif kind == "forward":
                conn.send(("ok", bp.forward(*args).numpy()))  # a torch tensor would travel as a shared fd
            else:
                raise DistributedError(f"rank 0 got an unknown launcher message {kind!r}")
        except LopaError as e:
            conn.send(("error", e))
            if bp.broken:
                return 2
        except BaseException as e:
            traceback.print_exc()
            conn.send(("error", DistributedError(f"rank 0 crashed: {type(e).__name__}: {e}")))
            return 1


def _report(ctx: DistContext | None, conn: Connection | None, error: LopaError) -> None:
    rank = ctx.rank if ctx is not None else os.environ.get("RANK")
    print(f"lopa rank {rank}: error: {error}", file=sys.stderr, flush=True)
    if ctx is not None and not isinstance(error, DistributedError):
        ctx.mark_failed(error)
    if conn is not None:
        with contextlib.suppress(OSError):  # the launcher is gone
            conn.send(("error", error))


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
