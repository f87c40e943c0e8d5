"""The task's exact posterior over answers given a partial one: which phrasings fit, and a uniform draw of one.

An answer of ``lopa.tiny.task`` is a chain of *segments*, each one of a few fixed token strings: the start, an
opener, per operation a filler (from the second on) and a step, a closing; then the end token and the end/pad tail
up to the answer's room (``lopa.tiny.data.encode_rows``). Wordings are drawn uniformly and independently, so given
some answer positions already fixed, every phrasing that agrees with them is equally likely: the posterior is
uniform over the consistent phrasings. :class:`Phrasings` counts them with a left-to-right pass over (segment,
offset) and draws one uniformly by walking back, in O(segments × offsets × choices) rather than over the up to
38,880 phrasings of a three-operation problem.

:meth:`Phrasings.marginals` gives the posterior's per-position distributions (a forward-backward pass over the same
lattice), the expectation of the one-hot draw; :func:`soft_targets` stacks them as training targets
(``lopa train --soft-targets``).

Used by ``lopa.tiny.trajectory`` for visited states whose filled positions hold the model's own tokens: such a
state need not agree with the reference answer, and its training target is a phrasing drawn from this posterior.
``tests/tiny/test_posterior.py`` checks both against enumerating every wording with ``task.render``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from lopa.tiny import task
from lopa.tiny.task import Problem

T = TypeVar("T")
FREE = -1  # a position not fixed yet (the caller's mask id is mapped to this)


def segments(p: Problem, encode: Callable[[str], list[int]]) -> list[list[list[int]]]:
    """Token strings of every segment of ``p``'s answers: segment -> choices -> ids (an empty choice is [])."""

    def enc(text: str) -> list[int]:
        return encode(" " + text) if text else []

    out = [[enc(task.START.format(v=p.start, item=p.item))], [enc(o) for o in task.OPENERS]]
    value = p.start
    for j, (symbol, n) in enumerate(p.ops):
        if j:
            out.append([enc(f) for f in task.FILLERS])
        forms = range(len(task.ADD_STEPS))
        out.append([enc(task._step_text(symbol, form, value, n)) for form in forms])
        value += n if symbol == "+" else -n
    out.append([enc(c.format(r=value, name=p.name, item=p.item)) for c in task.CLOSINGS])
    return out


class Phrasings:
    """The answers of one problem in a row of ``room`` answer positions (answer, end token, end/pad tail)."""

    def __init__(self, p: Problem, encode: Callable[[str], list[int]], end_id: int, room: int) -> None:
        self.segments = segments(p, encode)
        self.end_id = end_id
        self.room = room

    def _forward(self, fixed: Sequence[int]) -> list[dict[int, int]]:
        """ways[s][o]: phrasings of segments < s that agree with ``fixed`` and end at offset o."""
        ways: list[dict[int, int]] = [{0: 1}]
        for choices in self.segments:
            nxt: dict[int, int] = {}
            for o, w in ways[-1].items():
                for ids in choices:
                    e = o + len(ids)
                    if e < self.room and _agrees(fixed, o, ids):
                        nxt[e] = nxt.get(e, 0) + w
            ways.append(nxt)
        return ways

    def _tail_ok(self, fixed: Sequence[int]) -> list[bool]:
        """tail_ok[o]: every fixed position from o on holds the end token (o = where the answer text ends)."""
        ok = [True] * (self.room + 1)
        for o in range(self.room - 1, -1, -1):
            ok[o] = ok[o + 1] and fixed[o] in (FREE, self.end_id)
        return ok

    def count(self, fixed: Sequence[int]) -> int:
        """How many phrasings agree with ``fixed`` (room ids, ``FREE`` where not fixed)."""
        tail = self._tail_ok(fixed)
        return sum(w for o, w in self._forward(fixed)[-1].items() if tail[o])

    def _backward(self, fixed: Sequence[int], tail: list[bool]) -> list[dict[int, int]]:
        """back[s][o]: completions of segments >= s from offset o that agree with ``fixed``, the tail included."""
        back: list[dict[int, int]] = [{} for _ in self.segments] + [{o: 1 for o in range(self.room) if tail[o]}]
        for s in range(len(self.segments) - 1, -1, -1):
            after = back[s + 1]
            for o in range(self.room):
                w = sum(
                    after.get(o + len(ids), 0)
                    for ids in self.segments[s]
                    if o + len(ids) < self.room and _agrees(fixed, o, ids)
                )
                if w:
                    back[s][o] = w
        return back

    def marginals(self, fixed: Sequence[int]) -> list[dict[int, float]] | None:
        """Per position, the posterior probability of each token given ``fixed``: the share of the agreeing
        phrasings that hold it there (the expectation of :meth:`sample`'s one-hot draw); None when no phrasing
        agrees. A forward-backward pass over (segment, offset): O(segments x offsets x choices)."""
        tail = self._tail_ok(fixed)
        ways, back = self._forward(fixed), self._backward(fixed, tail)
        total = sum(w for o, w in ways[-1].items() if tail[o])
        if not total:
            return None
        counts: list[dict[int, int]] = [{} for _ in range(self.room)]
        for s, choices in enumerate(self.segments):
            after = back[s + 1]
            for o, w in ways[s].items():
                for ids in choices:
                    e = o + len(ids)
                    if e < self.room and (b := after.get(e, 0)) and _agrees(fixed, o, ids):
                        for k, t in enumerate(ids):
                            counts[o + k][t] = counts[o + k].get(t, 0) + w * b
        for o, w in ways[-1].items():  # the end token and the end/pad tail after the answer's text
            if tail[o]:
                for j in range(o, self.room):
                    counts[j][self.end_id] = counts[j].get(self.end_id, 0) + w
        return [{t: c / total for t, c in pos.items()} for pos in counts]

    def sample(self, fixed: Sequence[int], rng: random.Random) -> list[int] | None:
        """A phrasing drawn uniformly from those that agree with ``fixed``, as ``room`` ids with its end/pad tail;
        None when none does."""
        ways = self._forward(fixed)
        tail = self._tail_ok(fixed)
        ends = [(o, w) for o, w in ways[-1].items() if tail[o]]
        if not ends:
            return None
        o = _pick(ends, rng)
        parts: list[list[int]] = []
        for s in range(len(self.segments) - 1, -1, -1):  # walk back: a choice that ends at o, weighted by its ways
            options = [
                (ids, w)
                for ids in self.segments[s]
                if (w := ways[s].get(o - len(ids), 0)) and _agrees(fixed, o - len(ids), ids)
            ]
            ids = _pick(options, rng)
            parts.append(ids)
            o -= len(ids)
        answer = [t for ids in reversed(parts) for t in ids]
        return answer + [self.end_id] * (self.room - len(answer))


def soft_targets(phrasings: Sequence[Phrasings], fixed_rows: Sequence[Sequence[int]], vocab: int) -> Tensor:
    """(n, room, vocab) float32: row i's posterior distribution at each of its ``FREE`` positions given
    ``fixed_rows[i]`` (room ids, ``FREE`` where not fixed); zeros at fixed positions and in a row that no phrasing
    agrees with (such a row has no target: its loss is the caller's, a flat one for a dead branch)."""
    if len(phrasings) != len(fixed_rows):
        raise ValueError(f"{len(phrasings)} phrasings for {len(fixed_rows)} rows")
    room = phrasings[0].room if phrasings else 0
    index: list[tuple[int, int, int]] = []  # (row, position, token) of every nonzero entry
    value: list[float] = []
    for i, (phr, fixed) in enumerate(zip(phrasings, fixed_rows, strict=True)):
        dist = phr.marginals(fixed)
        for j, pos in enumerate(dist or []):
            if fixed[j] == FREE:
                index.extend((i, j, t) for t in pos)
                value.extend(pos.values())
    out = torch.zeros(len(fixed_rows), room, vocab)
    if index:
        out[tuple(torch.tensor(index).T)] = torch.tensor(value)
    return out


def _agrees(fixed: Sequence[int], start: int, ids: list[int]) -> bool:
    """``ids`` placed at ``start`` agrees with every fixed position it covers."""
    return all(fixed[start + k] in (FREE, t) for k, t in enumerate(ids))


def _pick(options: list[tuple[T, int]], rng: random.Random) -> T:
    """An item drawn with probability proportional to its weight."""
    r = rng.randrange(sum(w for _, w in options))
    for item, w in options:
        r -= w
        if r < 0:
            return item
    raise AssertionError("weights changed under the draw")
