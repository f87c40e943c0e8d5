"""An independent reference for every decoder of docs/algorithm.md, slow and written for reading, not speed.

It imports nothing from ``lopa.decoding``, ``lopa.engine`` or ``lopa.model`` (K/V cache included): the transformer is
re-implemented below from §1 (Qwen2 / LLaMA blocks without a causal mask) in plain tensor math on the weights of a
state dict, and the decoders are re-implemented from §2-§3 on plain Python lists. Tests compare the engine with it
token for token and step for step (spawned lookahead positions, scores, winner, fill, forward count).

Semantics, and why it still needs no cache
-----------------------------------------
For these bidirectional models the engine's prefix cache is approximate (§1 "Frozen committed positions"): a
committed position's K/V, and the last logit it contributes, are frozen as computed in the forward that committed
it. A naive full-sequence recompute would therefore NOT equal the engine. The reference keeps no cache between
steps; instead it keeps the *history of commits*: for every forward that committed something, the winner's whole
window (tokens and start position) and how many leading positions it committed. At every step the committed K/V
are rebuilt from scratch by replaying those forwards in order (:func:`replay`): forward ``i`` runs its recorded
window over the K/V rebuilt so far and keeps its first ``n_i`` positions' K/V, plus (shift 1) the raw logit of the
last committed position. So the prefix is by construction "what the winners' windows produce", recomputed every
step; the tests also compare the engine's final cache with :func:`replay` of the reference's history.

Decoding rules implemented (each iteration = exactly one forward per candidate here; the engine batches them):

- State: tokens (prompt, then blocks of ``block_size``), blocks with a state (active / ready / cached) and a
  ``full`` (fully activated) flag, ``end_seen``. The prompt is a ready block. Block states change only at the
  end of an iteration, step (e): fully decoded active blocks with no earlier active block become ready, and a
  forward turns every ready block into cached. So a lookahead token that completes a block leaves it active
  (and in the window) until the winner's step (e).
- Before the forward, on every candidate: threshold appends a fully activated block when it has no active block;
  d2f appends one when the last block's decoded ratio >= tau_add, then fully activates every block whose
  predecessor's ratio >= tau_act. Either only while no end token was filled and fewer than max_new_tokens //
  block_size blocks exist. Decoding ends when the anchor has no active block.
- Window = from the first non-cached block to the end; the forward commits the anchor's ready blocks.
- Prediction of a masked position p: the raw output at p - shift (Dream shift 1, LLaDA 0); when that index is
  before the window, the frozen last logit. Mask logit removed, softmax, greedy token; ``prob`` = p(chosen);
  ``conf`` = maxprob | top1 - top2 | sum p log p.
- Fill (on the winner, from its own prediction): threshold fills every masked position of its first active block
  with prob > tau, else (none) that block's single most confident one; d2f does that in every active block, the
  fallback only in fully activated blocks. Rankings: confidence descending, ties to the lower position.
- LoPA: after the fill, lookahead j (j = 1..k) = winner + the chosen token at its j-th most confident remaining
  predicted position. Score = mean confidence over the branch's predicted positions (``mean``) or over those
  predicted in every candidate (``shared``), 1.0 when there are none. Candidates are ordered lookahead 1..k then
  the anchor; the winner is the first candidate with the highest score (so ties go to lookahead branches in
  creation order, the anchor last).
- Vanilla: answer fully masked, a full forward without cache each step, fill the single most confident position
  (by the order's confidence); stop once every position is decoded, or once the decoded prefix holds an end token
  (the positions after it are never read).

Greedy decoding only (temperature 0; sampling is covered by the engine's own seeded-equivalence tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from lopa.config import DecodeConfig  # read as plain data: which decoder, k, thresholds, confidence kind

SHIFT = {"dream": 1, "llada": 0}  # docs/algorithm.md §1: Dream's logits are shifted, LLaDA's are not
KV = list[tuple[Tensor, Tensor]]  # per layer: K (after RoPE) and V, each (kv_heads, n, head_dim)


# ---- the transformer (§1) ---------------------------------------------------------------------------------------
class ReferenceTransformer:
    """Qwen2 / LLaMA blocks without a causal mask, written out on the weights of ``model.state_dict()``."""

    def __init__(self, model: nn.Module, family: str) -> None:
        cfg = model.config
        if getattr(cfg, "rope_scaling", None):
            raise NotImplementedError("the reference implements plain RoPE only")
        self.w = {k: v.detach().float() for k, v in model.state_dict().items()}
        self.layers, self.heads, self.kv_heads = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim, self.eps, self.theta = cfg.head_dim, cfg.rms_norm_eps, cfg.rope_theta
        self.mask_id, self.shift = cfg.mask_token_id, SHIFT[family]

    def _linear(self, x: Tensor, name: str) -> Tensor:
        bias = self.w.get(f"{name}.bias")
        return F.linear(x, self.w[f"{name}.weight"], bias)

    def _norm(self, x: Tensor, name: str) -> Tensor:
        return self.w[f"{name}.weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rope(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: (heads, L, D) rotated by its absolute positions (L,), half-split layout."""
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angle = positions[:, None].double() * inv_freq[None, :]  # (L, D/2)
        cos, sin = torch.cat([angle, angle], -1).cos().float(), torch.cat([angle, angle], -1).sin().float()
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def forward(self, tokens: list[int], start: int, past: KV | None = None) -> tuple[Tensor, KV]:
        """Run the window ``tokens`` at positions ``start..``, attending to ``past`` (the committed prefix
        [0, start)) and fully to itself. Returns raw logits (L, vocab) and the window's K/V per layer."""
        length, d = len(tokens), self.head_dim
        positions = torch.arange(start, start + length)
        x = self.w["model.embed_tokens.weight"][torch.tensor(tokens)]  # (L, hidden)
        out_kv: KV = []
        for i in range(self.layers):
            p = f"model.layers.{i}"
            h = self._norm(x, f"{p}.input_layernorm")
            q = self._linear(h, f"{p}.self_attn.q_proj").view(length, self.heads, d).transpose(0, 1)  # (H, L, D)
            k = self._linear(h, f"{p}.self_attn.k_proj").view(length, self.kv_heads, d).transpose(0, 1)  # (Hkv, L, D)
            v = self._linear(h, f"{p}.self_attn.v_proj").view(length, self.kv_heads, d).transpose(0, 1)
            q, k = self._rope(q, positions), self._rope(k, positions)
            out_kv.append((k, v))
            keys = torch.cat([past[i][0], k], 1) if past else k  # (Hkv, start + L, D)
            values = torch.cat([past[i][1], v], 1) if past else v
            group = self.heads // self.kv_heads
            keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)  # (H, S, D)
            attn = torch.softmax(q @ keys.transpose(1, 2) / math.sqrt(d), -1)  # (H, L, S): no causal mask
            o = (attn @ values).transpose(0, 1).reshape(length, self.heads * d)
            x = x + self._linear(o, f"{p}.self_attn.o_proj")
            h = self._norm(x, f"{p}.post_attention_layernorm")
            gate, up = self._linear(h, f"{p}.mlp.gate_proj"), self._linear(h, f"{p}.mlp.up_proj")
            x = x + self._linear(F.silu(gate) * up, f"{p}.mlp.down_proj")
        return self._linear(self._norm(x, "model.norm"), "lm_head"), out_kv


@dataclass(frozen=True)
class Commit:
    """One committing forward: the winner's window (tokens from ``start``) and its first ``n`` committed."""

    start: int
    window: tuple[int, ...]
    n: int


def replay(model: ReferenceTransformer, commits: list[Commit]) -> tuple[KV, Tensor | None]:
    """The committed K/V and the frozen last logit, rebuilt from scratch from the history of commits."""
    kv: KV = []
    last = None
    for c in commits:
        assert c.start == (kv[0][0].shape[1] if kv else 0), "commits must tile the prefix"
        logits, window_kv = model.forward(list(c.window), c.start, kv or None)
        new = [(k[:, : c.n], v[:, : c.n]) for k, v in window_kv]
        kv = (
            new
            if not kv
            else [(torch.cat([a, k], 1), torch.cat([b, v], 1)) for (a, b), (k, v) in zip(kv, new, strict=True)]
        )
        last = logits[c.n - 1] if model.shift else None
    return kv, last


# ---- token choice (§3) ------------------------------------------------------------------------------------------
@dataclass
class Guess:
    token: int
    prob: float  # p(chosen): what thresholds compare
    conf: float  # ranking confidence


def guess(logit: Tensor, mask_id: int, kind: str) -> Guess:
    """Greedy choice and confidence from one raw logit row (vocab,)."""
    x = logit.float().clone()
    x[mask_id] = float("-inf")
    p = torch.softmax(x, -1)
    token = int(p.argmax())
    top = torch.topk(p, 2).values
    conf = {"maxprob": p[token], "margin": top[0] - top[1], "neg_entropy": torch.special.xlogy(p, p).sum()}[kind]
    return Guess(token, float(p[token]), float(conf))


def most_confident(guesses: dict[int, Guess], among: list[int]) -> list[int]:
    """``among`` ranked by confidence, highest first; ties go to the lower position."""
    return sorted(among, key=lambda pos: (-guesses[pos].conf, pos))


# ---- state (§2) -------------------------------------------------------------------------------------------------
@dataclass
class Blk:
    start: int
    end: int
    state: str = "active"  # active | ready | cached
    full: bool = False  # fully activated


@dataclass
class Cand:
    tokens: list[int]
    blocks: list[Blk]
    end_seen: bool = False
    extra: int = -1  # lookahead: the position it filled beyond the anchor

    def copy(self) -> Cand:
        return Cand(list(self.tokens), [Blk(b.start, b.end, b.state, b.full) for b in self.blocks], self.end_seen)

    def ratio(self, b: Blk, mask: int) -> float:
        return sum(t != mask for t in self.tokens[b.start : b.end]) / (b.end - b.start)

    def window_start(self) -> int:
        return next((b.start for b in self.blocks if b.state != "cached"), len(self.tokens))


@dataclass
class RefStep:
    spawned: list[int]  # extra positions of the lookahead candidates verified this step, in creation order
    scores: list[float]  # per candidate (lookahead ones, then the anchor)
    winner: int
    filled: list[int]  # positions the winner's fill wrote from this forward's predictions, ascending
    committed: int  # committed prefix length after this step


@dataclass
class RefResult:
    tokens: list[int]  # the whole final sequence, prompt included
    forwards: int
    steps: list[RefStep]
    commits: list[Commit] = field(default_factory=list)


# ---- the decoders (§3) ------------------------------------------------------------------------------------------
def reference_decode(
    model: ReferenceTransformer, prompt: list[int], cfg: DecodeConfig, end_ids: frozenset[int]
) -> RefResult:
    """Decode ``prompt`` as ``cfg`` (a lopa DecodeConfig, read as plain data) says, greedily."""
    if cfg.temperature != 0 or cfg.extra_fill or cfg.force_anchor:
        raise NotImplementedError("the reference decodes greedily, without extra_fill or force_anchor")
    if cfg.decoder == "vanilla":
        return _vanilla(model, prompt, cfg, end_ids)
    return _blocks(model, prompt, cfg, end_ids)


def _vanilla(model: ReferenceTransformer, prompt: list[int], cfg: DecodeConfig, end_ids: frozenset[int]) -> RefResult:
    kind = {"maskgit_plus": "maxprob", "topk_margin": "margin", "entropy": "neg_entropy"}[cfg.order]
    mask, n = model.mask_id, len(prompt)
    tokens, steps = list(prompt) + [mask] * cfg.max_new_tokens, []
    while mask in tokens[n:]:
        logits, _ = model.forward(tokens, 0)  # the whole sequence, no cache
        masked = [p for p in range(n, len(tokens)) if tokens[p] == mask]
        guesses = {p: guess(logits[p - model.shift], mask, kind) for p in masked}
        pos = most_confident(guesses, masked)[0]
        tokens[pos] = guesses[pos].token
        steps.append(RefStep([], [guesses[pos].conf], 0, [pos], 0))
        decoded = tokens[n : tokens.index(mask, n) if mask in tokens[n:] else len(tokens)]
        if any(t in end_ids for t in decoded):
            break
    return RefResult(tokens, len(steps), steps)


def _prepare(c: Cand, cfg: DecodeConfig, mask: int) -> None:
    size, limit = cfg.block_size, cfg.max_new_tokens // cfg.block_size
    may_add = not c.end_seen and len(c.blocks) - 1 < limit
    base = cfg.base if cfg.decoder == "lopa" else cfg.decoder
    if base == "threshold":
        if may_add and not any(b.state == "active" for b in c.blocks):
            c.blocks.append(Blk(len(c.tokens), len(c.tokens) + size, "active", True))
            c.tokens += [mask] * size
        return
    if may_add and c.ratio(c.blocks[-1], mask) >= cfg.tau_add:
        c.blocks.append(Blk(len(c.tokens), len(c.tokens) + size, "active", False))
        c.tokens += [mask] * size
    for prev, b in zip(c.blocks, c.blocks[1:], strict=False):
        if not b.full and c.ratio(prev, mask) >= cfg.tau_act:
            b.full = True


def _fill(c: Cand, guesses: dict[int, Guess], cfg: DecodeConfig) -> list[int]:
    """The base decoder's fill of ``c`` from its own predictions; returns the filled positions, ascending."""
    active = [b for b in c.blocks if b.state == "active"]
    base = cfg.base if cfg.decoder == "lopa" else cfg.decoder
    filled = []
    for b in active[:1] if base == "threshold" else active:
        inside = [p for p in guesses if b.start <= p < b.end]
        sure = [p for p in inside if guesses[p].prob > cfg.threshold]
        if not sure and inside and b.full:
            sure = most_confident(guesses, inside)[:1]
        filled += sure
    return sorted(filled)


def _write(c: Cand, positions: list[int], guesses: dict[int, Guess], end_ids: frozenset[int]) -> None:
    for p in positions:
        c.tokens[p] = guesses[p].token
        c.end_seen |= guesses[p].token in end_ids


def _promote(c: Cand, mask: int) -> None:
    for b in c.blocks:
        if b.state == "active":
            if mask in c.tokens[b.start : b.end]:
                return
            b.state = "ready"


def _blocks(model: ReferenceTransformer, prompt: list[int], cfg: DecodeConfig, end_ids: frozenset[int]) -> RefResult:
    mask, shift = model.mask_id, model.shift
    k = cfg.branches if cfg.decoder == "lopa" else 0
    cap = cfg.max_iterations or cfg.max_new_tokens + cfg.max_new_tokens // cfg.block_size + 8
    cands = [Cand(list(prompt), [Blk(0, len(prompt), "ready", True)])]  # lookahead ones first, the anchor last
    commits: list[Commit] = []
    steps: list[RefStep] = []
    while True:
        for c in cands:
            _prepare(c, cfg, mask)
        anchor = cands[-1]
        if not any(b.state == "active" for b in anchor.blocks) or len(steps) >= cap:
            break
        start = anchor.window_start()
        n_commit = sum(b.end - b.start for b in anchor.blocks if b.state == "ready")
        prefix, last = replay(model, commits)  # the committed K/V, rebuilt from scratch
        guesses, masked = [], []
        for c in cands:  # each candidate alone, over the same committed prefix
            logits, _ = model.forward(c.tokens[start:], start, prefix or None)
            own = [p for p in range(start, len(c.tokens)) if c.tokens[p] == mask]
            rows = {p: logits[p - shift - start] if p - shift >= start else last for p in own}
            guesses.append({p: guess(row, mask, cfg.confidence) for p, row in rows.items()})
            masked.append(own)
        if cfg.branch_score == "shared":
            common = set.intersection(*(set(m) for m in masked))
            scored = [sorted(common)] * len(cands)
        else:
            scored = masked
        scores = [sum(g[p].conf for p in s) / len(s) if s else 1.0 for g, s in zip(guesses, scored, strict=True)]
        w = max(range(len(cands)), key=lambda i: (scores[i], -i))  # the first of the best
        winner, pred = cands[w], guesses[w]
        if n_commit:
            commits.append(Commit(start, tuple(winner.tokens[start:]), n_commit))
        for b in winner.blocks:
            if b.state == "ready":
                b.state = "cached"
        filled = _fill(winner, pred, cfg)
        _write(winner, filled, pred, end_ids)
        _promote(winner, mask)
        committed = commits[-1].start + commits[-1].n if commits else 0
        steps.append(RefStep([c.extra for c in cands[:-1]], scores, w, filled, committed))
        remaining = [p for p in pred if p not in filled]
        cands = []
        for pos in most_confident(pred, remaining)[:k]:
            branch = winner.copy()
            _write(branch, [pos], pred, end_ids)
            branch.extra = pos
            cands.append(branch)
        winner.extra = -1
        cands.append(winner)
    return RefResult(cands[-1].tokens, len(steps), steps, commits)
