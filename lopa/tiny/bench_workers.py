"""``lopa bench`` over several processes: on CPU the decoders are spread over ``--workers`` ``lopa bench``
processes (longest rows first onto the least loaded), whose rows are merged; the progress bar advances by each
finished row's estimated cost (:func:`_cost`), so its ETA counts LoPA's rows as the slow ones.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from typing import Any

import torch
from tqdm import tqdm

from lopa.config import DecodeConfig
from lopa.tiny.bench_rows import Row


def _cost(name: str, cfg: DecodeConfig) -> float:
    """Rough relative cost of a decoder's run: forwards per answer x rows per forward (for splitting the work)."""
    if cfg.decoder == "vanilla":
        tpf = 1.0
    elif cfg.decoder == "lopa":
        tpf = 1.3 + 0.3 * cfg.num_branches
    else:
        tpf = 2.4 if cfg.extra_fill else 1.3
    return cfg.max_new_tokens / tpf * max(cfg.cache_rows, 1)  # rows per forward (vanilla: one, uncached)


def worker_count(args: Any, device: torch.device, n_decoders: int) -> int:
    """Processes to spread the decoders over: 1 with --bp / --tp or on CUDA, else --workers or one per core."""
    if args.emit_answers or args.bp or args.tp != 1:
        return 1
    if args.workers:
        return max(1, min(args.workers, n_decoders))
    if device.type != "cpu":
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), n_decoders))


def run_workers(
    args: Any, names: list[str], table: dict[str, DecodeConfig], block: int, max_new: int, workers: int
) -> list[Row]:
    """Spread the decoders over ``workers`` processes (longest first onto the least loaded); merge their rows."""
    from lopa.errors import LopaError

    groups: list[list[str]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for name in sorted(names, key=lambda n: -_cost(n, table[n])):
        i = load.index(min(load))
        groups[i].append(name)
        load[i] += _cost(name, table[name])
    base = [sys.executable, "-m", "lopa", "bench", "--n", str(args.n), "--json-only", "--emit-answers"]
    base += ["--threads", str(max(1, args.threads)), "--block-size", str(block), "--max-new-tokens", str(max_new)]
    for flag in ("model", "revision", "lora", "device", "dtype", "max_num_seqs", "max_model_len", "problem_seed"):
        value = getattr(args, flag, None)
        if value is not None:
            base += [f"--{flag.replace('_', '-')}", str(value)]
    if args.enforce_eager:
        base.append("--enforce-eager")
    groups = [group for group in groups if group]
    # the bar advances by each finished row's estimated cost, so its ETA weighs LoPA's rows as the slow ones
    bar = tqdm(
        total=round(sum(_cost(n, table[n]) for n in names)),
        desc=f"bench: {len(names)} decoders, {len(groups)} workers",
        bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]",
        disable=args.json_only,
    )
    lock = threading.Lock()

    def relay(stream) -> None:  # a worker's "  name: 12.3s" lines advance the bar; anything else is passed on
        for line in stream:
            done = re.fullmatch(r"  (\S+): [0-9.]+s", line.rstrip("\n"))
            with lock:
                if done and done.group(1) in table:
                    bar.update(round(_cost(done.group(1), table[done.group(1)])))
                    bar.set_postfix_str(done.group(1))
                else:
                    bar.write(line.rstrip("\n"), file=sys.stderr)

    procs: list[subprocess.Popen] = []
    relays: list[threading.Thread] = []
    rows: list[Row] = []
    previous = _exit_on_sigterm()  # a SIGTERM (kill, a job scheduler) unwinds through the cleanup below
    try:
        for group in groups:
            cmd = [*base, "--decoders", *group]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            relays.append(threading.Thread(target=relay, args=(procs[-1].stderr,), daemon=True))
            relays[-1].start()
        for proc in procs:
            out = proc.stdout.read()  # stderr belongs to the relay thread
            if proc.wait() != 0:
                raise LopaError(f"a bench worker process failed (exit {proc.returncode}); see its error above")
            record = json.loads(out.strip().splitlines()[-1])
            rows += [Row(**r) for r in record["rows"]]
    finally:  # a failure, Ctrl-C or SIGTERM leaves no worker behind
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for t in relays:
            t.join(timeout=5)
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return rows


def _exit_on_sigterm() -> Any:
    """Make SIGTERM raise ``SystemExit(143)`` in the main thread (by default it ends the process at once, skipping
    every ``finally``); returns the handler to restore, or None off the main thread (where none can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, _exit)
