"""``lopa train --family sdar``: train the tiny block-diffusion (SDAR-format) model on the word-problem task.

Objective: SDAR's (``lopa.tiny.block_data``): ``[noisy | clean]`` copies under the block-diffusion training
mask, one mask ratio per row, ``1 / p``-weighted cross-entropy on the masked positions, no logit shift. The
model is an SDAR checkpoint (Qwen3 layer: per-head q/k RMSNorm, no attention biases; block-causal attention with
``--block-size`` blocks aligned to absolute position 0). Batches are a pure function of (seed, step) and a rerun
of the same command resumes, as for the Dream model (``lopa.tiny.train``, whose state format this shares).

An exponential moving average of the weights (``--ema``, kept in ``DIR/train_state/ema.safetensors``) is what is
validated and exported. Every validation scores the average with ``lopa.tiny.block_evaluate``'s exact
block-causal threshold loop; the best one so far is also written to ``DIR/best`` (the save to ship), the latest
to ``DIR``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lopa.checkpoint.save import save_checkpoint
from lopa.errors import ConfigError
from lopa.model.config import ModelConfig
from lopa.model.transformer import Transformer
from lopa.tiny import task
from lopa.tiny.block_data import BlockLayout, noisy_logits_idx, training_batch, training_mask, weighted_loss
from lopa.tiny.block_evaluate import score
from lopa.tiny.train import EMA_FILE, STATE_DIR, check_common_args, load_state, lr_at, save_state
from lopa.tiny.train import model_config as tiny_model_config
from lopa.tiny.train_loop import Ema, Progress, device_for, optimizer, optimizer_step, step_sources, text_codec
from lopa.tiny.vocab import build_tokenizer, save_tokenizer, special_ids

RECOMMENDED_THRESHOLD = 0.9


def model_config(args: Any, vocab_size: int, ids: dict[str, int]) -> ModelConfig:
    """The SDAR architecture of the tiny block model from the CLI numbers: Qwen3 (q/k norm, no attention biases),
    block-causal attention in blocks of ``--block-size``."""
    return tiny_model_config(
        args, vocab_size, ids, "sdar", attention_bias=False, block_size=args.block_size, qk_norm=True
    )


def layout_for(args: Any, ids: dict[str, int]) -> BlockLayout:
    """Prompt room ``--max-prompt``, answer room ``--block-size * --num-blocks`` (the recommended max_new_tokens)."""
    return BlockLayout(
        args.max_prompt, args.block_size * args.num_blocks, args.block_size, ids["eos_token_id"], ids["mask_token_id"]
    )


def write_checkpoint(model: Transformer, tok: Tokenizer, layout: BlockLayout, out: Path) -> None:
    """The SDAR-format checkpoint directory, with the recommended decoding settings."""
    gen = {
        **special_ids(tok),
        "block_size": layout.block_size,
        "max_new_tokens": layout.answer_room,
        "decoder": "threshold",
        "threshold": RECOMMENDED_THRESHOLD,
    }
    save_checkpoint(model, out, generation_config=gen)
    save_tokenizer(tok, out)


def run(args: Any) -> int:
    check_common_args(args)
    if args.average_from:
        raise ConfigError("--average-from is for the Dream model; the block model exports an EMA (--ema).")
    if args.workers:
        raise ConfigError("--workers is for the Dream model; the block model builds its batches in-process.")
    if (
        args.on_policy_tokens != "reference"
        or args.visit_window
        or args.lookahead
        or args.flat_share
        or args.lopa_trajectories
    ):
        raise ConfigError(
            "--on-policy-tokens, --visit-window, --lookahead, --lopa-trajectories and --flat-share are for the Dream "
            "model; the block model trains on random rows only."
        )
    if args.init_from:
        raise ConfigError("--init-from is for the Dream model.")
    if args.name_weight != 1.0:
        raise ConfigError("--name-weight is for the Dream model.")
    if getattr(args, "soft_targets", False) or getattr(args, "dead_weight", 1.0) != 1.0:
        raise ConfigError("--soft-targets and --dead-weight are for the Dream model.")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_for(args)
    out = Path(args.out)
    tok = build_tokenizer()
    ids = special_ids(tok)
    layout = layout_for(args, ids)
    torch.manual_seed(args.seed)
    model = Transformer(model_config(args, tok.get_vocab_size(), ids)).to(device)
    opt = optimizer(model, args)
    meta = load_state(model, opt, out, args) or {"step": 0, "seconds": 0.0, "tokens": 0}
    meta["args"] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    ema = Ema(model, out / STATE_DIR / EMA_FILE, args.ema)
    averaged = Transformer(model.config).to(device)  # holds the EMA for validation and export
    n_params = sum(p.numel() for p in model.parameters())
    print(f"lopa train --family sdar: {n_params:,} parameters on {device}, step {meta['step']}/{args.steps}, out={out}")

    encode, decode = text_codec(tok)

    def export(target: Path) -> Transformer:
        ema.load_into(averaged)
        write_checkpoint(averaged, tok, layout, target)
        return averaged

    def save_all() -> None:
        """Weights, optimizer, meta and the EMA of this step, then the exported checkpoint in ``out``."""
        save_state(model, opt, meta, out)
        ema.save()
        export(out)

    validation = task.fixed_set("validation", args.eval_n) if args.eval_every else []
    progress = Progress(meta, args.steps, out)
    attn = training_mask(layout.length, layout.block_size, device)  # (2L - B, 2L - B), the same for every row
    logits_idx = noisy_logits_idx(args.batch, layout, device)  # (rows, L)
    model.train()
    stop = min(args.until, args.steps) if args.until else args.steps
    while meta["step"] < stop:
        step = meta["step"]
        t0 = time.perf_counter()
        rng, gen = step_sources(args.seed, step)
        batch = training_batch(rng, gen, lambda r: task.sample(r, "train"), encode, layout, args.batch)
        batch = {k: v.to(device) for k, v in batch.items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(
                batch["ids"],
                batch["positions"],
                attn_mask=attn[None].expand(args.batch, -1, -1),
                logits_idx=logits_idx,
            )  # (rows, L, vocab): the noisy copy
        loss = weighted_loss(logits, batch["targets"], batch["loss_mask"], batch["ratio"], batch["prompt_mask"])
        optimizer_step(model, opt, loss)
        ema.update(model, step, args.warmup)
        record = progress.done(step, loss.item(), args.batch * (2 * layout.length - layout.block_size), t0)
        if meta["step"] % args.save_every == 0 or meta["step"] == stop:
            save_all()
        if args.eval_every and meta["step"] % args.eval_every == 0:
            ema.load_into(averaged)
            record["validation"] = score(averaged, validation, encode, decode, layout, RECOMMENDED_THRESHOLD)
            progress.bar.write(f"step {meta['step']}: validation (EMA) {record['validation']}")
            best = meta.get("best")
            if best is None or record["validation"]["accuracy"] >= best["validation"]["accuracy"]:
                meta["best"] = {"step": meta["step"], "validation": record["validation"]}
                export(out / "best")
                save_all()  # the state must hold the new best, with the EMA of the same step
        progress.write(record)
    progress.close()
    if meta["step"] < args.steps:
        print(f"stopped at step {meta['step']}/{args.steps}; rerun the same command to resume")
        return 0
    final = export(out)
    if args.test_n:
        meta["test"] = score(final, task.fixed_set("test", args.test_n), encode, decode, layout, RECOMMENDED_THRESHOLD)
        print(f"test of the EMA ({args.test_n} problems, greedy, threshold {RECOMMENDED_THRESHOLD}): {meta['test']}")
        save_state(model, opt, meta, out)
    tokens_per_s = meta["tokens"] / max(meta["seconds"], 1e-9)
    print(f"done: {meta['step']} steps, {meta['seconds'] / 60:.1f} min training, {tokens_per_s:,.0f} tok/s -> {out}")
    return 0
