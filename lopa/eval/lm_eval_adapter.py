"""lm-evaluation-harness model ``lopa`` (generate_until only), for running lm-eval's own task definitions.

Optional: importing this module imports ``lm_eval`` (``pip install lm-eval``); nothing else in lopa imports it.
Importing registers the model name ``lopa``. Two ways to run it:

- ``python -m lopa.eval.lm_eval_adapter run --model lopa --model_args model=DIR,decoder=lopa,branches=7 ...``
  (lm-eval's own command line, after registering the model);
- ``import lopa.eval.lm_eval_adapter; lm_eval.simple_evaluate(model="lopa", model_args=..., tasks=[...])``.

Model args: ``model`` (or ``pretrained``), ``lora``, ``device``, ``dtype``, ``escape_until`` (ignore the task's
stop strings, as the authors' HumanEval run did) and any :class:`~lopa.config.DecodeConfig` field. lm-eval's
``max_gen_toks`` is ignored (the paper's runs use ``max_new_tokens``). Log-likelihood requests raise
NotImplementedError: diffusion LMs have no cheap exact likelihood, and the generation tasks do not need one.
"""

from __future__ import annotations

import sys
from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval") from e

from lopa.config import DecodeConfig
from lopa.eval.code import cut_at_stops

_IGNORED = {"batch_size", "max_batch_size"}  # lm-eval passes these; lopa decodes one prompt at a time


@register_model("lopa")
class LopaLM(LM):
    """lm-eval's view of a :class:`lopa.LLM`: greedy or sampled generation until a stop string."""

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        lora: str | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        revision: str | None = None,
        escape_until: bool = False,
        llm: Any = None,
        **decode: Any,
    ) -> None:
        super().__init__()
        for key in _IGNORED & set(decode):
            decode.pop(key)
        self.config = DecodeConfig.from_dict(decode)  # unknown keys are a ConfigError naming the known ones
        if llm is None:
            from lopa.llm import LLM

            llm = LLM(model or pretrained, lora=lora, device=device or "cpu", dtype=dtype, revision=revision)
        self.llm = llm
        self.escape_until = bool(escape_until)

    # ---- generation -------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            until = [] if self.escape_until else _as_list(gen_kwargs.get("until"))
            config = self.config.replace(stop=tuple(dict.fromkeys(self.config.stop + tuple(until))))
            if gen_kwargs.get("do_sample") and gen_kwargs.get("temperature"):
                config = config.replace(temperature=float(gen_kwargs["temperature"]))
            completion = self.llm.generate([context], config, raw=True)[0]
            text = cut_at_stops(completion.text, until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "lopa's lm-eval model implements generate_until only; choose generation tasks (gsm8k, minerva_math, "
            "humaneval, mbpp), not multiple-choice or perplexity tasks"
        )

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("lopa's lm-eval model implements generate_until only (no perplexity)")

    # ---- chat templates (--apply_chat_template) -----------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.llm, "model_name", "lopa"))

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "lopa" if getattr(self.llm.tokenizer, "has_chat_template", False) else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.llm.tokenizer.apply_chat_template(chat_history)


def _as_list(until: Any) -> list[str]:
    if until is None:
        return []
    return [until] if isinstance(until, str) else [u for u in until if u]


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the ``lopa`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
