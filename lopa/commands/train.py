"""``lopa train``: train the bundled tiny dLLM from scratch (:mod:`lopa.tiny.train`)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory: checkpoint + resumable training state")
    p.add_argument(
        "--family",
        choices=("dream", "sdar"),
        default="dream",
        help="dream (default): the bidirectional Dream model; sdar: the block-diffusion model (SDAR objective, "
        "block-causal attention, no logit shift; lopa.tiny.block_train)",
    )
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the validated and exported weights (0 = off)")
    p.add_argument(
        "--on-policy",
        type=float,
        default=0.5,
        help="dream: fraction of each batch drawn from the states the model's own threshold and D2F decoding visit, "
        "with the reference tokens (lopa.tiny.trajectory; 0 = off; default: 0.5)",
    )
    p.add_argument(
        "--on-policy-from", type=int, default=500, metavar="STEP", help="dream: first step with visited states"
    )
    p.add_argument(
        "--on-policy-tokens",
        choices=("reference", "model"),
        default="reference",
        help="dream: what the visited states' filled positions hold: the reference answer's tokens (default) or the "
        "model's own, with targets drawn from the task's exact posterior (lopa.tiny.posterior)",
    )
    p.add_argument(
        "--visit-window",
        action="store_true",
        help="dream: the D2F trajectories' blocks in flight see each other, as in the engine's window (default: "
        "block-causal)",
    )
    p.add_argument(
        "--lookahead",
        type=int,
        default=0,
        metavar="K",
        help="dream, with --on-policy-tokens model: also train on one LoPA branch of every visited state (an extra "
        "fill at a j-th most confident position, j <= K); branches no answer agrees with get a flat target (0 = off)",
    )
    p.add_argument(
        "--lopa-trajectories",
        action="store_true",
        help="dream, with --lookahead K: a third of the visited problems follow LoPA over threshold with K branches, "
        "and every candidate its verification sees is a training state (lopa.tiny.lookahead_trajectory)",
    )
    p.add_argument(
        "--flat-share",
        type=float,
        default=0.0,
        metavar="F",
        help="dream, with --lookahead: the share of the visited rows drawn from the branches no answer agrees with "
        "(default: 0, drawn like any state)",
    )
    p.add_argument(
        "--name-weight",
        type=float,
        default=1.0,
        metavar="W",
        help="dream: factor on the loss where the target is the person's name, which the closing '{name} has ...' "
        "copies from the question (default: 1, plain cross-entropy)",
    )
    p.add_argument(
        "--soft-targets",
        action="store_true",
        help="dream: train every masked position toward the task's exact posterior distribution given the row's "
        "filled positions (lopa.tiny.posterior), instead of toward one phrasing drawn from it (default: off)",
    )
    p.add_argument(
        "--dead-weight",
        type=float,
        default=1.0,
        metavar="W",
        help="dream, with --soft-targets: factor on the loss where the model's most likely token has posterior 0, "
        "a fill no correct answer can follow (default: 1, no factor)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="DIR",
        help="dream: start from this checkpoint's weights (same architecture) instead of a random initialisation",
    )
    p.add_argument(
        "--ema-from-init",
        action="store_true",
        help="dream, with --init-from: the EMA starts at the start weights and averages from the first step (default: "
        "it copies the weights through the warm-up, as from a random initialisation)",
    )
    p.add_argument("--steps", type=int, default=4000, help="total optimizer steps (default: 4000)")
    p.add_argument("--until", type=int, default=0, help="stop after this step for now; rerun to resume (0 = --steps)")
    p.add_argument("--batch", type=int, default=32, help="problems per step (default: 32)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    p.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (default: 200)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: 0.05)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (default: 128)")
    p.add_argument("--layers", type=int, default=4, help="transformer layers (default: 4)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default: 4)")
    p.add_argument("--intermediate", type=int, default=384, help="MLP inner size (default: 384)")
    p.add_argument("--block-size", type=int, default=32, help="positions per answer block (default: 32)")
    p.add_argument("--num-blocks", type=int, default=2, help="answer blocks per row (default: 2)")
    p.add_argument("--max-prompt", type=int, default=32, help="prompt room in tokens (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and data (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default)")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="dream: processes that build the random rows of the next steps ahead (the same batches, faster on a "
        "GPU; default: 0, built in the training process)",
    )
    p.add_argument("--save-every", type=int, default=250, help="write checkpoint + state every N steps")
    p.add_argument(
        "--average-from",
        type=int,
        default=0,
        metavar="STEP",
        help="dream, with --ema 0: export the mean of the weights saved every --save-every steps from STEP to the "
        "end (0 = the last step's weights)",
    )
    p.add_argument("--eval-every", type=int, default=500, help="validation accuracy every N steps (0 = off)")
    p.add_argument("--eval-n", type=int, default=200, help="validation problems per evaluation (default: 200)")
    p.add_argument("--test-n", type=int, default=600, help="test problems scored at the end (0 = skip)")


def run(args: argparse.Namespace) -> int:
    if args.family == "sdar":  # the block-diffusion model (SDAR's objective)
        from lopa.tiny.block_train import run as run_block_train

        return run_block_train(args)
    from lopa.tiny.train import run as run_train

    return run_train(args)
