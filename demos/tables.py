"""Result tables that stay readable in an 80-column terminal.

Rich shrinks a table that is wider than the console by cutting cells to ``en…``; these helpers build
tables whose labels never wrap or get cut (``no_wrap``, ``min_width``), whose free text folds onto
more lines instead, and which carry a legend for their short headers. ``--wide`` tables show every
column and are printed at their natural width, even past the terminal's edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.segment import Segments
from rich.table import Table

Kind = Literal["label", "num", "text"]


@dataclass(frozen=True)
class Col:
    """A column: ``label`` never wraps (names), ``num`` is right-aligned and never wraps, ``text``
    folds onto more lines when space runs out (verdicts, notes)."""

    header: str
    kind: Kind = "num"


def table(title: str | None, cols: Sequence[Col], *, legend: str | None = None) -> Table:
    """A table whose labels and numbers keep their full width; ``legend`` goes under it, dimmed."""
    t = Table(title=title, caption=legend, caption_justify="left", caption_style="dim", title_justify="left")
    for c in cols:
        if c.kind == "text":
            t.add_column(c.header, overflow="fold", ratio=1, min_width=10)
        else:
            t.add_column(
                c.header,
                no_wrap=True,
                justify="right" if c.kind == "num" else "left",
                min_width=len(c.header),
            )
    return t


def natural_width(console: Console, renderable: RenderableType) -> int:
    """Columns ``renderable`` takes when nothing limits it."""
    return Measurement.get(console, console.options.update(max_width=10_000), renderable).maximum


def emit(console: Console, renderable: RenderableType, *, wide: bool = False) -> None:
    """Print at the console's width, or (``wide``) at the table's natural width where that is wider:
    every column in full, for a wide terminal or a file."""
    need = natural_width(console, renderable) if wide else 0
    if need <= console.width:
        console.print(renderable)
        return
    # rendered at the wider width, then printed as finished lines that the console must not wrap again
    lines = console.render_lines(renderable, console.options.update_width(need), new_lines=True)
    console.print(Segments([seg for line in lines for seg in line]), soft_wrap=True)


__all__ = ["Col", "emit", "natural_width", "table"]
