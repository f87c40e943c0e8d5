"""``lopa train``: train the bundled tiny Dream-format dLLM on the word-problem task from scratch.

Objective (D2F style, see ``lopa.tiny.data``): block-wise masks whose ratios never decrease along the answer, a
block-causal attention layout matching the block decoders, cross-entropy on masked answer positions with
Dream's shifted logits. From ``--on-policy-from`` on, a fraction ``--on-policy`` of every batch is drawn from the
states the model's own threshold and D2F decoding visit, filled with the reference answer's tokens or
(``--on-policy-tokens model``) with the model's own and posterior targets (``lopa.tiny.trajectory``; with
``--lopa-trajectories`` also LoPA's own, ``lopa.tiny.lookahead_trajectory``), re-collected
every ``VISIT_EVERY`` steps with the current weights. With ``--soft-targets`` every masked position is trained
toward the task's exact posterior distribution given the row's filled positions (``lopa.tiny.posterior``) instead
of toward one phrasing drawn from it. An exponential
moving average of the weights (``--ema``; with ``--ema-from-init`` it averages from ``--init-from``'s weights
instead of copying through the warm-up) is what is validated and exported; the best validation so far is also
written to ``DIR/best``.
Random batches are a pure function of (seed, step) (``lopa.tiny.batches``; ``--workers`` processes build them
ahead), the visited pool of (seed, step, weights), and the pool in use is saved with the state, so training is
reproducible and a resumed run continues exactly where it stopped.

``--out DIR`` receives the Dream checkpoint (config.json, model.safetensors, tokenizer.json,
generation_config.json: loadable by ``lopa.checkpoint.loader.load_checkpoint``) at every save, plus the training
state in ``DIR/train_state`` (safetensors for weights and optimizer moments, JSON for the step and settings;
never pickle) and a JSON-lines log. Rerunning the same command resumes. Called by ``commands/train.py``.

``lopa train --family sdar`` trains the block-diffusion model instead (SDAR's objective and checkpoint format, an EMA
of the weights exported): :mod:`lopa.tiny.block_train`, which shares this module's arguments and state format.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor

from lopa.checkpoint.loader import load_checkpoint
from lopa.checkpoint.save import save_checkpoint
from lopa.errors import ConfigError
from lopa.model.config import ModelConfig
from lopa.model.families import family_named
from lopa.model.transformer import Transformer
from lopa.tiny import task
from lopa.tiny.batches import complete, random_row_stream, visited_rows
from lopa.tiny.data import Layout, answer_logits_idx, encode_rows, masked_loss
from lopa.tiny.evaluate import score
from lopa.tiny.lookahead_trajectory import visit_lookahead
from lopa.tiny.posterior import Phrasings
from lopa.tiny.train_loop import Ema, Progress, device_for, optimizer, optimizer_step, step_sources, text_codec
from lopa.tiny.trajectory import Visited, visit
from lopa.tiny.vocab import build_tokenizer, save_tokenizer, special_ids

VISIT_EVERY = 100  # steps between two collections of visited states
ARCH_KEYS = ("hidden", "layers", "heads", "kv_heads", "intermediate", "block_size", "num_blocks", "max_prompt")
# what else a run's batches, schedule and export follow: a resumed run must keep them to continue exactly
RUN_KEYS = (
    "steps", "lr", "warmup", "weight_decay", "ema", "average_from", "init_from",
    "on_policy", "on_policy_from", "on_policy_tokens", "visit_window", "lookahead", "flat_share", "name_weight",
    "lopa_trajectories", "ema_from_init", "soft_targets", "dead_weight",
)  # fmt: skip
STATE_DIR = "train_state"
AVERAGE_FILE = "average.safetensors"  # float64 sum of the weights at each averaged save; count and step in metadata
EMA_FILE = "ema.safetensors"
POOL_FILE = "visited.safetensors"  # the visited states in use at the last save


def model_config(args: Any, vocab_size: int, ids: dict[str, int], family: str = "dream", **extra: Any) -> ModelConfig:
    """The architecture of a tiny model of ``family`` from the CLI numbers (``extra``: the family's own fields)."""
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise ConfigError("--hidden must be a multiple of --heads, and --heads a multiple of --kv-heads.")
    return family_named(family).make_config(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=256,
        rope_theta=10000.0,
        **ids,
        **extra,
    )


def lr_at(step: int, args: Any) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak at ``--steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def save_state(model: Transformer, opt: torch.optim.Optimizer, meta: dict, out: Path) -> None:
    """Weights, AdamW moments and the step, written atomically enough that a crash leaves the last good state."""
    d = out / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    names = {p: n for n, p in model.named_parameters()}
    moments = {f"{names[p]}::{k}": v.detach().cpu() for p, s in opt.state.items() for k, v in s.items()}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(d / "weights.tmp"))
    save_file({k: v.reshape(-1) if v.dim() == 0 else v for k, v in moments.items()}, str(d / "optim.tmp"))
    (d / "weights.tmp").replace(d / "weights.safetensors")
    (d / "optim.tmp").replace(d / "optim.safetensors")
    (d / "state.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_state(model: Transformer, opt: torch.optim.Optimizer, out: Path, args: Any) -> dict | None:
    """Restore a previous run in ``out`` (None when there is none); refuse a different architecture, seed, batch
    or any of ``RUN_KEYS`` (a run resumed with another schedule or other states would not be the run it claims)."""
    d = out / STATE_DIR
    if not (d / "state.json").is_file():
        return None
    meta = json.loads((d / "state.json").read_text(encoding="utf-8"))
    saved = meta["args"]
    for key in ARCH_KEYS + ("seed", "batch", "family") + RUN_KEYS:
        if key in RUN_KEYS and (key not in saved or not hasattr(args, key)):
            continue  # a state written before the option existed, or a trainer without it
        theirs = saved.get(key, "dream" if key == "family" else None)
        if _same_setting(key, theirs, getattr(args, key)):
            continue
        raise ConfigError(
            f"{out} holds a run with --{key.replace('_', '-')} {theirs}, not {getattr(args, key)}; use the same "
            "settings to resume or a new --out."
        )
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in load_file(str(d / "weights.safetensors")).items()})
    params = dict(model.named_parameters())
    for key, v in load_file(str(d / "optim.safetensors")).items():
        name, k = key.split("::")
        opt.state[params[name]][k] = (v.reshape(()) if k == "step" else v).to(device)
    return meta


def _same_setting(key: str, saved: Any, given: Any) -> bool:
    """Whether a resumed run's ``--key`` matches the saved one (``--init-from``: the same directory, however spelt)."""
    if key == "init_from" and saved and given:
        return Path(saved).resolve() == Path(given).resolve()
    return saved == given


def add_to_average(weights: dict[str, Tensor], step: int, out: Path) -> None:
    """Add ``weights`` (saved at ``step``) to the run's float64 running sum, once: a resumed run that redoes steps
    already summed skips them (batches are a pure function of (seed, step), so the redone weights are the same)."""
    path = out / STATE_DIR / AVERAGE_FILE
    total, count = {}, 0
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            info = f.metadata()
        if int(info["step"]) >= step:
            return
        total, count = load_file(str(path)), int(info["count"])
    summed = {k: v.detach().cpu().double() + total.get(k, 0.0) for k, v in weights.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(summed, str(path.with_suffix(".tmp")), metadata={"count": str(count + 1), "step": str(step)})
    path.with_suffix(".tmp").replace(path)


def averaged_weights(out: Path) -> tuple[dict[str, Tensor], int]:
    """The mean of the summed saves (float32) and how many there were."""
    path = out / STATE_DIR / AVERAGE_FILE
    with safe_open(str(path), framework="pt") as f:
        count = int(f.metadata()["count"])
    return {k: (v / count).float() for k, v in load_file(str(path)).items()}, count


def write_checkpoint(model: Transformer, tok: Tokenizer, layout: Layout, out: Path) -> None:
    """The Dream-format checkpoint directory (what users and ``--model`` load)."""
    gen = {
        **special_ids(tok),
        "block_size": layout.block_size,
        "max_new_tokens": layout.answer_len,
        "decoder": "threshold",
        "threshold": 0.9,
    }
    save_checkpoint(model, out, generation_config=gen)
    save_tokenizer(tok, out)


def init_weights(model: Transformer, source: Path) -> None:
    """``--init-from``: load a Dream checkpoint's weights (safetensors) into ``model``; refuse another architecture."""
    loaded = load_checkpoint(source).model
    ours, theirs = model.config, loaded.config
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    for key in keys + ("num_key_value_heads",):
        if getattr(ours, key) != getattr(theirs, key):
            raise ConfigError(
                f"--init-from {source} has {key} {getattr(theirs, key)}, this run {getattr(ours, key)}; pass the "
                "checkpoint's architecture (--hidden, --layers, ...)."
            )
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in loaded.state_dict().items()})


def check_common_args(args: Any) -> None:
    """The checks both tiny trainers make (Dream here, ``--family sdar`` in ``block_train``)."""
    if args.steps < 1 or args.batch < 1:
        raise ConfigError("--steps and --batch must be >= 1.")
    if not 0.0 <= args.ema < 1.0:
        raise ConfigError(f"--ema must be in [0, 1), got {args.ema}.")
    if args.ema_from_init and not (args.init_from and args.ema):
        raise ConfigError("--ema-from-init needs --init-from DIR and an EMA (--ema > 0).")


def check_args(args: Any) -> None:
    """Refuse settings that cannot train (named errors, nothing written)."""
    check_common_args(args)
    if not 0 <= args.average_from <= args.steps:
        raise ConfigError(f"--average-from must be between 0 and --steps ({args.steps}), got {args.average_from}.")
    if args.average_from and args.ema:
        raise ConfigError("--average-from exports a mean of saves; it needs --ema 0.")
    if not 0.0 <= args.on_policy < 1.0:
        raise ConfigError(f"--on-policy must be in [0, 1), got {args.on_policy}.")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}.")
    if args.lookahead < 0:
        raise ConfigError(f"--lookahead must be >= 0, got {args.lookahead}.")
    if not 0.0 <= args.flat_share < 1.0 or (args.flat_share and not args.lookahead):
        raise ConfigError(f"--flat-share must be in [0, 1) and needs --lookahead, got {args.flat_share}.")
    if args.lookahead and args.on_policy_tokens != "model":
        raise ConfigError("--lookahead needs --on-policy-tokens model (a branch's target is drawn from the posterior).")
    if args.lopa_trajectories and not args.lookahead:
        raise ConfigError("--lopa-trajectories needs --lookahead K (the number of branches LoPA verifies).")
    if args.name_weight <= 0:
        raise ConfigError(f"--name-weight must be > 0, got {args.name_weight}.")
    if args.dead_weight <= 0 or (args.dead_weight != 1.0 and not args.soft_targets):
        raise ConfigError(f"--dead-weight must be > 0 and needs --soft-targets, got {args.dead_weight}.")
    if args.soft_targets and args.on_policy and args.on_policy_tokens != "model":
        raise ConfigError(
            "--soft-targets needs --on-policy-tokens model (or --on-policy 0): reference-filled states "
            "have no posterior draw."
        )
    if args.init_from and not (Path(args.init_from) / "config.json").is_file():
        raise ConfigError(f"--init-from {args.init_from}: no checkpoint there (config.json missing).")


def name_weights(targets: Tensor, name_ids: Tensor, factor: float) -> Tensor | None:
    """(rows, L) loss factors: ``factor`` where the target is one of the task's names, 1 elsewhere; None at 1.

    A name occurs in an answer only in the closing ``{name} has {r} {item} now.``, where it must be copied from the
    question: one answer token in about 180, a signal too rare for v4 to learn the copy in 13,000 steps
    (``scripts/commit_calibration.py``'s copy probe). The target there is certain, so weighting it changes how fast
    the copy is learnt, not what the loss is minimised by."""
    if factor == 1.0:
        return None
    return torch.where(torch.isin(targets, name_ids), factor, 1.0)


def collect(model: Transformer, args: Any, step: int, encode: Any, layout: Layout) -> Visited:
    """The visited states of a batch's worth (``--batch``) of training problems drawn from (seed, step): half of them
    filled in threshold order, half in D2F's (a trained model visits about 22 states per problem). With
    ``--lopa-trajectories`` a third go each way, and the last third follows LoPA over threshold with ``--lookahead``
    branches, every verified candidate recorded (``lopa.tiny.lookahead_trajectory``)."""
    rng, _ = step_sources(args.seed + 7919, step)
    problems = [task.sample(rng, "train") for _ in range(args.batch)]
    lopa = args.lopa_trajectories
    cut = [0, args.batch // 3, 2 * args.batch // 3, args.batch] if lopa else [0, args.batch // 2, args.batch]
    pools = []
    for i, order in enumerate(("threshold", "d2f", "lopa")[: len(cut) - 1]):
        chunk = problems[cut[i] : cut[i + 1]]
        rows = encode_rows(chunk, encode, layout)
        own: dict[str, Any] = {}  # --on-policy-tokens model: the model's tokens, posterior targets
        if args.on_policy_tokens == "model":
            own = {"phrasings": [Phrasings(p, encode, layout.end_id, layout.answer_len) for p in chunk], "rng": rng}
            if args.soft_targets:
                own["soft_vocab"] = model.config.vocab_size
        if order == "lopa":
            pools.append(visit_lookahead(model, *rows, layout, args.lookahead, **own))
            continue
        if own:
            own["lookahead"] = args.lookahead
        pools.append(visit(model, *rows, layout, order, window_attention=args.visit_window, **own))
    return Visited.merge(pools)


def run(args: Any) -> int:
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_for(args)
    out = Path(args.out)
    tok = build_tokenizer()
    ids = special_ids(tok)
    layout = Layout(args.max_prompt, args.block_size, args.num_blocks, ids["eos_token_id"], ids["mask_token_id"])
    torch.manual_seed(args.seed)
    model = Transformer(model_config(args, tok.get_vocab_size(), ids)).to(device)
    opt = optimizer(model, args)
    meta = load_state(model, opt, out, args)
    if meta is None:
        meta = {"step": 0, "seconds": 0.0, "tokens": 0}
        if args.init_from:
            init_weights(model, Path(args.init_from))
    meta["args"] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    ema = Ema(model, out / STATE_DIR / EMA_FILE, args.ema) if args.ema else None
    averaged = Transformer(model.config).to(device)  # holds the EMA for validation and export
    n_params = sum(p.numel() for p in model.parameters())
    print(f"lopa train: {n_params:,} parameters on {device}, step {meta['step']}/{args.steps}, out={out}")

    def exported() -> Transformer:
        return ema.load_into(averaged) if ema is not None else model

    pool_path = out / STATE_DIR / POOL_FILE
    pool = Visited.load(pool_path) if pool_path.is_file() and meta["step"] > 0 else None

    def save_all() -> None:
        save_state(model, opt, meta, out)
        if ema is not None:
            ema.save()
        if pool is not None:
            pool.save(pool_path)
        write_checkpoint(exported(), tok, layout, out)

    encode, decode = text_codec(tok)
    name_ids = torch.tensor([tok.token_to_id(n) for n in task.NAMES], device=device)  # (names,)
    validation = task.fixed_set("validation", args.eval_n) if args.eval_every else []
    progress = Progress(meta, args.steps, out)
    model.train()
    stop = min(args.until, args.steps) if args.until else args.steps
    stream = random_row_stream(args, layout, meta["step"], stop)  # step by step, built ahead with --workers
    while meta["step"] < stop:
        step = meta["step"]
        t0 = time.perf_counter()
        if visited_rows(step, args) and (pool is None or step % VISIT_EVERY == 0):
            pool = collect(model, args, step, encode, layout)
        random_part, gen_state = next(stream)
        batch = complete(step, args, layout, random_part, gen_state, pool)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        rows = batch["ids"].shape[0]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(
                batch["ids"],
                batch["positions"],
                attn_mask=batch["attn_mask"],
                logits_idx=answer_logits_idx(rows, layout, device),
            )  # (rows, answer_len, vocab)
        weight = name_weights(batch["targets"], name_ids, args.name_weight)
        soft = batch.get("soft")  # (rows, answer_len, vocab) with --soft-targets
        loss = masked_loss(
            logits, batch["targets"], batch["loss_mask"], layout, batch["flat"], weight, soft, args.dead_weight
        )
        optimizer_step(model, opt, loss)
        if ema is not None:
            ema.update(model, step, 0 if args.ema_from_init else args.warmup)
        record = progress.done(step, loss.item(), rows * layout.length, t0)
        if meta["step"] % args.save_every == 0 or meta["step"] == stop:
            regular = meta["step"] % args.save_every == 0 or meta["step"] == args.steps  # not an --until stop
            if args.average_from and meta["step"] >= args.average_from and regular:
                add_to_average(model.state_dict(), meta["step"], out)
            save_all()
        if args.eval_every and meta["step"] % args.eval_every == 0:
            record["validation"] = score(exported(), validation, encode, decode, layout)
            progress.bar.write(f"step {meta['step']}: validation {record['validation']}")
            best = meta.get("best")
            if best is None or record["validation"]["accuracy"] >= best["validation"]["accuracy"]:
                meta["best"] = {"step": meta["step"], "validation": record["validation"]}
                write_checkpoint(exported(), tok, layout, out / "best")
                save_all()  # the state must hold the new best
        progress.write(record)
    progress.close()
    if meta["step"] < args.steps:
        print(f"stopped at step {meta['step']}/{args.steps}; rerun the same command to resume")
        return 0
    final = exported()
    if args.average_from:
        weights, count = averaged_weights(out)
        final = copy.deepcopy(model)  # the run's state keeps the last step's weights; the export is the mean
        final.load_state_dict(weights)
        write_checkpoint(final, tok, layout, out)
        meta["averaged_saves"] = count
        print(f"exported the mean of {count} saves from step {args.average_from} to {args.steps}")
        if validation:
            meta["validation_averaged"] = score(final, validation, encode, decode, layout)
            print(f"validation of the mean: {meta['validation_averaged']}")
    if args.test_n:
        meta["test"] = score(final, task.fixed_set("test", args.test_n), encode, decode, layout)
        print(f"test ({args.test_n} problems, greedy, threshold 0.9): {meta['test']}")
    if args.average_from or args.test_n:
        save_state(model, opt, meta, out)  # the last step's weights, with the export's scores in its meta
    tokens_per_s = meta["tokens"] / max(meta["seconds"], 1e-9)
    print(f"done: {meta['step']} steps, {meta['seconds'] / 60:.1f} min training, {tokens_per_s:,.0f} tok/s -> {out}")
    return 0
