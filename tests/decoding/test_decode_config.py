"""DecodeConfig's derived values: ``describe()`` (the one-line settings of headers and summaries) and
``cache_rows`` (the KV rows a request decodes with), checked against literal expectations and against the
candidates the engine really verifies."""

from __future__ import annotations

import pytest

from lopa import LLM, DecodeConfig

DESCRIBED = [
    (DecodeConfig(decoder="vanilla", order="entropy"), "vanilla order=entropy"),
    (DecodeConfig(decoder="threshold", block_size=8, threshold=0.7), "threshold block=8 tau=0.7"),
    (
        DecodeConfig(decoder="d2f", block_size=4, threshold=0.9, tau_add=0.2, tau_act=0.8),
        "d2f block=4 tau=0.9 tau_add=0.2 tau_act=0.8",
    ),
    (
        DecodeConfig(decoder="lopa", base="threshold", branches=3, block_size=16, threshold=0.9),
        "lopa base=threshold k=3 block=16 tau=0.9",
    ),
    (DecodeConfig(), "lopa base=d2f k=4 block=16 tau=0.9 tau_add=0.1 tau_act=0.95"),
]


@pytest.mark.parametrize(("cfg", "text"), DESCRIBED, ids=[t.split()[0] + str(i) for i, (_, t) in enumerate(DESCRIBED)])
def test_describe_names_the_settings_that_matter(cfg: DecodeConfig, text: str) -> None:
    assert cfg.describe() == text


@pytest.mark.parametrize(
    ("cfg", "rows"),
    [
        (DecodeConfig(decoder="vanilla", branches=7), 0),  # no KV cache at all
        (DecodeConfig(decoder="threshold", branches=7), 1),  # branches only count for lopa
        (DecodeConfig(decoder="d2f"), 1),
        (DecodeConfig(decoder="lopa", branches=0), 1),
        (DecodeConfig(decoder="lopa", branches=5), 6),
    ],
)
def test_cache_rows_is_the_anchor_plus_the_lookahead_branches(cfg: DecodeConfig, rows: int) -> None:
    assert cfg.cache_rows == rows


def test_the_widest_verify_uses_every_cache_row(tiny_ckpt) -> None:
    """On the tiny checkpoint lopa spawns all k branches at some step: that forward verifies cache_rows rows."""
    cfg = DecodeConfig(decoder="lopa", base="threshold", branches=3, block_size=8, max_new_tokens=16, trace=True)
    c = LLM(tiny_ckpt).generate("def add(a, b):", cfg, raw=True)[0]
    assert max(len(s.candidates) for s in c.trace) == cfg.cache_rows == 4
