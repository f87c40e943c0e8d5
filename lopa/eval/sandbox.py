"""Run model-written programs in a separate, limited process: pass / fail / timeout / error, never a crash.

Called by the eval loop (:mod:`lopa.eval.runner`) with the programs the code tasks build; each program runs in
its own process (``python -I -S``: isolated, standard library only; bootstrap :mod:`lopa.eval.sandbox_boot`) with:

- a fresh temporary working directory, removed afterwards, and ``TMPDIR`` pointing into it;
- no inherited file descriptors (``close_fds``), a stripped environment, a new session (process group);
- ``RLIMIT_CPU``, ``RLIMIT_AS`` (memory), ``RLIMIT_NPROC``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE`` and a wall-time
  limit after which the whole process group is killed;
- a guard that keeps destructive ``os``/``shutil`` calls inside the working directory and disables process
  creation (the normal-case protection);
- when the harness runs as root: a fresh unprivileged user id per program. Root ignores ``RLIMIT_NPROC`` and
  every file permission, so without this a fork bomb or ``rm`` would only be stopped by the guard. The fresh
  id makes the process limit count only that program's processes and lets the harness kill every process
  it left behind (all processes of that id) when it ends.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import stat
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

Status = Literal["pass", "fail", "timeout", "error"]
_BOOT = (Path(__file__).with_name("sandbox_boot.py")).read_text(encoding="utf-8")
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

    def __init__(self, limits: SandboxLimits | None = None, isolate_user: bool | None = None) -> None:
        self.limits = (limits or SandboxLimits()).validate()
        want_user = os.geteuid() == 0 if isolate_user is None else isolate_user
        self.python = sys.executable
        self.isolation = "guard+rlimits"
        if want_user:
            python = _python_for_other_users()
            if python is None:
                if isolate_user:
                    raise ConfigError(
                        "cannot run sandboxed programs as a separate user: no Python interpreter readable by other "
                        "users was found (install python3 system-wide, e.g. /usr/bin/python3)"
                    )
            else:
                self.python, self.isolation = python, "user+guard+rlimits"

    def describe(self) -> dict[str, object]:
        return {"isolation": self.isolation, "python": self.python, **asdict(self.limits)}

    def run_many(self, programs: Sequence[str], workers: int = 2) -> list[SandboxResult]:
        """Run every program, ``workers`` at a time; results in input order."""
        if workers <= 1 or len(programs) <= 1:
            return [self.run(p) for p in programs]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self.run, programs))

    def run(self, program: str) -> SandboxResult:
        start = time.perf_counter()
        try:
            return self._run(program, start)
        except Exception as e:  # noqa: BLE001 - a harness-side failure is this sample's error, not a crash
            return SandboxResult("error", f"sandbox failure: {type(e).__name__}: {e}", time.perf_counter() - start)

    def _run(self, program: str, start: float) -> SandboxResult:
        uid = secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0] if "user" in self.isolation else None
        outer = Path(tempfile.mkdtemp(prefix="lopa-sandbox-"))
        try:
            work = outer / "work"
            work.mkdir()
            (work / "program.py").write_text(program, encoding="utf-8")
            if uid is not None:
                outer.chmod(0o711)  # the program may enter work/, but not read the harness's output files
                os.chown(work, uid, uid)
            limits = {**asdict(self.limits), "cpu_s": int(-(-self.limits.timeout_s // 1))}
            limits_arg = ",".join(f"{k}={int(v)}" for k, v in limits.items() if k != "timeout_s")
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work), "TMPDIR": str(work)}
            nonce = secrets.token_hex(16)
            with open(outer / "stdout", "w+b") as out, open(outer / "stderr", "w+b") as err:
                extra = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
                proc = subprocess.Popen(
                    [self.python, "-I", "-S", "-c", _BOOT, limits_arg],
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=err,
                    cwd=work,
                    env=env,
                    close_fds=True,
                    start_new_session=True,
                    **extra,
                )
                timed_out = False
                try:
                    proc.communicate(input=(nonce + "\n").encode(), timeout=self.limits.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                _kill_group(proc.pid)
                if uid is not None:
                    _kill_user(uid)
                proc.wait()
                seconds = time.perf_counter() - start
                stdout, stderr = _tail(out), _tail(err)
            return _classify(proc.returncode, timed_out, nonce in stdout, stderr, seconds, uid)
        finally:
            _remove_tree(outer)


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


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_user(uid: int) -> None:
    """Kill every process running as ``uid`` (a fresh id only this program used), until none is left."""
    for _ in range(200):
        pids = _pids_of_user(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


def _pids_of_user(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real user id is ``uid``, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        try:  # /proc/PID is owned by the process's effective uid: one stat() filters cheaply
            if not entry.isdigit() or os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 ").split()[0]) == uid and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def _remove_tree(path: Path) -> None:
    def make_writable_and_retry(func, p, _exc):  # noqa: ANN001 - shutil's onerror signature
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)


_OTHER_USERS_PYTHON: dict[str, str | None] = {}


def _python_for_other_users() -> str | None:
    """An interpreter (this one if possible) that an unprivileged user can start; probed once per process."""
    if "python" not in _OTHER_USERS_PYTHON:
        found = None
        for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
            if candidate and _other_users_can_run(candidate):
                found = candidate
                break
        _OTHER_USERS_PYTHON["python"] = found
    return _OTHER_USERS_PYTHON["python"]


def _other_users_can_run(python: str) -> bool:
    if not os.path.exists(python):
        return False
    try:
        probe = subprocess.run(
            [python, "-I", "-c", "import _posixsubprocess, resource"],
            user=65534,
            group=65534,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            timeout=30,
            close_fds=True,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0
