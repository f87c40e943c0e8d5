"""Throughput benchmark: aggregate tokens/s of batched decoding on the bundled model, by batch size and decoder.

For every decoder (threshold and lopa k=4 over the checkpoint's recommended settings) and every batch size
(``max_num_seqs``: 1, 4, 16, 64 by default), ``LLM.generate`` decodes the same held-out problems of the
bundled task (``lopa.tiny.task.fixed_set("test", n)``) with continuous batching. Batch 1 is the single-sequence
engine (one prompt after another). Reported per row: aggregate tok/s (all generated tokens / wall time),
p50 / p99 latency (per request, from submission to its last token), TPF (tokens / that sequence's own
forwards, so it compares across batch sizes), accuracy on the task, and the mean batch size each sequence ran
with. Each row also says whether every answer's tokens equal batch 1's, and the tokens per CPU second of this
process (steadier than wall time on a shared machine). Prints a table, then one JSON line.

    python bench/throughput.py                     # 64 prompts, batch 1 4 16 64, threshold and lopa k=4
    python bench/throughput.py --n 16 --batch 1 4  # quicker
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from lopa import LLM, DecodeConfig
from lopa.tiny.task import extract_answer, fixed_set


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def decoders(llm: LLM, branches: int) -> dict[str, DecodeConfig]:
    base = llm.default_config  # the checkpoint's recommendations (block size, max_new_tokens, threshold)
    return {
        "threshold": base.replace(decoder="threshold"),
        f"lopa-k{branches}": base.replace(decoder="lopa", base="threshold", branches=branches),
    }


def measure(llm: LLM, cfg: DecodeConfig, prompts: list[str], answers: list[int]) -> tuple[dict, list[list[int]]]:
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, cfg, raw=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(o.stats.tokens for o in outs)
    latencies = [o.stats.seconds for o in outs]
    row = {
        "tok_s": tokens / wall,
        "wall_s": wall,
        "cpu_s": cpu,  # this process's CPU seconds: on a shared machine, tokens per CPU second is the steadier
        "tok_per_cpu_s": tokens / cpu if cpu > 0 else 0.0,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "tpf": tokens / sum(o.stats.forwards for o in outs),
        "accuracy": sum(extract_answer(o.text) == a for o, a in zip(outs, answers, strict=True)) / len(outs),
        "mean_batch": statistics.fmean(o.stats.batch_size for o in outs),
        "tokens": tokens,
    }
    return row, [o.token_ids + [o.stats.forwards] for o in outs]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled tiny model)")
    p.add_argument("--n", type=int, default=64, help="held-out problems (default: 64)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64], help="max_num_seqs values")
    p.add_argument("--branches", type=int, default=4, help="lopa k (default: 4)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="runs per cell, interleaved; the fastest counts (default: 3)")
    args = p.parse_args()
    torch.set_num_threads(max(1, args.threads))
    problems = fixed_set("test", args.n)
    prompts, answers = [q.prompt for q in problems], [q.answer for q in problems]
    rows = []
    llms = {b: LLM(args.model, device=args.device, max_num_seqs=b) for b in args.batch}
    first = llms[args.batch[0]]
    table = decoders(first, args.branches)
    for name, cfg in table.items():
        best: dict[int, dict] = {}
        answers_of: dict[int, list[list[int]]] = {}
        for b, llm in llms.items():
            llm.generate(prompts[: min(len(prompts), 2 * b)], cfg, raw=True)  # warm-up (allocations, caches)
        for _ in range(max(1, args.repeats)):  # batch sizes interleaved, so a busy machine hurts them alike
            for b, llm in llms.items():
                row, got = measure(llm, cfg, prompts, answers)
                if b not in best or row["tok_s"] > best[b]["tok_s"]:
                    best[b] = row
                answers_of.setdefault(b, got)
                assert got == answers_of[b], "greedy decoding must repeat itself exactly"
        for b in llms:
            best[b].update(decoder=name, batch=b, same_as_first=answers_of[b] == answers_of[args.batch[0]])
            rows.append(best[b])
    gen = first.default_config
    header = {
        "model": first.model_name,
        "n": len(prompts),
        "device": str(first.device),
        "threads": args.threads,
        "block_size": gen.block_size,
        "max_new_tokens": gen.max_new_tokens,
        "threshold": gen.threshold,
    }
    print("  ".join(f"{k}={v}" for k, v in header.items()))
    print(
        f"{'decoder':<10} {'batch':>5} {'tok/s':>8} {'x b1':>6} {'p50 s':>7} {'p99 s':>7} {'TPF':>5} "
        f"{'acc':>5} {'mean b':>6} {'= b1':>5} {'tok/cpu-s':>9} {'x b1':>6}"
    )
    for r in rows:
        b1 = next(x for x in rows if x["decoder"] == r["decoder"])
        print(
            f"{r['decoder']:<10} {r['batch']:>5} {r['tok_s']:>8.0f} {r['tok_s'] / b1['tok_s']:>6.2f} "
            f"{r['p50_s']:>7.3f} {r['p99_s']:>7.3f} {r['tpf']:>5.2f} {r['accuracy']:>5.2f} {r['mean_batch']:>6.1f} "
            f"{str(r['same_as_first']):>5} {r['tok_per_cpu_s']:>9.0f} {r['tok_per_cpu_s'] / b1['tok_per_cpu_s']:>6.2f}"
        )
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    print(json.dumps({"bench": "throughput", **header, "versions": versions, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
