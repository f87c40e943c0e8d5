"""Sparse mixture-of-experts feed-forward in the Qwen3-MoE layout (SDAR-30B-A3B): the router, the experts, and
which layers are sparse.

A sparse layer's ``mlp`` is a :class:`SparseMoeBlock`: a router ``mlp.gate`` (Linear hidden -> num_experts, no
bias), a softmax over the experts in fp32, the ``num_experts_per_tok`` most probable experts per token (their
probabilities renormalised to sum to 1 when ``norm_topk_prob``), and experts ``mlp.experts.E`` that are SwiGLU
MLPs of width ``moe_intermediate_size`` (``gate_proj`` / ``up_proj`` / ``down_proj``). A token's output is the
routing-weighted sum of its chosen experts' outputs. Parameter names are the checkpoint's own, so a Qwen3-MoE
state dict loads as is. Layer ``i`` is sparse iff ``i not in mlp_only_layers and num_experts > 0 and (i + 1) %
decoder_sparse_step == 0`` (transformers' Qwen3-MoE rule); the others keep the dense MLP of ``intermediate_size``.

The compute is exact in either of two forms, chosen per call:

- sparse (the default): the (token, expert) pairs are sorted by expert and each expert runs once on the tokens
  routed to it, added back with ``index_add_``; no Python loop over tokens, one host sync for the counts;
- dense (inside a CUDA graph capture, where shapes cannot depend on the routing): every expert runs on every
  token and is weighted by its routing weight, which is 0 for the experts a token did not choose. Adding that 0 to
  the output changes nothing, so both forms give the same numbers; the dense one costs ``num_experts /
  num_experts_per_tok`` times the expert FLOPs.

Under tensor parallelism (:mod:`lopa.model.tp`) each expert's gate/up are split by columns and down by rows, the
router is replicated, and the block all-reduces its summed output once (``reduce``), not once per expert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lopa.model.layers import MLP


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts numbers of a checkpoint (Qwen3-MoE field names)."""

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False  # transformers' Qwen3MoeConfig default; SDAR-30B-A3B / Qwen3-30B-A3B set true
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) has the expert block instead of the dense MLP."""
        return (
            layer not in self.mlp_only_layers and self.num_experts > 0 and (layer + 1) % self.decoder_sparse_step == 0
        )


def route(router_logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """Routing weights (N, top_k) in the logits' dtype and expert ids (N, top_k) from router logits (N, E).

    Softmax in fp32 over all experts, then the top-k probabilities (renormalised to sum 1 when ``normalize``).
    """
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float)  # (N, E)
    weights, experts = torch.topk(probs, top_k, dim=-1)  # (N, k) each
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), experts


def combine(
    x: Tensor, weights: Tensor, experts: Tensor, num_experts: int, run: Callable[[int, Tensor], Tensor], dense: bool
) -> Tensor:
    """sum_k weights[n, k] * run(experts[n, k], x[n]) for every token n, added in increasing expert order.

    x: (N, hidden); weights, experts: (N, k); run(e, x_e) is expert e on rows x_e (M, hidden) -> (M, hidden).
    ``dense`` runs every expert on every token (no data-dependent shape: graph-safe); otherwise each expert runs
    on its own tokens only. Both give the same result (see the module docstring).
    """
    out = torch.zeros_like(x)  # (N, hidden)
    if dense:
        for e in range(num_experts):
            w = (weights * (experts == e)).sum(dim=-1)  # (N,): the token's weight for e, 0 when not chosen
            out.add_(run(e, x) * w[:, None])
        return out
    top_k = experts.shape[-1]
    flat = experts.flatten()  # (N * k,)
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
    tokens = order // top_k  # (N * k,) token of each sorted pair
    pair_weights = weights.flatten()[order]  # (N * k,)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # one host sync
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = tokens[start : start + n]  # (n,)
        out.index_add_(0, rows, run(e, x[rows]) * pair_weights[start : start + n, None])
        start += n
    return out


class SparseMoeBlock(nn.Module):
    """Router + experts of one sparse layer; same call signature as :class:`~lopa.model.layers.MLP`."""

    def __init__(self, hidden: int, moe: MoEConfig) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = moe.num_experts_per_tok, moe.norm_topk_prob
        self.gate = nn.Linear(hidden, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(hidden, moe.moe_intermediate_size) for _ in range(moe.num_experts))
        self.reduce: Callable[[Tensor], Tensor] | None = None  # the tensor-parallel all-reduce, bound by tp.py

    def _run(self, e: int, x: Tensor) -> Tensor:
        return self.experts[e](x)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., hidden) -> (..., hidden)."""
        flat = x.reshape(-1, x.shape[-1])  # (N, hidden)
        weights, experts = route(self.gate(flat), self.top_k, self.norm_topk_prob)  # (N, k) each
        dense = x.is_cuda and torch.cuda.is_current_stream_capturing()
        out = combine(flat, weights, experts, len(self.experts), self._run, dense)
        if self.reduce is not None:
            out = self.reduce(out)
        return out.view(x.shape)


def feed_forward(hidden: int, intermediate: int, moe: MoEConfig | None, layer: int) -> nn.Module:
    """The ``mlp`` of layer ``layer``: a :class:`SparseMoeBlock` where ``moe`` makes it sparse, else the dense MLP."""
    if moe is not None and moe.is_sparse(layer):
        return SparseMoeBlock(hidden, moe)
    return MLP(hidden, intermediate)
