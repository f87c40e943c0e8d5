"""The code sandbox: every bad program becomes a result (never a harness crash) and nothing escapes it."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from lopa.eval.sandbox import Program, Sandbox, SandboxLimits
from lopa.eval.sandbox.isolation import pids_of_user as _pids_of_user

LIMITS = SandboxLimits(timeout_s=1.0, memory_mb=1024)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(LIMITS)


def alone(solution: str) -> Program:
    """A solution with nothing to test: it passes when it loads without error."""
    return Program(solution, "")


def test_pass_fail_and_error_are_told_apart(sandbox: Sandbox) -> None:
    results = sandbox.run_many(
        [
            Program("def f(x):\n    return x + 1\n", "assert f(1) == 2\n", ("f",)),
            Program("def f(x):\n    return x\n", "assert f(1) == 2, 'wrong'\n", ("f",)),
            alone("def f(:\n"),
            alone("1 / 0\n"),
            Program("def f(x):\n    return 1 / x\n", "f(0)\n", ("f",)),
        ]
    )
    assert [r.status for r in results] == ["pass", "fail", "error", "error", "error"]
    assert "wrong" in results[1].detail
    assert "SyntaxError" in results[2].detail
    assert "ZeroDivisionError" in results[3].detail and "ZeroDivisionError" in results[4].detail


def test_a_run_takes_a_program_not_a_string(sandbox: Sandbox) -> None:
    """The single-process mode, whose pass a program could forge, is gone from the API."""
    with pytest.raises(TypeError, match="Program"):
        sandbox.run("assert True\n")  # type: ignore[arg-type]


def test_a_solution_that_exits_while_loading_is_not_a_pass(sandbox: Sandbox) -> None:
    for solution in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"):
        result = sandbox.run(Program(solution + "def f():\n    return 1\n", "assert f() == 1\n", ("f",)))
        assert result.status == "error", result


def test_a_passing_program_that_replaces_stdout_still_passes(sandbox: Sandbox) -> None:
    assert sandbox.run(alone("import io, sys\nsys.stdout = io.StringIO()\nprint('hidden')\n")).passed


def test_infinite_loop_times_out_and_harness_continues(sandbox: Sandbox) -> None:
    looping, after = sandbox.run_many([alone("while True:\n    pass\n"), alone("x = 1\n")])
    assert looping.status == "timeout"
    assert looping.seconds >= LIMITS.timeout_s  # it ran until the limit; the bound above only guards against a hang
    assert looping.seconds < LIMITS.timeout_s + 60
    assert after.status == "pass"


def test_sleeping_program_times_out_on_wall_time(sandbox: Sandbox) -> None:
    result = sandbox.run(alone("import time\ntime.sleep(60)\n"))
    assert result.status == "timeout"  # no CPU time used: only the wall-clock limit can end it
    assert LIMITS.timeout_s <= result.seconds < 60  # ended at the limit, before the sleep would have ended it


def test_ten_gigabyte_allocation_fails_inside(sandbox: Sandbox) -> None:
    result = sandbox.run(alone("x = bytearray(10 * 1024**3)\n"))
    assert result.status == "error"
    assert "memory" in result.detail.lower()
    assert sandbox.run(alone("x = bytearray(10 * 1024**2)\n")).passed  # 10 MB is fine


def test_files_outside_the_temp_dir_survive(sandbox: Sandbox, tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    attempts = [
        f"import os\nos.remove({str(sentinel)!r})\n",
        f"import os\nos.unlink({str(sentinel)!r})\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
        f"import pathlib\npathlib.Path({str(sentinel)!r}).unlink()\n",
        f"open({str(sentinel)!r}, 'w').write('overwritten')\n",
        f"import os\nos.rename({str(sentinel)!r}, 'stolen.txt')\n",
        f"import subprocess\nsubprocess.run(['rm', '-f', {str(sentinel)!r}])\n",
        f"import os\nos.system('rm -f {sentinel}')\n",
    ]
    for result in sandbox.run_many([alone(a) for a in attempts]):
        assert result.status == "error", result
    assert sentinel.read_text() == "keep me"


def test_files_inside_the_temp_dir_work_and_are_removed(sandbox: Sandbox, monkeypatch) -> None:
    # the sandbox makes its directory under tempfile's root: point that at a directory only this test uses, so
    # other processes creating files in /tmp cannot make the comparison flaky (0711: a per-program user may enter)
    root = Path(tempfile.mkdtemp(prefix="lopa-test-root-"))
    root.chmod(0o711)
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    solution = (
        "import os, tempfile\n"
        "open('scratch.txt', 'w').write('x')\n"
        "os.remove('scratch.txt')\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('y')\n"
        "open('left.txt', 'w').write(os.getcwd())\n"
        "def left():\n    return open('left.txt').read()\n"
    )
    try:
        result = sandbox.run(Program(solution, "assert left()\n", ("left",)))
        assert result.passed, result.detail
        assert os.listdir(root) == []  # the sample's directories were made here and removed
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_fork_bomb_is_contained(sandbox: Sandbox) -> None:
    bomb, after = sandbox.run_many([alone("import os\nwhile True:\n    os.fork()\n"), alone("x = 2 + 2\n")], workers=1)
    assert bomb.status in ("error", "timeout")
    assert after.passed
    if bomb.uid is not None:
        assert _pids_of_user(bomb.uid) == []


def test_fork_bomb_that_bypasses_the_guard_is_contained(sandbox: Sandbox) -> None:
    """Under root the per-program user id makes RLIMIT_NPROC apply; every process it made is killed."""
    if not sandbox.user:
        pytest.skip("needs root (a separate user id per program)")
    bomb = sandbox.run(alone("import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n"))
    assert bomb.status == "timeout"
    assert bomb.uid is not None and _pids_of_user(bomb.uid) == []
    assert sandbox.run(alone("x = 1\n")).passed


def test_environment_is_stripped_and_fds_closed(sandbox: Sandbox) -> None:
    os.environ["LOPA_SECRET_FOR_TEST"] = "x"
    try:
        solution = (
            "import os\n"
            "def environment():\n    return dict(os.environ)\n"
            "def descriptors():\n    return sorted(int(fd) for fd in os.listdir('/proc/self/fd'))\n"
        )
        # 0, 1, 2, the two ends of the channel to the tests, and the listdir itself
        tests = "assert 'LOPA_SECRET_FOR_TEST' not in environment()\nassert len(descriptors()) == 6, descriptors()\n"
        result = sandbox.run(Program(solution, tests, ("environment", "descriptors")))
    finally:
        del os.environ["LOPA_SECRET_FOR_TEST"]
    assert result.passed, result.detail


def test_output_flood_is_cut() -> None:
    small = Sandbox(SandboxLimits(timeout_s=5.0, max_file_mb=1))
    result = small.run(alone("import sys\nwhile True:\n    sys.stderr.write('x' * 1000)\n"))
    assert result.status == "error"


def test_bad_limits_are_config_errors() -> None:
    from lopa.errors import ConfigError

    with pytest.raises(ConfigError):
        Sandbox(SandboxLimits(timeout_s=0))
    with pytest.raises(ConfigError):
        Sandbox(SandboxLimits(memory_mb=1))
