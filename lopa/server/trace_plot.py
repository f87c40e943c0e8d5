"""Pictures of one decoding trace: the filling-order map (``--trace-plot``, PNG) and its animation (``--trace-gif``).

The map has one column per answer position (grouped by block, block edges drawn) and one row per forward, top
to bottom. Row f shows every position decoded so far: light grey where it was filled by an earlier forward,
coloured (dark to bright with f) where forward f filled it; a star marks a fill that came from the winning
lookahead branch (``TraceStep.fills``). Positions after the first end token are faded. The GIF has one frame
per forward: frame f is the map with rows 1..f drawn; the last frame is held longer. Called by
``commands/generate.py``; matplotlib (the ``plot`` extra) renders, Pillow (a matplotlib dependency) writes the GIF.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lopa.config import DecodeConfig
from lopa.engine.output import Completion, TraceStep
from lopa.errors import ConfigError

_EARLIER = (0.82, 0.82, 0.80, 1.0)  # a position filled by an earlier forward
_EMPTY = (1.0, 1.0, 1.0, 1.0)
FRAME_MS, LAST_FRAME_MS = 350, 2500


@dataclass
class FillOrder:
    """Per answer position: the forward that filled it (0 = never), its token, and whether lookahead filled it."""

    step: np.ndarray  # (positions,) int
    token: np.ndarray  # (positions,) int, -1 where never filled
    lookahead: np.ndarray  # (positions,) bool
    forwards: int
    first_end: int  # answer position of the first end token, positions when there is none


def fill_order(trace: list[TraceStep], prompt_len: int, positions: int, end_ids: frozenset[int]) -> FillOrder:
    """Fold a trace into per-position fill records (answer positions: 0 is the first generated one)."""
    step = np.zeros(positions, dtype=np.int64)
    token = np.full(positions, -1, dtype=np.int64)
    lookahead = np.zeros(positions, dtype=bool)
    for s in trace:
        for absolute, tok, from_lookahead in s.fills():
            p = absolute - prompt_len
            if 0 <= p < positions:
                step[p], token[p], lookahead[p] = s.iteration, tok, from_lookahead
    ends = [p for p in range(positions) if step[p] and int(token[p]) in end_ids]
    return FillOrder(step, token, lookahead, len(trace), min(ends) if ends else positions)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("trace pictures need matplotlib: pip install 'lopa[plot]'") from e
    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    return plt


class _Map:
    """One figure of the map; ``draw(upto)`` shows rows 1..upto (the GIF redraws it per frame)."""

    def __init__(self, order: FillOrder, block_size: int, title: str, labels: list[str] | None) -> None:
        plt = _pyplot()
        self.order, self.plt = order, plt
        n, f = len(order.step), max(order.forwards, 1)
        width = min(18.0, max(6.0, 0.32 * n + 2.0))
        height = min(12.0, max(3.2, 0.3 * f + 1.8))
        self.fig, self.ax = plt.subplots(figsize=(width, height))
        self.cmap = plt.get_cmap("viridis")
        self.image = self.ax.imshow(
            self._rgba(0), aspect="auto", interpolation="nearest", extent=(-0.5, n - 0.5, f + 0.5, 0.5)
        )
        for edge in range(block_size, n, block_size):
            self.ax.axvline(edge - 0.5, color="black", linewidth=1.2)
        self.stars = self.ax.scatter([], [], marker="*", s=70, c="white", edgecolors="black", linewidths=0.6, zorder=3)
        self.ax.set_xlabel("answer position" + (" (token)" if labels else ""))
        self.ax.set_ylabel("forward")
        self.ax.set_ylim(f + 0.5, 0.5)
        ticks = [t for t in range(1, f + 1) if f <= 25 or t % max(1, f // 20) == 0 or t == 1]
        self.ax.set_yticks(ticks)
        if labels is not None and n <= 64:
            self.ax.set_xticks(range(n))
            self.ax.set_xticklabels(
                [f"{p} {labels[p]}" if labels[p] else str(p) for p in range(n)], rotation=90, fontsize=7
            )
        self.title = title
        self.ax.set_title(f"{title}\n", fontsize=9)  # room for the two-line title that draw() writes
        handles = [
            plt.Line2D([], [], marker="*", color="white", markeredgecolor="black", linestyle="", markersize=9),
            plt.Rectangle((0, 0), 1, 1, color=_EARLIER),
        ]
        self.ax.legend(
            handles, ["lookahead fill (winner)", "filled earlier"], loc="upper right", fontsize=7, framealpha=0.9
        )
        self.fig.tight_layout()

    def _rgba(self, upto: int) -> np.ndarray:
        o, f = self.order, max(self.order.forwards, 1)
        img = np.tile(np.array(_EMPTY), (f, len(o.step), 1))  # (forwards, positions, rgba)
        for row in range(1, upto + 1):
            earlier = (o.step > 0) & (o.step < row)
            img[row - 1, earlier] = _EARLIER
            now = o.step == row
            img[row - 1, now] = self.cmap((row - 1) / max(f - 1, 1))
        img[:, o.first_end + 1 :, 3] = 0.35  # after the first end token: not part of the answer
        return img

    def draw(self, upto: int) -> None:
        o = self.order
        self.image.set_data(self._rgba(upto))
        shown = o.lookahead & (o.step <= upto) & (o.step > 0)
        xs = np.nonzero(shown)[0]
        self.stars.set_offsets(np.column_stack([xs, o.step[xs]]) if len(xs) else np.empty((0, 2)))
        progress = f"forward {upto} of {o.forwards}" if upto < o.forwards else f"{o.forwards} forwards"
        self.ax.set_title(f"{self.title}\n{progress}", fontsize=9)

    def close(self) -> None:
        self.plt.close(self.fig)


def _prepare(completion: Completion, cfg: DecodeConfig, end_ids: frozenset[int]) -> FillOrder:
    if not completion.trace:
        raise ConfigError("this completion has no trace; decode with DecodeConfig(trace=True)")
    return fill_order(completion.trace, len(completion.prompt_token_ids), cfg.max_new_tokens, end_ids)


def _block(cfg: DecodeConfig) -> int:
    return cfg.block_size if cfg.uses_blocks else cfg.max_new_tokens


def _labels(order: FillOrder, end_ids: frozenset[int], token_text: Callable[[int], str] | None) -> list[str] | None:
    if token_text is None:
        return None
    return ["EOS" if t in end_ids else _printable(token_text(t)) if t >= 0 else "" for t in order.token.tolist()]


def _printable(text: str) -> str:
    """A short tick label: control characters escaped, blanks shown as a dot."""
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text.strip())
    return (text or "·")[:10]


def _title(completion: Completion, cfg: DecodeConfig, describe: str) -> str:
    s = completion.stats
    return f"filling order: {describe} | {s.tokens} tokens, {s.forwards} forwards, TPF {s.tpf:.2f}"


def _make_map(
    completion: Completion,
    cfg: DecodeConfig,
    end_ids: frozenset[int],
    describe: str,
    token_text: Callable[[int], str] | None,
) -> tuple[FillOrder, _Map]:
    """The filling order of ``completion`` and its figure, shared by the PNG and the GIF."""
    order = _prepare(completion, cfg, end_ids)
    title = _title(completion, cfg, describe or cfg.decoder)
    return order, _Map(order, _block(cfg), title, _labels(order, end_ids, token_text))


def save_trace_plot(
    completion: Completion,
    cfg: DecodeConfig,
    path: str | Path,
    end_ids: frozenset[int],
    describe: str = "",
    token_text: Callable[[int], str] | None = None,
    dpi: int = 120,
) -> Path:
    """Write the filling-order map of ``completion`` (decoded with ``cfg``, trace on) as a PNG."""
    order, fmap = _make_map(completion, cfg, end_ids, describe, token_text)
    try:
        fmap.draw(order.forwards)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fmap.fig.savefig(out, dpi=dpi)
    finally:
        fmap.close()
    return out


def save_trace_gif(
    completion: Completion,
    cfg: DecodeConfig,
    path: str | Path,
    end_ids: frozenset[int],
    describe: str = "",
    token_text: Callable[[int], str] | None = None,
    dpi: int = 90,
) -> Path:
    """Write the map as an animated GIF: one frame per forward, the last held for a while."""
    from PIL import Image

    order, fmap = _make_map(completion, cfg, end_ids, describe, token_text)
    fmap.fig.set_dpi(dpi)
    frames = []
    try:
        for upto in range(1, order.forwards + 1):
            fmap.draw(upto)
            fmap.fig.canvas.draw()
            rgba = np.asarray(fmap.fig.canvas.buffer_rgba())  # (height, width, 4) uint8
            frames.append(Image.fromarray(rgba[..., :3].copy()).convert("P", palette=Image.Palette.ADAPTIVE))
    finally:
        fmap.close()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    durations = [FRAME_MS] * (len(frames) - 1) + [LAST_FRAME_MS]
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=False, disposal=1)
    return out
