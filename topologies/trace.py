"""The trace of a run: every message between the manager and agents (and between agents, for
direct cascade hops), with sizes, times and errors."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANAGER = "manager"


@dataclass(slots=True)
class TraceEvent:
    seq: int
    sender: str
    recipient: str
    kind: str  # request | reply | error | forward | timeout | event
    bytes: int
    start: float
    end: float
    label: str = ""
    via: str = "direct"  # direct | group | forward
    error: str | None = None
    correlation_id: str | None = None

    @property
    def latency(self) -> float:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency_ms"] = round(self.latency * 1e3, 3)
        return d


@dataclass
class Trace:
    events: list[TraceEvent] = field(default_factory=list)

    def record(
        self,
        sender: str,
        recipient: str,
        kind: str,
        *,
        nbytes: int = 0,
        start: float,
        end: float,
        label: str = "",
        via: str = "direct",
        error: str | None = None,
        correlation_id: str | None = None,
    ) -> TraceEvent:
        ev = TraceEvent(
            len(self.events), sender, recipient, kind, nbytes, start, end, label, via, error, correlation_id
        )
        self.events.append(ev)
        return ev

    @property
    def bytes_total(self) -> int:
        return sum(e.bytes for e in self.events)

    def errors(self) -> list[TraceEvent]:
        return [e for e in self.events if e.error]

    def to_list(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in sorted(self.events, key=lambda e: (e.start, e.seq))]

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps({"events": self.to_list(), "bytes_total": self.bytes_total}, indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    def timeline(self, path: str | Path, title: str = "message timeline") -> Path:
        """A sequence picture: one lane per participant, one bar per message from send to arrival."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        events = sorted(self.events, key=lambda e: (e.start, e.seq))
        lanes: list[str] = []
        for e in events:
            for who in (e.sender, e.recipient):
                if who not in lanes:
                    lanes.append(who)
        t0 = min((e.start for e in events), default=0.0)
        colors = {
            "request": "#219ebc",
            "reply": "#2a9d8f",
            "error": "#e63946",
            "timeout": "#e76f51",
            "forward": "#8338ec",
        }
        fig, ax = plt.subplots(figsize=(10, 1 + 0.5 * max(1, len(lanes))))
        for e in events:
            y0, y1 = lanes.index(e.sender), lanes.index(e.recipient)
            x0, x1 = (e.start - t0) * 1e3, (e.end - t0) * 1e3
            ax.annotate(
                "",
                xy=(x1, y1),
                xytext=(x0, y0),
                arrowprops={"arrowstyle": "->", "color": colors.get(e.kind, "#555555"), "lw": 1.2},
            )
        ax.set_yticks(range(len(lanes)), lanes)
        ax.set_ylim(-0.5, len(lanes) - 0.5)
        end = max(((e.end - t0) * 1e3 for e in events), default=1.0)
        ax.set_xlim(-0.02 * end, end * 1.05 + 1e-3)
        ax.invert_yaxis()
        ax.set_xlabel("ms since the run started")
        ax.set_title(title)
        from matplotlib.lines import Line2D

        ax.legend(
            handles=[Line2D([0], [0], color=c, label=k) for k, c in colors.items()], fontsize=7, loc="lower right"
        )
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
