"""The SDAR family's model side, dense and MoE, against transformers (an independent implementation).

- Checkpoints laid out like the official release (tests/support/sdar_checkpoints.py) load; their logits under a
  block-causal mask equal transformers' ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` built by transformers'
  own loader from the same tensors (a 4-D additive mask), within 1e-4: GQA, MHA and one kv head, tied and untied
  heads, several blocks with L a multiple of block_size and not; MoE with a layer in ``mlp_only_layers``,
  ``decoder_sparse_step`` 2, ``norm_topk_prob`` true and false. The comparisons are shown not to be vacuous: the
  mask changes the logits, a perturbed router or q-norm weight breaks the equality, tokens use several experts.
- The expert compute: the dense (graph-safe) form equals the sparse one; ``fuse`` equals unfused; the pooled
  forward (packed rows of different widths) equals one forward per row; the fast runner (static cache rows, and
  CUDA graphs on a GPU) equals the eager runner.
- Tensor parallelism (2 gloo ranks): expert shards put together are the full experts, the router and q/k norms
  are replicated, an expert width that does not split is refused by name; logits equal one process.
- Save -> load round-trips the tensors under SDAR's names and the config (``sdar_moe`` fields exported back).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lopa import LLM
from lopa.checkpoint.loader import load_checkpoint
from lopa.checkpoint.save import save_checkpoint
from lopa.engine.fast import FastRunner
from lopa.engine.runner import Candidate, Runner
from lopa.errors import ConfigError
from lopa.model.families import config_from_hf
from lopa.model.fused import fuse, is_fused
from lopa.model.moe import SparseMoeBlock, combine, route
from lopa.model.pooled import pooled_forward
from lopa.model.tp import TPShard
from lopa.parallel.launch import BranchParallelGroup
from lopa.parallel.replay import plain_forward
from lopa.testing import transformers_bidirectional_logits
from tests.support.sdar_checkpoints import release_config, transformers_twin_dir, write_release_checkpoint

transformers = pytest.importorskip("transformers")

BLOCK = 4
# name -> (heads, kv heads, tied head)
DENSE = {"gqa": (4, 2, False), "mha-tied": (4, 4, True), "kv1": (4, 1, False)}
# name -> Qwen3-MoE fields; sparse layers of 4: step 1 without layer 1 -> 0, 2, 3; step 2 -> 1, 3
MOE = {
    "only-layer-1-norm": dict(decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True),
    "step-2-no-norm": dict(decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=False),
}
EXPERTS = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


def block_causal(rows: int, length: int, block: int = BLOCK) -> torch.Tensor:
    """(rows, L, L) bool: query i sees key j iff j // block <= i // block (True = may attend)."""
    b = torch.arange(length) // block
    return (b[None, :] <= b[:, None]).expand(rows, length, length)


def inputs(length: int, rows: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 300, (rows, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(length)[None].expand(rows, length)


def twin(ckpt: Path, root: Path) -> torch.nn.Module:
    """transformers' model of ``ckpt``'s tensors, loaded by transformers itself (nothing missing or left over)."""
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(transformers_twin_dir(ckpt, root / "hf")),
        attn_implementation="eager",
        dtype=torch.float32,
        output_loading_info=True,
    )
    assert not any(info.values()), info
    return hf.eval()


def logits(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None):
    with torch.no_grad():
        return model(ids, positions, attn_mask=mask)


@pytest.fixture(scope="module")
def moe_ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdar-moe")
    return {
        name: write_release_checkpoint(root / name, layers=4, moe={**EXPERTS, **fields}, seed=5)
        for name, fields in MOE.items()
    }


# ---- dense -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [12, 10], ids=["3-blocks", "2.5-blocks"])
@pytest.mark.parametrize("name", DENSE)
def test_dense_logits_equal_transformers_qwen3(tmp_path, name, length):
    heads, kv, tie = DENSE[name]
    ckpt = write_release_checkpoint(tmp_path / "ckpt", heads=heads, kv_heads=kv, tie=tie, seed=1)
    loaded = load_checkpoint(ckpt)
    assert (loaded.config.attention, loaded.config.block_size, loaded.config.qk_norm) == ("block_causal", 4, True)
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tie  # noqa: SIM118
    hf = twin(ckpt, tmp_path)
    ids, pos = inputs(length)
    mask = block_causal(2, length)
    got = logits(loaded.model, ids, pos, mask)
    want = transformers_bidirectional_logits(hf, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # not vacuous: the block-causal mask matters (full attention gives other logits; lopa's forward applies the
    # block rule of a block-causal config by itself, so the check is on the reference), and so does the q norm
    assert (got - transformers_bidirectional_logits(hf, ids, None)).abs().max() > 1e-2
    implicit = logits(loaded.model, ids, pos, None)  # no explicit mask: the config's block rule
    torch.testing.assert_close(implicit, want, atol=1e-4, rtol=0)
    loaded.model.model.layers[0].self_attn.q_norm.weight.data.mul_(1.5)
    assert (logits(loaded.model, ids, pos, mask) - want).abs().max() > 1e-3


def test_release_config_parses_to_sdar_4b():
    cfg = config_from_hf(release_config())
    shape = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    assert shape == (2560, 36, 32, 8, 128)
    assert (cfg.rope_theta, cfg.attention_bias, cfg.tie_word_embeddings) == (1e6, False, False)
    assert (cfg.block_size, cfg.mask_token_id, cfg.eos_token_id, cfg.logit_shift) == (4, 151669, 151643, 0)
    assert cfg.family == "sdar" and cfg.moe is None


# ---- MoE ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MOE)
def test_moe_logits_equal_transformers_qwen3_moe(tmp_path, moe_ckpts, name):
    ckpt = moe_ckpts[name]
    loaded = load_checkpoint(ckpt)
    hf = twin(ckpt, tmp_path)
    sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in loaded.model.model.layers]
    assert sparse == [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in hf.model.layers]
    assert sparse == ([True, False, True, True] if name.startswith("only") else [False, True, False, True])
    layer = sparse.index(True)
    ours, theirs = loaded.model.model.layers[layer].mlp, hf.model.layers[layer].mlp
    for e in (0, 7):  # transformers holds the experts fused: gate_up (E, 2I, H), down (E, H, I)
        gate_up = torch.cat([ours.experts[e].gate_proj.weight, ours.experts[e].up_proj.weight])
        assert torch.equal(theirs.experts.gate_up_proj[e], gate_up)
        assert torch.equal(theirs.experts.down_proj[e], ours.experts[e].down_proj.weight)
    ids, pos = inputs(10)
    mask = block_causal(2, 10)
    want = transformers_bidirectional_logits(hf, ids, mask)
    torch.testing.assert_close(logits(loaded.model, ids, pos, mask), want, atol=1e-4, rtol=0)
    # not vacuous: the tokens spread over several experts, and a perturbed router breaks the equality
    x = loaded.model.model.embed_tokens(ids).reshape(-1, 64)
    _, chosen = route(ours.gate(x), 2, True)
    assert chosen.unique().numel() >= 4
    ours.gate.weight.data[0] += 0.5
    assert (logits(loaded.model, ids, pos, mask) - want).abs().max() > 1e-3


def test_norm_topk_prob_changes_the_weights():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    plain, experts = route(scores, 2, False)
    normed, _ = route(scores, 2, True)
    probs = torch.softmax(scores, -1)
    assert experts.tolist() == [[0, 1]]
    torch.testing.assert_close(plain, probs[:, :2])
    torch.testing.assert_close(normed, probs[:, :2] / probs[:, :2].sum())


def test_dense_expert_compute_equals_sparse(moe_ckpts):
    block = load_checkpoint(moe_ckpts["only-layer-1-norm"]).model.model.layers[0].mlp
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(2))
    weights, experts = route(block.gate(x), block.top_k, True)
    with torch.no_grad():
        sparse = combine(x, weights, experts, 8, block._run, dense=False)
        dense = combine(x, weights, experts, 8, block._run, dense=True)
        one_by_one = torch.stack([  # the definition, token by token
            sum(weights[n, k] * block.experts[int(experts[n, k])](x[n]) for k in range(2)) for n in range(37)
        ])  # fmt: skip
    torch.testing.assert_close(dense, sparse, atol=1e-6, rtol=0)
    torch.testing.assert_close(sparse, one_by_one, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_fused_equals_unfused(tmp_path, moe_ckpts, kind):
    ckpt = moe_ckpts["step-2-no-norm"] if kind == "moe" else write_release_checkpoint(tmp_path / "d", seed=2)
    model = load_checkpoint(ckpt).model
    fused = fuse(copy.deepcopy(model))
    assert is_fused(fused) and not is_fused(model)
    ids, pos = inputs(11)
    mask = block_causal(2, 11)
    torch.testing.assert_close(logits(fused, ids, pos, mask), logits(model, ids, pos, mask), atol=1e-5, rtol=0)


def test_pooled_forward_with_packed_rows_equals_each_row(moe_ckpts):
    """Rows of different widths run their token-wise work (the experts included) on the packed real tokens."""
    model = load_checkpoint(moe_ckpts["only-layer-1-norm"]).model
    cfg = model.config
    ids, pos = inputs(8, rows=3, seed=4)
    widths = [8, 5, 3]
    valid = torch.arange(8)[None] < torch.tensor(widths)[:, None]  # (3, 8)
    pool = torch.zeros(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 16, cfg.head_dim)
    with torch.no_grad():
        got, _, _ = pooled_forward(
            model, ids, pos, valid, torch.zeros(3, 1, dtype=torch.long), pool, pool.clone(),
            torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
        )  # fmt: skip
        for r, w in enumerate(widths):
            want = model(ids[r : r + 1, :w], pos[r : r + 1, :w])[:, :1]
            torch.testing.assert_close(got[r : r + 1], want, atol=1e-5, rtol=0)


# ---- save / load -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense-tied", "moe"])
def test_save_load_round_trips_sdar_names(tmp_path, moe_ckpts, kind):
    src = moe_ckpts["only-layer-1-norm"] if kind == "moe" else write_release_checkpoint(tmp_path / "d", tie=True)
    first = load_checkpoint(src)
    out = save_checkpoint(first.model, tmp_path / "saved", tokenizer_dir=src)
    with safe_open(str(out / "model.safetensors"), "pt") as f, safe_open(str(src / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())  # noqa: SIM118 (SDAR's own names, nothing renamed)
        for key in g.keys():  # noqa: SIM118
            assert torch.equal(f.get_tensor(key), g.get_tensor(key)), key
    names = set(first.model.state_dict())
    assert "model.layers.0.self_attn.q_norm.weight" in names
    if kind == "moe":
        assert {"model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.7.down_proj.weight"} <= names
        assert "model.layers.1.mlp.gate_proj.weight" in names  # the layer in mlp_only_layers is dense
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == ("sdar_moe" if kind == "moe" else "sdar")
    assert exported["block_size"] == 4
    if kind == "moe":
        assert {k: exported[k] for k in ("num_experts", "num_experts_per_tok", "mlp_only_layers")} == {
            "num_experts": 8, "num_experts_per_tok": 2, "mlp_only_layers": [1],
        }  # fmt: skip
    second = load_checkpoint(out)
    assert second.config == first.config
    for key, value in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[key], value), key


# ---- tensor parallelism (world 2, gloo, each rank its own process) -----------------------------------------
def test_tp_shards_of_the_experts_put_together_are_the_full_weights(moe_ckpts):
    ckpt = moe_ckpts["only-layer-1-norm"]
    full = load_checkpoint(ckpt).model.state_dict()
    parts = [load_checkpoint(ckpt, shard=TPShard(r, 2)).model.state_dict() for r in range(2)]
    expert = "model.layers.0.mlp.experts.3."
    assert parts[0][expert + "gate_proj.weight"].shape == (16, 64)  # moe_intermediate_size 32 split in 2
    for key, want in full.items():
        got = [p[key] for p in parts]
        if key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            assert torch.equal(torch.cat(got), want), key
        elif key.endswith(("o_proj.weight", "down_proj.weight")):
            assert torch.equal(torch.cat(got, 1), want), key
        else:  # router, norms (q/k norms included), embeddings, head
            assert all(torch.equal(g, want) for g in got), key


def test_tp_refuses_an_expert_width_it_cannot_split(tmp_path):
    ckpt = write_release_checkpoint(tmp_path / "odd", moe={**EXPERTS, "moe_intermediate_size": 33})
    with pytest.raises(ConfigError, match="moe_intermediate_size=33"):
        load_checkpoint(ckpt, shard=TPShard(0, 2))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_tensor_parallel_equals_single_process(tmp_path, moe_ckpts, single_thread, kind):
    ckpt = moe_ckpts["only-layer-1-norm"] if kind == "moe" else write_release_checkpoint(tmp_path / "d", seed=3)
    ids = [5, 17, 3, 99, 42, 7, 260, 11, 12, 4]
    with BranchParallelGroup(1, ckpt, tp=2, timeout_s=8.0, startup_timeout_s=240) as group:
        got = group.forward(ids)
    torch.testing.assert_close(got, plain_forward(LLM(ckpt), ids), atol=1e-4, rtol=0)


# ---- the runners: eager vs the fast path (static cache rows; CUDA graphs on CUDA) ------------------------------
def runner_logits(runner: Runner, mask_id: int) -> list[torch.Tensor]:
    """Raw logits of a committed prompt window, then of three branch windows of different widths, twice."""
    prompt = Candidate(torch.tensor([*range(3, 12), *[mask_id] * 4]), torch.arange(9, 13), torch.ones(4, dtype=bool))
    branches = [
        Candidate(torch.tensor([4, 9, mask_id, mask_id]), torch.arange(11, 13), torch.ones(2, dtype=bool), 1),
        Candidate(torch.tensor([4, mask_id, mask_id]), torch.arange(10, 12), torch.ones(2, dtype=bool), 2),
        Candidate(torch.tensor([4, mask_id, mask_id, mask_id]), torch.arange(10, 13), torch.ones(3, dtype=bool), 0),
    ]
    runner.begin(40, rows=3)
    out = []
    for start, commit, cands in [(0, 9, [prompt]), (9, 0, branches), (9, 0, branches)]:
        with torch.no_grad():
            out.append(runner.raw_logits(start, commit, cands)[0].float().cpu().clone())  # a graph reuses its buffer
        if commit:
            runner.cache.commit(commit)
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fast_runner_equals_eager_on_the_moe_model(moe_ckpts, device):
    """On CUDA the fast runner captures graphs, where every expert runs on every token: still the same logits."""
    loaded = load_checkpoint(moe_ckpts["step-2-no-norm"], device=device)
    dev, mask_id = torch.device(device), loaded.config.mask_token_id
    fast = FastRunner(fuse(copy.deepcopy(loaded.model)), dev)
    assert fast.use_graphs == (device == "cuda")
    eager = Runner(loaded.model, dev)
    for want, got in zip(runner_logits(eager, mask_id), runner_logits(fast, mask_id), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.committed_kv()[0], eager.committed_kv()[0], atol=1e-5, rtol=0)
