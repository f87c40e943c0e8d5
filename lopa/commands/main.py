"""Command line: ``lopa generate | bench | train | eval | sweep | serve``.

Each subcommand is one module of this package exposing ``add_arguments(parser)`` and ``run(args) -> int``; the
feature code they call stays in its own package (``tiny/``, ``eval/``, ``server/``, ``parallel/``). This file
only wires them up and turns :class:`~lopa.errors.LopaError` into a clean message and exit code 2. Only the
module of the command asked for is imported, so ``lopa --help`` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lopa.errors import LopaError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("lopa.commands.generate", "decode prompts and print the text with stats"),
    "bench": ("lopa.commands.bench", "compare the decoders side by side on held-out problems"),
    "train": ("lopa.commands.train", "train the bundled tiny dLLM (Dream format)"),
    "eval": ("lopa.commands.eval", "score a model on a benchmark task (score, TPF, tok/s)"),
    "sweep": ("lopa.commands.sweep", "run a grid of decoder settings and plot the trade-offs"),
    "serve": ("lopa.commands.serve", "OpenAI-compatible HTTP server"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lopa", description="Diffusion LLM inference with LoPA.")
    from lopa import __version__

    parser.add_argument("--version", action="version", version=f"lopa {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the module the user asked for (keeps `lopa --help` fast)
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args._run(args) or 0)
    except LopaError as e:
        print(f"lopa {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
