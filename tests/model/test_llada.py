"""The LLaDA family: forward equals transformers' LlamaForCausalLM run bidirectionally on the checkpoint's own
tensors (renamed here, independently of lopa's table), LoRA merge equals peft's merge_and_unload on a module tree
spelled like LLaDA's, greedy vanilla decoding equals a plain no-shift loop, config parsing and its refusals."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from lopa.checkpoint.loader import load_checkpoint
from lopa.commands.main import main
from lopa.errors import TensorMismatchError, UnsupportedModelError
from lopa.model.families import config_from_hf, family_named
from lopa.testing import llama_config, make_random_lora, make_tiny_checkpoint, transformers_bidirectional_logits

transformers = pytest.importorskip("transformers")

TOL = 1e-4
# LLaDA tensor name -> transformers' Llama name, written out here so the test does not reuse lopa's mapping.
_TO_LLAMA = [
    (r"model\.transformer\.wte\.weight", "model.embed_tokens.weight"),
    (r"model\.transformer\.ln_f\.weight", "model.norm.weight"),
    (r"model\.transformer\.ff_out\.weight", "lm_head.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.([qkv])_proj\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.attn_out\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_proj\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.up_proj\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_out\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]
CONFIGS = {  # make_tiny_checkpoint arguments: MHA and GQA, tied and untied heads, LLaDA's RoPE theta
    "mha-untied": dict(num_heads=4, num_kv_heads=4, rope_theta=500_000.0),
    "gqa-tied": dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True, rope_theta=500_000.0),
    "mqa-untied-3layers": dict(num_heads=8, num_kv_heads=1, num_layers=3, hidden_size=64, intermediate_size=96),
    "mha-tied-wide": dict(hidden_size=96, num_heads=3, num_kv_heads=3, tie_word_embeddings=True),
}
# The published LLaDA-8B config.json, as LLaDA's own loader reads it.
LLADA_8B = {
    "activation_type": "silu", "alibi": False, "architectures": ["LLaDAModelLM"], "attention_layer_norm": False,
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_size": 126464, "eos_token_id": 126081, "include_bias": False, "include_qkv_bias": False,
    "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": 126336,
    "max_sequence_length": 4096, "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada",
    "multi_query_attention": None, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081,
    "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
    "vocab_size": 126464, "weight_tying": False,
}  # fmt: skip


def _llama_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in tensors.items():
        for pattern, repl in _TO_LLAMA:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = t
                break
        else:
            raise AssertionError(f"unmapped LLaDA tensor {key}")
    return out


def _llama_twin(ckpt: Path, tensors: dict[str, torch.Tensor] | None = None):
    """LlamaForCausalLM holding the checkpoint's tensors, with every layer's causal flag off."""
    cfg = load_checkpoint(ckpt).config
    hf = transformers.LlamaForCausalLM(llama_config(cfg))
    state = _llama_state(tensors if tensors is not None else load_file(str(ckpt / "model.safetensors")))
    if cfg.tie_word_embeddings:
        assert "lm_head.weight" not in state
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True)
    for layer in hf.model.layers:
        layer.self_attn.is_causal = False
    return hf.eval()


def _ids(vocab: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))  # (1, L)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_llama_bidirectional(name: str, tmp_path: Path) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / name, family="llada", seed=sorted(CONFIGS).index(name), **CONFIGS[name])
    ours = load_checkpoint(ckpt)
    assert ours.config.tie_word_embeddings == bool(CONFIGS[name].get("tie_word_embeddings"))
    ids = _ids(ours.config.vocab_size, 29, seed=1)
    with torch.no_grad():
        got = ours.model(ids, torch.arange(29)[None])  # (1, L, vocab)
    want = transformers_bidirectional_logits(_llama_twin(ckpt), ids)
    assert got.std() > 0.3  # far from constant, so the comparison means something
    assert (got - want).abs().max() <= TOL  # position by position: no shift between the two


def test_causal_llama_differs_so_the_comparison_has_teeth(tmp_path: Path) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "c", family="llada", seed=3)
    ids = _ids(300, 16, seed=2)
    with torch.no_grad():
        causal = _llama_twin(ckpt)(input_ids=ids).logits
        ours = load_checkpoint(ckpt).model(ids, torch.arange(16)[None])
    assert (ours - causal).abs().max() > 1e-2


# ---- LoRA -----------------------------------------------------------------------------------------------------
class _Root(nn.Module):
    def prepare_inputs_for_generation(self, *args, **kwargs):  # peft's causal-LM wrapper looks it up
        return {}


def _llada_module_tree(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Modules named exactly as in the LLaDA checkpoint (2-D weights as Linear), so peft matches its names."""
    root = _Root()
    for key, t in tensors.items():
        *path, param = key.split(".")
        mod = root
        for i, part in enumerate(path):
            if not hasattr(mod, part):
                linear = i == len(path) - 1 and t.dim() == 2 and part != "wte"
                mod.add_module(part, nn.Linear(t.shape[1], t.shape[0], bias=False) if linear else nn.Module())
            mod = getattr(mod, part)
        if isinstance(mod, nn.Linear):
            mod.weight.data.copy_(t)
        else:
            mod.register_parameter(param, nn.Parameter(t.clone()))
    return root


@pytest.mark.parametrize(
    "targets",
    [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")],
    ids=["qv", "all-linear-and-head"],
)
def test_lora_merge_equals_peft(targets: tuple[str, ...], tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    ckpt = make_tiny_checkpoint(tmp_path / "base", family="llada", num_kv_heads=2, seed=5)
    lora = make_random_lora(ckpt, tmp_path / "lora", r=4, alpha=8, targets=targets, seed=6)
    tensors = load_file(str(ckpt / "model.safetensors"))
    merged = peft.PeftModel.from_pretrained(_llada_module_tree(tensors), str(lora)).merge_and_unload()
    merged_tensors = {k: v.detach() for k, v in merged.state_dict().items()}
    if "ff_out" in targets:  # peft's suffix rule also hits the LM head, model.transformer.ff_out
        head = "model.transformer.ff_out.weight"
        assert not torch.equal(merged_tensors[head], tensors[head])
    ids = _ids(300, 12, seed=7)
    with torch.no_grad():
        ours = load_checkpoint(ckpt, lora=lora).model(ids, torch.arange(12)[None])
        base = load_checkpoint(ckpt).model(ids, torch.arange(12)[None])
    theirs = transformers_bidirectional_logits(_llama_twin(ckpt, merged_tensors), ids)
    assert (ours - base).abs().max() > 1e-2  # the adapter really changes the model
    assert (ours - theirs).abs().max() <= TOL


# ---- greedy vanilla decoding, computed independently ----------------------------------------------------------
def _plain_vanilla(hf, prompt: list[int], n: int, mask: int, shift: int) -> list[int]:
    """Whole answer masked; each step fills the most confident masked position with its argmax token."""
    x = torch.tensor([prompt + [mask] * n])  # (1, P + n)
    for _ in range(n):
        probs = torch.softmax(transformers_bidirectional_logits(hf, x)[0].double(), dim=-1)  # (P + n, vocab)
        masked = (x[0] == mask).nonzero().flatten()
        p = probs[masked - shift]  # the output that predicts each masked position
        conf, tok = p.max(-1)
        j = int(conf.argmax())
        x[0, masked[j]] = tok[j]
    return x[0, len(prompt) :].tolist()


def test_vanilla_generate_equals_a_plain_no_shift_loop(tmp_path: Path, capsys) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "hand", family="llada", num_layers=2, num_kv_heads=4, seed=11)
    tensors = load_file(str(ckpt / "model.safetensors"))
    head = "model.transformer.ff_out.weight"
    tensors[head] = tensors[head] * 4.0  # a sharper head: confidences spread out, so the fill order matters
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    hf = _llama_twin(ckpt)
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    mask, ends = ids["<|mdm_mask|>"], {ids["<|endoftext|>"], ids["<|eot_id|>"]}
    prompt = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode("the answer is", add_special_tokens=False).ids
    n = 10
    want = _plain_vanilla(hf, prompt, n, mask, shift=0)
    cut = next((i for i, t in enumerate(want) if t in ends), n)
    args = ["generate", "--model", str(ckpt), "--json", "--raw", "--decoder", "vanilla"]
    assert main([*args, "--max-new-tokens", str(n), "the answer is"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from lopa import LLM

    assert LLM(ckpt).encode_prompt("the answer is", raw=True) == prompt  # what the CLI decoded from
    assert got["token_ids"] == want[:cut]
    assert len(set(want[:cut])) >= 2  # not a degenerate all-same answer
    assert _plain_vanilla(hf, prompt, n, mask, shift=1) != want  # Dream's shift would decode something else


# ---- config and refusals --------------------------------------------------------------------------------------
def test_published_llada_8b_config_parses() -> None:
    cfg = config_from_hf(LLADA_8B)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        4096,
        32,
        32,
        32,
    )
    assert (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size) == (128, 12288, 126464)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (500000.0, 1e-5, 4096)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.tie_word_embeddings, cfg.attention_bias) == (
        126336,
        126081,
        False,
        False,
    )
    assert cfg.family == "llada" and cfg.logit_shift == 0


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("alibi", True, "ALiBi"),
        ("block_type", "sequential", "block_type='sequential'"),
        ("attention_layer_norm", True, "QK layer norm"),
        ("include_bias", True, "biases"),
        ("scale_logits", True, "scaled logits"),
    ],
)
def test_unsupported_llada_options_are_named(field: str, value: object, fragment: str) -> None:
    with pytest.raises(UnsupportedModelError, match=re.escape(fragment)):
        config_from_hf({**LLADA_8B, field: value})


def test_unknown_model_type_lists_the_supported_families(tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(make_tiny_checkpoint(tmp_path / "a", family="llada"), tmp_path / "b"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"'mistral' is not supported.*dream \(.*'Dream'.*llada \("):
        load_checkpoint(ckpt)


def test_dream_tensor_names_in_a_llada_checkpoint_are_named(tmp_path: Path, tiny_ckpt: Path) -> None:
    ckpt = make_tiny_checkpoint(tmp_path / "l", family="llada")
    shutil.copyfile(tiny_ckpt / "model.safetensors", ckpt / "model.safetensors")
    with pytest.raises(TensorMismatchError, match=r"unexpected tensor '[\w.]+'; .* a llada model"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_name_tables_translate_every_tensor_both_ways(family: str) -> None:
    from lopa.model.transformer import Transformer

    fam = family_named(family)
    cfg = fam.make_config(97, 32, 48, 3, 4, 2, 8)
    with torch.device("meta"):
        names = list(Transformer(cfg).state_dict())
    ckpt = [fam.tensor_to_checkpoint(n) for n in names]
    assert len(set(ckpt)) == len(names)  # one checkpoint name per tensor
    assert [fam.tensor_to_shared(c) for c in ckpt] == names
    assert fam.tensor_to_shared("model.transformer.blocks.0.q_norm.weight") is None or family == "dream"
