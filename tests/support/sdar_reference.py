"""An independent reference of SDAR's official decoder (``block_diffusion_generate`` in JetAstra/SDAR generate.py),
for the equivalence tests of lopa's decoders on block-causal models. It imports nothing from lopa.

The model is transformers' ``Qwen3ForCausalLM`` loaded from the checkpoint's own config.json and safetensors,
run with a 4-D additive block-causal mask (query ``i`` sees key ``j`` iff ``j // block <= i // block``, blocks
aligned to absolute position 0) and position ids ``0..L-1``; output ``i`` predicts token ``i`` (no shift).

The decoding follows the official code:

- the sequence is ``num_blocks * block`` positions, ``num_blocks = ceil((P + gen_length) / block)``, the prompt
  written at its head and masks after it; the prompt's whole blocks are prefilled (one forward when there is at
  least one), and decoding starts at the block holding the end of the prompt, its prompt tokens fixed;
- each step runs the current block over the earlier ones and, for ``low_confidence_dynamic``, fills every masked
  position whose confidence exceeds the threshold, or, when fewer than ``num_transfer_tokens[step]`` pass (the
  official schedule: ``block // steps`` plus one for the first ``block % steps`` steps), that many of the most
  confident masked positions;
- a full block costs one more forward (the official code writes its K/V into the cache with it); decoding stops
  after a block once an end token appears in the generated part.

Choices where the official code samples or is loose (the brief of the equivalence tests): the token is the argmax,
the mask token is never a candidate (its logit is removed before the softmax), the confidence is the maximum
softmax probability, and the top-k fallback is capped by the number of masked positions (the official ``topk``
over ``-inf`` confidences would otherwise overwrite prompt tokens of a partial first block).

The model recomputes the whole sequence every step: under block-causal attention the K/V of finished blocks do not
depend on later positions, so that equals the official cache; forwards are COUNTED as the official code runs them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


def load_qwen3(path: Path) -> torch.nn.Module:
    """transformers' Qwen3ForCausalLM with the checkpoint's tensors (eager attention, float32)."""
    from safetensors.torch import load_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    d = json.loads((Path(path) / "config.json").read_text())
    cfg = Qwen3Config(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d["num_key_value_heads"],
        head_dim=d["head_dim"],
        max_position_embeddings=d["max_position_embeddings"],
        rms_norm_eps=d["rms_norm_eps"],
        rope_theta=d["rope_theta"],
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        attention_bias=d.get("attention_bias", False),
        attn_implementation="eager",
    )
    model = Qwen3ForCausalLM(cfg).float().eval()
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"} and (not missing or cfg.tie_word_embeddings), missing
    return model


def block_causal_additive(length: int, block: int) -> torch.Tensor:
    """(1, 1, L, L) float mask: 0 where query i may see key j (j // block <= i // block), -inf elsewhere."""
    blocks = torch.arange(length) // block
    allowed = blocks[None, :] <= blocks[:, None]
    return torch.where(allowed, 0.0, float("-inf"))[None, None]


def num_transfer_tokens(block: int, steps: int) -> list[int]:
    """The official per-step schedule: ``block // steps`` each, plus one for the first ``block % steps`` steps."""
    return [block // steps + (1 if i < block % steps else 0) for i in range(steps)]


@dataclass
class SdarRun:
    tokens: list[int]  # the whole sequence, prompt included, masks where nothing was decoded
    forwards: int  # counted as the official code runs them (prefill, denoising steps, one cache write per block)
    blocks: int  # blocks decoded (the first one may hold the prompt's tail)
    fallback_fills: int = 0  # steps where fewer than the scheduled count passed and >= 2 were filled anyway
    min_gap: float = float("inf")  # smallest gap between ranked confidences / to the threshold (tie guard)
    steps: list[list[int]] = field(default_factory=list)  # per denoising step: the positions filled


@torch.no_grad()
def block_diffusion_generate(
    model: torch.nn.Module,
    prompt: list[int],
    mask_id: int,
    gen_length: int,
    block: int,
    denoising_steps: int,
    threshold: float,
    stop_ids: set[int],
) -> SdarRun:
    """Greedy ``low_confidence_dynamic`` block diffusion, as described in the module docstring."""
    p = len(prompt)
    num_blocks = (p + gen_length + block - 1) // block
    x = torch.full((num_blocks * block,), mask_id, dtype=torch.long)
    x[:p] = torch.tensor(prompt)
    prefill_blocks = p // block
    run = SdarRun([], forwards=int(prefill_blocks > 0), blocks=0)
    schedule = num_transfer_tokens(block, denoising_steps)
    for b in range(prefill_blocks, num_blocks):
        lo, hi = b * block, (b + 1) * block
        run.blocks += 1
        for step in range(denoising_steps + 1):
            masked = x[lo:hi] == mask_id  # (block,)
            run.forwards += 1
            if not masked.any():
                break  # this forward writes the finished block's K/V into the official cache
            logits = model(
                x[None, :hi], attention_mask=block_causal_additive(hi, block), position_ids=torch.arange(hi)[None]
            ).logits[0, lo:hi]  # (block, vocab)
            logits[:, mask_id] = float("-inf")
            probs = torch.softmax(logits.double(), dim=-1)
            conf, token = probs.max(dim=-1)  # (block,) each
            conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
            n = schedule[step]
            high = conf > threshold
            run.min_gap = min(run.min_gap, float((conf[masked] - threshold).abs().min()))
            if int(high.sum()) >= n:
                chosen = high
            else:
                take = min(n, int(masked.sum()))
                ranked = conf.sort(descending=True).values
                if take < int(masked.sum()):
                    run.min_gap = min(run.min_gap, float(ranked[take - 1] - ranked[take]))
                chosen = torch.zeros_like(masked)
                chosen[conf.topk(take).indices] = True
                run.fallback_fills += int(take >= 2)
            x[lo:hi] = torch.where(chosen, token, x[lo:hi])
            run.steps.append((chosen.nonzero().flatten() + lo).tolist())
        if any(int(t) in stop_ids for t in x[p:hi]):
            break
    run.tokens = x.tolist()
    return run


@torch.no_grad()
def fresh_kv(model: torch.nn.Module, tokens: list[int], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one block-causal forward of ``tokens`` from scratch: (layers, kv_heads, L, head_dim) each,
    keys after q/k norm and RoPE (what a cache holds)."""
    n = len(tokens)
    out = model(
        torch.tensor([tokens]),
        attention_mask=block_causal_additive(n, block),
        position_ids=torch.arange(n)[None],
        use_cache=True,
    )
    layers = out.past_key_values.layers
    return torch.stack([layer.keys[0] for layer in layers]), torch.stack([layer.values[0] for layer in layers])
