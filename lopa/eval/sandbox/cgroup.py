"""Bound a sample's processes as a whole: one cgroup per sample, with a memory and a process-count limit.

Owned by :mod:`lopa.eval.sandbox`. Supports cgroup v1 (separate ``memory`` and ``pids`` hierarchies) and v2 (the
unified hierarchy, where the harness's own cgroup must be allowed to enable ``memory`` and ``pids`` for its
children: the root cgroup, or one delegated that way). A sample's cgroup is made inside the harness's own, so the
limits of whatever runs the harness still apply on top. Its processes join it before they exec
(:meth:`SampleCgroup.wrap`); afterwards every process in it is killed and it is removed. :func:`cgroup_kind` probes
once whether this works here (it needs root); ``None`` means it does not, and the sandbox falls back to per-process
limits (docs/eval.md says what each guarantees).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Literal

ROOT = Path("/sys/fs/cgroup")
Kind = Literal["v1", "v2"]
# joins the cgroups whose cgroup.procs files come before "--", then execs the command after it
_JOIN = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 111; shift; done; shift; exec "$@"'


def _own_paths() -> dict[str, str]:
    """This process's cgroup per controller (v1) or under the key "" (v2), from /proc/self/cgroup."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _parents(kind: Kind) -> list[Path]:
    """Where a sample's cgroup is made: one directory per hierarchy."""
    own = _own_paths()
    if kind == "v1":
        return [ROOT / c / own[c].lstrip("/") for c in ("memory", "pids")]
    return [ROOT / own[""].lstrip("/")]


def _write(path: Path, value: str) -> None:
    path.write_text(value)


class SampleCgroup:
    """One sample's cgroup: ``memory_mb`` of memory (no swap) and ``max_tasks`` processes and threads in all."""

    def __init__(self, kind: Kind, memory_mb: int, max_tasks: int) -> None:
        self.kind = kind
        name = f"lopa-sandbox-{secrets.token_hex(8)}"
        self.dirs: list[Path] = []
        try:
            for parent in _parents(kind):
                (parent / name).mkdir()
                self.dirs.append(parent / name)
            limit = str(memory_mb * 1024 * 1024)
            if kind == "v1":
                memory, pids = self.dirs
                _write(memory / "memory.limit_in_bytes", limit)
                with contextlib.suppress(OSError):  # only with swap accounting; must not be below the limit
                    _write(memory / "memory.memsw.limit_in_bytes", limit)
                _write(pids / "pids.max", str(max_tasks))
            else:
                (group,) = self.dirs
                _write(group / "memory.max", limit)
                with contextlib.suppress(OSError):
                    _write(group / "memory.swap.max", "0")
                _write(group / "pids.max", str(max_tasks))
        except BaseException:
            self.remove()
            raise

    def wrap(self, command: list[str]) -> list[str]:
        """``command``, run so that it (and everything it starts) is in this cgroup from its first instruction."""
        procs = [str(d / "cgroup.procs") for d in self.dirs]
        return ["/bin/sh", "-c", _JOIN, "sh", *procs, "--", *command]

    def pids(self) -> list[int]:
        found: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return sorted(found)

    def kill(self, patience_s: float = 60.0) -> bool:
        """SIGKILL every process in the cgroup until none is left; False if some outlived ``patience_s``."""
        if self.kind == "v2":
            with contextlib.suppress(OSError):
                _write(self.dirs[0] / "cgroup.kill", "1")
        deadline = time.monotonic() + patience_s
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                return True
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)
        return False

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of this sample for exceeding the memory limit."""
        name = "memory.oom_control" if self.kind == "v1" else "memory.events"
        try:
            text = (self.dirs[0] / name).read_text()
        except OSError:
            return False
        counts = dict(line.split() for line in text.splitlines() if len(line.split()) == 2)
        return int(counts.get("oom_kill", "0")) > 0

    def remove(self) -> None:
        """Kill what is left and remove the cgroup (a killed process may take a moment to leave it)."""
        self.kill()
        deadline = time.monotonic() + 10.0
        for d in self.dirs:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break  # still busy: left empty of live processes, and removed by whoever owns the parent
                    time.sleep(0.002)
        self.dirs = []


_PROBED: dict[str, Kind | None] = {}


def cgroup_kind() -> Kind | None:
    """ "v1" or "v2" when a sample cgroup with memory and pids limits can be made here; None otherwise."""
    if "kind" not in _PROBED:
        _PROBED["kind"] = _probe()
    return _PROBED["kind"]


def _probe() -> Kind | None:
    if os.geteuid() != 0:
        return None
    candidates: list[Kind] = ["v2"] if (ROOT / "cgroup.controllers").exists() else ["v1"]
    for kind in candidates:
        try:
            if kind == "v2":
                parent = _parents(kind)[0]
                with contextlib.suppress(OSError):  # allowed for the root cgroup or a delegated one only
                    _write(parent / "cgroup.subtree_control", "+memory +pids")
                if not {"memory", "pids"} <= set((parent / "cgroup.subtree_control").read_text().split()):
                    continue
            SampleCgroup(kind, 64, 4).remove()
            return kind
        except (OSError, KeyError, ValueError):
            continue
    return None
