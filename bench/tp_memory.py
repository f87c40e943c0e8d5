"""Memory of one tensor-parallel rank against one process: tensor bytes and peak resident memory.

For TP = 1, 2 and 4, a fresh process loads rank 0's shard of a random checkpoint (weights read slice by slice
with positioned reads, never memory-mapped: ``lopa.checkpoint.safetensors_io``), allocates the static cache
(``--rows`` x ``--max-len``) and reports the bytes of its parameters + cache, its peak RSS minus the RSS it had
before loading (interpreter and torch excluded, torch's meta-device code warmed first), and the growth of its
anonymous memory (RssAnon: what the rank owns, without the few file-backed pages the RSS also counts). The
same ratio is then computed from the shapes alone for Dream-7B (no weights needed).

    python bench/tp_memory.py                  # random checkpoint of about 0.3 GB in a temp dir
    python bench/tp_memory.py --model DIR --tp 1,2,4

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import torch

from lopa.model.config import ModelConfig
from lopa.model.families import family_named
from lopa.model.tp import TPShard, shard_model
from lopa.model.transformer import Transformer

DREAM = family_named("dream")
DREAM_7B = DREAM.make_config(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, head_dim=128,
)  # fmt: skip


def measure(model: str, tp: int, rows: int, max_len: int) -> dict[str, float]:
    """Run in a child process: rank 0's shard of ``model`` plus its cache; bytes and peak RSS growth."""
    from lopa import LLM

    with torch.device("meta"):  # the first meta-device init loads ~70 MB of torch code: not the model's memory
        Transformer(DREAM.make_config(8, 8, 8, 1, 1, 1, 8))
    before = psutil.Process().memory_info().rss
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    before_anon = int(status["RssAnon"].split()[0]) * 1024
    llm = LLM(model, shard=TPShard(0, tp) if tp > 1 else None)
    llm.runner.begin(max_len, rows=rows)
    weights = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    for p in llm.model.parameters():
        p.sum()  # every weight page resident, however the loader read it (a mapped page counts only once touched)
    llm.runner.cache.k.fill_(1.0)  # zero-filled pages become resident only when written
    llm.runner.cache.v.fill_(1.0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    anon = int(status["RssAnon"].split()[0]) * 1024  # memory the rank owns (file-backed pages excluded)
    return {
        "weights": weights, "cache": llm.runner.cache.memory_bytes(), "rss_growth": peak - before,
        "anon_growth": anon - before_anon,
    }  # fmt: skip


def shape_bytes(cfg: ModelConfig, tp: int, rows: int, max_len: int, elem: int = 2) -> int:
    """Parameter + cache bytes of one rank, from the shapes (meta device)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if tp > 1:
        shard_model(model, TPShard(0, tp))
    params = sum(p.numel() for p in model.parameters())
    local = model.config
    cache = 2 * local.num_hidden_layers * rows * local.num_key_value_heads * max_len * local.head_dim
    return (params + cache) * elem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tp", default="1,2,4")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, int(args.child), args.rows, args.max_len)))
        return
    model = args.model
    if model is None:
        from lopa.testing import make_tiny_checkpoint

        model = str(
            make_tiny_checkpoint(
                Path(tempfile.mkdtemp()) / "tp-mem-random", hidden_size=768, num_layers=8, num_heads=4,
                num_kv_heads=2, intermediate_size=3072, seed=0,
            )
        )  # fmt: skip
    sizes = [int(t) for t in args.tp.split(",")]
    rows = {}
    for tp in sizes:
        cmd = [sys.executable, __file__, "--model", model, "--child", str(tp)]
        cmd += ["--rows", str(args.rows), "--max-len", str(args.max_len)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[tp] = json.loads(out.strip().splitlines()[-1])
    base = rows[sizes[0]]
    base_total = base["weights"] + base["cache"]
    print(f"model={Path(model).name} cache={args.rows} rows x {args.max_len} positions, fp32, rank 0 of each TP group")
    head = (
        f"{'tp':>3} {'weights MB':>11} {'cache MB':>9} {'tensors/1p':>11} {'peak RSS MB':>12} {'RSS/1p':>7} "
        f"{'anon MB':>8} {'anon/1p':>8}"
    )
    print(head + "\n" + "-" * len(head))
    for tp, r in rows.items():
        r["tensor_ratio"] = (r["weights"] + r["cache"]) / base_total
        r["rss_ratio"] = r["rss_growth"] / base["rss_growth"]
        r["anon_ratio"] = r["anon_growth"] / base["anon_growth"]
        print(
            f"{tp:>3} {r['weights'] / 2**20:>11.1f} {r['cache'] / 2**20:>9.1f} {r['tensor_ratio']:>11.3f} "
            f"{r['rss_growth'] / 2**20:>12.1f} {r['rss_ratio']:>7.3f} {r['anon_growth'] / 2**20:>8.1f} "
            f"{r['anon_ratio']:>8.3f}"
        )
    dream = {tp: shape_bytes(DREAM_7B, tp, args.rows, 4096) / shape_bytes(DREAM_7B, 1, args.rows, 4096) for tp in sizes}
    print("Dream-7B shape, bf16, cache 4 rows x 4096: " + ", ".join(f"tp={t}: {v:.3f}" for t, v in dream.items()))
    print(json.dumps({"bench": "tp_memory", "model": Path(model).name, "rows": rows, "dream_7b_ratio": dream}))


if __name__ == "__main__":
    main()
