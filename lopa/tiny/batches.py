"""The Dream trainer's batches (``lopa train``): step ``s``'s rows, built in this process or by worker processes.

A step's batch has two parts. The *random* rows (``data.training_batch``: fresh training problems, D2F-style
noise) are a pure function of (seed, step), so they can be built ahead of time by ``--workers`` processes. The
*visited* rows (``trajectory.visited_batch``) are drawn from the pool of states the current weights visit, so
they are drawn here, from the same per-step generator, continued where the random part left it. Both ways give
the same batch bit for bit (a test compares them), so ``--workers`` changes the speed of a run, never its result.

On a GPU the random rows are the bottleneck (about 0.17 ms of Python per problem, 22 ms per step at batch 128,
against a few milliseconds per optimiser step), which is what the workers are for; on a 2-core CPU they only
compete with the forward. Called by ``lopa.tiny.train``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import Tensor

from lopa.tiny import task
from lopa.tiny.data import Layout, training_batch
from lopa.tiny.train_loop import step_sources, text_codec
from lopa.tiny.trajectory import Visited, visited_batch
from lopa.tiny.vocab import build_tokenizer

Batch = dict[str, Tensor]


def visited_rows(step: int, args: Any) -> int:
    """How many of step ``step``'s rows come from the visited pool (0 before ``--on-policy-from``)."""
    return round(args.batch * args.on_policy) if args.on_policy and step >= args.on_policy_from else 0


def random_rows(step: int, args: Any, layout: Layout) -> tuple[Batch, Tensor]:
    """Step ``step``'s random rows, and the state of its generator after drawing them (for the visited part)."""
    rng, gen = step_sources(args.seed, step)
    encode, _ = _codec()
    n = args.batch - visited_rows(step, args)
    vocab = _vocab_size() if getattr(args, "soft_targets", False) else 0
    rows = training_batch(rng, gen, lambda r: task.sample(r, "train"), encode, layout, n, vocab)
    return rows, gen.get_state()


def complete(step: int, args: Any, layout: Layout, rows: Batch, gen_state: Tensor, pool: Visited | None) -> Batch:
    """Add the visited rows to step ``step``'s random rows, drawn with the step's generator from ``gen_state``."""
    n = visited_rows(step, args)
    if not n:
        return rows
    if pool is None:
        raise RuntimeError(f"step {step} needs {n} visited rows but no pool was collected")
    gen = torch.Generator()
    gen.set_state(gen_state)
    extra = visited_batch(pool, layout, gen, n, args.flat_share)
    return {k: torch.cat([rows[k], extra[k]]) for k in rows}


class _Steps(torch.utils.data.Dataset):
    """Random rows of steps ``first`` .. ``stop - 1``, for a DataLoader's workers."""

    def __init__(self, args: Any, layout: Layout, first: int, stop: int) -> None:
        self.args, self.layout, self.first, self.stop = args, layout, first, stop

    def __len__(self) -> int:
        return self.stop - self.first

    def __getitem__(self, i: int) -> tuple[Batch, Tensor]:
        return random_rows(self.first + i, self.args, self.layout)


def random_row_stream(args: Any, layout: Layout, first: int, stop: int) -> Iterator[tuple[Batch, Tensor]]:
    """The random rows of steps ``first`` .. ``stop - 1`` in order: built here (``--workers 0``) or ahead of time
    by ``args.workers`` processes, each a few steps ahead."""
    if not args.workers:
        return (random_rows(step, args, layout) for step in range(first, stop))
    loader = torch.utils.data.DataLoader(
        _Steps(args, layout, first, stop),
        batch_size=None,  # each item is already a whole step
        num_workers=args.workers,
        prefetch_factor=4,
        worker_init_fn=_one_thread,
    )
    return iter(loader)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # a worker builds rows in Python; its own thread pool would only compete


@cache
def _tokenizer() -> Tokenizer:
    """The task's tokenizer, built once per process (workers included)."""
    return build_tokenizer()


def _vocab_size() -> int:
    """The task tokenizer's vocabulary size (the width of soft targets)."""
    return _tokenizer().get_vocab_size()


@cache
def _codec() -> tuple[Any, Any]:
    """The task's text codec."""
    return text_codec(_tokenizer())
