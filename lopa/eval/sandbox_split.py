"""The split verdict, appended to :mod:`lopa.eval.sandbox_boot`'s text: the solution and its tests in two processes.

Owned by :mod:`lopa.eval.sandbox`; like the bootstrap it imports nothing from lopa, and it uses the bootstrap's
helpers (``_install_guard``, ``_run``, ...). The *solution* process executes the model's code and then serves
calls; the *tests* process executes the task's tests, in which every function the solution defines is a proxy that
sends its arguments to the solution process and returns the decoded reply. Values cross as tagged JSON that
decodes only to plain builtin data (None, bool, int, float, complex, str, bytes, tuple, list, dict, set,
frozenset, range, and an iterator over a materialized list), so a reply cannot run code in the tests process.
The verdict is the tests process's exit status: the solution cannot print or fake it, and under root the two
processes run as different user ids, so the solution cannot signal, trace or read the tests process either.
"""

# ruff: noqa: F821  (the bootstrap's names are defined in the text this file is appended to)

import json

_MAX_ITEMS = 100_000  # an iterator is materialized up to this many items


def _enc(v, depth=0):
    if depth > 100:
        raise TypeError("the value is nested too deeply to pass between the solution and its tests")
    d = depth + 1
    if v is None or isinstance(v, (bool, str)):
        return v if type(v) in (bool, str, type(None)) else str(v)
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if isinstance(v, complex):
        return {"__c": [v.real, v.imag]}
    if isinstance(v, (bytes, bytearray)):
        return {"__ba" if isinstance(v, bytearray) else "__b": bytes(v).hex()}
    if isinstance(v, tuple):
        return {"__t": [_enc(x, d) for x in v]}
    if isinstance(v, list):
        return [_enc(x, d) for x in v]
    if isinstance(v, dict):
        return {"__d": [[_enc(k, d), _enc(x, d)] for k, x in v.items()]}
    if isinstance(v, (set, frozenset)):
        return {"__f" if isinstance(v, frozenset) else "__s": [_enc(x, d) for x in v]}
    if isinstance(v, range):
        return {"__r": [v.start, v.stop, v.step]}
    if hasattr(type(v), "__next__"):
        items = []
        for x in v:
            if len(items) >= _MAX_ITEMS:
                raise TypeError(f"an iterator of more than {_MAX_ITEMS} items cannot be passed")
            items.append(_enc(x, d))
        return {"__i": items}
    raise TypeError(f"a {type(v).__name__} cannot be passed between the solution and its tests (plain data only)")


_TAGS = {
    "__t": lambda x: tuple(_dec(i) for i in x),
    "__d": lambda x: {_dec(k): _dec(v) for k, v in x},
    "__s": lambda x: {_dec(i) for i in x},
    "__f": lambda x: frozenset(_dec(i) for i in x),
    "__c": lambda x: complex(float(x[0]), float(x[1])),
    "__b": bytes.fromhex,
    "__ba": lambda x: bytearray.fromhex(x),
    "__r": lambda x: range(int(x[0]), int(x[1]), int(x[2])),
    "__i": lambda x: iter([_dec(i) for i in x]),
}


def _dec(v):
    if isinstance(v, list):
        return [_dec(x) for x in v]
    if isinstance(v, dict):
        if len(v) != 1 or next(iter(v)) not in _TAGS:
            raise ValueError("malformed value from the solution process")
        tag, x = next(iter(v.items()))
        return _TAGS[tag](x)
    if v is None or type(v) in (bool, int, float, str):
        return v
    raise ValueError("malformed value from the solution process")


def _channel(read_fd, write_fd):
    reader = open(read_fd, "rb", buffering=1 << 16)  # noqa: SIM115 - lives as long as the process
    write = os.write

    def send(message):
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[write(write_fd, data) :]

    def receive():
        line = reader.readline()
        if not line:
            raise RuntimeError("the solution process ended before answering (it crashed or exited)")
        return json.loads(line)

    return send, receive


def _serve_solution(read_fd, write_fd):
    """Run the solution, announce its functions, then answer calls until the tests close the channel."""
    send, receive = _channel(read_fd, write_fd)
    exit_now = os._exit
    source = _read("program.py")
    _install_guard(os.path.realpath(os.getcwd()))
    namespace = {"__name__": "__lopa_sandbox__", "__builtins__": builtins}
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException as e:  # noqa: BLE001 - reported to the tests process, which decides the verdict
        _print_exc()
        send({"failed": f"{type(e).__name__}: {e}"[:2000]})
        exit_now(EXIT_ERROR)
    send({"ready": sorted(k for k, v in namespace.items() if callable(v) and not k.startswith("__"))})
    while True:
        try:
            request = receive()
        except RuntimeError:
            exit_now(0)  # the tests are done
        try:
            fn = namespace[request["name"]]
            result = fn(*_dec(request["args"]), **_dec(request["kwargs"]))
            reply = {"ok": _enc(result)}
        except BaseException as e:  # noqa: BLE001 - the test sees the exception
            reply = {"raise": type(e).__name__, "message": str(e)[:2000]}
        _flush()
        send(reply)


def _run_tests(read_fd, write_fd):
    """Run the tests against proxies of the solution's functions; the exit status is the verdict."""
    send, receive = _channel(read_fd, write_fd)
    exit_now = os._exit
    source = _read("tests.py")
    _install_guard(os.path.realpath(os.getcwd()))
    first = receive()
    if "failed" in first:
        sys.stderr.write(f"the solution failed before its tests ran: {first['failed']}\n")
        exit_now(EXIT_ERROR)

    def proxy(name):
        def call(*args, **kwargs):
            send({"name": name, "args": _enc(list(args)), "kwargs": _enc(kwargs)})
            reply = receive()
            if "ok" in reply:
                return _dec(reply["ok"])
            kind = getattr(builtins, str(reply.get("raise")), None)
            is_error = isinstance(kind, type) and issubclass(kind, Exception)
            message = str(reply.get("message", ""))
            try:
                error = kind(message) if is_error else None
            except Exception:  # noqa: BLE001 - an exception type that needs other arguments
                error = None
            raise error or RuntimeError(f"{reply.get('raise')}: {message}")

        call.__name__ = call.__qualname__ = name
        return call

    namespace = {"__name__": "__lopa_tests__", "__builtins__": builtins}
    namespace.update({name: proxy(name) for name in first.get("ready", []) if isinstance(name, str)})
    code = _run(source, "tests.py", namespace)
    _flush()
    exit_now(code)


def _split_main(role, read_fd, write_fd):
    _quiet_stdin()
    if role == "solution":
        _serve_solution(read_fd, write_fd)
    else:
        _run_tests(read_fd, write_fd)
