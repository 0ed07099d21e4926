"""The trace of a run: every message between the manager and agents (and between agents, for
direct cascade hops), with sizes, times and errors."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MANAGER = "manager"
BROKER = "broker"  # the timeline's lane for group publishes, which the broker copies to each member

# One colour per message kind, far apart in hue (request and reply used to be two teals).
KIND_COLORS = {
    "request": "#1f77b4",  # blue
    "reply": "#2ca02c",  # green
    "event": "#444444",  # dark grey
    "error": "#d62728",  # red
    "timeout": "#ff7f0e",  # orange
    "forward": "#9467bd",  # purple
}
COPY = "broker copy"  # the broker's copy of a group publish to one member: the request's blue, dashed
OTHER_COLOR = "#bcbd22"  # olive: a kind this list does not know


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
    members: list[str] = field(default_factory=list)  # a group publish: the agents the broker copies it to
    answer: str | None = None  # a reply: the answer it carried (a live view shows it as it arrives)

    @property
    def latency(self) -> float:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency_ms"] = round(self.latency * 1e3, 3)
        return d


@dataclass(slots=True)
class Arrow:
    """One arrow of the timeline: from (x0 ms, lane y0) to (x1 ms, lane y1)."""

    x0: float
    y0: int
    x1: float
    y1: int
    kind: str  # a KIND_COLORS key, or COPY
    color: str
    style: str = "-"


@dataclass(slots=True)
class TimelineSpec:
    """What the timeline draws, before any pixels: lanes top to bottom, arrows, legend entries."""

    lanes: list[str]
    arrows: list[Arrow]
    legend: list[tuple[str, str, str]]  # (kind, colour, linestyle), only kinds that occur

    def arrows_of(self, kind: str) -> list[Arrow]:
        return [a for a in self.arrows if a.kind == kind]


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
        members: Sequence[str] = (),
        answer: str | None = None,
    ) -> TraceEvent:
        ev = TraceEvent(
            len(self.events),
            sender,
            recipient,
            kind,
            nbytes,
            start,
            end,
            label,
            via,
            error,
            correlation_id,
            list(members),
            answer,
        )
        self.events.append(ev)
        return ev

    @classmethod
    def from_list(cls, events: Iterable[Mapping[str, Any]]) -> Trace:
        """A trace back from :meth:`to_list` / the ``trace`` of a run's JSON (older ones, without
        ``members``, too)."""
        names = {f.name for f in fields(TraceEvent)}
        return cls([TraceEvent(**{k: v for k, v in ev.items() if k in names}) for ev in events])

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

    def group_members(self, publish: TraceEvent) -> list[str]:
        """Who the broker copied a group publish to: recorded on the event, or (traces written
        before that was recorded) the senders of the group replies that share its start time."""
        if publish.members:
            return list(publish.members)
        return list(
            dict.fromkeys(
                e.sender
                for e in self.events
                if e.via == "group"
                and e is not publish
                and e.recipient == MANAGER
                and abs(e.start - publish.start) < 1e-6
            )
        )

    def timeline_spec(self) -> TimelineSpec:
        """The timeline's lanes and arrows (times in ms since the first message).

        A group publish goes from the manager to the ``broker`` lane, and the broker's copy to each
        member is drawn from there (dashed), so a member's handling starts where its copy lands; its
        reply starts there too."""
        events = sorted(self.events, key=lambda e: (e.start, e.seq))
        t0 = min((e.start for e in events), default=0.0)
        groups = {e.seq: self.group_members(e) for e in events if e.via == "group" and e.recipient.startswith("group:")}
        lanes: list[str] = [MANAGER] if events else []
        if groups:
            lanes.append(BROKER)
        for e in events:
            for who in (e.sender, *groups.get(e.seq, [e.recipient])):
                if who not in lanes and not who.startswith("group:"):
                    lanes.append(who)
        copied_at: dict[tuple[float, str], float] = {}  # (publish start, member) -> when its copy left the broker
        arrows: list[Arrow] = []

        def ms(t: float) -> float:
            return (t - t0) * 1e3

        def lane(who: str) -> int:
            return lanes.index(BROKER if who.startswith("group:") else who)

        for e in events:
            color = KIND_COLORS.get(e.kind, OTHER_COLOR)
            if e.seq in groups:
                arrows.append(Arrow(ms(e.start), lane(MANAGER), ms(e.end), lane(BROKER), e.kind, color))
                for m in groups[e.seq]:
                    copied_at[(e.start, m)] = e.end
                    copy = Arrow(ms(e.end), lane(BROKER), ms(e.end), lane(m), COPY, KIND_COLORS["request"], "--")
                    arrows.append(copy)
                continue
            start = e.start
            if e.via == "group":
                start = max(start, copied_at.get((e.start, e.sender), start))
            arrows.append(Arrow(ms(start), lane(e.sender), ms(e.end), lane(e.recipient), e.kind, color))
        kinds = dict.fromkeys(a.kind for a in arrows)
        legend = [(k, KIND_COLORS[k], "-") for k in KIND_COLORS if k in kinds]
        legend += [(k, OTHER_COLOR, "-") for k in kinds if k not in KIND_COLORS and k != COPY]
        if COPY in kinds:
            legend.append((COPY, KIND_COLORS["request"], "--"))
        return TimelineSpec(lanes, arrows, legend)

    def timeline(self, path: str | Path, title: str = "message timeline") -> Path:
        """A sequence picture: one lane per participant, one arrow per message from send to arrival,
        coloured by kind (see :meth:`timeline_spec`)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D

        path = Path(path)
        spec = self.timeline_spec()
        n = max(1, len(spec.lanes))
        fig, ax = plt.subplots(figsize=(10, 1.4 + 0.5 * n))
        for y in range(n):
            ax.axhline(y, color="#eeeeee", lw=0.8, zorder=0)
        for a in spec.arrows:
            ax.annotate(
                "",
                xy=(a.x1, a.y1),
                xytext=(a.x0, a.y0),
                arrowprops={"arrowstyle": "->", "color": a.color, "lw": 1.3, "ls": a.style, "shrinkA": 0, "shrinkB": 0},
            )
            if a.kind == COPY:
                ax.plot([a.x1], [a.y1], marker="o", ms=3, color=a.color, zorder=3)
        ax.set_yticks(range(len(spec.lanes)), spec.lanes)
        ax.set_ylim(-0.5, n - 0.5)
        end = max((max(a.x0, a.x1) for a in spec.arrows), default=1.0)
        ax.set_xlim(-0.02 * end - 1e-3, end * 1.05 + 1e-3)
        ax.invert_yaxis()
        ax.set_xlabel("ms since the run started")
        ax.set_title(title)
        ax.legend(
            handles=[Line2D([0], [0], color=c, ls=ls, lw=1.5, label=k) for k, c, ls in spec.legend],
            fontsize=7.5,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            frameon=False,
            title="message",
            title_fontsize=8,
        )
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
