"""The evaluation loop: decode every document, score it, write per-sample JSONL and a summary JSON.

Called by ``lopa eval`` (:mod:`lopa.commands.eval`) and ``lopa sweep``. The model is reached only through
``llm.generate([prompt], config, raw=True)`` (the task renders the exact prompt text), one prompt at a time,
so latency is per sample. Code programs run in the sandbox on a small thread pool while the next sample
decodes. Metric definitions follow docs/algorithm.md §5: ``tok/s = Σ tokens / Σ latency`` (aggregate, with
the per-sample mean beside it), ``tpf = tokens / forwards`` per sample.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from statistics import mean, median
from typing import Any

from tqdm import tqdm

from lopa.config import DecodeConfig
from lopa.engine.protocol import Engine
from lopa.errors import PromptTooLongError
from lopa.eval.sandbox import Sandbox, SandboxResult
from lopa.eval.tasks.base import Doc, Task

SAMPLES_FILE, SUMMARY_FILE = "samples.jsonl", "summary.json"
# per-sample fields that depend on timing, not on the decoded result (excluded when comparing runs)
TIMING_FIELDS = ("latency", "tokens_per_second", "sandbox_seconds")


@dataclass
class EvalResult:
    records: list[dict[str, Any]]
    summary: dict[str, Any]


def resolve_chat(chat: str, task: Task, has_template: bool) -> bool:
    """--chat auto|on|off -> whether prompts go through the chat template (never without one)."""
    wanted = task.chat_default if chat == "auto" else chat == "on"
    return wanted and has_template


def evaluate(
    llm: Engine,
    task: Task,
    docs: list[Doc],
    config: DecodeConfig,
    *,
    chat: str = "auto",
    num_fewshot: int | None = None,
    sandbox: Sandbox | None = None,
    workers: int = 2,
    progress: bool = True,
    out_dir: Path | None = None,
    meta: dict[str, Any] | None = None,
) -> EvalResult:
    """Run ``task`` over ``docs`` with ``config``; write files to ``out_dir`` when given."""
    use_chat = resolve_chat(chat, task, bool(llm.tokenizer.has_chat_template))
    stops = tuple(dict.fromkeys(config.stop + task.stops(use_chat)))
    config = config.replace(stop=stops).validate()
    sandbox = sandbox or (Sandbox() if task.is_code else None)
    records: list[dict[str, Any]] = []
    pending: dict[int, Future[SandboxResult]] = {}
    started = time.perf_counter()
    bar = tqdm(total=len(docs), desc=task.name, unit="sample", disable=not progress, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, doc in enumerate(docs):
            prompt = task.render(doc, llm.tokenizer, use_chat, num_fewshot)
            record = _generate(llm, task, doc, i, prompt, config)
            if "error" not in record:
                text = task.completion_text(record["completion"], use_chat)
                if task.is_code:
                    program = task.program(doc, text)
                    record["extracted"] = program.solution
                    # the solution apart from its tests: the verdict comes from a process the solution cannot touch
                    pending[i] = pool.submit(sandbox.run, program)  # type: ignore[union-attr]
                else:
                    score = task.score(doc, text)
                    record.update(correct=score.correct, extracted=score.extracted, **score.extra)
            records.append(record)
            bar.update(1)
            bar.set_postfix(_running(records, pending), refresh=False)
        for i, future in pending.items():
            result = future.result()
            records[i].update(
                correct=result.passed, status=result.status, detail=result.detail[-500:], sandbox_seconds=result.seconds
            )
    bar.set_postfix(_running(records, {}), refresh=True)
    bar.close()
    summary = summarize(records, time.perf_counter() - started)
    summary["settings"] = {
        "task": task.name,
        "chat": use_chat,
        "num_fewshot": task.num_fewshot if num_fewshot is None else num_fewshot,
        "decode": config.to_dict(),
        "sandbox": sandbox.describe() if sandbox else None,
    }
    summary.update(environment(llm), **(meta or {}))
    if out_dir is not None:
        write_outputs(out_dir, records, summary)
    return EvalResult(records, summary)


def _generate(llm: Engine, task: Task, doc: Doc, index: int, prompt: str, config: DecodeConfig) -> dict[str, Any]:
    record: dict[str, Any] = {"index": index, "id": task.doc_id(doc, index), "prompt": prompt}
    target = task.target(doc)
    if target is not None:
        record["target"] = target
    try:
        completion = llm.generate([prompt], config, raw=True)[0]
    except PromptTooLongError as e:  # counted as wrong, reported in the summary, and the run goes on
        record.update(completion="", correct=False, error=str(e), forwards=0, tokens=0, tpf=0.0, latency=0.0)
        return record
    s = completion.stats
    record.update(
        completion=completion.text,
        finish_reason=completion.finish_reason,
        prompt_tokens=len(completion.prompt_token_ids) or s.prompt_tokens,
        forwards=s.forwards,
        tokens=s.tokens,
        iterations=s.iterations,
        tpf=s.tpf,
        tpf_paper=s.tpf_paper,
        latency=s.seconds,
        tokens_per_second=s.tokens_per_second,
    )
    return record


def _running(records: list[dict[str, Any]], pending: dict[int, Future[SandboxResult]]) -> dict[str, str]:
    """Progress-bar fields: score over the samples scored so far, aggregate tok/s so far."""
    scored = [r["correct"] for r in records if "correct" in r]
    scored += [f.result().passed for f in pending.values() if f.done()]
    tokens, seconds = sum(r["tokens"] for r in records), sum(r["latency"] for r in records)
    return {
        "score": f"{sum(scored) / len(scored):.3f}" if scored else "-",
        "tok/s": f"{tokens / seconds:.1f}" if seconds > 0 else "-",
    }


def summarize(records: list[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """Aggregate metrics over the per-sample records (docs/algorithm.md §5)."""
    n = len(records)
    ok = [r for r in records if "error" not in r]
    tokens, forwards = sum(r["tokens"] for r in ok), sum(r["forwards"] for r in ok)
    seconds = sum(r["latency"] for r in ok)
    correct = sum(bool(r["correct"]) for r in records)
    latencies = [r["latency"] for r in ok]
    out: dict[str, Any] = {
        "n": n,
        "correct": correct,
        "score": correct / n if n else 0.0,
        "tokens": tokens,
        "forwards": forwards,
        "seconds": seconds,
        "tok_s": tokens / seconds if seconds > 0 else 0.0,
        "tok_s_mean": mean(r["tokens_per_second"] for r in ok) if ok else 0.0,
        "tpf_mean": mean(r["tpf"] for r in ok) if ok else 0.0,
        "tpf_aggregate": tokens / forwards if forwards else 0.0,
        "tpf_paper_mean": mean(r["tpf_paper"] for r in ok) if ok else 0.0,
        "latency_mean": mean(latencies) if latencies else 0.0,
        "latency_median": median(latencies) if latencies else 0.0,
        "prompt_too_long": n - len(ok),
        "wall_seconds": wall_seconds,
    }
    for key in ("strict_match", "flexible_extract"):
        if any(key in r for r in records):
            out[f"score_{key}"] = sum(bool(r.get(key)) for r in records) / n
    if any("status" in r for r in records):
        statuses = [r.get("status", "skipped") for r in records]
        out["status_counts"] = {s: statuses.count(s) for s in sorted(set(statuses))}
    return out


def environment(llm: Engine) -> dict[str, Any]:
    """Model, device, dtype and versions, so every number is printed with what produced it."""
    import torch

    from lopa import __version__

    device = llm.device_name
    device_name = platform.processor() or platform.machine()
    if device.startswith("cuda") and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(torch.device(device))
    return {
        "model": llm.model_name,
        "device": device,
        "device_name": device_name,
        "dtype": llm.dtype_name,
        "versions": {"lopa": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "platform": platform.platform(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_outputs(out_dir: Path, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / SAMPLES_FILE, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_samples(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable lines ``lopa eval`` prints."""
    d = summary["settings"]["decode"]
    knobs = f"decoder={d['decoder']}" + (
        f" base={d['base']} branches={d['branches']}" if d["decoder"] == "lopa" else ""
    )
    knobs += f" block={d['block_size']} tau_conf={d['threshold']} tau_add={d['tau_add']} tau_act={d['tau_act']}"
    notes = []
    sandbox = summary["settings"].get("sandbox") or {}
    if sandbox.get("unisolated"):
        notes.append(
            f"  sandbox: {sandbox.get('isolation')} (unisolated: the OS gave no namespaces or separate user id; "
            f"see docs/eval.md for what this mode guarantees)"
        )
    if summary.get("prompt_too_long"):
        notes.append(
            f"  prompt_too_long {summary['prompt_too_long']}/{summary['n']}: not decoded and scored wrong (the prompt "
            f"plus max_new_tokens={d['max_new_tokens']} exceeds the model's context)"
        )
    return "\n".join(
        [
            f"task {summary['settings']['task']}  model {summary['model']}  device {summary['device']} "
            f"({summary['device_name']})  dtype {summary['dtype']}",
            f"  {knobs} max_new_tokens={d['max_new_tokens']} temperature={d['temperature']}",
            f"  score {summary['score']:.4f} ({summary['correct']}/{summary['n']})  tok/s {summary['tok_s']:.2f} "
            f"(per-sample mean {summary['tok_s_mean']:.2f})  tpf {summary['tpf_mean']:.3f} "
            f"(aggregate {summary['tpf_aggregate']:.3f}, paper-style {summary['tpf_paper_mean']:.3f})  "
            f"latency {summary['latency_mean']:.3f}s",
            *notes,
        ]
    )
