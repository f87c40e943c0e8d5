"""The verdict, appended to :mod:`lopa.eval.sandbox.boot`'s text: the solution and its tests in two processes.

Owned by :mod:`lopa.eval.sandbox`; like the bootstrap it imports nothing from lopa, and it uses the bootstrap's
helpers (``_install_guard``, ``_run``, ...). The *solution* process executes the model's code and then serves
calls, each run in the solution's own namespace (its imports and globals are there). The *tests* process builds its
namespace only from what the task gives: builtins, the standard-library modules the tests name, the task's context
code (e.g. a HumanEval prompt's helpers) and, for each entry point the task names, a proxy that sends its arguments
to the solution process and returns the decoded reply. Nothing the solution defines or rebinds reaches it.

Values cross as tagged JSON that decodes only to plain builtin data (None, bool, int, float, complex, str, bytes,
tuple, list, dict, set, frozenset, range, and an iterator over a materialized list), or to an opaque handle for
any other object (an instance of a class the solution defines): the tests may pass a handle back, read and set
its attributes and call it, but it has no truth value, compares by identity and runs no code in the tests process.
The verdict is the tests process's exit status: the solution cannot print or fake it, and under root the two
processes run as different user ids, so the solution cannot signal, trace or read the tests process either.
"""

# ruff: noqa: F821  (the bootstrap's names are defined in the text this file is appended to)

import json

_MAX_ITEMS = 100_000  # an iterator is materialized up to this many items
# exceptions that steer control flow (a StopIteration raised inside map() ends it early): never re-raised as such
_NOT_RERAISED = ("StopIteration", "StopAsyncIteration")


def _enc(v, handle, depth=0):
    """``v`` as tagged JSON; ``handle(v)`` encodes anything that is not plain data (or raises TypeError)."""
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
        return {"__t": [_enc(x, handle, d) for x in v]}
    if isinstance(v, list):
        return [_enc(x, handle, d) for x in v]
    if isinstance(v, dict):
        return {"__d": [[_enc(k, handle, d), _enc(x, handle, d)] for k, x in v.items()]}
    if isinstance(v, (set, frozenset)):
        return {"__f" if isinstance(v, frozenset) else "__s": [_enc(x, handle, d) for x in v]}
    if isinstance(v, range):
        return {"__r": [v.start, v.stop, v.step]}
    if hasattr(type(v), "__next__"):
        items = []
        for x in v:
            if len(items) >= _MAX_ITEMS:
                raise TypeError(f"an iterator of more than {_MAX_ITEMS} items cannot be passed")
            items.append(_enc(x, handle, d))
        return {"__i": items}
    return {"__h": handle(v)}


_TAGS = {
    "__c": lambda x, h: complex(float(x[0]), float(x[1])),
    "__b": lambda x, h: bytes.fromhex(x),
    "__ba": lambda x, h: bytearray.fromhex(x),
    "__r": lambda x, h: range(int(x[0]), int(x[1]), int(x[2])),
    "__h": lambda x, h: h(int(x)),
    "__t": lambda x, h: tuple(_dec(i, h) for i in x),
    "__d": lambda x, h: {_dec(k, h): _dec(v, h) for k, v in x},
    "__s": lambda x, h: {_dec(i, h) for i in x},
    "__f": lambda x, h: frozenset(_dec(i, h) for i in x),
    "__i": lambda x, h: iter([_dec(i, h) for i in x]),
}


def _dec(v, handle):
    """The value tagged JSON ``v`` stands for; ``handle(i)`` gives the object behind handle ``i``."""
    if isinstance(v, list):
        return [_dec(x, handle) for x in v]
    if isinstance(v, dict):
        if len(v) != 1 or next(iter(v)) not in _TAGS:
            raise ValueError("malformed value between the solution and its tests")
        tag, x = next(iter(v.items()))
        return _TAGS[tag](x, handle)
    if v is None or type(v) in (bool, int, float, str):
        return v
    raise ValueError("malformed value between the solution and its tests")


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
    """Run the solution, say it is ready, then answer requests until the tests close the channel."""
    send, receive = _channel(read_fd, write_fd)
    exit_now = os._exit
    source = _read("program.py")
    _install_guard(os.path.realpath(os.getcwd()))
    namespace = {"__name__": "__lopa_sandbox__", "__builtins__": builtins}
    objects, ids = [], {}  # handle -> object, id(object) -> handle (objects keeps every handed-out object alive)

    def handle(obj):
        if id(obj) not in ids:
            ids[id(obj)] = len(objects)
            objects.append(obj)
        return ids[id(obj)]

    def resolve(i):
        if not 0 <= i < len(objects):
            raise ValueError(f"no object {i} in the solution")
        return objects[i]

    def answer(request):
        op = request["op"]
        if "h" in request:
            target = resolve(int(request["h"]))
        elif request.get("name") in namespace:
            target = namespace[request["name"]]
        else:
            raise NameError(f"name {request.get('name')!r} is not defined by the solution")
        if op == "call":
            return target(*_dec(request["args"], resolve), **_dec(request["kwargs"], resolve))
        if op == "getattr":
            return getattr(target, str(request["attr"]))
        if op == "setattr":
            return setattr(target, str(request["attr"]), _dec(request["value"], resolve))
        raise ValueError(f"unknown request {op!r}")

    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException as e:  # noqa: BLE001 - reported to the tests process, which decides the verdict
        _print_exc()
        send({"failed": f"{type(e).__name__}: {e}"[:2000]})
        exit_now(EXIT_ERROR)
    send({"ready": True})
    while True:
        try:
            request = receive()
        except RuntimeError:
            exit_now(0)  # the tests are done
        try:
            reply = {"ok": _enc(answer(request), handle)}
        except BaseException as e:  # noqa: BLE001 - the test sees the exception
            reply = {"raise": type(e).__name__, "message": str(e)[:2000]}
        _flush()
        send(reply)


def _run_tests(read_fd, write_fd):
    """Run the task's tests against proxies of its entry points; the exit status is the verdict."""
    send, receive = _channel(read_fd, write_fd)
    exit_now = os._exit
    spec = json.loads(_read("tests.json"))
    _install_guard(os.path.realpath(os.getcwd()))
    first = receive()
    if "failed" in first:
        sys.stderr.write(f"the solution failed before its tests ran: {first['failed']}\n")
        exit_now(EXIT_ERROR)
    remotes = {}  # handle -> its one proxy, so that identity holds across replies

    def remote(i):
        if i not in remotes:
            remotes[i] = Remote(i)
        return remotes[i]

    def no_handle(v):
        raise TypeError(f"a {type(v).__name__} cannot be passed to the solution (plain data only)")

    def enc(v):
        return _enc(v, lambda x: x._lopa_handle if type(x) is Remote else no_handle(x))

    def request(message):
        send(message)
        reply = receive()
        if "ok" in reply:
            return _dec(reply["ok"], remote)
        name, message = str(reply.get("raise")), str(reply.get("message", ""))
        kind = getattr(builtins, name, None) if name not in _NOT_RERAISED else None
        error = None
        if isinstance(kind, type) and issubclass(kind, Exception):
            try:
                error = kind(message)
            except Exception:  # noqa: BLE001 - an exception type that needs other arguments
                error = None
        raise error or RuntimeError(f"{name}: {message}")

    class Remote:
        """An object of the solution: attributes and calls go to it; no truth value, equal only to itself."""

        __slots__ = ("_lopa_handle",)

        def __init__(self, i):
            object.__setattr__(self, "_lopa_handle", i)

        def __getattr__(self, attr):
            return request({"op": "getattr", "h": self._lopa_handle, "attr": attr})

        def __setattr__(self, attr, value):
            request({"op": "setattr", "h": self._lopa_handle, "attr": attr, "value": enc(value)})

        def __call__(self, *args, **kwargs):
            return request({"op": "call", "h": self._lopa_handle, "args": enc(list(args)), "kwargs": enc(kwargs)})

        def __bool__(self):
            raise TypeError("an object of the solution has no truth value in its tests (compare plain values)")

        def __repr__(self):
            return f"<object #{self._lopa_handle} of the solution>"

    def proxy(name):
        def call(*args, **kwargs):
            return request({"op": "call", "name": name, "args": enc(list(args)), "kwargs": enc(kwargs)})

        call.__name__ = call.__qualname__ = name
        return call

    proxies = {name: proxy(name) for name in spec["entry_points"]}
    namespace = {"__name__": "__lopa_tests__", "__builtins__": builtins}
    for name in spec["modules"]:  # standard-library modules the tests use without importing them
        try:  # noqa: SIM105 - contextlib would be one more import on every run
            namespace[name] = __import__(name)
        except ImportError:
            pass
    namespace.update(proxies)
    code = _run(spec["context"], "context.py", namespace) if spec["context"] else 0
    if code == 0:
        namespace.update(proxies)  # the entry points are the solution's, whatever the context defined
        code = _run(spec["tests"], "tests.py", namespace)
    _flush()
    exit_now(code)


def _split_main(role, read_fd, write_fd):
    _quiet_stdin()
    if role == "solution":
        _serve_solution(read_fd, write_fd)
    else:
        _run_tests(read_fd, write_fd)
