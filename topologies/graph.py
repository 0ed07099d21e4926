"""Agent graphs: agents are nodes (id, tier, metadata), edges are message flows (networkx)."""

from __future__ import annotations

from collections.abc import Iterable
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


TIER_COLORS = {Tier.DEVICE: "#8ecae6", Tier.EDGE: "#ffb703", Tier.CLOUD: "#b5e48c", None: "#dddddd"}


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

    # -- pictures -----------------------------------------------------------------------------
    def to_mermaid(self) -> str:
        lines = ["flowchart LR"]
        ids = {n: f"n{i}" for i, n in enumerate(self.g.nodes)}
        for n, d in self.g.nodes(data=True):
            label = f"{n}<br/><i>{d['tier']}</i>" if d.get("tier") else str(n)
            shape = ("[", "]") if d.get("kind") == "agent" else ("([", "])")
            lines.append(f'    {ids[n]}{shape[0]}"{label}"{shape[1]}')
        for u, v, d in self.g.edges(data=True):
            lines.append(f"    {ids[u]} -->|{d.get('kind', '')}| {ids[v]}")
        for tier in Tier:
            members = [ids[n] for n, d in self.g.nodes(data=True) if d.get("tier") == tier]
            if members:
                lines.append(f"    classDef {tier} fill:{TIER_COLORS[tier]}")
                lines.append(f"    class {','.join(members)} {tier}")
        return "\n".join(lines) + "\n"

    def draw(self, path: str | Path) -> Path:
        """Render to ``.svg``/``.png`` (matplotlib) or ``.mmd``/``.md`` (Mermaid text); tiers are colours."""
        path = Path(path)
        if path.suffix in (".mmd", ".md", ".mermaid"):
            path.write_text(self.to_mermaid())
            return path
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        g = nx.DiGraph(self.g)
        try:
            layers = {n: i for i, gen in enumerate(nx.topological_generations(g)) for n in gen}
        except nx.NetworkXUnfeasible:
            layers = {n: 0 for n in g}
        for n, layer in layers.items():
            g.nodes[n]["layer"] = layer
        pos = (
            nx.multipartite_layout(g, subset_key="layer") if nx.is_directed_acyclic_graph(g) else nx.circular_layout(g)
        )
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(set(layers.values())) + 2), max(4, 0.7 * len(g) + 1)))
        colors = [TIER_COLORS.get(self.g.nodes[n].get("tier"), "#eeeeee") for n in g]
        shapes = {n: "o" if self.g.nodes[n].get("kind") == "agent" else "s" for n in g}
        for shape in set(shapes.values()):
            nodes = [n for n in g if shapes[n] == shape]
            nx.draw_networkx_nodes(
                g,
                pos,
                nodelist=nodes,
                node_shape=shape,
                ax=ax,
                node_size=1600,
                node_color=[colors[list(g).index(n)] for n in nodes],
                edgecolors="#333333",
            )
        nx.draw_networkx_labels(g, pos, ax=ax, font_size=8)
        nx.draw_networkx_edges(
            g, pos, ax=ax, arrows=True, arrowsize=14, node_size=1600, connectionstyle="arc3,rad=0.08"
        )
        edge_labels = {(u, v): d.get("kind", "") for u, v, d in self.g.edges(data=True)}
        nx.draw_networkx_edge_labels(g, pos, edge_labels=edge_labels, ax=ax, font_size=7)
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=TIER_COLORS[t], label=str(t)) for t in Tier], loc="lower right", fontsize=8)
        ax.set_title(self.name)
        ax.axis("off")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
