"""The mesh from the command line: ``lopa generate --tp 2`` and ``lopa serve --tp 2`` answer like one process.

``lopa serve --tp 2`` runs as a subprocess (the server becomes rank 0 of the group); a stream the client
abandons leaves the group in step for the next request, and the worker rank ends with the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import psutil

from lopa import LLM, DecodeConfig
from lopa.commands.main import main
from lopa.parallel.process_group import free_port
from tests.parallel.test_tp import TIMEOUT_S, checkpoint


def test_cli_generate_tp2_prints_the_single_process_answer(tmp_path, capsys, monkeypatch, single_thread):
    ckpt = checkpoint(tmp_path, 4, 2)
    monkeypatch.setenv("LOPA_DIST_TIMEOUT", str(TIMEOUT_S))
    flags = ["--decoder", "lopa", "--branches", "2", "--block-size", "4", "--max-new-tokens", "16"]
    assert main(["generate", "--tp", "2", "--model", str(ckpt), "--json", *flags, "hello there"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref = LLM(ckpt).generate("hello there", DecodeConfig(decoder="lopa", branches=2, block_size=4, max_new_tokens=16))
    assert got["token_ids"] == ref[0].token_ids
    assert got["stats"]["forwards"] == ref[0].stats.forwards
    assert main(["generate", "--tp", "0", "--model", str(ckpt), "x"]) == 2
    assert "must be positive" in capsys.readouterr().err


def test_serve_tp2_answers_like_one_process(tmp_path, single_thread):
    ckpt = checkpoint(tmp_path, 4, 2)
    port = free_port()
    flags = ["--decoder", "lopa", "--branches", "2", "--block-size", "4", "--max-new-tokens", "16"]
    cmd = [sys.executable, "-m", "lopa", "serve", "--tp", "2", "--model", str(ckpt), "--port", str(port), *flags]
    env = dict(os.environ, LOPA_DIST_TIMEOUT=str(TIMEOUT_S), OMP_NUM_THREADS="1")
    server = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
    try:
        url, deadline = f"http://127.0.0.1:{port}/v1", time.monotonic() + 240
        while True:
            assert server.poll() is None, "the server exited"
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.5)
        workers = [c.pid for c in psutil.Process(server.pid).children()]
        assert len(workers) == 1
        ref = LLM(ckpt)
        want = DecodeConfig(decoder="lopa", branches=2, block_size=4, max_new_tokens=16)
        want = ref.generate("def add(a, b):", want, raw=True)[0]
        for stream in (False, True):  # twice: the group is in step after the first request
            body = {"model": ckpt.name, "prompt": "def add(a, b):", "max_tokens": 16, "stream": stream}
            r = httpx.post(f"{url}/completions", json=body, timeout=120)
            assert r.status_code == 200
            if stream:
                chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
                assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
            else:
                assert r.json()["choices"][0]["text"] == want.text
                assert r.json()["usage"]["forwards"] == want.stats.forwards
        body = {"model": ckpt.name, "prompt": "def add(a, b):", "max_tokens": 256, "stream": True}
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=120) as r:
            next(r.iter_lines())  # hang up after the first event: rank 0 finishes the request quietly
        body = {"model": ckpt.name, "prompt": "def add(a, b):", "max_tokens": 16}
        assert httpx.post(f"{url}/completions", json=body, timeout=120).json()["choices"][0]["text"] == want.text
    finally:
        server.terminate()
        server.wait(timeout=30)
    deadline = time.monotonic() + 10  # the worker rank sees its parent gone within a heartbeat
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers):
        assert time.monotonic() < deadline, "a worker rank outlived the server"
        time.sleep(0.1)
