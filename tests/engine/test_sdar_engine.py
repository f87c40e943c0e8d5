"""The engine on a block-causal (SDAR) checkpoint: the decoders agree with each other where the definitions say they
must, every runner (eager, fast, batched, fast batched) decodes the same, and the committed K/V are EXACT: equal to
a fresh block-causal forward of the final tokens in transformers' Qwen3ForCausalLM (tests/support/sdar_reference.py),
which is the point of block diffusion. Block sizes other than the model's attention block are refused by name.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from lopa.config import DecodeConfig
from lopa.engine.batch import BatchRunner
from lopa.engine.block_layout import layout_block
from lopa.engine.fast import FastRunner
from lopa.engine.fast_batch import FastBatchRunner
from lopa.engine.loop import decode, run
from lopa.engine.runner import Runner
from lopa.engine.scheduler import Scheduler
from lopa.errors import BlockSizeError, ConfigError
from lopa.llm import LLM
from lopa.model.fused import fuse
from tests.support.sdar_checks import load_model, lopa_decode, prompts_for, sdar_checkpoint, special_ids
from tests.support.sdar_reference import fresh_kv, load_qwen3

pytest.importorskip("transformers")

BLOCK = 4
KV_TOL = 1e-5
BASE = DecodeConfig(block_size=BLOCK, max_new_tokens=16, threshold=0.7)
CONFIGS = [
    BASE.replace(decoder="threshold"),
    BASE.replace(decoder="lopa", base="threshold", branches=3, min_fill=2),
    BASE.replace(decoder="lopa", base="d2f", branches=2, threshold=0.8, tau_add=0.25, tau_act=0.5),
    BASE.replace(decoder="d2f", tau_add=0.25, tau_act=0.5),
    BASE.replace(decoder="vanilla"),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sdar_checkpoint(tmp_path_factory.mktemp("sdar") / "ckpt", BLOCK)


@pytest.fixture(scope="module")
def model(ckpt: Path) -> torch.nn.Module:
    return load_model(ckpt)


def _ids(ckpt: Path) -> tuple[int, set[int]]:
    mask, eos = special_ids(ckpt)
    return mask, {eos}


def _lookahead_wins(step) -> int:  # noqa: ANN001
    return sum(t.winner != len(t.candidates) - 1 for t in step.trace or [])


def test_lopa_k0_equals_threshold_and_lookahead_branches_win(ckpt: Path, model: torch.nn.Module) -> None:
    mask, ends = _ids(ckpt)
    wins = 0
    for prompt in prompts_for(BLOCK):
        for min_fill in (1, 2):
            base = BASE.replace(decoder="threshold", min_fill=min_fill)
            want = lopa_decode(model, prompt, base, mask, ends)
            k0 = lopa_decode(model, prompt, base.replace(decoder="lopa", base="threshold", branches=0), mask, ends)
            assert k0.state.tokens.tolist() == want.state.tokens.tolist(), (prompt, min_fill)
            assert k0.stats.forwards == want.stats.forwards
            lopa = base.replace(decoder="lopa", base="threshold", branches=3, trace=True)
            wins += _lookahead_wins(lopa_decode(model, prompt, lopa, mask, ends))
    assert wins > 0  # a lookahead branch won verification somewhere


def test_d2f_with_full_thresholds_is_threshold_and_keeps_blocks_in_flight(ckpt: Path, model: torch.nn.Module) -> None:
    mask, ends = _ids(ckpt)
    widths: list[int] = []

    class Recording(Runner):
        def verify(self, window_start, commit_len, cands, sampler, iteration):  # noqa: ANN001, ANN202
            widths.append(int(cands[-1].tokens.numel()) - commit_len)  # active positions in the window
            return super().verify(window_start, commit_len, cands, sampler, iteration)

    for prompt in prompts_for(BLOCK):
        want = lopa_decode(model, prompt, BASE.replace(decoder="threshold"), mask, ends)
        d2f = BASE.replace(decoder="d2f", tau_add=1.0, tau_act=1.0)
        got = lopa_decode(model, prompt, d2f, mask, ends)
        assert got.state.tokens.tolist() == want.state.tokens.tolist(), prompt
        cfg = BASE.replace(decoder="d2f", tau_add=0.25, tau_act=0.5).validate()
        step = run(decode(Recording(model), prompt, cfg, mask, frozenset(ends)))
        assert mask not in step.state.tokens.tolist()
    assert max(widths) > 2 * BLOCK  # several blocks were in flight in one forward


def test_vanilla_fills_one_position_per_forward(ckpt: Path, model: torch.nn.Module) -> None:
    mask, ends = _ids(ckpt)
    for prompt in prompts_for(BLOCK):
        step = lopa_decode(model, prompt, BASE.replace(decoder="vanilla", trace=True), mask, ends)
        assert step.trace is not None and all(len(t.filled) == 1 for t in step.trace)
        tail = len(prompt) % BLOCK
        assert step.stats.forwards == step.state.length - len(prompt) == 16 - tail  # no end token here


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=["threshold", "lopa-threshold", "lopa-d2f"])
def test_committed_kv_equal_a_fresh_forward_of_the_final_tokens(
    ckpt: Path, model: torch.nn.Module, cfg: DecodeConfig
) -> None:
    mask, ends = _ids(ckpt)
    hf = load_qwen3(ckpt)
    wins = 0
    for prompt in prompts_for(BLOCK):
        runner = Runner(model)
        step = run(decode(runner, prompt, cfg.replace(trace=True).validate(), mask, frozenset(ends)))
        k, v = runner.committed_kv()  # (layers, kv_heads, n, head_dim)
        n = k.shape[2]
        assert n == step.state.length - BLOCK  # everything but the last block, which no forward follows
        want_k, want_v = fresh_kv(hf, step.state.tokens.tolist(), BLOCK)  # the WHOLE final sequence
        assert (k - want_k[:, :, :n]).abs().max() <= KV_TOL
        assert (v - want_v[:, :, :n]).abs().max() <= KV_TOL
        wins += _lookahead_wins(step)
    assert wins > 0 or cfg.decoder != "lopa"  # a lookahead winner's span was committed


def _batched(runner: BatchRunner, jobs: list[tuple[list[int], DecodeConfig]], mask: int, ends: set[int]) -> dict:
    sched = Scheduler(runner, mask, frozenset(ends))
    for rid, (prompt, cfg) in enumerate(jobs):
        sched.add(rid, prompt, cfg.validate())
    final, slots = {}, {}
    while sched.has_work:
        steps = sched.step()
        slots.update({e.rid: e.slot for e in sched.running})
        final.update({rid: step for rid, step in steps if step.done})
    return {rid: (step, slots[rid]) for rid, step in final.items()}


def _jobs() -> list[tuple[list[int], DecodeConfig]]:
    prompts = prompts_for(BLOCK)
    return [(prompts[i % len(prompts)], cfg) for i, cfg in enumerate(CONFIGS)]


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fast"])
def test_batched_equals_alone(ckpt: Path, model: torch.nn.Module, fast: bool) -> None:
    mask, ends = _ids(ckpt)
    jobs = _jobs()
    if fast:  # padded buckets: the static-prefix pooled forward (the graph path, run eagerly on CPU)
        runner = FastBatchRunner(fuse(copy.deepcopy(model)), 8, 64, window_granularity=16, kv_granularity=32)
    else:
        runner = BatchRunner(model, 8, 64)
    got = _batched(runner, jobs, mask, ends)
    for rid, (prompt, cfg) in enumerate(jobs):
        alone_runner = Runner(model)
        alone = run(decode(alone_runner, prompt, cfg.validate(), mask, frozenset(ends)))
        step, slot = got[rid]
        assert step.state.tokens.tolist() == alone.state.tokens.tolist(), (rid, cfg.decoder)
        assert step.stats.forwards == alone.stats.forwards, rid
        if alone_runner.cache is not None:
            k, v = alone_runner.committed_kv()
            pk, pv = runner.pool.span(slot, 0, runner.pool.committed[slot])
            assert pk.shape == k.shape and (pk - k).abs().max() <= KV_TOL and (pv - v).abs().max() <= KV_TOL


def test_fast_runner_equals_eager(ckpt: Path, model: torch.nn.Module) -> None:
    mask, ends = _ids(ckpt)
    fast = FastRunner(fuse(copy.deepcopy(model)), window_granularity=16, kv_granularity=32)
    for prompt, cfg in _jobs():
        want = run(decode(Runner(model), prompt, cfg.validate(), mask, frozenset(ends)))
        got = run(decode(fast, prompt, cfg.validate(), mask, frozenset(ends)))
        assert got.state.tokens.tolist() == want.state.tokens.tolist(), cfg.decoder
        assert got.stats.forwards == want.stats.forwards


def test_other_block_sizes_are_refused_and_the_default_is_the_models(ckpt: Path, model: torch.nn.Module) -> None:
    mask, ends = _ids(ckpt)
    with pytest.raises(BlockSizeError, match="attention blocks of 4 positions"):
        layout_block(model.config, BASE.replace(block_size=8))
    with pytest.raises(BlockSizeError):
        run(decode(Runner(model), [1, 2, 3], BASE.replace(block_size=2, max_new_tokens=8), mask, frozenset(ends)))
    with pytest.raises(ConfigError, match="multiple of the model's attention block"):
        layout_block(model.config, BASE.replace(decoder="vanilla", max_new_tokens=10))
    llm = LLM(str(ckpt))
    assert llm.default_config.block_size == BLOCK
    with pytest.raises(BlockSizeError):
        llm.generate("hi", llm.decode_config(block_size=8))
    bidirectional = dataclasses.replace(model.config, attention="bidirectional", block_size=None)
    assert layout_block(bidirectional, BASE.replace(block_size=8)) is None  # any block size, today's layout


@pytest.mark.gpu
def test_cuda_graphs_equal_eager_on_a_block_causal_model(ckpt: Path, model: torch.nn.Module) -> None:
    """The captured graphs carry the block rule (built from device tensors): one sequence and many."""
    mask, ends = _ids(ckpt)
    dev = torch.device("cuda")
    base = copy.deepcopy(model).to(dev)
    fast = FastRunner(fuse(copy.deepcopy(base)), dev)
    assert fast.use_graphs
    wants = []
    for prompt, cfg in _jobs():
        want = run(decode(Runner(base, dev), prompt, cfg.validate(), mask, frozenset(ends)))
        got = run(decode(fast, prompt, cfg.validate(), mask, frozenset(ends)))
        assert got.state.tokens.tolist() == want.state.tokens.tolist(), cfg.decoder
        assert got.stats.forwards == want.stats.forwards
        wants.append(want)
    assert fast.replays > len(fast.captured) > 0
    batch = FastBatchRunner(fuse(copy.deepcopy(base)), 8, 64, dev)
    for rid, (step, _) in _batched(batch, _jobs(), mask, ends).items():
        assert step.state.tokens.tolist() == wants[rid].state.tokens.tolist(), rid
        assert step.stats.forwards == wants[rid].stats.forwards
    assert len(batch.captured) > 0


def test_every_kv_access_strategy_gives_transformers_logits(ckpt: Path, model: torch.nn.Module) -> None:
    """A window crossing a block boundary after a committed prefix of two blocks, through CacheWrite (eager),
    StaticRows (the graph path, a padded window and kv length) and PoolSlots (two rows of different widths, so the
    packed path), equals transformers' Qwen3ForCausalLM on the whole sequence with a 4-D block-causal mask."""
    from lopa.model.cache import KVPool, StaticKVCache
    from lopa.model.kv_access import StaticRows, block_causal
    from lopa.model.pooled import pooled_forward
    from tests.support.sdar_reference import block_causal_additive

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (1, 14), generator=gen)  # prefix [0, 8), window [8, 14) crosses block 2 -> 3
    pos = torch.arange(14)[None]
    hf = load_qwen3(ckpt)
    with torch.no_grad():
        want = hf(ids, attention_mask=block_causal_additive(14, BLOCK), position_ids=pos).logits[0, 8:]  # (6, vocab)
        cfg = model.config
        shape = (cfg.num_hidden_layers, 1, 32, cfg.num_key_value_heads, cfg.head_dim)
        cache = StaticKVCache(*shape)  # CacheWrite
        model(ids[:, :8], pos[:, :8], cache)
        cache.commit(8)
        eager = model(ids[:, 8:], pos[:, 8:], cache)[0]
        fused = fuse(copy.deepcopy(model))
        static = StaticKVCache(*shape)  # StaticRows: a padded window of 8, over 24 slots
        for lo, hi in ((0, 8), (8, 16)):
            window = torch.arange(lo, hi)[None]
            tokens = torch.where(window < 14, ids[:, window.clamp_max(13)[0]], 0)
            kv = StaticRows.build(static, window, window < 14, 24, BLOCK)
            out = fused(tokens, window, kv)[0]
        graph = out[:6]
        pool = KVPool(cfg.num_hidden_layers, 1, 32, cfg.num_key_value_heads, cfg.head_dim)  # PoolSlots
        slot = torch.zeros(1, dtype=torch.long)
        _, k, v = pooled_forward(model, ids[:, :8], pos[:, :8], None, torch.arange(8)[None], pool.k, pool.v, slot, slot)
        pool.commit(0, k[:, 0], v[:, 0])
        rows = torch.stack([ids[0, 8:], torch.cat([ids[0, 8:12], ids[0, :2]])])  # row 1: 4 real tokens
        valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
        prefix = torch.full((2,), 8)
        logits, _, _ = pooled_forward(
            model, rows, pos[:, 8:].expand(2, 6), valid, torch.arange(6)[None].expand(2, 6), pool.k, pool.v,
            torch.zeros(2, dtype=torch.long), prefix,
        )  # fmt: skip
    for got in (eager, graph, logits[0], logits[1, :4]):
        assert (got - want[: got.shape[0]]).abs().max() <= 1e-4
    rule = block_causal(torch.tensor([[0, 3, 4, 9]]), torch.arange(12)[None], BLOCK)[0]  # (4, 12)
    assert rule.sum(dim=1).tolist() == [4, 4, 8, 12]  # query i sees every key of its own block and the earlier ones
