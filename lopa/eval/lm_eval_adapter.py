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

Device: a ``device`` in the model args is the user's and must exist (else DeviceUnavailableError). lm-eval's
command line hands every model its own default, ``cuda:0``, when ``--device`` is not given; that default (or no
device at all) follows lopa's default instead when CUDA is not available: ``cpu``.

Batching: ``generate_until`` hands all of lm-eval's requests to ``LLM.generate`` in one call (one config per
request where their generation kwargs differ), so they decode together, ``max_num_seqs`` at a time.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install lm-eval") from e

from lopa.config import DecodeConfig
from lopa.eval.code_extract import cut_at_stops

_IGNORED = {"batch_size", "max_batch_size"}  # lm-eval passes these; LLM.generate batches by max_num_seqs
LOPA_DEFAULT_DEVICE = "cpu"  # lopa.LLM's and the CLI's default
log = logging.getLogger("lopa")


def harness_default_device() -> str | None:
    """The device lm-eval's command line passes when ``--device`` is not given (``cuda:0`` in 0.4.x)."""
    try:
        from lm_eval.config.evaluate_config import EvaluatorConfig
    except ImportError:  # pragma: no cover - older lm-eval: its command-line default was cuda too
        return "cuda:0"
    default = EvaluatorConfig.__dataclass_fields__["device"].default
    return default if isinstance(default, str) else None


def choose_device(explicit: str | None, harness: str | None) -> str:
    """The device to load on: the user's ``explicit`` one as given (checked by the loader); otherwise lm-eval's
    ``harness`` device, unless it is lm-eval's own default (or absent) and CUDA is not available, in which case
    lopa's default."""
    if explicit is not None:
        return explicit
    if harness is None:
        return LOPA_DEFAULT_DEVICE
    if harness == harness_default_device() and not torch.cuda.is_available():
        log.info("lm-eval's default device %s: no CUDA here, using lopa's default %s", harness, LOPA_DEFAULT_DEVICE)
        return LOPA_DEFAULT_DEVICE
    return harness


@register_model("lopa")
class LopaLM(LM):
    """lm-eval's view of a :class:`lopa.LLM`: greedy or sampled generation until a stop string."""

    def __init__(
        self,
        model: str | None = None,
        pretrained: str | None = None,
        lora: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        escape_until: bool = False,
        llm: Any = None,
        harness_device: str | None = None,
        **decode: Any,
    ) -> None:
        """``device``: the user's (must exist); ``harness_device``: what lm-eval passed (see :func:`choose_device`)."""
        super().__init__()
        for key in _IGNORED & set(decode):
            decode.pop(key)
        self.config = DecodeConfig.from_dict(decode)  # unknown keys are a ConfigError naming the known ones
        if llm is None:
            from lopa.llm import LLM

            device = choose_device(device, harness_device)
            llm = LLM(model or pretrained, lora=lora, device=device, dtype=dtype, revision=revision)
        self.llm = llm
        self._device = torch.device(llm.device_name)
        self.escape_until = bool(escape_until)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> LopaLM:
        """lm-eval's constructor from ``--model_args``; its own ``device`` is kept apart from the user's."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> LopaLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        harness_device = extra.pop("device", None)
        return cls(**arg_dict, **extra, harness_device=harness_device)

    # ---- generation -------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """All requests in one ``LLM.generate`` call; each text cut at its own stop strings."""
        if not requests:
            return []
        contexts, untils, configs = [], [], []
        for req in requests:
            context, gen_kwargs = req.args
            until = [] if self.escape_until else _as_list(gen_kwargs.get("until"))
            config = self.config.replace(stop=tuple(dict.fromkeys(self.config.stop + tuple(until))))
            if gen_kwargs.get("do_sample") and gen_kwargs.get("temperature"):
                config = config.replace(temperature=float(gen_kwargs["temperature"]))
            contexts.append(context)
            untils.append(until)
            configs.append(config)
        shared = configs[0] if all(c == configs[0] for c in configs) else configs
        completions = self.llm.generate(contexts, shared, raw=True, progress=not disable_tqdm)
        out = []
        for req, until, completion in zip(requests, untils, completions, strict=True):
            text = cut_at_stops(completion.text, until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
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
        return self.llm.model_name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return "lopa" if self.llm.tokenizer.has_chat_template else None

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
