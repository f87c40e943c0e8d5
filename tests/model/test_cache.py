"""StaticKVCache with the shared forward (Dream and LLaDA models): chunked prefix commits, padded branch rows,
commit from a row, rollback."""

from __future__ import annotations

import pytest
import torch

from lopa.errors import ConfigError
from lopa.model.cache import StaticKVCache
from lopa.model.families import family_named
from lopa.model.transformer import Transformer
from lopa.testing import random_model

TOL = 1e-4
PREFIX, WINDOW = 21, 8


@pytest.fixture(scope="module", params=["dream", "llada"])
def model(request: pytest.FixtureRequest) -> Transformer:
    """A random model of each family (LLaDA: no q/k/v biases); the cache must not care which."""
    cfg = family_named(request.param).make_config(
        attention_bias=request.param == "dream",
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    return random_model(cfg, seed=11)


def _cache(model: Transformer, rows: int = 1, max_len: int = 64, dtype: torch.dtype = torch.float32) -> StaticKVCache:
    c = model.config
    return StaticKVCache(c.num_hidden_layers, rows, max_len, c.num_key_value_heads, c.head_dim, dtype=dtype)


def _ids(n: int, seed: int, vocab: int = 101) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))  # (n,)


def _commit_prefix(model: Transformer, cache: StaticKVCache, prefix: torch.Tensor, chunks: list[int]) -> None:
    """Run the prefix through the model chunk by chunk, committing each chunk (row 0 broadcast to all rows)."""
    assert sum(chunks) == prefix.numel()
    start = 0
    for n in chunks:
        ids = prefix[start : start + n][None]  # (1, n)
        model(ids, torch.arange(start, start + n)[None], cache=cache)
        cache.commit(n)
        start += n
    assert cache.committed == prefix.numel()


def _chunk_mask(chunks: list[int]) -> torch.Tensor:
    """(1, L, L) bool: a query sees its own chunk and every earlier one (the window is the last chunk).

    This is what a cached run computes: committed K/V were produced before later chunks existed.
    """
    chunk_of = torch.cat([torch.full((n,), i) for i, n in enumerate(chunks)])  # (L,)
    return (chunk_of[:, None] >= chunk_of[None, :])[None]


@torch.no_grad()
@pytest.mark.parametrize("chunks", [[21], [5, 16], [1, 7, 13], [3, 3, 3, 3, 3, 3, 3]])
def test_chunked_prefix_then_window_equals_full_forward(model: Transformer, chunks: list[int]) -> None:
    prefix, window = _ids(PREFIX, 0), _ids(WINDOW, 1)
    seq = torch.cat([prefix, window])[None]  # (1, P + W)
    full = model(seq, torch.arange(PREFIX + WINDOW)[None], attn_mask=_chunk_mask([*chunks, WINDOW]))
    cache = _cache(model)
    start = 0
    for n in chunks:
        part = model(prefix[start : start + n][None], torch.arange(start, start + n)[None], cache=cache)  # (1, n, V)
        cache.commit(n)
        assert (part - full[:, start : start + n]).abs().max() <= TOL
        start += n
    got = model(window[None], torch.arange(PREFIX, PREFIX + WINDOW)[None], cache=cache)  # (1, W, vocab)
    assert (got - full[:, PREFIX:]).abs().max() <= TOL
    # With one chunk for everything the window logits are those of the plain bidirectional forward.
    if chunks == [PREFIX]:
        plain = model(seq, torch.arange(PREFIX + WINDOW)[None])
        assert (got - plain[:, PREFIX:]).abs().max() > 1e-3  # the prefix did not see the window when cached


@torch.no_grad()
def test_window_forward_never_overwrites_the_committed_prefix(model: Transformer) -> None:
    prefix, window = _ids(PREFIX, 0), _ids(WINDOW, 1)
    cache = _cache(model)
    _commit_prefix(model, cache, prefix, [10, 11])
    frozen_k = cache.k[:, 0, :, :PREFIX].clone()  # (layers, kv_heads, P, head_dim)
    model(window[None], torch.arange(PREFIX, PREFIX + WINDOW)[None], cache=cache)
    assert not torch.equal(cache.k[:, 0, :, PREFIX : PREFIX + WINDOW], torch.zeros_like(frozen_k[:, :, :WINDOW]))
    assert torch.equal(cache.k[:, 0, :, :PREFIX], frozen_k)


@torch.no_grad()
def test_padded_branch_rows_equal_single_row_forwards(model: Transformer) -> None:
    prefix = _ids(PREFIX, 2)
    lengths = [8, 5, 3]
    windows = [_ids(n, 10 + i) for i, n in enumerate(lengths)]
    rows, width = len(lengths), max(lengths)
    ids = torch.full((rows, width), 7)  # (rows, W) padded with an arbitrary token
    positions = torch.zeros(rows, width, dtype=torch.long)  # padded positions are arbitrary too
    valid = torch.zeros(rows, width, dtype=torch.bool)  # (rows, W)
    for r, w in enumerate(windows):
        ids[r, : w.numel()] = w
        positions[r, : w.numel()] = torch.arange(PREFIX, PREFIX + w.numel())
        valid[r, : w.numel()] = True
    cache = _cache(model, rows=rows)
    _commit_prefix(model, cache, prefix, [9, 12])
    batched = model(ids, positions, cache=cache, valid=valid)  # (rows, W, vocab)
    for r, w in enumerate(windows):
        single_cache = _cache(model)
        _commit_prefix(model, single_cache, prefix, [9, 12])
        single = model(w[None], torch.arange(PREFIX, PREFIX + w.numel())[None], cache=single_cache)
        assert (batched[r, : w.numel()] - single[0]).abs().max() <= TOL
    # Without the valid mask the padding leaks into the short rows: the mask is doing real work.
    cache.rollback()
    leaky = model(ids, positions, cache=cache)
    assert (leaky[2, :3] - batched[2, :3]).abs().max() > 1e-3


@torch.no_grad()
def test_commit_from_a_nonzero_row_copies_it_to_every_row(model: Transformer) -> None:
    prefix = _ids(PREFIX, 3)
    windows = torch.stack([_ids(WINDOW, 20 + r) for r in range(3)])  # (3, W)
    positions = torch.arange(PREFIX, PREFIX + WINDOW).expand(3, -1)  # (3, W)
    cache = _cache(model, rows=3)
    _commit_prefix(model, cache, prefix, [PREFIX])
    model(windows, positions, cache=cache)
    winner_k = cache.k[:, 2, :, PREFIX : PREFIX + 5].clone()  # (layers, kv_heads, 5, head_dim)
    assert not torch.equal(cache.k[:, 0, :, PREFIX : PREFIX + 5], winner_k)
    cache.commit(5, from_row=2)
    assert cache.committed == PREFIX + 5
    for r in range(3):
        assert torch.equal(cache.k[:, r, :, PREFIX : PREFIX + 5], winner_k)
        assert torch.equal(cache.v[:, r, :, PREFIX : PREFIX + 5], cache.v[:, 2, :, PREFIX : PREFIX + 5])
    # Functionally: the next window sees prefix + row 2's first five tokens, exactly like a one-row sequence.
    nxt = _ids(4, 30)
    pos = torch.arange(PREFIX + 5, PREFIX + 9)[None]
    got = model(nxt[None].expand(3, -1), pos.expand(3, -1), cache=cache)  # (3, 4, vocab)
    ref_cache = _cache(model)
    _commit_prefix(model, ref_cache, prefix, [PREFIX])
    model(windows[2:3], positions[:1], cache=ref_cache)  # row 2's window alone, then keep its first five
    ref_cache.commit(5)
    ref = model(nxt[None], pos, cache=ref_cache)
    for r in range(3):
        assert (got[r] - ref[0]).abs().max() <= TOL


@torch.no_grad()
def test_rollback_forgets_uncommitted_writes(model: Transformer) -> None:
    prefix, window = _ids(PREFIX, 4), _ids(WINDOW, 5)
    pos = torch.arange(PREFIX, PREFIX + WINDOW)[None]
    cache = _cache(model)
    _commit_prefix(model, cache, prefix, [PREFIX])
    first = model(window[None], pos, cache=cache)
    assert cache.written == PREFIX + WINDOW
    cache.rollback()
    assert cache.written == cache.committed == PREFIX
    with pytest.raises(ConfigError, match="cannot commit"):
        cache.commit(1)
    model(_ids(WINDOW, 6)[None], pos, cache=cache)  # a different pre-write, then forgotten again
    cache.rollback()
    again = model(window[None], pos, cache=cache)
    assert (again - first).abs().max() <= TOL
    cache.reset()
    assert cache.committed == cache.written == 0


def test_commit_more_than_written_is_refused(model: Transformer) -> None:
    cache = _cache(model)
    with torch.no_grad():
        model(_ids(4, 7)[None], torch.arange(4)[None], cache=cache)
    with pytest.raises(ConfigError, match="only 4 are written"):
        cache.commit(5)


def test_overflow_and_too_many_rows_are_refused(model: Transformer) -> None:
    cache = _cache(model, rows=2, max_len=10)
    with torch.no_grad(), pytest.raises(ConfigError, match="overflow"):
        model(_ids(11, 8)[None], torch.arange(11)[None], cache=cache)
    with torch.no_grad(), pytest.raises(ConfigError, match="3 rows"):
        model(_ids(3, 8)[None].expand(3, -1), torch.arange(3).expand(3, -1), cache=cache)
    with pytest.raises(ConfigError, match="rows >= 1"):
        StaticKVCache(1, 0, 4, 1, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_bytes_counts_both_buffers(model: Transformer, dtype: torch.dtype) -> None:
    c = model.config
    rows, max_len = 3, 40
    cache = _cache(model, rows=rows, max_len=max_len, dtype=dtype)
    bytes_per = torch.tensor([], dtype=dtype).element_size()
    per_buffer = c.num_hidden_layers * rows * c.num_key_value_heads * max_len * c.head_dim * bytes_per
    assert cache.memory_bytes() == 2 * per_buffer
