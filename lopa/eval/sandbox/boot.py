"""Bootstrap run inside every sandbox process, before the untrusted program (passed to ``python -s -S -c``).

Owned by :mod:`lopa.eval.sandbox.sandbox`, which reads this file as text and runs it with the sandbox interpreter; it
must therefore import nothing from lopa (the interpreter may be a different one that cannot see the package).

Order matters: resource limits first, then the guard is installed, and only then is the code executed. Every
sample runs as two processes (the ``solution`` and ``tests`` roles, ``split.py``, appended to this text);
the verdict is the tests process's exit status: 0 when its code ran to the end, 3 assertion failed, 4 other
exception, 5 MemoryError, 6 the code called exit(). A program is never trusted to report its own outcome: a
single process that printed a secret after its last line could be forged by a program that reads the secret.
"""

import sys

# run with -s -S but not -E (the harness sets PYTHONHASHSEED, in an environment it builds from nothing, so that
# both processes iterate sets of strings in the same order): keep the working directory off the import path
sys.path[:] = [p for p in sys.path if p not in ("", ".")]

import _io  # noqa: E402
import _posixsubprocess  # noqa: E402
import builtins  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import posix  # noqa: E402
import resource  # noqa: E402

EXIT_FAIL, EXIT_ERROR, EXIT_MEMORY, EXIT_SYSEXIT = 3, 4, 5, 6


def _set_limits(limits: dict) -> None:
    mb = 1024 * 1024
    cpu = limits["cpu_s"]
    # soft limit sends SIGXCPU, the hard one SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_file_mb"] * mb,) * 2)
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _install_guard(root: str) -> None:
    """Confine destructive file operations to ``root`` and disable process creation and signals.

    A determined program can get around this (ctypes, or the original functions still reachable through
    objects Python keeps, such as ``type(sys.stdout.buffer.raw)``); the namespaces, the process limits and,
    under root, the separate user id are the walls (docs/eval.md). This layer makes ordinary mistakes
    (``rm -rf``-style cleanup, ``os.system``) harmless and gives a clear PermissionError instead.
    """
    real_open, real_os_open, readlink = builtins.open, os.open, os.readlink
    realpath, join, isabs, getcwd = os.path.realpath, os.path.join, os.path.isabs, os.getcwd

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor: it was opened through the checks
        p = os.fsdecode(os.fspath(path))
        base = readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None and not isabs(p) else getcwd()
        full = realpath(join(base, p))
        return full == root or full.startswith(root + os.sep)

    def confine(module, name, n_paths=1):
        fn = getattr(module, name, None)
        if fn is None:
            return

        def guarded(*args, **kwargs):
            paths = list(args[:n_paths]) + [kwargs[k] for k in ("path", "src", "dst") if k in kwargs]
            dir_fd = kwargs.get("dir_fd", kwargs.get("src_dir_fd"))
            if not all(inside(p, dir_fd) for p in paths):
                raise PermissionError(f"{name}() outside the sandbox directory is not allowed: {paths!r}")
            return fn(*args, **kwargs)

        setattr(module, name, guarded)

    def deny(module, name):
        if hasattr(module, name):

            def denied(*args, **kwargs):
                raise PermissionError(f"{name}() is disabled in the lopa sandbox")

            setattr(module, name, denied)

    # os re-exports posix's functions (importlib.reload(os) copies them again): guard both modules
    for module in (posix, os):
        for name in ("remove", "unlink", "rmdir", "mkdir", "truncate", "chmod", "chown", "lchown", "utime", "mkfifo"):
            confine(module, name)
        for name in ("rename", "replace", "link", "symlink"):
            confine(module, name, 2)
        process_calls = ["fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "kill", "killpg"]
        process_calls += ["setsid", "setpgid", "setuid", "setgid", "chroot", "mknod"]
        process_calls += [n for n in dir(module) if n.startswith(("exec", "spawn"))]
        for name in process_calls:
            deny(module, name)
    deny(_posixsubprocess, "fork_exec")  # what subprocess.Popen calls to start a child

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path, kwargs.get("dir_fd")):
            raise PermissionError(f"writing outside the sandbox directory is not allowed: {path!r}")
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"writing outside the sandbox directory is not allowed: {file!r}")
        return real_open(file, mode, *args, **kwargs)

    real_file_io = _io.FileIO

    class GuardedFileIO(real_file_io):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and not inside(file):
                raise PermissionError(f"writing outside the sandbox directory is not allowed: {file!r}")
            super().__init__(file, mode, *args, **kwargs)

    os.open = posix.open = guarded_os_open
    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO


def _print_exc() -> None:
    import traceback  # only on failure: importing it costs time on every passing run

    traceback.print_exc()


def _run(source: str, filename: str, namespace: dict) -> int:
    """Execute ``source``; the exit code its outcome maps to (0 when it ran to the end)."""
    code = 0
    try:
        exec(compile(source, filename, "exec"), namespace)
    except AssertionError:
        _print_exc()
        code = EXIT_FAIL
    except MemoryError:
        sys.stderr.write("MemoryError: the program exceeded the sandbox memory limit\n")
        code = EXIT_MEMORY
    except SystemExit as e:
        sys.stderr.write(f"SystemExit({e.code!r}): the program exited before its tests finished\n")
        code = EXIT_SYSEXIT
    except BaseException:  # noqa: BLE001 - every failure of the program is a result, not a harness crash
        _print_exc()
        code = EXIT_ERROR
    return code


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:  # noqa: SIM105 - contextlib would be one more import on every run
            stream.flush()
        except Exception:  # noqa: BLE001 - a stream the program broke must not turn a pass into a crash
            pass


def _quiet_stdin() -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the program reads an empty stdin, and holds no descriptor but 0, 1 and 2
    os.close(devnull)


def _read(name: str) -> str:
    with open(name, encoding="utf-8") as f:
        return f.read()


def main() -> None:
    # argv[1]: "name=int,name=int,..." (json would cost an import on every run); argv[2]: the role; 3, 4: the
    # channel's read and write ends; 5: where to say "started" (the harness starts the wall clock on it)
    limits = {k: int(v) for k, v in (kv.split("=") for kv in sys.argv[1].split(","))}
    _set_limits(limits)
    started = int(sys.argv[5])
    os.write(started, b"s")
    os.close(started)
    _split_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))  # noqa: F821 - defined in split.py
