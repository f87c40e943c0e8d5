"""The :class:`Sandbox`: runs a :class:`~lopa.eval.sandbox.program.Program` as two limited processes (solution and
tests) and waits for the tests process's verdict.

It builds each process's command line (the bootstrap text of ``boot.py`` + ``split.py`` run with ``-c``, inside
namespaces when available, joined to the sample's cgroup, under a fresh user id), its working directory and
environment, starts the wall clock once both processes have started, and afterwards kills and removes everything
the sample left. What the isolation consists of is described in :mod:`lopa.eval.sandbox`.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from lopa.errors import ConfigError
from lopa.eval.sandbox.cgroup import SampleCgroup, cgroup_kind
from lopa.eval.sandbox.isolation import (
    kill_group,
    kill_user,
    namespace_command,
    namespaces_available,
    python_for_other_users,
    remove_files_of,
    remove_ipc_of,
    remove_tree,
    sandbox_python,
)
from lopa.eval.sandbox.program import TAIL_CHARS, Program, SandboxLimits, SandboxResult, classify, stdlib_names_used

_BOOT = (
    "\n".join(Path(__file__).with_name(name).read_text(encoding="utf-8") for name in ("boot.py", "split.py"))
    + "\nmain()\n"
)
_UID_RANGE = (1_000_000, 1_900_000_000)  # far above any real account's id
_SETUP_TASKS = 4  # per process: the joining shell / unshare, and the namespace's setup commands
_SETUP_TIMEOUT_S = 120.0  # how long the two processes may take to start before the wall clock starts anyway


class Sandbox:
    """Runs :class:`Program` s under :class:`SandboxLimits`; thread-safe, so :meth:`run_many` uses a thread pool."""

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        isolate_user: bool | None = None,
        namespaces: bool | None = None,
        cgroup: bool | None = None,
    ) -> None:
        self.limits = (limits or SandboxLimits()).validate()
        self.as_root = os.geteuid() == 0
        want_user = self.as_root if isolate_user is None else isolate_user
        self.python = sandbox_python()
        self.user = False
        if want_user:
            python = python_for_other_users()
            if python is None:
                if isolate_user:
                    raise ConfigError(
                        "cannot run sandboxed programs as a separate user: no Python interpreter readable by other "
                        "users was found (install python3 system-wide, e.g. /usr/bin/python3)"
                    )
            else:
                self.python, self.user = python, True
        self.namespaces = namespaces_available(self.as_root) if namespaces is None else namespaces
        self.cgroup = cgroup_kind() if cgroup is None or cgroup else None
        if self.user and not self.namespaces and not shutil.which("setpriv"):
            self.cgroup = None  # the user id could not be dropped after joining the cgroup
        if cgroup and self.cgroup is None:
            raise ConfigError(
                "no cgroup can be made for the sandbox here (it needs root and the memory and pids controllers)"
            )
        parts = ["namespaces"] if self.namespaces else []
        parts += (["user"] if self.user else []) + (["cgroup"] if self.cgroup else []) + ["guard", "rlimits"]
        self.isolation = "+".join(parts)

    @property
    def unisolated(self) -> bool:
        """True unless the OS isolates the program: own namespaces AND own user id (see docs/eval.md)."""
        return not (self.namespaces and self.user)

    def describe(self) -> dict[str, object]:
        return {
            "isolation": self.isolation,
            "unisolated": self.unisolated,
            "memory_bound": "per sample (cgroup)" if self.cgroup else "per process (RLIMIT_AS)",
            "python": self.python,
            **asdict(self.limits),
        }

    def run_many(self, programs: Sequence[Program], workers: int = 2) -> list[SandboxResult]:
        """Run every program, ``workers`` at a time; results in input order."""
        if workers <= 1 or len(programs) <= 1:
            return [self.run(p) for p in programs]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self.run, programs))

    def run(self, program: Program) -> SandboxResult:
        """Run ``program``'s tests against its solution; the verdict is the tests process's exit status."""
        if not isinstance(program, Program):  # the single-process mode is gone: a program never grades itself
            raise TypeError(
                f"Sandbox.run takes a Program (solution, tests, entry points), not a {type(program).__name__}"
            )
        start = time.perf_counter()
        try:
            return self._run(program, start)
        except Exception as e:  # noqa: BLE001 - a harness-side failure is this sample's error, not a crash
            return SandboxResult("error", f"sandbox failure: {type(e).__name__}: {e}", time.perf_counter() - start)

    def _run(self, program: Program, start: float) -> SandboxResult:
        spec = {
            "context": program.context,
            "tests": program.tests,
            "entry_points": list(program.entry_points),
            "modules": stdlib_names_used(program.context, program.tests, exclude=program.entry_points),
        }
        sol_uid, test_uid = self._fresh_uid(), self._fresh_uid()
        sol_dir = self._workdir({"program.py": program.solution}, sol_uid)
        test_dir = self._workdir({"tests.json": json.dumps(spec)}, test_uid)
        group = None
        to_solution, to_tests, started = os.pipe(), os.pipe(), os.pipe()  # (read, write) each
        still_open = [*to_solution, *to_tests, *started]  # closed once each: a number may be reused at once
        try:
            if self.cgroup:
                tasks = 2 * (self.limits.max_processes + _SETUP_TASKS)
                group = SampleCgroup(self.cgroup, self.limits.memory_mb, tasks)
            with open(sol_dir / "stderr", "w+b") as sol_err, open(test_dir / "stderr", "w+b") as err:
                fds = (to_solution[0], to_tests[1], started[1])
                sol = self._spawn(sol_dir / "work", sol_uid, ["solution", *map(str, fds)], fds, sol_err, group)
                fds = (to_tests[0], to_solution[1], started[1])
                test = self._spawn(test_dir / "work", test_uid, ["tests", *map(str, fds)], fds, err, group)
                for fd in (*to_solution, *to_tests, started[1]):  # the processes hold them now
                    still_open.remove(fd)
                    os.close(fd)
                _wait_started(started[0], 2)
                timed_out = False
                try:
                    test.wait(timeout=self.limits.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                self._end(test, test_uid, None)
                self._end(sol, sol_uid, group)
                seconds = time.perf_counter() - start
                detail = _tail(err) or _tail(sol_err)
            oom = group is not None and group.oom_killed()
            return classify(test.returncode, timed_out, oom, detail, seconds, sol_uid)
        finally:
            for fd in still_open:
                os.close(fd)
            if group is not None:
                group.remove()
            remove_tree(sol_dir)
            remove_tree(test_dir)

    # ---- shared steps -----------------------------------------------------------------------------------------
    def _fresh_uid(self) -> int | None:
        return secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0] if self.user else None

    def _workdir(self, files: dict[str, str], uid: int | None) -> Path:
        outer = Path(tempfile.mkdtemp(prefix="lopa-sandbox-"))
        work = outer / "work"
        work.mkdir()
        for name, text in files.items():
            (work / name).write_text(text, encoding="utf-8")
        if uid is not None:
            outer.chmod(0o711)  # the program may enter work/, but not read the harness's output files
            os.chown(work, uid, uid)
        return outer

    def _command(self, work: Path, uid: int | None, role: list[str]) -> list[str]:
        """The command line of one process: the bootstrap in the interpreter, in namespaces when available."""
        limits = {**asdict(self.limits), "cpu_s": int(-(-self.limits.timeout_s // 1))}
        limits_arg = ",".join(f"{k}={int(v)}" for k, v in limits.items() if k != "timeout_s")
        command = [self.python, "-s", "-S", "-c", _BOOT, limits_arg, *role]
        if self.namespaces:
            command = namespace_command(command, work, uid if self.as_root else None, self.as_root)
        return command

    def _spawn(self, work: Path, uid: int | None, role: list[str], fds: tuple[int, ...], err, group):  # noqa: ANN001
        command = self._command(work, uid, role)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        env["PYTHONHASHSEED"] = "0"  # one set order in both processes (the same code gives the same order)
        extra: dict = {}
        if uid is not None and not self.namespaces:
            if group is None:
                extra = {"user": uid, "group": uid, "extra_groups": []}
            else:  # drop to the user id after joining the cgroup, which only root may do
                drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", "--"]
                command = [*drop, *command]
        if group is not None:
            command = group.wrap(command)  # joins before anything else runs (as root: before the user id drops)
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=work,
            env=env,
            close_fds=True,
            pass_fds=fds,
            start_new_session=True,
            **extra,
        )

    def _end(self, proc: subprocess.Popen, uid: int | None, group: SampleCgroup | None) -> None:
        """Kill what is left of a process: its group, its user id's processes, the sample's cgroup; its files."""
        kill_group(proc.pid)
        if group is not None:
            group.kill()
        if uid is not None:
            kill_user(uid)
        proc.wait()
        if uid is not None:
            remove_files_of(uid)
            remove_ipc_of(uid)


def _wait_started(fd: int, count: int) -> None:
    """Wait until ``count`` processes wrote to ``fd`` (or all closed it, or set-up took ``_SETUP_TIMEOUT_S``)."""
    deadline = time.monotonic() + _SETUP_TIMEOUT_S
    seen = 0
    while seen < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return
        data = os.read(fd, 64)
        if not data:
            return
        seen += len(data)


def _tail(f) -> str:  # noqa: ANN001 - an open binary file
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 16 * TAIL_CHARS))
    return f.read().decode("utf-8", "replace")
