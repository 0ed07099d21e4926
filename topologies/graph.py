"""Agent graphs: agents are nodes (id, tier, metadata), edges are message flows (networkx)."""

from __future__ import annotations

import itertools
import re
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import networkx as nx

from protocols import check_level


class Tier(StrEnum):
    DEVICE = "device"
    EDGE = "edge"
    CLOUD = "cloud"


class GraphError(ValueError):
    """A graph or pattern that cannot run: says which part is wrong and why."""


@dataclass(frozen=True, slots=True)
class AgentRef:
    """An agent in a graph: its id on the bus, its tier, free metadata (e.g. weight)."""

    agent_id: str
    tier: Tier | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_str(cls, value: str) -> AgentRef:
        """``agent-id`` or ``agent-id@tier``."""
        agent_id, _, tier = value.partition("@")
        return cls(agent_id, Tier(tier) if tier else None)

    def __str__(self) -> str:
        return self.agent_id


def agent(agent_id: str, tier: Tier | str | None = None, **meta: Any) -> AgentRef:
    try:
        check_level(agent_id)
    except ValueError as e:
        raise GraphError(str(e)) from None
    return AgentRef(agent_id, Tier(tier) if tier else None, dict(meta))


TIER_COLORS: dict[Tier | None, str] = {
    Tier.DEVICE: "#8ecae6",
    Tier.EDGE: "#ffb703",
    Tier.CLOUD: "#b5e48c",
    None: "#dddddd",
}
# Tiers presence reports that are none of the three above get these, in order of appearance.
EXTRA_TIER_COLORS = ("#f4a3c0", "#cdb4db", "#ffd6a5", "#a0c4ff", "#caffbf")
STEP_COLOR = "#ffffff"
# Flows are told apart by colour (their label goes in the legend): labels on the edges themselves
# collide with boxes and with each other as soon as a pattern nests.
FLOW_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
FLOW_STYLES = ("-", "--", ":", "-.")
UNKNOWN_TIER = "tier unknown"


def tier_color(tier: str | None, seen: list[str] | None = None) -> str:
    """The fill of an agent of ``tier``; tiers outside device/edge/cloud take the extra colours
    in the order they appear in ``seen``."""
    if tier is None or tier in TIER_COLORS:
        return TIER_COLORS[Tier(tier) if tier else None]
    extra = [t for t in (seen or []) if t not in TIER_COLORS]
    i = extra.index(tier) if tier in extra else 0
    return EXTRA_TIER_COLORS[i % len(EXTRA_TIER_COLORS)]


class AgentGraph:
    """A directed multigraph of agents and pattern steps (fan-out, aggregation, routing).

    Built by patterns (``pattern.graph()``) for validation, drawing and introspection, or by hand:
    a hand-built acyclic graph runs as a dataflow (each agent sees its predecessors' answers).
    """

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.g: nx.MultiDiGraph = nx.MultiDiGraph()

    # -- building -----------------------------------------------------------------------------
    def add_agent(self, agent_id: str | AgentRef, tier: Tier | str | None = None, **meta: Any) -> str:
        ref = agent_id if isinstance(agent_id, AgentRef) else agent(agent_id, tier, **meta)
        existing = self.g.nodes.get(ref.agent_id)
        if existing is not None and existing.get("kind") == "agent":
            if ref.tier and existing.get("tier") and existing["tier"] != ref.tier:
                raise GraphError(f"agent {ref.agent_id!r} given two tiers: {existing['tier']} and {ref.tier}")
            return ref.agent_id
        self.g.add_node(ref.agent_id, kind="agent", tier=ref.tier, meta=dict(ref.meta))
        return ref.agent_id

    def add_step(self, step_id: str, kind: str, **meta: Any) -> str:
        """A non-agent node: the task source, an aggregator, the answer sink."""
        self.g.add_node(step_id, kind=kind, tier=None, meta=meta)
        return step_id

    def add_flow(self, src: str, dst: str, kind: str = "request", **meta: Any) -> None:
        for n in (src, dst):
            if n not in self.g:
                raise GraphError(f"flow {src!r} -> {dst!r}: unknown node {n!r} (add it first)")
        self.g.add_edge(src, dst, kind=kind, **meta)

    def merge(self, other: AgentGraph) -> None:
        for n, data in other.g.nodes(data=True):
            if data.get("kind") == "agent":
                self.add_agent(AgentRef(n, data.get("tier"), data.get("meta", {})))
            elif n not in self.g:
                self.g.add_node(n, **data)
        for u, v, data in other.g.edges(data=True):
            self.g.add_edge(u, v, **data)

    # -- reading ------------------------------------------------------------------------------
    def agents(self) -> list[AgentRef]:
        return [
            AgentRef(n, d.get("tier"), d.get("meta", {}))
            for n, d in self.g.nodes(data=True)
            if d.get("kind") == "agent"
        ]

    def agent_ids(self) -> list[str]:
        return [a.agent_id for a in self.agents()]

    def predecessors(self, node: str) -> list[str]:
        return list(dict.fromkeys(self.g.predecessors(node)))

    def validate(self, *, known: Iterable[str] | None = None, acyclic: bool = False) -> None:
        if not self.agents():
            raise GraphError(f"graph {self.name!r} has no agents")
        if known is not None:
            known_set = set(known)
            unknown = [a for a in self.agent_ids() if a not in known_set]
            if unknown:
                raise GraphError(f"graph {self.name!r}: unknown agent(s) {', '.join(unknown)}")
        if acyclic and not nx.is_directed_acyclic_graph(self.g):
            cycle = nx.find_cycle(self.g)
            path = " -> ".join(str(e[0]) for e in cycle) + f" -> {cycle[0][0]}"
            raise GraphError(f"graph {self.name!r} has a cycle where none is allowed: {path}")

    # -- tiers -------------------------------------------------------------------------------
    def tier_of(self, agent_id: str) -> str | None:
        t = self.g.nodes[agent_id].get("tier")
        return str(t) if t else None

    def fill_tiers(self, tiers: Mapping[str, str | None]) -> list[str]:
        """Give agents whose pattern names no tier the tier found elsewhere (e.g. in presence);
        a tier set in the pattern wins. Returns the agents that got one."""
        filled = []
        for a in self.agent_ids():
            found = tiers.get(a)
            if found and not self.g.nodes[a].get("tier"):
                self.g.nodes[a]["tier"] = Tier(found) if found in {t.value for t in Tier} else str(found)
                filled.append(a)
        return filled

    def tiers_present(self) -> list[str | None]:
        """The tiers of the agents, in the order device, edge, cloud, others, unknown (None)."""
        found = {self.tier_of(a) for a in self.agent_ids()}
        known = [str(t) for t in Tier if str(t) in found]
        others = sorted(t for t in found if t is not None and t not in known)
        return [*known, *others, *([None] if None in found else [])]

    def legend(self) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
        """What the picture's legends list: (label, fill) per node style actually drawn — tiers
        present, "tier unknown" for agents without one, pattern steps — and (label, colour,
        linestyle) per flow label."""
        present = self.tiers_present()
        nodes = [(t if t else UNKNOWN_TIER, tier_color(t, [p for p in present if p])) for t in present]
        if any(d.get("kind") != "agent" for _, d in self.g.nodes(data=True)):
            nodes.append(("pattern step", STEP_COLOR))
        comp = {n: i for i, c in enumerate(nx.strongly_connected_components(self.g)) for n in c}
        # flows inside a cycle are not drawn one by one: the cycle's box names them
        labels = list(dict.fromkeys(_flow_label(d) for u, v, d in self.g.edges(data=True) if comp[u] != comp[v]))
        flows = [
            (lab, FLOW_COLORS[i % len(FLOW_COLORS)], FLOW_STYLES[(i // len(FLOW_COLORS)) % len(FLOW_STYLES)])
            for i, lab in enumerate(labels)
        ]
        return nodes, flows

    # -- pictures -----------------------------------------------------------------------------
    def node_label(self, node: str) -> str:
        """Agents show their id; steps of a nested pattern show what they are, then where."""
        d = self.g.nodes[node]
        if d.get("kind") == "agent":
            return _wrap(node)
        prefix, _, base = node.rpartition("/")
        how = (d.get("meta") or {}).get("how")
        text = f"{base}: {how}" if how else base
        return _wrap(text) + (f"\n({_wrap(prefix)})" if prefix else "")

    def to_mermaid(self) -> str:
        lines = ["flowchart LR"]
        ids = {n: f"n{i}" for i, n in enumerate(self.g.nodes)}
        for n, d in self.g.nodes(data=True):
            label = f"{n}<br/><i>{d['tier']}</i>" if d.get("tier") else str(n)
            shape = ("[", "]") if d.get("kind") == "agent" else ("([", "])")
            lines.append(f'    {ids[n]}{shape[0]}"{label}"{shape[1]}')
        for u, v, d in self.g.edges(data=True):
            lines.append(f"    {ids[u]} -->|{d.get('kind', '')}| {ids[v]}")
        present = [t for t in self.tiers_present() if t]
        for tier in present:
            members = [ids[n] for n, d in self.g.nodes(data=True) if d.get("tier") and str(d["tier"]) == tier]
            cls = "tier_" + "".join(c if c.isalnum() else "_" for c in tier)
            lines.append(f"    classDef {cls} fill:{tier_color(tier, present)}")
            lines.append(f"    class {','.join(members)} {cls}")
        return "\n".join(lines) + "\n"

    def layout(self, sizes: Mapping[str, tuple[float, float]] | None = None) -> GraphLayout:
        """Where everything goes, in inches: a layered left-to-right layout (see :func:`layered_layout`)."""
        sizes = sizes or {n: _estimate_size(self.node_label(n)) for n in self.g}
        return layered_layout(self.g, sizes)

    def draw(self, path: str | Path) -> Path:
        """Render to ``.svg``/``.png`` (matplotlib) or ``.mmd``/``.md`` (Mermaid text).

        Left to right in layers; boxes fit their (wrapped) labels; fills are tiers (legend lists only
        the tiers present, grey is "tier unknown"); flows are coloured by label, named in a legend."""
        path = Path(path)
        if path.suffix in (".mmd", ".md", ".mermaid"):
            path.write_text(self.to_mermaid())
            return path
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch
        from matplotlib.path import Path as MplPath

        node_legend, flow_legend = self.legend()
        present = [t for t in self.tiers_present() if t]
        fig = plt.figure(figsize=(4, 3), dpi=110)
        ax = fig.add_axes((0, 0, 1, 1))
        ax.axis("off")
        texts = {}
        for n, d in self.g.nodes(data=True):
            agent_node = d.get("kind") == "agent"
            tier = self.tier_of(n) if agent_node else None
            texts[n] = ax.text(
                0,
                0,
                self.node_label(n),
                ha="center",
                va="center",
                fontsize=NODE_FONT,
                zorder=4,
                bbox={
                    "boxstyle": "round,pad=0.45" if agent_node else "round4,pad=0.35",
                    "fc": tier_color(tier, present) if agent_node else STEP_COLOR,
                    "ec": "#333333" if agent_node else "#888888",
                    "ls": "-" if agent_node else "--",
                    "lw": 1.0,
                },
            )
        renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
        sizes = {}
        for n, t in texts.items():
            patch = t.get_bbox_patch()
            t.draw(renderer)
            ext = patch.get_window_extent(renderer) if patch is not None else t.get_window_extent(renderer)
            sizes[n] = (ext.width / fig.dpi, ext.height / fig.dpi)
        lay = layered_layout(self.g, sizes)
        flow_cols = 1 if len(flow_legend) <= 6 else 2
        legend_h = 0.35 + 0.19 * max(len(node_legend), -(-len(flow_legend) // flow_cols))
        title_h = 0.45
        margin = 0.3
        width = max(lay.width + 2 * margin, 6.0)
        height = lay.height + 2 * margin + legend_h + title_h
        fig.set_size_inches(width, height)
        ax.set_position((0, 0, 1, 1))
        x0 = -width / 2
        y_top = lay.height / 2 + margin + title_h
        ax.set_xlim(x0, x0 + width)
        ax.set_ylim(y_top - height, y_top)
        for n, (x, y) in lay.pos.items():
            texts[n].set_position((x, y))
        for c in lay.clusters:
            ax.add_patch(
                FancyBboxPatch(
                    (c.x0, c.y0),
                    c.x1 - c.x0,
                    c.y1 - c.y0,
                    boxstyle="round,pad=0.05",
                    fc="#f6f6f6",
                    ec="#999999",
                    ls=":",
                    zorder=1,
                )
            )
            ax.text((c.x0 + c.x1) / 2, c.y1 + 0.08, c.caption, ha="center", va="bottom", fontsize=NODE_FONT - 1.5)
        styles = {lab: (col, ls) for lab, col, ls in flow_legend}
        for e in lay.edges:
            col, ls = styles[e.label]
            pts = lay.path(e)
            if len(pts) < 2:
                continue
            ax.add_patch(
                FancyArrowPatch(
                    path=MplPath(pts),
                    arrowstyle="-|>",
                    mutation_scale=11,
                    color=col,
                    ls=ls,
                    lw=1.2,
                    zorder=2,
                )
            )
        ax.text(x0 + width / 2, y_top - 0.12, self.name, ha="center", va="top", fontsize=11)
        bottom = (margin * 0.5) / height
        if node_legend:
            fig.legend(
                handles=[Patch(fc=c, ec="#555555", label=lab) for lab, c in node_legend],
                loc="lower left",
                bbox_to_anchor=(0.01, bottom),
                fontsize=7.5,
                title="nodes",
                title_fontsize=8,
                frameon=False,
            )
        if flow_legend:
            fig.legend(
                handles=[Line2D([0], [0], color=c, ls=ls, lw=1.5, label=lab) for lab, c, ls in flow_legend],
                loc="lower right",
                bbox_to_anchor=(0.99, bottom),
                fontsize=7.5,
                title="flows",
                title_fontsize=8,
                frameon=False,
                ncol=flow_cols,
            )
        fig.savefig(path)
        plt.close(fig)
        return path


# -- layout ------------------------------------------------------------------------------------
NODE_FONT = 9.0
WRAP = 18
COL_GAP = 0.9  # inches between columns: room for the arrows
ROW_GAP = 0.35  # inches between boxes in a column
VIRTUAL = 0.18  # the height a long edge takes where it passes a column


def _wrap(text: str, width: int = WRAP) -> str:
    """Wrap at spaces, and long words (ids) after ``/ . - _``, so a box stays narrow."""
    lines: list[str] = []
    for line in textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [text]:
        cur = ""
        for tok in re.findall(r"[^/._-]+[/._-]*|[/._-]+", line):
            if cur and len(cur) + len(tok) > width:
                lines.append(cur)
                cur = ""
            cur += tok
        lines.append(cur)
    return "\n".join(lines)


def _estimate_size(label: str) -> tuple[float, float]:
    """Box size in inches for a label when nothing can measure it (0.6 em per character)."""
    lines = label.split("\n")
    em = NODE_FONT / 72
    return (0.6 * em * max(len(x) for x in lines) + 0.9 * em, 1.25 * em * len(lines) + 0.9 * em)


def _flow_label(d: Mapping[str, Any]) -> str:
    return str(d.get("kind") or "flow")


@dataclass(slots=True)
class EdgeRoute:
    src: str
    dst: str
    label: str
    points: list[tuple[float, float]]  # centre of src, bends where it passes columns, centre of dst


@dataclass(slots=True)
class Cluster:
    """Agents in a cycle (a debate's members): drawn as one column in a box, their flows summarised."""

    nodes: list[str]
    caption: str
    x0: float = 0.0
    y0: float = 0.0
    x1: float = 0.0
    y1: float = 0.0


@dataclass(slots=True)
class GraphLayout:
    pos: dict[str, tuple[float, float]]
    boxes: dict[str, tuple[float, float, float, float]]  # x0, y0, x1, y1
    layers: list[list[str]]
    edges: list[EdgeRoute]
    clusters: list[Cluster]
    width: float
    height: float

    def path(self, edge: EdgeRoute) -> list[tuple[float, float]]:
        """The curve to draw for ``edge``: smooth through its bends, from border to border of its boxes."""
        return _clip(_smooth(edge.points), self.boxes[edge.src], self.boxes[edge.dst])


def layered_layout(g: nx.MultiDiGraph, sizes: Mapping[str, tuple[float, float]]) -> GraphLayout:
    """Sugiyama-style: columns by longest path (cycles collapse into one column), long edges bend
    through the columns they cross, rows ordered by barycentre and placed as close to their
    neighbours as the boxes allow. Coordinates are inches; the picture is centred on y = 0."""
    simple = nx.DiGraph(g)
    cond = nx.condensation(simple)
    comp_of: dict[str, int] = cond.graph["mapping"]
    comp_layer = {c: i for i, gen in enumerate(nx.topological_generations(cond)) for c in gen}
    layer_of = {n: comp_layer[comp_of[n]] for n in g}
    n_layers = max(layer_of.values(), default=-1) + 1
    # blocks: the units ordered within a column (a node, or all members of one cycle)
    order_hint = {n: i for i, n in enumerate(g)}
    blocks: dict[str, list[str]] = {}
    for _c, data in cond.nodes(data=True):
        members = sorted(data["members"], key=order_hint.__getitem__)
        blocks[members[0]] = members
    edges: list[EdgeRoute] = []
    chains: list[tuple[EdgeRoute, list[str]]] = []
    inner: dict[str, list[str]] = {}
    adj: dict[str, set[str]] = {n: set() for n in g}
    extra_size: dict[str, tuple[float, float]] = {}
    extra_layer: dict[str, int] = {}
    seen_pairs: set[tuple[str, str, str]] = set()
    for i, (u, v, d) in enumerate(g.edges(data=True)):
        label = _flow_label(d)
        if comp_of[u] == comp_of[v]:
            inner.setdefault(blocks_key(blocks, u), []).append(label)
            continue
        if (u, v, label) in seen_pairs:
            continue
        seen_pairs.add((u, v, label))
        path = [u]
        for layer in range(layer_of[u] + 1, layer_of[v]):
            vn = f"\0v{i}.{layer}"
            extra_layer[vn] = layer
            extra_size[vn] = (0.05, VIRTUAL)
            adj[vn] = set()
            path.append(vn)
        path.append(v)
        for a, b in itertools.pairwise(path):
            adj[a].add(b)
            adj[b].add(a)
        route = EdgeRoute(u, v, label, [])
        edges.append(route)
        chains.append((route, path))
    all_layer = {**layer_of, **extra_layer}
    size = {**{n: sizes[n] for n in g}, **extra_size}
    columns: list[list[list[str]]] = [[] for _ in range(n_layers)]
    for key, members in blocks.items():
        columns[layer_of[key]].append(members)
    for vn, layer in extra_layer.items():
        columns[layer].append([vn])

    def flat(col: list[list[str]]) -> list[str]:
        return [n for b in col for n in b]

    # barycentre ordering, a few sweeps each way
    for sweep in range(8):
        rng = range(1, n_layers) if sweep % 2 == 0 else range(n_layers - 2, -1, -1)
        for li in rng:
            ref = li - 1 if sweep % 2 == 0 else li + 1
            rank = {n: k for k, n in enumerate(flat(columns[ref]))}

            current = {b[0]: k for k, b in enumerate(columns[li])}

            def bary(block: list[str], rank: dict[str, int] = rank, current: dict[str, int] = current) -> float:
                ks = [rank[m] for n in block for m in adj[n] if m in rank]
                return sum(ks) / len(ks) if ks else float(current[block[0]])

            columns[li].sort(key=bary)
    # x: column centres from the widest box in each column
    widths = [max((size[n][0] for n in flat(col)), default=0.0) for col in columns]
    xs: list[float] = []
    x = 0.0
    for li, w in enumerate(widths):
        x += (widths[li - 1] / 2 + COL_GAP + w / 2) if li else w / 2
        xs.append(x)
    # y: rows as close to their neighbours' mean as the boxes allow (isotonic regression)
    y: dict[str, float] = {}
    for col in columns:
        _place(flat(col), [0.0] * len(flat(col)), size, y)
    for sweep in range(10):
        for li in range(n_layers) if sweep % 2 == 0 else range(n_layers - 1, -1, -1):
            nodes = flat(columns[li])
            want = []
            for n in nodes:
                nb = [y[m] for m in adj[n] if m in y and all_layer[m] != li]
                want.append(sum(nb) / len(nb) if nb else y[n])
            _place(nodes, want, size, y)
    lo = min((y[n] - size[n][1] / 2 for n in y), default=0.0)
    hi = max((y[n] + size[n][1] / 2 for n in y), default=0.0)
    left = xs[0] - widths[0] / 2 if xs else 0.0
    right = xs[-1] + widths[-1] / 2 if xs else 0.0
    cx, cy = (left + right) / 2, (lo + hi) / 2
    pos = {n: (xs[all_layer[n]] - cx, y[n] - cy) for n in all_layer}
    for route, path in chains:
        route.points = [pos[n] for n in path]
    boxes = {
        n: (
            pos[n][0] - size[n][0] / 2,
            pos[n][1] - size[n][1] / 2,
            pos[n][0] + size[n][0] / 2,
            pos[n][1] + size[n][1] / 2,
        )
        for n in g
    }
    clusters = []
    for key, labels in inner.items():
        members = blocks[key]
        bx = [boxes[m] for m in members]
        pad = 0.12
        caption = "\u2194 " + ", ".join(dict.fromkeys(labels))  # the flows among them, both ways
        clusters.append(
            Cluster(
                members,
                caption,
                min(b[0] for b in bx) - pad,
                min(b[1] for b in bx) - pad,
                max(b[2] for b in bx) + pad,
                max(b[3] for b in bx) + pad,
            )
        )
    width = right - left
    height = (hi - lo) + (0.35 if clusters else 0.0)
    return GraphLayout(
        {n: pos[n] for n in g}, boxes, [[n for n in flat(c) if n in g] for c in columns], edges, clusters, width, height
    )


def blocks_key(blocks: Mapping[str, list[str]], node: str) -> str:
    return next(k for k, members in blocks.items() if node in members)


def _place(nodes: list[str], want: list[float], size: Mapping[str, tuple[float, float]], y: dict[str, float]) -> None:
    """Set ``y`` (top to bottom = decreasing y) as near ``want`` as possible with boxes apart:
    pool-adjacent-violators on the offsets, which gives the least-squares answer."""
    if not nodes:
        return
    offs = [0.0]
    for a, b in itertools.pairwise(nodes):
        offs.append(offs[-1] + size[a][1] / 2 + ROW_GAP + size[b][1] / 2)
    # y_k = top - offs_k; with z_k = want_k + offs_k we need non-increasing... solve on z
    target = [w + o for w, o in zip(want, offs, strict=True)]
    pools: list[list[float]] = []  # [sum, count]
    for t in target:
        pools.append([t, 1.0])
        while len(pools) > 1 and pools[-2][0] / pools[-2][1] < pools[-1][0] / pools[-1][1]:
            s, c = pools.pop()
            pools[-1][0] += s
            pools[-1][1] += c
    k = 0
    for s, c in pools:
        for _ in range(int(c)):
            y[nodes[k]] = s / c - offs[k]
            k += 1


def _smooth(points: list[tuple[float, float]], steps: int = 16) -> list[tuple[float, float]]:
    """A curve through the points with horizontal tangents (cubic Bézier per stretch)."""
    if len(points) == 2 and abs(points[0][1] - points[1][1]) < 1e-9:
        return points
    out = [points[0]]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        dx = (x1 - x0) / 2
        for i in range(1, steps + 1):
            t = i / steps
            a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3
            out.append((a * x0 + b * (x0 + dx) + c * (x1 - dx) + d * x1, a * y0 + b * y0 + c * y1 + d * y1))
    return out


def _inside(p: tuple[float, float], box: tuple[float, float, float, float]) -> bool:
    return box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]


def _clip(
    pts: list[tuple[float, float]], a: tuple[float, float, float, float], b: tuple[float, float, float, float]
) -> list[tuple[float, float]]:
    """The part of a curve outside both boxes, ends moved onto the box borders."""
    gap = 0.04
    a = (a[0] - gap, a[1] - gap, a[2] + gap, a[3] + gap)
    b = (b[0] - gap, b[1] - gap, b[2] + gap, b[3] + gap)
    i = 0
    while i < len(pts) - 1 and _inside(pts[i + 1], a):
        i += 1
    j = len(pts) - 1
    while j > i + 1 and _inside(pts[j - 1], b):
        j -= 1
    start = _border(pts[i], pts[i + 1], a) if i + 1 < len(pts) else pts[i]
    end = _border(pts[j], pts[j - 1], b) if j - 1 >= 0 else pts[j]
    return [start, *pts[i + 1 : j], end]


def _border(
    inside: tuple[float, float], outside: tuple[float, float], box: tuple[float, float, float, float]
) -> tuple[float, float]:
    """Where the segment from a point in ``box`` to one outside crosses its border (bisection)."""
    lo, hi = inside, outside
    if not _inside(lo, box):
        return lo
    for _ in range(30):
        m = ((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2)
        if _inside(m, box):
            lo = m
        else:
            hi = m
    return hi
