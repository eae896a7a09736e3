"""Pixel-exact pictures: panels (uint8 RGB arrays) laid out on a matplotlib figure (Agg).

Panels are drawn as arrays (nearest-neighbour upscaling, block grid lines, hatching), then placed
with `Figure.figimage`, which copies pixels without resampling; matplotlib adds only the titles.
So the picture's size and where each panel, grid line and hatch lands are known to the pixel,
and tests check them.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GRID_RGB = (255, 196, 0)  # block grid lines (amber)
HATCH_BG_RGB = (235, 235, 235)  # a block with no prediction: light grey ...
HATCH_RGB = (120, 120, 120)  # ... with dark diagonal stripes
DPI = 100
TITLE_FONT_SIZES = (8, 7, 6)  # the title's size, smaller only where it would not fit
COL_TITLE_BAND = 14  # px above the panels that the column titles take


@dataclass(frozen=True)
class Layout:
    """`rows` x `cols` square panels of `panel` px under a title band, `pad` px apart."""

    rows: int
    cols: int
    panel: int
    pad: int = 8
    title_h: int = 60

    @property
    def width(self) -> int:
        return self.cols * self.panel + (self.cols + 1) * self.pad

    @property
    def height(self) -> int:
        return self.title_h + self.rows * self.panel + self.rows * self.pad

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """(top, left) pixel of panel (row, col), counted from the picture's top-left corner."""
        return self.title_h + row * (self.panel + self.pad), self.pad + col * (self.panel + self.pad)


def upscale_factor(size: int, min_px: int) -> int:
    """The integer factor that makes a `size`-px image at least `min_px` px (at least 1)."""
    return max(1, math.ceil(min_px / size))


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour: [h, w, 3] -> [h*scale, w*scale, 3]."""
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def draw_grid(panel: np.ndarray, cell: int, rgb: tuple[int, int, int] = GRID_RGB) -> np.ndarray:
    """1-px lines on every cell boundary (rows/columns 0, cell, 2*cell, ...) and the far border."""
    out = panel.copy()
    h, w = out.shape[:2]
    for y in [*range(0, h, cell), h - 1]:
        out[y, :] = rgb
    for x in [*range(0, w, cell), w - 1]:
        out[:, x] = rgb
    return out


def hatch(panel: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """Fill the `size` x `size` square at (top, left) with diagonal stripes."""
    out = panel.copy()
    y, x = np.mgrid[0:size, 0:size]
    stripe = ((x + y) // 3) % 3 == 0  # [size, size]
    square = np.where(stripe[..., None], np.array(HATCH_RGB, np.uint8), np.array(HATCH_BG_RGB, np.uint8))
    out[top : top + size, left : left + size] = square
    return out


def compose(
    panels: list[list[np.ndarray]],
    out: str | Path,
    title: str,
    col_titles: list[str],
    layout: Layout,
) -> np.ndarray:
    """Place `panels[row][col]` (uint8 [panel, panel, 3]) on a white picture with the titles;
    write it as PNG to `out`; return the picture, uint8 [height, width, 3]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(layout.width / DPI, layout.height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    _fit_title(fig, title, layout)
    for c, text in enumerate(col_titles):
        top, left = layout.origin(0, c)
        fig.text((left + layout.panel / 2) / layout.width, 1 - (top - 3) / layout.height, text,
                 ha="center", va="bottom", fontsize=7)
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            if panel.shape != (layout.panel, layout.panel, 3):
                raise ValueError(f"panel {r},{c} has shape {panel.shape}, layout wants {layout.panel} px")
            top, left = layout.origin(r, c)
            fig.figimage(panel, xo=left, yo=layout.height - top - layout.panel, origin="upper")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out), dpi=DPI, facecolor="white")
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _fit_title(fig: Any, title: str, layout: Layout) -> Any:
    """Put `title` in the band above the column titles, wrapped (long paths broken) and, only if
    it must, in a smaller font, so that no line runs off the picture; a title too long even then
    keeps the lines that fit and ends with an ellipsis. Returns the text artist."""
    renderer = fig.canvas.get_renderer()
    width, height = layout.width - 2 * layout.pad, layout.title_h - COL_TITLE_BAND - 4
    text = fig.text(0.5, 1 - 4 / layout.height, "", ha="center", va="top")

    def wrapped(chars: int) -> list[str]:
        return [w for line in title.splitlines()
                for w in textwrap.wrap(line, chars, break_long_words=True, break_on_hyphens=False) or [""]]

    longest = max([len(line) for line in title.splitlines()] + [10])
    for size in TITLE_FONT_SIZES:
        text.set_fontsize(size)
        for chars in range(longest, 9, -1):  # the widest wrap whose lines fit the width
            lines = wrapped(chars)
            text.set_text("\n".join(lines))
            box = text.get_window_extent(renderer)
            if box.width <= width:
                break
        if box.height <= height:
            return text
    while len(lines) > 1 and text.get_window_extent(renderer).height > height:
        lines = lines[:-1]
        last = lines[-1]
        while True:  # the ellipsis takes the place of the last line's end
            text.set_text("\n".join([*lines[:-1], last + "…"]))
            if text.get_window_extent(renderer).width <= width or not last:
                break
            last = last[:-1]
    return text
