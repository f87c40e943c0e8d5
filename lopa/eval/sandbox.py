"""Run model-written programs in a separate, limited process: pass / fail / timeout / error, never a crash.

Called by the eval loop (:mod:`lopa.eval.runner`) with the programs the code tasks build; each program runs in
its own process (``python -I -S``: isolated, standard library only; bootstrap :mod:`lopa.eval.sandbox_boot`) with:

- when ``unshare`` works (root, or unprivileged user namespaces): new network, mount and PID namespaces with
  private ``/tmp``, ``/var/tmp`` and ``/dev/shm`` (:mod:`lopa.eval.sandbox_os`);
- a fresh temporary working directory, removed afterwards, and ``TMPDIR`` pointing into it;
- no inherited file descriptors (``close_fds``), a stripped environment, a new session (process group);
- ``RLIMIT_CPU``, ``RLIMIT_AS`` (memory), ``RLIMIT_NPROC``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE`` and a wall-time
  limit after which the whole process group is killed;
- a guard that keeps destructive ``os``/``shutil`` calls inside the working directory and disables process
  creation (the normal-case protection);
- when the harness runs as root: a fresh unprivileged user id per program. Root ignores ``RLIMIT_NPROC`` and
  every file permission, so without this a fork bomb or ``rm`` would only be stopped by the guard. The fresh
  id makes the process limit count only that program's processes and lets the harness kill every process
  it left behind (all processes of that id) and remove the files it left in the shared temporary directories.

Given the split of a program into its solution and its tests (``run(program, solution=...)``), the two run in
separate processes (:mod:`lopa.eval.sandbox_split`) and the verdict is the tests process's exit status, which
the solution cannot forge; under root they also run as different user ids. What each mode guarantees is listed
in docs/eval.md and recorded by :meth:`Sandbox.describe` (``unisolated`` when the OS gave no isolation).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from lopa.errors import ConfigError
from lopa.eval.sandbox_os import (
    kill_group,
    kill_user,
    namespace_command,
    namespaces_available,
    pids_of_user,
    python_for_other_users,
    remove_files_of,
    remove_tree,
)

Status = Literal["pass", "fail", "timeout", "error"]
_BOOT = (
    "\n".join(
        Path(__file__).with_name(name).read_text(encoding="utf-8") for name in ("sandbox_boot.py", "sandbox_split.py")
    )
    + "\nmain()\n"
)
_pids_of_user = pids_of_user  # the tests' name for it
_EXIT_DETAIL = {3: "assertion failed", 4: "exception", 5: "memory limit exceeded", 6: "exit() called"}
_UID_RANGE = (1_000_000, 1_900_000_000)  # far above any real account's id
_TAIL = 2000  # characters of stderr kept as the detail of a failure


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits. ``timeout_s`` is wall time; the CPU limit is the same number, rounded up."""

    timeout_s: float = 10.0
    memory_mb: int = 2048
    max_processes: int = 16
    max_file_mb: int = 64
    max_open_files: int = 128

    def validate(self) -> SandboxLimits:
        if not self.timeout_s > 0:
            raise ConfigError(f"sandbox timeout must be > 0 seconds, got {self.timeout_s!r}")
        if self.memory_mb < 64:
            raise ConfigError(f"sandbox memory limit must be >= 64 MB (Python needs it to start), got {self.memory_mb}")
        return self


@dataclass(frozen=True)
class SandboxResult:
    status: Status
    detail: str
    seconds: float
    uid: int | None = None  # the user id the program ran as (None: the harness's own)

    @property
    def passed(self) -> bool:
        return self.status == "pass"


class Sandbox:
    """Runs programs under :class:`SandboxLimits`; thread-safe, so :meth:`run_many` uses a thread pool."""

    def __init__(
        self, limits: SandboxLimits | None = None, isolate_user: bool | None = None, namespaces: bool | None = None
    ) -> None:
        self.limits = (limits or SandboxLimits()).validate()
        self.as_root = os.geteuid() == 0
        want_user = self.as_root if isolate_user is None else isolate_user
        self.python = sys.executable
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
        parts = (["namespaces"] if self.namespaces else []) + (["user"] if self.user else []) + ["guard", "rlimits"]
        self.isolation = "+".join(parts)

    @property
    def unisolated(self) -> bool:
        """True unless the OS isolates the program: own namespaces AND own user id (see docs/eval.md)."""
        return not (self.namespaces and self.user)

    def describe(self) -> dict[str, object]:
        return {
            "isolation": self.isolation,
            "unisolated": self.unisolated,
            "python": self.python,
            **asdict(self.limits),
        }

    def run_many(
        self, programs: Sequence[str], workers: int = 2, solutions: Sequence[str | None] | None = None
    ) -> list[SandboxResult]:
        """Run every program, ``workers`` at a time; results in input order (``solutions``: see :meth:`run`)."""
        sols = list(solutions) if solutions is not None else [None] * len(programs)
        if workers <= 1 or len(programs) <= 1:
            return [self.run(p, s) for p, s in zip(programs, sols, strict=True)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self.run, programs, sols))

    def run(self, program: str, solution: str | None = None) -> SandboxResult:
        """Run ``program``. With ``solution`` (a prefix of ``program``: the model's code, the rest being the
        task's tests) the two run as separate processes and the tests process's exit status is the verdict."""
        start = time.perf_counter()
        try:
            if solution and program.startswith(solution):
                return self._run_split(solution, program[len(solution) :], start)
            return self._run(program, start)
        except Exception as e:  # noqa: BLE001 - a harness-side failure is this sample's error, not a crash
            return SandboxResult("error", f"sandbox failure: {type(e).__name__}: {e}", time.perf_counter() - start)

    # ---- one process: the program prints the nonce it never saw when it ran to the end -----------------------
    def _run(self, program: str, start: float) -> SandboxResult:
        uid = self._fresh_uid()
        outer = self._workdir({"program.py": program}, uid)
        try:
            nonce = secrets.token_hex(16)
            with open(outer / "stdout", "w+b") as out, open(outer / "stderr", "w+b") as err:
                proc = self._spawn(outer / "work", uid, [], (), out, err, stdin=subprocess.PIPE)
                timed_out = False
                try:
                    proc.communicate(input=(nonce + "\n").encode(), timeout=self.limits.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                self._end(proc, uid)
                seconds = time.perf_counter() - start
                stdout, stderr = _tail(out), _tail(err)
            return _classify(proc.returncode, timed_out, nonce in stdout, stderr, seconds, uid)
        finally:
            remove_tree(outer)

    # ---- two processes: the verdict is the tests process's exit status ------------------------------------------
    def _run_split(self, solution: str, tests: str, start: float) -> SandboxResult:
        sol_uid, test_uid = self._fresh_uid(), self._fresh_uid()
        sol_dir = self._workdir({"program.py": solution}, sol_uid)
        test_dir = self._workdir({"tests.py": tests}, test_uid)
        to_solution, to_tests = os.pipe(), os.pipe()  # (read, write) each
        try:
            with open(sol_dir / "stderr", "w+b") as sol_err, open(test_dir / "stderr", "w+b") as err:
                fds = (to_solution[0], to_tests[1])
                sol = self._spawn(
                    sol_dir / "work", sol_uid, ["solution", *map(str, fds)], fds, subprocess.DEVNULL, sol_err
                )
                fds = (to_tests[0], to_solution[1])
                test = self._spawn(test_dir / "work", test_uid, ["tests", *map(str, fds)], fds, subprocess.DEVNULL, err)
                for fd in (*to_solution, *to_tests):
                    os.close(fd)
                to_solution = to_tests = ()
                timed_out = False
                try:
                    test.wait(timeout=self.limits.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                self._end(test, test_uid)
                self._end(sol, sol_uid)
                seconds = time.perf_counter() - start
                detail = _tail(err) or _tail(sol_err)
            return _classify(test.returncode, timed_out, True, detail, seconds, sol_uid)
        finally:
            for fd in (*to_solution, *to_tests):
                os.close(fd)
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

    def _spawn(self, work: Path, uid: int | None, role: list[str], fds: tuple[int, ...], out, err, stdin=None):  # noqa: ANN001
        limits = {**asdict(self.limits), "cpu_s": int(-(-self.limits.timeout_s // 1))}
        limits_arg = ",".join(f"{k}={int(v)}" for k, v in limits.items() if k != "timeout_s")
        command = [self.python, "-I", "-S", "-c", _BOOT, limits_arg, *role]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
        extra: dict = {}
        if self.namespaces:
            command = namespace_command(command, work, uid if self.as_root else None, self.as_root)
        elif uid is not None:
            extra = {"user": uid, "group": uid, "extra_groups": []}
        return subprocess.Popen(
            command,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd=work,
            env=env,
            close_fds=True,
            pass_fds=fds,
            start_new_session=True,
            **extra,
        )

    def _end(self, proc: subprocess.Popen, uid: int | None) -> None:
        """Kill what is left of a program: its process group, every process of its user id, its files."""
        kill_group(proc.pid)
        if uid is not None:
            kill_user(uid)
        proc.wait()
        if uid is not None:
            remove_files_of(uid)


def _classify(rc: int, timed_out: bool, saw_nonce: bool, stderr: str, seconds: float, uid: int | None) -> SandboxResult:
    detail = stderr[-_TAIL:].strip()
    if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return SandboxResult("timeout", detail or "time limit exceeded", seconds, uid)
    if rc == 0 and saw_nonce:
        return SandboxResult("pass", "", seconds, uid)
    if rc == 3:
        return SandboxResult("fail", detail, seconds, uid)
    if rc == -signal.SIGXFSZ:
        detail = "output file size limit exceeded"
    reason = _EXIT_DETAIL.get(rc, "exited early without finishing its tests" if rc == 0 else f"exit status {rc}")
    return SandboxResult("error", f"{reason}: {detail}" if detail else reason, seconds, uid)


def _tail(f) -> str:  # noqa: ANN001 - an open binary file
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 16 * _TAIL))
    return f.read().decode("utf-8", "replace")
