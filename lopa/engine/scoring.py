"""Token choice and branch scores from a verification forward's raw logits: the one scoring path of every runner.

Each candidate is a :class:`Row`: its predicted positions, its row of the logits, its sampler and sampling
stream, and (with the logit shift, :mod:`lopa.model.families`) the frozen raw logit that predicts its first position.
:func:`choose_and_score` turns them into per-position predictions and branch scores:

- greedy rows (temperature 0) that share a sampler are chosen together in one pass over all their positions,
  where the logits are, with ONE device-to-host copy; token choice is row-wise, so grouping changes no number;
- sampled rows draw from the seeded CPU generator of their own (seed, iteration, stream), one row at a time, so a
  run is reproducible whatever runner, batch layout or rank computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lopa.decoding.confidence import Prediction, Sampler, confidence_of, filtered_probs, predict
from lopa.decoding.lookahead import branch_score


@dataclass
class Row:
    """One candidate's share of a forward's logits."""

    predict: Tensor  # (m,) absolute positions to predict
    score_mask: Tensor  # (m,) bool, positions that enter the branch score
    stream: int  # sampling stream
    sampler: Sampler
    iteration: int
    logits_row: int  # its row of the (rows, n, vocab) logits; prediction j is at column j
    last: Tensor | None  # (vocab,) frozen raw logit standing in for column 0, or None


def greedy_choice(logits: Tensor, s: Sampler) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy token, its probability and confidence for each row of (m, vocab) logits, computed where the
    logits are; returns host tensors (m,) long, float32, float32 after ONE device-to-host copy."""
    probs = filtered_probs(logits, s)  # (m, vocab) fp32
    chosen = probs.argmax(-1)
    prob = probs.gather(-1, chosen[:, None])[:, 0]
    conf = prob if s.confidence == "maxprob" else confidence_of(probs, chosen, s.confidence)
    host = torch.stack([chosen.double(), prob.double(), conf.double()]).cpu()  # (3, m): exact for ids and fp32
    return host[0].long(), host[1].float(), host[2].float()


def _logits_of(logits: Tensor, rows: list[Row]) -> Tensor:
    """The (M, vocab) logits of the rows' predictions, in order, frozen last logits substituted (a copy)."""
    dev = logits.device
    counts = [int(r.predict.numel()) for r in rows]
    which = torch.cat([torch.full((m,), r.logits_row, dtype=torch.long) for r, m in zip(rows, counts, strict=True)])
    column = torch.cat([torch.arange(m) for m in counts])  # (M,)
    picked = logits[which.to(dev), column.to(dev)]  # (M, vocab): only the rows needed
    start = 0
    for r, m in zip(rows, counts, strict=True):
        if r.last is not None and m:
            picked[start] = r.last.to(picked)
        start += m
    return picked


def choose_and_score(logits: Tensor, rows: list[Row]) -> tuple[list[Prediction], list[float]]:
    """Per row: its prediction and its branch score. logits: (rows, n, vocab) raw, already shifted."""
    preds: list[Prediction | None] = [None] * len(rows)
    groups: dict[Sampler, list[int]] = {}
    for i, r in enumerate(rows):
        if r.sampler.temperature == 0:
            groups.setdefault(r.sampler, []).append(i)
        else:
            gen = r.sampler.generator(r.iteration, r.stream)
            preds[i] = predict(_logits_of(logits, [r]), r.predict, r.sampler, gen)
    for sampler, members in groups.items():
        group = [rows[i] for i in members]
        total = sum(int(r.predict.numel()) for r in group)
        if total:
            tokens, prob, conf = greedy_choice(_logits_of(logits, group), sampler)
        else:
            tokens, prob, conf = torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0)
        start = 0
        for i, r in zip(members, group, strict=True):
            sl = slice(start, start + r.predict.numel())
            preds[i] = Prediction(r.predict.cpu(), tokens[sl], prob[sl], conf[sl])
            start = sl.stop
    done = [p for p in preds if p is not None]
    return done, [branch_score(p.conf, r.score_mask) for p, r in zip(done, rows, strict=True)]
