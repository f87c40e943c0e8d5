"""A block-diffusion model's decoders on the bundled task, in the exact block-causal loop of training's evaluator.

``python scripts/block_evaluate.py MODEL [--n N] [--decoders ...]``: MODEL is ``lopa-tiny-block`` or a directory
written by ``lopa train --family sdar``. Prints one JSON line per decoder row (accuracy, well-formedness, TPF) and
the AUP of each family. The engine's own table is ``lopa bench --model MODEL``; this loop keeps no cache and is
what ``lopa train --family sdar`` validates with (:mod:`lopa.tiny.block_evaluate`).
"""

from __future__ import annotations

import argparse
import json

import torch

from lopa.checkpoint.hub import resolve_model
from lopa.checkpoint.loader import load_checkpoint
from lopa.metrics import aup
from lopa.tiny import task
from lopa.tiny.block_data import BlockLayout
from lopa.tiny.block_evaluate import SWEEP, score


def main(argv: list[str] | None = None) -> int:
    """``python scripts/block_evaluate.py MODEL``: a block model's rows on the test split (one JSON line each)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("model", help="a block model: lopa-tiny-block or a directory written by lopa train --family sdar")
    p.add_argument("--n", type=int, default=400, help="test problems (default: 400)")
    p.add_argument("--split", default="test", choices=("test", "validation"))
    p.add_argument("--decoders", nargs="+", default=list(SWEEP), choices=list(SWEEP))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(resolve_model(args.model))
    gen, cfg = ckpt.generation_config, ckpt.config
    tok = ckpt.tokenizer
    layout = BlockLayout(32, int(gen["max_new_tokens"]), int(cfg.block_size), cfg.eos_token_id, cfg.mask_token_id)
    problems = task.fixed_set(args.split, args.n)

    def encode(text: str) -> list[int]:
        return tok.encode(text)

    rows = {}
    for name in args.decoders:
        tau, extra, k = SWEEP[name]
        rows[name] = score(ckpt.model, problems, encode, tok.decode, layout, tau, 64, extra_fill=extra, branches=k)
        print(json.dumps({"decoder": name, **rows[name]}), flush=True)
    y_max = 100 * max(r["accuracy"] for r in rows.values())
    for family, members in (
        ("threshold (tau sweep)", [n for n in SWEEP if n.startswith("threshold@")] + ["threshold"]),
        ("lopa over threshold (k sweep)", ["threshold"] + [n for n in SWEEP if n.startswith("lopa")]),
    ):
        pts = [(rows[m]["tpf"], 100 * rows[m]["accuracy"]) for m in members if m in rows]
        if pts:
            print(json.dumps({"family": family, "aup": round(aup(pts, y_max).value, 2), "points": pts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
