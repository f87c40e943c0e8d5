"""``lopa bench``'s measurements: one :class:`Row` per decoder (:func:`measure` runs it on the problems), the
agreement column, the AUP of each family over its rows (:func:`family_aup`) and the printed tables.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

from lopa.config import DecodeConfig
from lopa.metrics import aup
from lopa.tiny.bench_sweep import FAMILIES, settings_of


@dataclass
class Row:
    name: str
    settings: str
    accuracy: float
    wellformed: float
    tpf: float
    tpf_paper: float
    forwards: float
    tok_s: float
    latency: float
    agreement: float | None  # None when threshold was not run
    branches: int
    base: str
    score: str
    threshold: float
    answers: list[int | None] | None = None  # final answers, for the agreement column (kept out of the JSON)
    accuracy_se: float = 0.0  # binomial standard error of accuracy: sqrt(acc (1 - acc) / n)

    def as_dict(self, answers: bool = False) -> dict:
        d = self.__dict__.copy()
        if not answers:
            d.pop("answers")
        return d


def measure(generate, names: list[str], table: dict[str, DecodeConfig], problems, prompts, args) -> list[Row]:
    """Run every named decoder on the prompts; each row keeps its final answers for the agreement column."""
    from lopa.tiny.grammar import parse
    from lopa.tiny.task import extract_answer

    rows: list[Row] = []
    for name in names:
        cfg = table[name]
        t0 = time.perf_counter()
        outs = generate(prompts, cfg, raw=True)
        wall = time.perf_counter() - t0
        answers = [extract_answer(o.text) for o in outs]
        tokens = sum(o.stats.tokens for o in outs)
        forwards = sum(o.stats.forwards for o in outs)
        n = len(outs)
        rows.append(
            Row(
                name=name,
                settings=settings_of(cfg),
                accuracy=(acc := sum(a == p.answer for a, p in zip(answers, problems, strict=True)) / n),
                accuracy_se=math.sqrt(acc * (1 - acc) / n),
                wellformed=sum(parse(o.text) for o in outs) / n,
                tpf=tokens / forwards,
                tpf_paper=sum(o.stats.tpf_paper for o in outs) / n,
                forwards=forwards / n,
                tok_s=tokens / wall if wall > 0 else 0.0,
                latency=sum(o.stats.seconds for o in outs) / n,
                agreement=None,
                branches=cfg.num_branches,
                base=cfg.base_decoder,
                score=cfg.branch_score if cfg.decoder == "lopa" else "",
                threshold=cfg.threshold,
                answers=answers,
            )
        )
        if not args.json_only or args.emit_answers:
            print(f"  {name}: {wall:.1f}s", file=sys.stderr, flush=True)
    return rows


def set_agreement(rows: list[Row]) -> None:
    """Agreement of each row's final answers with threshold τ=0.9's (None when threshold was not run)."""
    reference = next((r.answers for r in rows if r.name == "threshold"), None)
    for r in rows:
        if reference is not None and r.answers is not None:
            r.agreement = sum(a == b for a, b in zip(r.answers, reference, strict=True)) / len(reference)


def family_aup(rows: list[Row], families: dict[str, list[str]] | None = None, min_points: int = 2) -> dict[str, dict]:
    """AUP of every family (default :data:`FAMILIES`) with at least ``min_points`` measured points (accuracy in %).

    The default run's families (``min_points`` 1) are measured whole; a partial sweep (``--decoders``) reports a
    family only from two points on, so one stray row is not reported as a family."""
    by_name = {r.name: r for r in rows}
    if not rows:
        return {}
    y_max = 100 * max(r.accuracy for r in rows)
    out: dict[str, dict] = {}
    for family, members in (FAMILIES if families is None else families).items():
        pts = [(by_name[m].tpf, 100 * by_name[m].accuracy) for m in members if m in by_name]
        if len(pts) < max(1, min_points) or (min_points < 2 and len(pts) < len(members)):
            continue
        result = aup(pts, y_max)
        out[family] = {
            "aup": round(result.value, 2),
            "points": [[round(t, 3), round(a, 2)] for t, a in result.points],
            "members": [m for m in members if m in by_name],
        }
    return out


def format_table(rows: list[Row], header: dict) -> str:
    head = " ".join(f"{k}={v}" for k, v in header.items())
    cols = ("decoder", "settings", "acc", "±", "well-formed", "tpf", "fwd/sample", "tok/s", "latency", "agree")
    lines = [f"lopa bench: {head}", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        agree = "-" if r.agreement is None else f"{100 * r.agreement:.0f}%"
        lines.append(
            f"| {r.name} | {r.settings} | {100 * r.accuracy:.1f}% | {100 * r.accuracy_se:.1f} | "
            f"{100 * r.wellformed:.1f}% | {r.tpf:.2f} | "
            f"{r.forwards:.1f} | {r.tok_s:.0f} | {1000 * r.latency:.0f} ms | {agree} |"
        )
    return "\n".join(lines)


def format_aup(families: dict[str, dict]) -> str:
    lines = ["| family | AUP | points (tpf, accuracy %) |", "|---|---|---|"]
    for family, f in families.items():
        pts = " ".join(f"({t:.2f}, {a:.1f})" for t, a in f["points"])
        lines.append(f"| {family} | {f['aup']:.1f} | {pts} |")
    return "\n".join(lines)
