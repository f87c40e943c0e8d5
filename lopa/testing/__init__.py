"""Test support: tiny random-weight checkpoints (Dream or LLaDA family) and LoRA adapters, for tests and for trying
lopa without real weights.

The checkpoints are complete: ``config.json``, ``model.safetensors`` (or shards), ``generation_config.json``, and a
small byte-level BPE tokenizer (256 byte tokens, a few dozen merges, then the family's special tokens) that can
encode any text, with the family's kind of chat template. Dream: ``<|endoftext|>`` (eos = pad), ``<|im_start|>``,
``<|im_end|>``, ``<|mask|>`` and a ChatML template. LLaDA (``family="llada"``): ``<|startoftext|>`` (bos),
``<|endoftext|>`` (eos = pad), ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>``, ``<|mdm_mask|>``,
LLaDA's tensor names and config fields, and a Llama-3-style template like LLaDA-8B-Instruct's.
The weights are random, so the text a model generates is gibberish, but every code path runs::

    from lopa.testing import make_tiny_checkpoint, make_random_lora
    make_tiny_checkpoint("tiny-dream")
    make_random_lora("tiny-dream", "tiny-lora")

    from lopa import LLM
    llm = LLM("tiny-dream", lora="tiny-lora")
    print(llm.generate("hello")[0].text)

or from the shell: ``lopa generate --model tiny-dream --lora tiny-lora ...``. Both functions are deterministic in
``seed``. The test suite's ``tiny_ckpt`` / ``tiny_lora`` fixtures are built with them.

Modules: ``checkpoints`` (checkpoints, LoRA adapters, random models), ``tokenizers`` (their byte-level tokenizers
and chat templates), ``hf_twin`` (the same weights in transformers, for equivalence checks) and ``fake_llm``
(:class:`FakeLLM`, a stand-in facade that answers from a function, for the eval harness). Nothing in the engine
imports this package; tests, bench/ and users trying lopa without weights do.
"""

from lopa.testing.checkpoints import make_random_lora, make_tiny_checkpoint, random_model
from lopa.testing.fake_llm import FakeLLM
from lopa.testing.hf_twin import llama_config, qwen2_config, transformers_bidirectional_logits, transformers_twin
from lopa.testing.tokenizers import (
    CHATML_TEMPLATE,
    LLADA_SPECIAL_TOKENS,
    LLADA_TEMPLATE,
    SPECIAL_TOKENS,
    byte_level_tokenizer,
)

__all__ = [
    "CHATML_TEMPLATE",
    "LLADA_SPECIAL_TOKENS",
    "LLADA_TEMPLATE",
    "SPECIAL_TOKENS",
    "FakeLLM",
    "byte_level_tokenizer",
    "llama_config",
    "make_random_lora",
    "make_tiny_checkpoint",
    "qwen2_config",
    "random_model",
    "transformers_bidirectional_logits",
    "transformers_twin",
]
