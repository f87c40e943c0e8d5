"""Slow clients against a real ``lopa serve``: 200 connections that drip their headers a byte at a time do not
make the server unreachable, are closed at the header deadline, and a body that never finishes gets a 408.

The server runs under ``ulimit -n 200``, so before the connection cap the slow connections took every file
descriptor and ``/health`` never answered. Every loop here is bounded and stops by itself.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

SLOW = 200
NOFILE = 200  # the server's soft ulimit -n: fewer descriptors than the slow clients hold
HEADER_TIMEOUT_S = 3.0
BODY_TIMEOUT_S = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _limit_files() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, hard))


@pytest.fixture(scope="module")
def server(tiny_ckpt) -> Iterator[tuple[str, int]]:
    port = _free_port()
    cmd = [sys.executable, "-m", "lopa", "serve", "--model", str(tiny_ckpt), "--port", str(port)]
    cmd += ["--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S)]
    cmd += ["--block-size", "8", "--max-new-tokens", "8", "--log-level", "error"]
    proc = subprocess.Popen(cmd, preexec_fn=_limit_files, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"lopa serve exited with status {proc.returncode}"
            assert time.monotonic() < deadline, "lopa serve did not start"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url, port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096, socket.MSG_DONTWAIT) == b""  # EOF (a 503 answer is read first, then EOF)
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def test_health_answers_while_200_connections_drip_their_headers(server) -> None:
    url, port = server
    slow: list[socket.socket] = []
    try:
        for _ in range(SLOW):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the headers never end
            slow.append(s)
        r = httpx.get(f"{url}/health", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        closed: set[int] = set()
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 15  # bounded: ends by itself
        while len(closed) < SLOW and time.monotonic() < deadline:
            for i, s in enumerate(slow):
                if i in closed:
                    continue
                if _closed_by_server(s):
                    closed.add(i)
                else:
                    with contextlib.suppress(OSError):
                        s.sendall(b"X")  # one more byte of a header line, as slowloris does
            time.sleep(0.5)
        assert len(closed) == SLOW, f"{SLOW - len(closed)} slow connections still open after the header deadline"
    finally:
        for s in slow:
            s.close()
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 8}, timeout=60)
    assert r.status_code == 200, r.text


def test_a_body_that_never_finishes_gets_a_408(server) -> None:
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        s.sendall(head + b'{"prompt": "hi"')
        s.settimeout(BODY_TIMEOUT_S + 20)
        answer = b""
        with contextlib.suppress(TimeoutError, OSError):
            while chunk := s.recv(4096):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer
