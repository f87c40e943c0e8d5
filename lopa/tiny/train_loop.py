"""What both tiny trainers share (``lopa train``, Dream and ``--family sdar``): the device, the optimiser, the
per-step random sources, the optimiser step, the EMA of the weights, and the progress bookkeeping (tokens, time,
smoothed loss, the progress bar and the JSON-lines log). Each trainer keeps its own batch, forward, loss, saving
and validation.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor, nn
from tqdm import tqdm


def device_for(args: Any) -> torch.device:
    """``--device``: auto (cuda when available), cpu, cuda or cuda:N."""
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def optimizer(model: nn.Module, args: Any) -> torch.optim.AdamW:
    """AdamW (β 0.9 / 0.98) with weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8)


def step_sources(seed: int, step: int) -> tuple[random.Random, torch.Generator]:
    """The random sources of one step's batch: batches are a pure function of (seed, step), so runs resume exactly."""
    return random.Random(seed * 1_000_003 + step), torch.Generator().manual_seed(seed * 1_000_003 + step)


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """Backward, clip the gradient norm to 1, step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


class Ema:
    """An exponential moving average of a model's weights (float32), kept in ``path`` between runs.

    ``update`` after every optimiser step: ``ema = decay * ema + (1 - decay) * weights``, with decay 0 (a copy)
    during the learning-rate warm-up, so the average starts from trained weights.
    """

    def __init__(self, model: nn.Module, path: Path, decay: float) -> None:
        self.path, self.decay = path, decay
        device = next(model.parameters()).device
        if path.is_file():
            self.weights: dict[str, Tensor] = {k: v.to(device) for k, v in load_file(str(path)).items()}
        else:
            self.weights = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    def update(self, model: nn.Module, step: int, warmup: int) -> None:
        decay = self.decay if step >= warmup else 0.0
        with torch.no_grad():
            for k, v in model.state_dict().items():
                self.weights[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu() for k, v in self.weights.items()}, str(self.path.with_suffix(".tmp")))
        self.path.with_suffix(".tmp").replace(self.path)

    def load_into(self, target: nn.Module) -> nn.Module:
        """``target`` (a model of the same architecture) holding the average; returns it."""
        target.load_state_dict(self.weights)
        return target


def text_codec(tok: Tokenizer) -> tuple[Any, Any]:
    """(encode, decode) of the task's text without special tokens."""

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    def decode(token_ids: list[int]) -> str:
        return tok.decode(token_ids, skip_special_tokens=True)

    return encode, decode


class Progress:
    """A run's bookkeeping: ``meta`` (step, seconds, tokens), the smoothed loss, the bar and ``train_log.jsonl``."""

    def __init__(self, meta: dict[str, Any], steps: int, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.log = (out / "train_log.jsonl").open("a", encoding="utf-8")
        self.bar = tqdm(total=steps, initial=meta["step"], desc="train", dynamic_ncols=True)
        self.loss_ema: float | None = None
        self.window_t, self.window_tok = time.perf_counter(), 0

    def done(self, step: int, loss: float, tokens: int, t0: float) -> dict[str, Any]:
        """Count step ``step`` (started at ``t0``, ``tokens`` tokens); returns its log record."""
        meta = self.meta
        meta["step"], meta["tokens"] = step + 1, meta["tokens"] + tokens
        meta["seconds"] += time.perf_counter() - t0
        self.window_tok += tokens
        self.loss_ema = loss if self.loss_ema is None else 0.98 * self.loss_ema + 0.02 * loss
        self.bar.update(1)
        if meta["step"] % 20 == 0:
            now = time.perf_counter()
            self.bar.set_postfix(loss=f"{self.loss_ema:.4f}", tok_s=f"{self.window_tok / (now - self.window_t):,.0f}")
            self.window_t, self.window_tok = now, 0
        return {"step": meta["step"], "loss": round(self.loss_ema, 5), "seconds": round(meta["seconds"], 1)}

    def write(self, record: dict[str, Any]) -> None:
        """Log every 20th step and every validation."""
        if record["step"] % 20 == 0 or "validation" in record:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def close(self) -> None:
        self.bar.close()
        self.log.close()
