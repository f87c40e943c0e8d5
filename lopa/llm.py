"""LLM: the public facade. Loads a checkpoint once, turns prompts into Completions.

``generate`` handles prompts one after another (each prompt's branches are one batch); ``stream`` yields the
text that became final after every forward, so a server can send it at once and cancel between forwards by
closing the iterator. Text is never revised: decoded positions are final, and only the contiguous decoded
prefix of the answer is ever shown. Parameters are validated by :meth:`DecodeConfig.validate`; prompt length
is checked here against the model's context, and a prompt holding the mask token is refused here
(:class:`~lopa.errors.MaskTokenInPromptError`): every decoder continues a prompt, none infills one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lopa.config import DecodeConfig
from lopa.engine.engine import Step, answer_ids, decode
from lopa.engine.fast import make_runner
from lopa.errors import ConfigError, MaskTokenInPromptError, PromptTooLongError
from lopa.model.loader import load_checkpoint
from lopa.model.tp import TPShard
from lopa.outputs import Completion, Stats, TraceStep

Prompt = str | Sequence[int]
BUNDLED_MODEL_NAME = "lopa-tiny"  # model id of the checkpoint shipped in lopa/tiny/checkpoint
Messages = list[dict[str, str]]


@dataclass
class StreamEvent:
    """Text that became final since the previous event ('' if none); ``completion`` on the last event.

    With ``DecodeConfig.trace`` on, ``trace`` holds the trace steps recorded since the previous event (one per
    forward), so a client can show the decoding live; it is empty otherwise.
    """

    text: str
    token_ids: list[int]
    completion: Completion | None = None
    trace: list[TraceStep] = field(default_factory=list)


def default_model_dir() -> Path:
    from lopa.tiny import default_checkpoint_dir

    return default_checkpoint_dir()


class LLM:
    """A loaded model (any supported family) ready to decode. Not thread-safe: serialize calls."""

    def __init__(
        self,
        model_dir: str | Path | None = None,
        lora: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        enforce_eager: bool | None = None,
        shard: TPShard | None = None,
    ) -> None:
        path = Path(model_dir) if model_dir is not None else default_model_dir()
        self.checkpoint = load_checkpoint(path, lora=lora, device=device, dtype=dtype, shard=shard)
        if shard is not None and shard.size > 1:
            enforce_eager = True  # tensor-parallel all-reduces are timed collectives: no CUDA graph around them
        self.tokenizer = self.checkpoint.tokenizer
        self.model = self.checkpoint.model
        self.config = self.checkpoint.config
        self.device = next(self.model.parameters()).device
        self.model_name = path.resolve().name if model_dir is not None else BUNDLED_MODEL_NAME
        self.max_context = self.config.max_position_embeddings
        self.mask_id = int(self.tokenizer.mask_token_id)
        self.end_ids = frozenset(self.tokenizer.end_token_ids)
        self.default_config = DecodeConfig.recommended(
            {**self.config.family.decode_defaults, **self.checkpoint.generation_config}
        )
        self.runner = make_runner(self.model, self.device, enforce_eager)  # None: fast path on CUDA, eager on CPU
        # after a request, a KV cache larger than this is freed rather than kept for reuse (None: always kept)
        self.max_idle_cache_bytes: int | None = None

    def decode_config(self, **changes: object) -> DecodeConfig:
        """This checkpoint's recommended settings with ``changes`` applied (what the CLI's flags do), validated."""
        return self.default_config.replace(**changes).validate()

    # ---- prompts -------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt | Messages, raw: bool = False) -> list[int]:
        """Token ids of a prompt: ids verbatim, messages or text through the chat template (unless raw)."""
        if isinstance(prompt, str):
            if raw or not self.tokenizer.has_chat_template:
                ids = self.tokenizer.encode(prompt)
            else:
                ids = self.tokenizer.encode(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
        elif _is_messages(prompt):
            if self.tokenizer.has_chat_template:
                ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(list(prompt)))  # type: ignore[arg-type]
            else:
                ids = self.tokenizer.encode("\n".join(m.get("content", "") for m in prompt))  # type: ignore[union-attr]
        else:
            ids = [int(t) for t in prompt]  # type: ignore[union-attr]
            vocab = self.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ConfigError(f"token ids must be in [0, {vocab}); got {bad[:5]}")
        if not ids:
            raise ConfigError("the prompt is empty: give at least one token")
        self._refuse_mask(ids)
        return ids

    def _refuse_mask(self, ids: list[int]) -> None:
        """Every decoder continues a prompt; none infills it, so a mask token inside one is refused."""
        at = [i for i, t in enumerate(ids) if t == self.mask_id]
        if at:
            token = self.tokenizer.id_to_token(self.mask_id)
            raise MaskTokenInPromptError(
                f"the prompt contains the mask token {token!r} (id {self.mask_id}) at position(s) {at[:5]}; lopa "
                f"continues prompts and does not infill masked positions: remove the mask token from the prompt"
            )

    def count_prompt_tokens(self, prompt: Prompt | Messages, raw: bool = False) -> int:
        return len(self.encode_prompt(prompt, raw))

    def kv_cache_bytes(self, rows: int, positions: int) -> int:
        """Bytes of the K and V cache for ``rows`` branch rows of ``positions`` positions of this model."""
        c, element = self.config, next(self.model.parameters()).element_size()
        return 2 * c.num_hidden_layers * rows * c.num_key_value_heads * positions * c.head_dim * element

    def check_fits(self, ids: list[int], cfg: DecodeConfig) -> None:
        """Raise PromptTooLongError unless the prompt plus max_new_tokens fits the model's context."""
        need = len(ids) + cfg.max_new_tokens
        if need > self.max_context:
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({cfg.max_new_tokens}) = {need} exceeds the model's "
                f"context of {self.max_context} positions; shorten the prompt or lower max_new_tokens"
            )

    # ---- decoding ------------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        config: DecodeConfig | None = None,
        raw: bool = False,
        progress: bool = False,
    ) -> list[Completion]:
        """Decode each prompt (a string, a list of token ids, or a list of those)."""
        cfg = (config or self.default_config).validate()
        batch = [prompts] if isinstance(prompts, str) or _is_ids(prompts) else list(prompts)  # type: ignore[list-item]
        encoded = [self.encode_prompt(p, raw) for p in batch]  # validate every prompt before decoding any
        for ids in encoded:
            self.check_fits(ids, cfg)
        bar = tqdm(encoded, desc="generate", unit="prompt", disable=not progress)
        return [self._complete(ids, cfg) for ids in bar]

    def chat(self, messages: Messages, config: DecodeConfig | None = None) -> Completion:
        """Decode the assistant's reply to OpenAI-style messages."""
        cfg = (config or self.default_config).validate()
        ids = self.encode_prompt(messages)
        self.check_fits(ids, cfg)
        return self._complete(ids, cfg)

    def stream(
        self, prompt: Prompt | Messages, config: DecodeConfig | None = None, raw: bool = False
    ) -> Iterator[StreamEvent]:
        """Yield final text after every forward; the last event carries the Completion."""
        cfg = (config or self.default_config).validate()
        ids = self.encode_prompt(prompt, raw)
        self.check_fits(ids, cfg)
        shown_text, shown_ids, shown_steps = "", 0, 0
        hold = max((len(s) for s in cfg.stop), default=1) - 1
        for step, completion in self._steps(ids, cfg):
            if completion is None:
                out_ids, text, _, _ = self._answer(step, cfg)
                text = text.rstrip("\ufffd")  # an incomplete multi-byte character may still change
                text = text[: max(len(text) - hold, len(shown_text))] if cfg.stop else text
            else:
                out_ids, text = completion.token_ids, completion.text
            delta = text[len(shown_text) :] if text.startswith(shown_text) else ""
            shown_text += delta
            new_ids = out_ids[shown_ids:]
            shown_ids = max(shown_ids, len(out_ids))
            steps = step.trace[shown_steps:] if step.trace is not None else []
            shown_steps += len(steps)
            yield StreamEvent(delta, new_ids, completion, steps)

    def _steps(self, ids: list[int], cfg: DecodeConfig) -> Iterator[tuple[Step, Completion | None]]:
        t0 = time.perf_counter()
        stop = self._stop_check(cfg) if cfg.stop else None
        try:
            for step in decode(self.runner, ids, cfg, self.mask_id, self.end_ids, stop):
                if step.done:
                    yield step, self._completion(step, cfg, ids, time.perf_counter() - t0)
                else:
                    yield step, None
        finally:
            self._trim_cache()

    def _trim_cache(self) -> None:
        """Free a KV cache one large request grew past ``max_idle_cache_bytes`` (the next request allocates)."""
        cache = getattr(self.runner, "cache", None)
        limit = self.max_idle_cache_bytes
        if limit is None or cache is None or not hasattr(self.runner, "release"):
            return
        if 2 * cache.k.numel() * cache.k.element_size() > limit:
            self.runner.release()

    def _complete(self, ids: list[int], cfg: DecodeConfig) -> Completion:
        completion = None
        for _, completion in self._steps(ids, cfg):  # noqa: B007
            pass
        assert completion is not None
        return completion

    def _stop_check(self, cfg: DecodeConfig):
        def check(out: list[int]) -> bool:
            cut = next((i for i, t in enumerate(out) if t in self.end_ids), len(out))
            text = self.tokenizer.decode(out[:cut])
            return any(s in text for s in cfg.stop)

        return check

    def _answer(self, step: Step, cfg: DecodeConfig) -> tuple[list[int], str, bool, bool]:
        """(token ids, text, end token produced, stop string hit) of the final part of the answer."""
        out, end_token = answer_ids(step.state, self.end_ids)
        text = self.tokenizer.decode(out)
        cut = min((text.find(x) for x in cfg.stop if x in text), default=-1)
        if cut < 0:
            return out, text, end_token, False
        while out and len(self.tokenizer.decode(out)) > cut:  # drop the tokens that spell the stop string
            out = out[:-1]
        return out, text[:cut], False, True

    def _completion(self, step: Step, cfg: DecodeConfig, prompt: list[int], seconds: float) -> Completion:
        out, text, end_token, stop_hit = self._answer(step, cfg)
        stats: Stats = step.stats
        stats.tokens = len(out) + int(end_token)  # a stop string may have cut what the engine counted
        stats.seconds = seconds
        return Completion(
            text=text,
            token_ids=out,
            finish_reason="stop" if end_token or stop_hit else "length",
            stats=stats,
            prompt_token_ids=list(prompt),
            trace=step.trace,
        )


def _is_ids(x: object) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, int) for t in x)


def _is_messages(x: object) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)
