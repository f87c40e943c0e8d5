"""A hostile solution cannot forge a pass, escape the guard's listed bypasses, leave anything behind or reach the
network; the sample's memory is bounded as a whole.

The forging solutions and each bypass are the ones a hostile program used against the sandbox. What the OS layer
adds (namespaces, a fresh user id, a cgroup) depends on where the tests run; a test that needs it skips itself
elsewhere, and ``describe()`` then says what was in effect (docs/eval.md).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from lopa.eval.sandbox import Program, Sandbox, SandboxLimits
from lopa.eval.tasks.code import MBPP
from lopa.eval.tasks.evalplus import HumanEvalPlus

LIMITS = SandboxLimits(timeout_s=5.0, memory_mb=1024)
WRONG = "def add(a, b):\n    return a - b\n"
RIGHT = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4\n"
FORGE = (  # walk the stack to the bootstrap's frames and hunt for a secret to print, then exit 0
    "import os, sys\n"
    "f = sys._getframe()\n"
    "while f is not None:\n"
    "    for v in list(f.f_locals.values()):\n"
    "        if isinstance(v, str) and len(v) == 32:\n"
    "            os.write(1, ('\\n' + v + '\\n').encode())\n"
    "    f = f.f_back\n"
    "os._exit(0)\n"
)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(LIMITS)


def adds(solution: str, tests: str = TESTS) -> Program:
    return Program(solution, tests, ("add",))


def test_the_verdict_is_the_tests_process_exit_status(sandbox: Sandbox) -> None:
    assert sandbox.run(adds(RIGHT)).passed
    assert sandbox.run(adds(WRONG)).status == "fail"
    assert sandbox.run(adds(WRONG + FORGE)).status in ("fail", "error")


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
    assert sandbox.run(adds(WRONG + attack)).status in ("fail", "error")


# a name a solution rebinds, and the test line that rebinding made pass for a wrong answer (f returns 0, not 4)
SHADOWS = {
    "abs": ("abs = lambda *a, **k: 0\n", "assert abs(f(2) - 4) < 1e-9\n"),
    "enumerate": ("enumerate = lambda *a, **k: []\n", "for i, x in enumerate([4]):\n    assert f(2) == x\n"),
    "all": ("all = lambda *a, **k: True\n", "assert all(f(2) == 4 for _ in range(3))\n"),
    "isinstance": ("isinstance = lambda *a: True\n", "assert isinstance(f(2), str)\n"),
    "len": ("len = lambda *a: 3\n", "assert len(f(2)) == 3\n"),
    "math": ("class math:\n    isclose = staticmethod(lambda *a, **k: True)\n", "assert math.isclose(f(2), 4)\n"),
}


@pytest.mark.parametrize("name", sorted(SHADOWS))
def test_names_the_solution_binds_do_not_reach_the_tests(sandbox: Sandbox, name: str) -> None:
    """The issue's forgery (``abs``), and others like it: the tests see builtins, the standard-library modules
    they name, and the entry points; nothing else the solution binds."""
    shadow, tests = SHADOWS[name]
    result = sandbox.run(Program("def f(x):\n    return 0\n" + shadow, tests, ("f",)))
    assert result.status in ("fail", "error"), result
    right = "def f(x):\n    return 4\n" + shadow
    assert sandbox.run(Program(right, "assert abs(f(2) - 4) < 1e-9\n", ("f",))).passed


def test_an_evalplus_compare_loop_cannot_be_emptied(sandbox: Sandbox) -> None:
    """``enumerate = lambda *a, **k: []`` emptied every HumanEval+ / MBPP+ compare loop (4/4 forged passes)."""
    doc = {
        "task_id": "HumanEval/2",
        "prompt": 'def truncate_number(number: float) -> float:\n    """Decimal part."""\n',
        "entry_point": "truncate_number",
        "canonical_solution": "    return number % 1.0\n",
        "base_input": [[3.5], [1.33]],
        "plus_input": [[123.456]],
        "atol": 1e-6,
    }
    task = HumanEvalPlus()
    forged = "    for _ in enumerate([]):\n        pass\n    return 0.0\nenumerate = lambda *a, **k: []\n"
    program = task.program(doc, forged)
    assert "enumerate = lambda" in program.solution  # the forgery reached the solution: it is tested, not dropped
    assert sandbox.run(program).status == "fail"
    assert sandbox.run(task.program(doc, doc["canonical_solution"])).passed


def test_stop_iteration_from_the_solution_cannot_end_a_test_loop(sandbox: Sandbox) -> None:
    """Re-raised as such, a StopIteration would end map() early and make all() true on nothing."""
    solution = "def f(x):\n    raise StopIteration\n"
    result = sandbox.run(Program(solution, "assert all(map(lambda x: f(x) == x * 2, [1, 2, 3]))\n", ("f",)))
    assert result.status == "error" and "StopIteration" in result.detail, result


def test_only_the_entry_points_reach_the_tests(sandbox: Sandbox) -> None:
    solution = "import os\nSECRET = 7\ndef helper():\n    return SECRET\ndef f():\n    return helper() + len(os.sep)\n"
    tests = (
        "assert f() == 8\nassert 'helper' not in globals() and 'SECRET' not in globals() and 'os' not in globals()\n"
    )
    assert sandbox.run(Program(solution, tests, ("f",))).passed


def test_mbpp_82_and_367_reference_solutions_pass() -> None:
    """The tests use ``math`` that only the solution imports (task 82, Hugging Face version), and build a tree of
    the solution's ``Node`` class (task 367): both were errors."""
    docs = [
        {
            "task_id": 82,
            "text": "Write a function to find the volume of a sphere.",
            "code": "import math\r\ndef volume_sphere(r):\r\n  volume=(4/3)*math.pi*r*r*r\r\n  return volume",
            "test_list": [
                "assert math.isclose(volume_sphere(10), 4188.790204786391, rel_tol=0.001)",
                "assert math.isclose(volume_sphere(25), 65449.84694978735, rel_tol=0.001)",
            ],
            "test_setup_code": "",
        },
        {
            "task_id": 367,
            "text": "Write a function to check if a binary tree is balanced or not.",
            "code": "class Node:\r\n\tdef __init__(self, data):\r\n\t\tself.data = data\r\n\t\tself.left = None\r\n"
            "\t\tself.right = None\r\ndef get_height(root):\r\n\tif root is None:\r\n\t\treturn 0\r\n"
            "\treturn max(get_height(root.left), get_height(root.right)) + 1\r\ndef is_tree_balanced(root):\r\n"
            "\tif root is None:\r\n\t\treturn True\r\n\tlh = get_height(root.left)\r\n\trh = get_height(root.right)\r\n"
            "\treturn abs(lh - rh) <= 1 and is_tree_balanced(root.left) and is_tree_balanced(root.right)",
            "test_list": ["assert is_tree_balanced(root) == False", "assert is_tree_balanced(root1) == True"],
            "test_setup_code": "root = Node(1)\nroot.left = Node(2)\nroot.left.left = Node(3)\nroot1 = Node(1)\n"
            "root1.left = Node(2)\nassert root.left.left.data == 3\n",
        },
    ]
    task = MBPP()
    programs = [task.program(d, d["code"] + "\n[DONE]") for d in docs]
    assert programs[1].entry_points == ("is_tree_balanced", "Node")
    results = Sandbox(LIMITS).run_many(programs)
    assert [r.status for r in results] == ["pass", "pass"], results


def test_values_cross_as_plain_data_and_objects_as_handles(sandbox: Sandbox) -> None:
    solution = (
        "import math\n"
        "def f(x):\n    return [(x, {1: {'a', 'b'}}), b'\\x00', 1.5, None, math.inf, range(3), 2 ** 80, 1j]\n"
        "def g():\n    return (i for i in range(3))\n"
        "def h(x):\n    raise ValueError('no ' + str(x))\n"
        "class Evil:\n    def __eq__(self, other):\n        return True\n    def __bool__(self):\n        return True\n"
        "def evil():\n    return Evil()\n"
        "def same(a, b):\n    return a is b and isinstance(a, Evil)\n"
    )
    tests = (
        "import math\n"
        "assert f(2) == [(2, {1: {'a', 'b'}}), b'\\x00', 1.5, None, math.inf, range(3), 2 ** 80, 1j]\n"
        "assert list(g()) == [0, 1, 2]\n"
        "try:\n    h(3)\n    raise AssertionError('no exception')\n"
        "except ValueError as e:\n    assert str(e) == 'no 3'\n"
        "e = evil()\n"
        "assert not (e == 3) and e != 3 and e == e\n"  # its __eq__ stays in the solution
        "try:\n    bool(e)\n    raise AssertionError('a truth value crossed')\nexcept TypeError:\n    pass\n"
        "assert same(e, e) is True and same(e, evil()) is False\n"  # a handle goes back as the same object
        "try:\n    f(lambda: 1)\n    raise AssertionError('a function crossed')\nexcept TypeError as err:\n"
        "    assert 'plain data' in str(err)\n"
    )
    result = sandbox.run(Program(solution, tests, ("f", "g", "h", "evil", "same")))
    assert result.passed, result.detail
    forged = Program("class T:\n    pass\ndef f():\n    return T()\n", "assert f()\n", ("f",))
    assert sandbox.run(forged).status == "error"  # an object of the solution is not true in its tests


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
        if mode == "guard-only":
            sandbox = Sandbox(LIMITS, isolate_user=False, namespaces=False, cgroup=False)
        else:
            sandbox = Sandbox(LIMITS)
        result = sandbox.run(Program(GUARD_BYPASSES[name].format(target=target, victim=victim), ""))
        assert result.status == "error", result
        assert victim.read_text() == "keep me" and not target.exists()
    finally:
        for p in shared.iterdir():
            p.unlink()
        shared.rmdir()


def _ipc_keys() -> set[int]:
    """The keys of the host's SysV shared memory segments, message queues and semaphore sets (``ipcs``)."""
    keys = set()
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as f:
            keys |= {int(line.split()[0]) for line in f.readlines()[1:]}
    return keys


LITTERING = (  # the original FileIO type and ctypes: what the guard does not stop, the OS layer must
    "import ctypes, sys\n"
    "raw_file = type(sys.stdout.buffer.raw)\n"
    "libc = ctypes.CDLL(None)\n"
    "IPC_CREAT = 0o1000\n"
    "made = [libc.shmget({key}, 64 << 20, IPC_CREAT | 0o666), libc.msgget({key} + 1, IPC_CREAT | 0o666),\n"
    "        libc.semget({key} + 2, 1, IPC_CREAT | 0o666)]\n"
    "for name in {names!r}:\n"
    "    raw_file(name, 'w').write(b'x')\n"
    "def created():\n    return made\n"
)


@pytest.mark.parametrize("mode", ["default", "user-only"])
def test_nothing_a_sample_makes_outlives_it(mode: str) -> None:
    """64 MiB of SysV shared memory, a message queue, a semaphore set, and files in /run/lock, /tmp, /dev/shm and
    /var/tmp: none is left after the sample (only the sample's own keys and names are compared: other processes
    on the machine may create theirs meanwhile)."""
    if mode == "user-only":
        if os.geteuid() != 0:
            pytest.skip("needs root (a separate user id per process)")
        sandbox = Sandbox(LIMITS, namespaces=False)
    else:
        sandbox = Sandbox(LIMITS)
        if not sandbox.namespaces:
            pytest.skip("needs namespaces (unshare)")
    key = secrets.randbelow(1 << 30) + 1
    names = [f"{d}/lopa-leak-{secrets.token_hex(4)}" for d in ("/run/lock", "/tmp", "/dev/shm", "/var/tmp")]
    run_lock = sorted(os.listdir("/run/lock")) if os.path.isdir("/run/lock") else []
    solution = LITTERING.format(key=key, names=names)
    result = sandbox.run(Program(solution, "assert min(created()) >= 0\n", ("created",)))
    assert result.passed, result.detail  # it did make them
    assert {key, key + 1, key + 2} & _ipc_keys() == set()
    assert [n for n in names if os.path.exists(n)] == []
    assert (sorted(os.listdir("/run/lock")) if os.path.isdir("/run/lock") else []) == run_lock


def test_every_other_mount_is_read_only_inside_the_namespaces() -> None:
    """Even a program running as root inside the namespaces (no separate user id) cannot write outside the
    private temporary directories: here, in the root directory."""
    if os.geteuid() != 0:
        pytest.skip("needs root: otherwise the file permissions alone forbid the write")
    sandbox = Sandbox(LIMITS, isolate_user=False)
    if not sandbox.namespaces:
        pytest.skip("needs namespaces (unshare)")
    target = Path("/") / f"lopa-ro-probe-{secrets.token_hex(4)}"  # never one of the private directories
    solution = (
        "import sys\nraw_file = type(sys.stdout.buffer.raw)\n"
        "def write(path):\n    try:\n        raw_file(path, 'w').write(b'x')\n        return 'written'\n"
        "    except OSError as e:\n        return e.errno\n"
    )
    tests = f"import errno\nassert write({str(target)!r}) == errno.EROFS\nassert write('/tmp/scratch') == 'written'\n"
    try:
        result = sandbox.run(Program(solution, tests, ("write",)))
        assert result.passed, result.detail
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_the_sample_memory_is_bounded_as_a_whole() -> None:
    """4 forked children of 150 MB under memory_mb=256: per-process limits let all four hold theirs at once."""
    sandbox = Sandbox(SandboxLimits(timeout_s=30.0, memory_mb=256))
    if not sandbox.cgroup:
        pytest.skip("needs a cgroup (root, memory and pids controllers): per-process limits only")
    solution = (
        "import ctypes, os, time\n"
        "libc = ctypes.CDLL(None)\n"
        "r, w = os.pipe()\n"
        "children = []\n"
        "for _ in range(4):\n"
        "    pid = libc.fork()\n"
        "    if pid == 0:\n"
        "        block = bytearray(150 << 20)\n"
        "        for i in range(0, len(block), 4096):\n"
        "            block[i] = 1\n"
        "        os.write(w, b'%d\\n' % os.getpid())\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    children.append(pid)\n"
        "os.set_blocking(r, False)\n"
        "filled, dead = set(), set()\n"
        "deadline = time.time() + 20\n"
        "while len(filled | dead) < 4 and time.time() < deadline:\n"
        "    try:\n"
        "        filled |= {int(p) for p in os.read(r, 4096).split()}\n"
        "    except BlockingIOError:\n"
        "        time.sleep(0.05)\n"
        "    dead |= {p for p in children if p not in dead and os.waitpid(p, os.WNOHANG)[0] == p}\n"
        "def holding():\n    return len(filled - dead), len(filled | dead)\n"
    )
    result = sandbox.run(
        Program(solution, "held, done = holding()\nassert done == 4 and held <= 1, (held, done)\n", ("holding",))
    )
    assert result.passed, result.detail


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
        solution = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        result = sandbox.run(Program(solution, ""))
        assert result.status == "error" and ("ConnectionRefused" in result.detail or "OSError" in result.detail)
        assert accepted == []
    finally:
        server.close()


def test_the_wall_clock_starts_when_the_processes_have_started(sandbox: Sandbox, monkeypatch) -> None:
    """The race behind the flaky tests: the wall clock started before the set-up (namespaces, copying, the
    interpreter), so on a loaded machine a passing sample could be judged a timeout. A set-up made 3 s slower
    must not eat the 1 s limit; a program that sleeps past it still times out."""
    real = Sandbox._command

    def slow_setup(self: Sandbox, *args: object) -> list[str]:
        return ["/bin/sh", "-c", 'sleep 3; exec "$@"', "sh", *real(self, *args)]

    monkeypatch.setattr(Sandbox, "_command", slow_setup)
    quick = Sandbox(SandboxLimits(timeout_s=1.0, memory_mb=1024))
    assert quick.run(adds(RIGHT)).passed
    assert quick.run(adds(RIGHT + "import time\ntime.sleep(5)\n")).status == "timeout"


def test_describe_says_what_isolation_was_in_effect(sandbox: Sandbox) -> None:
    d = sandbox.describe()
    assert d["isolation"].endswith("guard+rlimits") and isinstance(d["unisolated"], bool)
    assert d["memory_bound"] == ("per sample (cgroup)" if sandbox.cgroup else "per process (RLIMIT_AS)")
    assert Sandbox(LIMITS, isolate_user=False, namespaces=False).describe()["unisolated"] is True
    if os.geteuid() == 0 and sandbox.namespaces:
        assert d["isolation"] in ("namespaces+user+guard+rlimits", "namespaces+user+cgroup+guard+rlimits")
        assert d["unisolated"] is False


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


def test_an_interpreter_under_a_private_tmp_is_replaced_by_its_real_file(tmp_path: Path, monkeypatch) -> None:
    """A virtual environment made with ``mktemp -d`` lives under /tmp, which the namespaces hide behind a private
    tmpfs: the sandbox starts the interpreter's real file instead, and a program still runs there."""
    link = Path(tempfile.mkdtemp(dir="/tmp")) / "python"
    link.symlink_to(os.path.realpath(sys.executable))
    monkeypatch.setattr(sys, "executable", str(link))
    sandbox = Sandbox(LIMITS, isolate_user=False)
    assert not sandbox.python.startswith("/tmp/") and Path(sandbox.python).samefile(link)
    result = sandbox.run(Program("def f():\n    return 1\n", "assert f() == 1\n", ("f",)))
    assert result.passed, result.detail
    shutil.rmtree(link.parent)
