"""Which rows ``lopa bench`` knows: every decoder setting by name (:func:`variants`), the default run's rows
(:data:`QUICK`) and the complete sweep's (:data:`FULL`), the decoder families whose AUP is reported
(:data:`QUICK_FAMILIES`, :data:`FAMILIES`), and the settings column of the table (:func:`settings_of`).
"""

from __future__ import annotations

from lopa.config import DecodeConfig

BRANCHES = (1, 2, 4, 8)
THRESHOLDS = (0.95, 0.9, 0.8, 0.7, 0.5)  # the τ sweep of threshold and d2f (0.9 is the reference)


def _tau_name(decoder: str, tau: float) -> str:
    return decoder if tau == 0.9 else f"{decoder}@{tau}"


def variants(block_size: int, max_new_tokens: int) -> dict[str, DecodeConfig]:
    """Name → DecodeConfig of every decoder the bench knows, in table order."""
    common = DecodeConfig(block_size=block_size, max_new_tokens=max_new_tokens, threshold=0.9)
    out = {"vanilla": common.replace(decoder="vanilla")}
    for tau in THRESHOLDS:
        out[_tau_name("threshold", tau)] = common.replace(decoder="threshold", threshold=tau)
    out["threshold+1"] = common.replace(decoder="threshold", extra_fill=1)
    for tau in THRESHOLDS:
        out[_tau_name("d2f", tau)] = common.replace(decoder="d2f", threshold=tau)
    for base in ("threshold", "d2f"):
        for score in ("mean", "shared"):
            for k in BRANCHES:
                suffix = "" if score == "mean" else "-shared"
                out[f"lopa-{base}-k{k}{suffix}"] = common.replace(
                    decoder="lopa", base=base, branches=k, branch_score=score
                )
    return out


FULL = list(variants(32, 64))  # --full: every decoder row
QUICK = ["threshold", "threshold+1", "d2f", "lopa-threshold-k2", "lopa-threshold-k4", "lopa-threshold-k8"]
QUICK_N, FULL_N = 400, 600  # problems per decoder; at 400 the standard error of an accuracy is at most 2.5 points

# the default run's families: a single point's AUP is ρ₁·y₁ (docs/algorithm.md §5)
QUICK_FAMILIES: dict[str, list[str]] = {
    "threshold (τ = 0.9)": ["threshold"],
    "threshold+1 (no search)": ["threshold+1"],
    "d2f (τ = 0.9)": ["d2f"],
    "lopa over threshold (k sweep)": ["threshold", "lopa-threshold-k2", "lopa-threshold-k4", "lopa-threshold-k8"],
}

# family → the rows of its sweep (lopa families start at k = 0: the base decoder at τ = 0.9)
FAMILIES: dict[str, list[str]] = {
    "threshold (τ sweep)": [_tau_name("threshold", t) for t in THRESHOLDS],
    "d2f (τ sweep)": [_tau_name("d2f", t) for t in THRESHOLDS],
    "lopa over threshold (k sweep)": ["threshold"] + [f"lopa-threshold-k{k}" for k in BRANCHES],
    "lopa over d2f (k sweep)": ["d2f"] + [f"lopa-d2f-k{k}" for k in BRANCHES],
    "lopa over threshold, shared score": ["threshold"] + [f"lopa-threshold-k{k}-shared" for k in BRANCHES],
    "lopa over d2f, shared score": ["d2f"] + [f"lopa-d2f-k{k}-shared" for k in BRANCHES],
}


def settings_of(cfg: DecodeConfig) -> str:
    """The table's settings column: :meth:`DecodeConfig.describe` plus the extra fill and the shared score."""
    extra = " +1" if cfg.extra_fill else ""
    shared = " score=shared" if cfg.decoder == "lopa" and cfg.branch_score == "shared" else ""
    return cfg.describe() + extra + shared
