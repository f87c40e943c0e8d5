"""Server load benchmark: 1, 4 and 16 concurrent ``openai`` clients against one ``lopa serve`` on loopback.

Starts ``python -m lopa serve`` (the bundled model unless ``--model``) as a subprocess on 127.0.0.1 and a free
port, waits for ``/health``, then for each concurrency sends the same held-out problems of the bundled task
(``lopa.tiny.task.fixed_set("test", n)``) through ``/v1/completions``, each client taking the next
prompt when its previous answer is back; each client is its own process (one interpreter lock per client).
Concurrency 1 is the sequential run. Reported per row: aggregate
completion tokens/s (all tokens / wall time), p50 / p99 request latency, accuracy, and the speedup over the
sequential run, and where the time goes: the server's and the clients' CPU seconds (same machine) and the
server's tokens per CPU second. Bounded: ``--n`` requests per row, a per-request timeout, and the server is
stopped at the end. Prints a table, then one JSON line.

    python bench/serve_load.py                          # 64 requests, concurrency 1 4 16, lopa k=4
    python bench/serve_load.py --n 16 --decoder threshold
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

from lopa.tiny.task import extract_answer, fixed_set

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lopa", "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    cmd += ["--max-num-seqs", str(args.max_num_seqs), "--queue-limit", str(max(64, args.n))]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"lopa serve exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"lopa serve did not answer /health within {args.start_timeout}s")


def _client(url: str, model: str, prompts: list[str], body: dict, timeout: float, todo, done, go) -> None:
    """One client process: waits for ``go``, then takes prompt indices from ``todo`` until it is empty."""
    api = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)
    cpu0 = time.process_time()
    go.wait()
    while True:
        try:
            i = todo.get_nowait()
        except queue.Empty:
            break
        t0 = time.perf_counter()
        try:
            r = api.completions.create(model=model, prompt=prompts[i], **body)
        except Exception as e:  # reported, never retried: the benchmark stays bounded
            done.put(("error", f"{type(e).__name__}: {e}"))
            continue
        done.put(("ok", (i, r.choices[0].text, r.usage.completion_tokens, time.perf_counter() - t0)))
    done.put(("cpu", time.process_time() - cpu0))


def run_clients(url: str, model: str, prompts: list[str], concurrency: int, body: dict, timeout: float):
    """Every prompt once, ``concurrency`` client processes at a time (one process each, so the clients do not
    share one interpreter lock): (wall seconds, [(index, text, tokens, seconds)], errors, clients' CPU seconds)."""
    ctx = mp.get_context("fork")  # the clients start from this process's imports, ready to send
    todo, done, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    for i in range(len(prompts)):
        todo.put(i)
    procs = [
        ctx.Process(target=_client, args=(url, model, prompts, body, timeout, todo, done, go))
        for _ in range(concurrency)
    ]
    for p in procs:
        p.start()
    time.sleep(0.5)  # let every client reach the start line
    results, errors, cpu, finished = [], [], 0.0, 0
    t0 = time.perf_counter()
    go.set()
    wall = 0.0
    while finished < concurrency:
        kind, item = done.get(timeout=timeout * len(prompts))
        if kind == "ok":
            results.append(item)
            wall = time.perf_counter() - t0
        elif kind == "error":
            errors.append(item)
        else:
            cpu, finished = cpu + item, finished + 1
    for p in procs:
        p.join(10)
    return wall, sorted(results), errors, cpu


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))] if ordered else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled tiny model)")
    p.add_argument("--n", type=int, default=64, help="requests per concurrency level (default: 64)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--decoder", default="lopa", choices=["threshold", "d2f", "lopa"])
    p.add_argument("--branches", type=int, default=4)
    p.add_argument("--max-num-seqs", type=int, default=16, help="the server's batch size (default: 16)")
    p.add_argument("--threads", type=int, default=2, help="the server's CPU threads (default: 2)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    p.add_argument("--start-timeout", type=float, default=120.0)
    args = p.parse_args()
    problems = fixed_set("test", args.n)
    prompts, answers = [q.prompt for q in problems], [q.answer for q in problems]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    rows = []
    try:
        model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        lopa = {"decoder": args.decoder}
        if args.decoder == "lopa":
            lopa.update(base="threshold", branches=args.branches)
        body = {"extra_body": {"lopa": lopa}}
        run_clients(url, model, prompts[: min(8, len(prompts))], 4, body, args.timeout)  # warm-up
        for c in args.concurrency:
            server_cpu = cpu_seconds(server.pid)
            wall, results, errors, client_cpu = run_clients(url, model, prompts, c, body, args.timeout)
            server_cpu = cpu_seconds(server.pid) - server_cpu
            health = httpx.get(f"{url}/health", timeout=10).json()
            tokens = sum(r[2] for r in results)
            rows.append(
                {
                    "concurrency": c,
                    "requests": len(results),
                    "errors": len(errors),
                    "tok_s": tokens / wall,
                    "wall_s": wall,
                    "p50_s": percentile([r[3] for r in results], 50),
                    "p99_s": percentile([r[3] for r in results], 99),
                    "accuracy": sum(extract_answer(r[1]) == answers[r[0]] for r in results) / len(prompts),
                    "tok_per_server_cpu_s": tokens / server_cpu if server_cpu > 0 else 0.0,
                    "server_cpu_s": server_cpu,  # where the time goes: the server's CPU seconds in this row
                    "client_cpu_s": client_cpu,  # ... and the openai clients' (same machine, same cores)
                    "completed": health.get("completed"),
                    "texts": [r[1] for r in results],
                }
            )
            for e in errors[:3]:
                print(f"  concurrency {c}: {e}", file=sys.stderr)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
    texts = [r.pop("texts") for r in rows]
    for r, t in zip(rows, texts, strict=True):
        r["speedup"] = r["tok_s"] / rows[0]["tok_s"]
        r["same_text_as_first"] = t == texts[0]
    header = {"model": model, "n": args.n, "decoder": args.decoder, "max_num_seqs": args.max_num_seqs}
    header.update(threads=args.threads, branches=args.branches if args.decoder == "lopa" else 0)
    print("  ".join(f"{k}={v}" for k, v in header.items()))
    print(
        f"{'clients':>7} {'tok/s':>8} {'x seq':>6} {'p50 s':>7} {'p99 s':>7} {'acc':>5} {'errors':>6} {'= seq':>5} "
        f"{'wall s':>7} {'srv cpu':>7} {'cli cpu':>7} {'tok/srv-cpu-s':>13} {'x seq':>6}"
    )
    for r in rows:
        print(
            f"{r['concurrency']:>7} {r['tok_s']:>8.0f} {r['speedup']:>6.2f} {r['p50_s']:>7.3f} {r['p99_s']:>7.3f} "
            f"{r['accuracy']:>5.2f} {r['errors']:>6} {str(r['same_text_as_first']):>5} {r['wall_s']:>7.2f} "
            f"{r['server_cpu_s']:>7.2f} {r['client_cpu_s']:>7.2f} {r['tok_per_server_cpu_s']:>13.0f} "
            f"{r['tok_per_server_cpu_s'] / rows[0]['tok_per_server_cpu_s']:>6.2f}"
        )
    print(json.dumps({"bench": "serve_load", **header, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
