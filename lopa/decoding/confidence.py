"""Token choice and confidence of masked positions from their logits (docs/algorithm.md §3).

Pure tensor functions. The mask token is never a candidate (its logit is removed before softmax); softmax
and entropies are computed in fp32 whatever the model dtype. At temperature 0 the chosen token is the argmax
(ties go to the lower id); otherwise it is sampled from a ``torch.Generator`` the caller seeds, so a run is
reproducible for a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CONFIDENCE_KINDS = ("maxprob", "margin", "neg_entropy")
_FP32_MAX = float(torch.finfo(torch.float32).max)
ORDER_TO_CONFIDENCE = {"maskgit_plus": "maxprob", "topk_margin": "margin", "entropy": "neg_entropy"}


@dataclass(frozen=True)
class Sampler:
    """Everything needed to turn logits into (token, p, confidence)."""

    mask_id: int
    confidence: str = "maxprob"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def generator(self, iteration: int, stream: int) -> torch.Generator | None:
        """A generator unique to (seed, iteration, stream); None when decoding greedily.

        Seeding per iteration and per candidate stream (not one running generator) makes sampling independent
        of how candidates are spread over ranks or batched.
        """
        if self.temperature == 0:
            return None
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + iteration * 7919 + stream) % (2**63))
        return g


@dataclass
class Prediction:
    """Per masked position of one branch: chosen token, its probability and its confidence. Each (m,)."""

    positions: Tensor  # absolute positions, ascending, long
    tokens: Tensor  # long
    prob: Tensor  # float32, p[chosen] (what thresholds compare)
    conf: Tensor  # float32, ranking confidence (maxprob | margin | neg_entropy)

    def subset(self, keep: Tensor) -> Prediction:
        return Prediction(self.positions[keep], self.tokens[keep], self.prob[keep], self.conf[keep])


def filtered_probs(logits: Tensor, s: Sampler) -> Tensor:
    """(m, vocab) logits → (m, vocab) fp32 probabilities after mask removal, temperature, top-k and top-p."""
    x = logits.float().clone()
    x[:, s.mask_id] = float("-inf")
    if s.temperature > 0:
        # shift so the best logit is 0 before scaling: a tiny temperature then sends the others to -inf (greedy
        # in the limit) instead of overflowing to inf - inf = nan; 1 / T is capped where fp32 ends
        x = (x - x.max(dim=-1, keepdim=True).values) * min(1.0 / s.temperature, _FP32_MAX)
    if s.top_k > 0 and s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[:, -1:]  # (m, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        drop = cum > s.top_p
        drop[:, 1:] = drop[:, :-1].clone()  # keep the first token that crosses top_p
        drop[:, 0] = False
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return torch.softmax(x, dim=-1)


def confidence_of(probs: Tensor, chosen: Tensor, kind: str) -> Tensor:
    """(m, vocab) probabilities, (m,) chosen ids → (m,) confidence; higher means surer."""
    if kind == "maxprob":
        return probs.gather(-1, chosen[:, None])[:, 0]
    if kind == "margin":
        top2 = torch.topk(probs, 2, dim=-1).values  # (m, 2)
        return top2[:, 0] - top2[:, 1]
    if kind == "neg_entropy":
        return (probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
    raise ValueError(f"unknown confidence kind {kind!r}")


def predict(logits: Tensor, positions: Tensor, s: Sampler, generator: torch.Generator | None = None) -> Prediction:
    """Choose a token for each masked position and measure how sure the model is. logits: (m, vocab)."""
    if logits.shape[0] == 0:
        empty = torch.zeros(0)
        return Prediction(positions, positions.clone(), empty, empty.clone())
    probs = filtered_probs(logits, s)  # (m, vocab)
    if generator is None:
        chosen = probs.argmax(-1)
    else:
        chosen = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(probs.device)
    prob = probs.gather(-1, chosen[:, None])[:, 0]
    conf = prob if s.confidence == "maxprob" else confidence_of(probs, chosen, s.confidence)
    return Prediction(positions.cpu(), chosen.cpu(), prob.cpu(), conf.cpu())


def rank(conf: Tensor) -> Tensor:
    """Indices sorting ``conf`` descending; ties keep the lower index (stable)."""
    return torch.sort(conf, descending=True, stable=True).indices
