"""Runner: one forward over the windows of all candidate branches, on one device.

The engine hands the runner a list of candidates (window tokens, the masked positions to predict, which of
them enter the branch score, a sampling stream). ``verify`` runs them as ONE batched forward (rows = branches,
padded keys masked out), applies the model's prediction offset ``config.logit_shift`` (a property of its family,
:mod:`lopa.model.families`), turns logits into per-position predictions and returns one score per candidate.
With Dream's shift of 1 the prediction for the first uncommitted position comes from the output of the last
committed one, which is no longer in the window: the runner keeps it as the *frozen last logit*, saved at the
previous commit. With LLaDA's shift of 0 every prediction comes from its own window position; no logit is
frozen (``last_logit`` stays empty). ``prediction(i)`` and ``commit(i, n)`` then act on the winner. The branch
-parallel runner in ``lopa.parallel`` has the same three methods, so the engine cannot tell them apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lopa.decoding.confidence import Prediction, Sampler
from lopa.engine.scoring import Row, choose_and_score
from lopa.model.cache import StaticKVCache
from lopa.model.families import predicting_index
from lopa.model.transformer import Transformer


@dataclass
class Candidate:
    tokens: Tensor  # (L,) the branch's window: READY blocks then ACTIVE blocks
    predict: Tensor  # (m,) absolute positions whose token to predict (masked positions of the window)
    score_mask: Tensor  # (m,) bool, positions that enter the branch score
    stream: int = 0  # sampling stream (see Sampler.generator)


@dataclass
class Batch:
    """Padded model inputs for a list of candidates."""

    ids: Tensor  # (rows, L) long
    positions: Tensor  # (rows, L) long
    valid: Tensor | None  # (rows, L) bool, None when no row is padded
    logits_idx: Tensor  # (rows, n) window indices whose raw logits are needed
    uses_last: list[bool]  # row's first prediction comes from the frozen last logit


def build_batch(window_start: int, commit_len: int, cands: list[Candidate], pad_id: int, shift: int) -> Batch:
    """Pad the candidates' windows into one batch and list the raw logits each row needs.

    Row r's raw logits come back as: [logits for predict positions (shifted by ``shift``)] + [commit_len - 1 if
    commit_len and shift] (the logit to freeze at the commit).
    """
    lengths = [int(c.tokens.numel()) for c in cands]
    width = max(lengths)
    ids = torch.full((len(cands), width), pad_id, dtype=torch.long)  # (rows, L)
    for r, c in enumerate(cands):
        ids[r, : lengths[r]] = c.tokens
    positions = (window_start + torch.arange(width)).expand(len(cands), width)  # (rows, L)
    valid = None
    if min(lengths) != width:
        valid = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # (rows, L)
    wanted, uses_last = [], []
    for c in cands:
        hidden = predicting_index(c.predict - window_start, shift)  # (m,) window index of the predicting state
        uses_last.append(bool(hidden.numel()) and int(hidden[0]) < 0)
        extra = [commit_len - 1] if commit_len and shift else []
        wanted.append(torch.cat([hidden.clamp_min(0), torch.tensor(extra, dtype=torch.long)]))
    n = max(1, max(w.numel() for w in wanted))
    logits_idx = torch.zeros(len(cands), n, dtype=torch.long)  # (rows, n)
    for r, w in enumerate(wanted):
        logits_idx[r, : w.numel()] = w
    return Batch(ids, positions, valid, logits_idx, uses_last)


@dataclass
class Runner:
    """Single-device runner: owns the model, the static cache and the frozen last logit (when the shift needs one)."""

    model: Transformer
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timing: dict[str, float] = field(default_factory=dict)
    forwards: int = 0

    def __post_init__(self) -> None:
        self.cache: StaticKVCache | None = None
        self.last_logit: Tensor | None = None  # (vocab,) raw logit of the last committed position; (0,) if no shift
        self._preds: list[Prediction] = []
        self._last: list[Tensor] = []

    @property
    def shift(self) -> int:
        """The model's prediction offset (its family's ``logit_shift``)."""
        return int(self.model.config.logit_shift)

    @property
    def pad_id(self) -> int:
        return self.model.config.padding_id

    def begin(self, max_len: int, rows: int, use_cache: bool = True) -> None:
        """Start a request: a cache for ``rows`` branch rows of ``max_len`` positions (reused when it fits)."""
        self.timing, self.forwards, self.last_logit = {}, 0, None
        if not use_cache:
            self.cache = None
            return
        cfg, p = self.model.config, next(self.model.parameters())
        c = self.cache
        if c is None or c.rows < rows or c.max_len < max_len or c.k.dtype != p.dtype or c.k.device != p.device:
            self.cache = StaticKVCache(
                cfg.num_hidden_layers, rows, max_len, cfg.num_key_value_heads, cfg.head_dim, p.dtype, p.device
            )
        self.cache.reset()

    def release(self) -> None:
        """Drop the KV cache so its memory is freed; the next ``begin`` allocates one of the size it needs."""
        self.cache = None

    def _tick(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.timing[phase] = self.timing.get(phase, 0.0) + now - t0
        return now

    @torch.inference_mode()
    def raw_logits(self, window_start: int, commit_len: int, cands: list[Candidate]) -> tuple[Tensor, Batch]:
        """The batched forward itself: raw logits (rows, n, vocab) at the indices listed by ``build_batch``."""
        if self.cache is not None and self.cache.committed != window_start:
            raise RuntimeError(f"window starts at {window_start} but the cache holds {self.cache.committed}")
        b = build_batch(window_start, commit_len, cands, self.pad_id, self.shift)
        dev = self.device
        valid = b.valid.to(dev) if b.valid is not None else None
        logits = self.model(b.ids.to(dev), b.positions.to(dev), self.cache, valid, b.logits_idx.to(dev))
        self.forwards += 1
        return logits, b

    def verify(
        self, window_start: int, commit_len: int, cands: list[Candidate], sampler: Sampler, iteration: int
    ) -> list[float]:
        """One forward over all candidates; returns each candidate's branch score."""
        t0 = time.perf_counter()
        logits, batch = self.raw_logits(window_start, commit_len, cands)  # (rows, n, vocab)
        t0 = self._tick("forward", t0)
        rows = [
            Row(
                c.predict,
                c.score_mask,
                c.stream,
                sampler,
                iteration,
                r,
                self.last_logit if batch.uses_last[r] else None,
            )
            for r, c in enumerate(cands)
        ]
        self._preds, scores = choose_and_score(logits, rows)
        self._last = [self.frozen_logit(logits, r, c.predict.numel(), commit_len) for r, c in enumerate(cands)]
        self._tick("scoring", t0)
        return scores

    def frozen_logit(self, logits: Tensor, row: int, m: int, commit_len: int) -> Tensor:
        """The raw logit row ``row`` would freeze if it won: (vocab,) after the ``m`` predictions, or (0,)."""
        return logits[row, m] if commit_len and self.shift else logits.new_zeros(0)

    def prediction(self, index: int) -> Prediction:
        """The per-position prediction of candidate ``index`` from the last verify."""
        return self._preds[index]

    def commit(self, index: int, n: int) -> None:
        """Commit the first ``n`` window positions of candidate ``index``: its K/V become every row's prefix."""
        if self.cache is None:
            return
        if n:
            self.cache.commit(n, from_row=index)
            self.last_logit = self._last[index].clone()
        else:
            self.cache.rollback()

    def committed_kv(self) -> tuple[Tensor, Tensor]:
        """The committed K/V (layers, kv_heads, committed, head_dim) each, for equivalence checks."""
        assert self.cache is not None
        return self.cache.committed_view()
