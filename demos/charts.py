"""What the demos' charts share: matplotlib without a display, and accuracy bars with their 95% CIs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display on these machines), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ci_bars(
    ax: Any, stats: Sequence[Mapping[str, Any]], colours: Sequence[str], foot: Sequence[str], *, fontsize: float = 8
) -> None:
    """Accuracy bars (%) with Wilson error bars from each ``stats``' ``accuracy`` and ``ci95``, and ``foot``
    written at the foot of each bar, clear of its error bar."""
    acc = [100 * s["accuracy"] for s in stats]
    err = [
        [max(0.0, 100 * (s["accuracy"] - s["ci95"][0])) for s in stats],
        [max(0.0, 100 * (s["ci95"][1] - s["accuracy"])) for s in stats],
    ]
    xs = range(len(stats))
    ax.bar(xs, acc, yerr=err, color=list(colours), capsize=4, ecolor="#444444")
    for x, text in zip(xs, foot, strict=True):
        ax.annotate(
            text, (x, 0), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=fontsize
        )


__all__ = ["ci_bars", "pyplot"]
