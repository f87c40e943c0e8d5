"""A hostile program cannot forge a pass, escape the guard's listed bypasses, leave files or reach the network.

The forging program and each bypass are the ones a hostile program used against the sandbox. What the OS layer
adds (namespaces, a fresh user id) depends on where the tests run; a test that needs it skips itself elsewhere, and
``describe()`` then marks results as unisolated (docs/eval.md).
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from pathlib import Path

import pytest

from lopa.eval.sandbox import Sandbox, SandboxLimits

LIMITS = SandboxLimits(timeout_s=5.0, memory_mb=1024)
WRONG = "def add(a, b):\n    return a - b\n"
TESTS = "\nassert add(1, 2) == 3\nassert add(2, 2) == 4\n"
FORGE = (  # walk the stack to the bootstrap's frame, print its nonce, exit 0 before the tests run
    "import os, sys\n"
    "f = sys._getframe()\n"
    "while f is not None:\n"
    "    if isinstance(f.f_locals.get('nonce'), str):\n"
    "        os.write(1, ('\\n' + f.f_locals['nonce'] + '\\n').encode())\n"
    "        os._exit(0)\n"
    "    f = f.f_back\n"
    "os._exit(0)\n"
)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(LIMITS)


def test_the_forged_pass_works_only_without_the_split(sandbox: Sandbox) -> None:
    solution = WRONG + FORGE
    # one process: the program can read the secret of the process it runs in (documented in docs/eval.md)
    assert sandbox.run(solution + TESTS).status == "pass"
    # the eval's way: the verdict is the tests process's exit status
    result = sandbox.run(solution + TESTS, solution=solution)
    assert result.status in ("fail", "error"), result
    assert sandbox.run(WRONG + TESTS, solution=WRONG).status == "fail"
    assert sandbox.run(
        "def add(a, b):\n    return a + b\n" + TESTS, solution="def add(a, b):\n    return a + b\n"
    ).passed


@pytest.mark.parametrize(
    "attack",
    [
        "import sys\nsys.stdout.write('ok')\nsys.exit(0)\n",  # exit 0 before the tests
        "import os\nos.kill(os.getppid(), 9)\n",  # kill whatever started it
        "import os\nfor pid in os.listdir('/proc'):\n    pid.isdigit() and os.kill(int(pid), 9)\n",
        "raise SystemExit(0)\n",
    ],
)
def test_a_solution_cannot_end_its_tests_with_a_pass(sandbox: Sandbox, attack: str) -> None:
    solution = WRONG + attack
    assert sandbox.run(solution + TESTS, solution=solution).status in ("fail", "error")


def test_values_cross_as_plain_data(sandbox: Sandbox) -> None:
    solution = (
        "import math\n"
        "def f(x):\n    return [(x, {1: {'a', 'b'}}), b'\\x00', 1.5, None, math.inf, range(3), 2 ** 80, 1j]\n"
        "def g():\n    return (i for i in range(3))\n"
        "def h(x):\n    raise ValueError('no ' + str(x))\n"
        "class Evil:\n    def __eq__(self, other):\n        return True\n"
        "def evil():\n    return Evil()\n"
    )
    tests = (
        "\nimport math\n"
        "assert f(2) == [(2, {1: {'a', 'b'}}), b'\\x00', 1.5, None, math.inf, range(3), 2 ** 80, 1j]\n"
        "assert list(g()) == [0, 1, 2]\n"
        "try:\n    h(3)\n    raise AssertionError('no exception')\n"
        "except ValueError as e:\n    assert str(e) == 'no 3'\n"
        "try:\n    evil()\n    raise AssertionError('an object crossed')\nexcept TypeError as e:\n"
        "    assert 'plain data' in str(e)\n"
    )
    result = sandbox.run(solution + tests, solution=solution)
    assert result.passed, result.detail


GUARD_BYPASSES = {
    "reload-os": "import importlib, os\nimportlib.reload(os)\nos.system('touch {target}')\n",
    "posix-fork": "import posix\nposix.fork()\n",
    "posix-execv": "import posix\nposix.execv('/bin/sh', ['sh', '-c', 'touch {target}'])\n",
    "posix-unlink": "import posix\nposix.unlink('{victim}')\n",
    "fileio-write": "import io\nio.FileIO('{target}', 'w').write(b'x')\n",
    "_io-open": "import _io\n_io.open('{target}', 'w').write('x')\n",
}


@pytest.mark.parametrize("name", sorted(GUARD_BYPASSES))
@pytest.mark.parametrize("mode", ["guard-only", "default"])
def test_guard_bypasses_are_blocked(tmp_path: Path, name: str, mode: str) -> None:
    shared = Path("/tmp") / f"lopa-test-{secrets.token_hex(4)}"  # a directory every user may write to
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    try:
        victim, target = shared / "victim", shared / "created"
        victim.write_text("keep me")
        victim.chmod(0o666)
        sandbox = Sandbox(LIMITS, isolate_user=False, namespaces=False) if mode == "guard-only" else Sandbox(LIMITS)
        program = GUARD_BYPASSES[name].format(target=target, victim=victim)
        result = sandbox.run(program)
        assert result.status == "error", result
        assert victim.read_text() == "keep me" and not target.exists()
    finally:
        for p in shared.iterdir():
            p.unlink()
        shared.rmdir()


def test_files_written_to_shared_temp_dirs_do_not_outlive_the_program(sandbox: Sandbox) -> None:
    if sandbox.unisolated and not sandbox.user:
        pytest.skip("needs namespaces or a separate user id (root)")
    names = [f"/tmp/lopa-leak-{secrets.token_hex(4)}", f"/dev/shm/lopa-leak-{secrets.token_hex(4)}"]
    program = (  # the original FileIO type, which the guard does not wrap: the OS layer must catch this
        "import sys\nraw_file = type(sys.stdout.buffer.raw)\n"
        + "".join(f"raw_file('{n}', 'w').write(b'x')\n" for n in names)
        + "assert True\n"
    )
    result = sandbox.run(program)
    assert result.passed, result.detail
    assert [n for n in names if os.path.exists(n)] == []


def test_the_network_is_unreachable(sandbox: Sandbox) -> None:
    if not sandbox.namespaces:
        pytest.skip("needs network namespaces (unshare)")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted: list[object] = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        result = sandbox.run(program)
        assert result.status == "error" and ("ConnectionRefused" in result.detail or "OSError" in result.detail)
        assert accepted == []
    finally:
        server.close()


def test_describe_says_what_isolation_was_in_effect(sandbox: Sandbox) -> None:
    d = sandbox.describe()
    assert d["isolation"].endswith("guard+rlimits") and isinstance(d["unisolated"], bool)
    assert Sandbox(LIMITS, isolate_user=False, namespaces=False).describe()["unisolated"] is True
    if os.geteuid() == 0 and sandbox.namespaces:
        assert d["isolation"] == "namespaces+user+guard+rlimits" and d["unisolated"] is False


def test_the_eval_console_marks_unisolated_results() -> None:
    from lopa import DecodeConfig
    from lopa.eval.runner import format_summary, summarize

    summary = summarize([], 1.0)
    summary.update(model="m", device="cpu", device_name="cpu", dtype="float32")
    unisolated = Sandbox(LIMITS, isolate_user=False, namespaces=False).describe()
    summary["settings"] = {"task": "humaneval", "decode": DecodeConfig().to_dict(), "sandbox": unisolated}
    assert "unisolated" in format_summary(summary)
    summary["settings"]["sandbox"] = {**unisolated, "unisolated": False}
    assert "unisolated" not in format_summary(summary)
