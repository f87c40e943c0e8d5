"""What the operating system gives the sandbox: namespaces, a fresh user id, and cleaning up after one.

Owned by :mod:`lopa.eval.sandbox`. :func:`namespace_command` wraps a command so it runs in new network, mount,
PID and IPC namespaces (util-linux ``unshare``): no network but a down loopback (so no server on the host, not even
on 127.0.0.1, can be reached), private empty ``/tmp``, ``/var/tmp``, ``/dev/shm`` and ``/run/lock`` that vanish
with the program, every other mount read-only, its own SysV IPC objects and POSIX message queues (gone with it),
its own ``/proc`` showing only its own processes, and every process killed when the program ends. Under root the
program then drops to its fresh user id (``setpriv``); without root an unprivileged user namespace is used when
the kernel allows one. :func:`namespaces_available` probes this once. The rest finds and kills a user id's
processes and removes the files and SysV IPC objects it left in the world-writable temporary directories (what is
left to clean when there are no namespaces).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# world-writable: where a program's user id can leave files (each gets a private tmpfs inside the namespaces)
SHARED_TMP = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
# runs as root inside the new namespaces: private temporary directories and POSIX message queues, every other
# mount read-only (so nothing the program writes outlives it, by construction), the work dir copied in, then the
# program, as its own user id when one is given ($2)
_INSIDE = r"""
set -e
cd "$1"
private="{private}"
for d in $private; do
  if [ -d "$d" ]; then mount -t tmpfs -o mode=1777,nosuid,nodev,size=256m tmpfs "$d"; fi
done
if [ -d /dev/mqueue ]; then mount -t mqueue -o nosuid,nodev,noexec mqueue /dev/mqueue; fi
sed 's/ - .*//' /proc/self/mountinfo | awk '{{print $5}}' | sort -u | while read -r m; do
  case "$m" in
    /proc|/proc/*|/sys|/sys/*|/dev/mqueue) ;;
    *) case " $private " in *" $m "*) ;; *) mount -o remount,bind,ro "$m" 2>/dev/null || true ;; esac ;;
  esac
done
mkdir /tmp/work
cp -R . /tmp/work/
cd /tmp/work
u=$2
shift 2
if [ -n "$u" ]; then
  chown -R "$u:$u" /tmp/work
  exec setpriv --reuid="$u" --regid="$u" --clear-groups --no-new-privs -- env HOME=/tmp/work TMPDIR=/tmp/work "$@"
fi
exec env HOME=/tmp/work TMPDIR=/tmp/work "$@"
""".format(private=" ".join(SHARED_TMP))


def _unshare_flags(as_root: bool) -> list[str]:
    user = [] if as_root else ["--user", "--map-root-user"]
    return ["unshare", *user, "--net", "--mount", "--pid", "--ipc", "--fork", "--kill-child", "--mount-proc"]


def namespace_command(command: list[str], work: Path, uid: int | None, as_root: bool) -> list[str]:
    """``command`` run inside new namespaces, in a private copy of ``work``, as ``uid`` (root only) when given."""
    inner = ["/bin/sh", "-c", _INSIDE, "sh", str(work), "" if uid is None else str(uid)]
    return [*_unshare_flags(as_root), "--", *inner, *command]


_PROBED: dict[bool, bool] = {}


def namespaces_available(as_root: bool) -> bool:
    """Whether ``unshare`` (and, under root, ``setpriv``) can build the sandbox's namespaces here."""
    if as_root not in _PROBED:
        ok = all(shutil.which(t) for t in ("unshare", "setpriv" if as_root else "unshare"))
        if ok:
            probe = Path(tempfile.mkdtemp(prefix="lopa-sandbox-probe-"))
            cmd = namespace_command(["/bin/true"], probe, 65534 if as_root else None, as_root)
            try:
                ok = subprocess.run(cmd, capture_output=True, timeout=30, cwd="/").returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
            finally:
                remove_tree(probe)
        _PROBED[as_root] = ok
    return _PROBED[as_root]


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def kill_user(uid: int, patience_s: float = 60.0) -> None:
    """Kill every process running as ``uid`` (a fresh id only this program used), until none is left.

    Bounded by time, not by a count of rounds: on a loaded machine a killed process can take long to exit.
    """
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        pids = pids_of_user(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


def pids_of_user(uid: int) -> list[int]:
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


def remove_files_of(uid: int, roots: tuple[str, ...] = SHARED_TMP) -> list[str]:
    """Remove what ``uid`` created in the shared temporary directories; returns the removed paths."""
    removed = []
    for root in roots:
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    remove_tree(Path(entry.path))
                else:
                    os.unlink(entry.path)
                removed.append(entry.path)
    return removed


def remove_ipc_of(uid: int) -> int:
    """Remove the SysV shared memory, message queues and semaphores owned by ``uid``; returns how many."""
    removed = 0
    for kind, flag in (("shm", "-m"), ("msg", "-q"), ("sem", "-s")):
        try:
            header, *rows = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        except (OSError, ValueError):
            continue
        column = header.split().index("uid")  # rows: key, id, perms, ..., uid, ...
        for row in rows:
            fields = row.split()
            if int(fields[column]) == uid:
                removed += subprocess.run(["ipcrm", flag, fields[1]], capture_output=True).returncode == 0
    return removed


def remove_tree(path: Path) -> None:
    def make_writable_and_retry(func, p, _exc):  # noqa: ANN001 - shutil's onerror signature
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=make_writable_and_retry)


_OTHER_USERS_PYTHON: dict[str, str | None] = {}


def _interpreters() -> list[str]:
    """This interpreter's real file first (a virtual environment's ``python`` links to it; programs run with ``-s -S``
    so the environment adds nothing), then the system's. One under a directory that gets a private tmpfs inside the
    namespaces (a venv made with ``mktemp -d``, say) would vanish there, so it is never a candidate."""
    found = []
    for path in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        real = os.path.realpath(path) if path else ""
        if real and os.path.exists(real) and not any(real.startswith(d.rstrip("/") + "/") for d in SHARED_TMP):
            found.append(real)
    return found


def sandbox_python() -> str:
    """The interpreter the sandbox starts as the harness's own user: see :func:`_interpreters`."""
    return next(iter(_interpreters()), sys.executable)


def python_for_other_users() -> str | None:
    """An interpreter (this one if possible) that an unprivileged user can start; probed once per process."""
    if "python" not in _OTHER_USERS_PYTHON:
        found = None
        for candidate in _interpreters():
            if _other_users_can_run(candidate):
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
