"""Circuits: a set of graph edges picked from edge scores, and the rules that pick them.

A :class:`Circuit` is a subset of a model's :class:`~hookpatch.circuits.Graph` edges, with
the score that picked each edge. Scores come from anything that rates edges — exact
single-edge patching, attribution patching, a hand-made ranking — as a tensor aligned with
``graph.edges`` (``[n_edges]``, or ``[n_edges, batch]``, averaged over prompts).

Extraction rules:

- :func:`top_n` — the ``n`` edges of highest (absolute) score;
- :func:`threshold` — every edge whose (absolute) score reaches ``t``;
- :func:`greedy` — grown from the logits backwards: repeatedly the highest-|score| edge whose
  receiver's node is already in the circuit (so every edge leads to the logits);
- :func:`prune` — drop edges off every path from ``input`` to ``logits`` (an edge that cannot
  carry information from the prompt to the output changes nothing when it is kept alone).

Every extraction prunes by default (``prune=True``), so a circuit can hold fewer edges than
asked for. ``save``/``load`` write JSON with a format version and the graph's sizes.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hookpatch._checks import is_int
from hookpatch.circuits._graph import Edge, EdgeIndices, Graph, Node, Receiver, _graph
from hookpatch.errors import HookpatchError
from hookpatch.model._facts import ModelFacts

CIRCUIT_FORMAT = "hookpatch.circuit"
CIRCUIT_VERSION = 1


@dataclass(frozen=True)
class Circuit:
    """A set of edges of one model's graph, with the score that picked each.

    Example:
        >>> c = top_n(graph(model), scores, 20)
        >>> len(c), c.labels[:3], c.nodes                   # edges, their labels, the nodes touched
        >>> c.save("ioi.json"); Circuit.load("ioi.json", graph=graph(model))
        >>> Circuit.from_edges(graph(model), ["input->L0H1.v", "L0H1->logits"])   # by hand

    Attributes:
        graph: the model's graph the edges belong to.
        edges: the edges, without repeats, in graph order (sorted on construction; build a
            circuit from labels such as ``"L0H1->L1H2.q"`` with :meth:`from_edges`).
        scores: per edge, the score used to pick it (mean over prompts), or None.
        method: how the circuit was made (``"top_n(n=20)"``, ``"hand-made"``), for the record.
    """

    graph: Graph
    edges: tuple[Edge, ...]
    scores: tuple[float, ...] | None = None
    method: str = "hand-made"
    _index: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        _require_graph(self.graph)
        items = list(self.edges)
        scores = None if self.scores is None else [float(s) for s in self.scores]
        if scores is not None and len(scores) != len(items):
            raise HookpatchError(
                f"scores: {len(scores)} scores for {len(items)} edges; pass one score per edge, or scores=None."
            )
        checked = [e if isinstance(e, Edge) else self.graph.edge(e) for e in items]
        by_edge = dict(zip(checked, scores or [0.0] * len(checked), strict=True))
        positions = self.graph.indices(checked)  # checks each edge against the graph
        order = sorted(dict(zip(positions, checked, strict=True)).items())
        index = [i for i, _ in order]
        edges = tuple(e for _, e in order)
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "_index", tuple(index))
        if scores is not None:
            object.__setattr__(self, "scores", tuple(by_edge[e] for e in edges))

    @classmethod
    def from_edges(
        cls, graph: Graph, edges: Iterable[Edge | str | tuple[Any, Any]], scores: Iterable[float] | None = None,
        method: str = "hand-made",
    ) -> Circuit:
        """A circuit from edge labels (``"L0H1->L1H2.q"``), ``(sender, receiver)`` pairs or
        :class:`Edge` s, checked against ``graph``; ``scores`` (optional) one per edge."""
        _require_graph(graph)
        if isinstance(edges, str | Edge):
            edges = [edges]
        items = tuple(graph.edge(e) for e in edges)
        return cls(graph, items, None if scores is None else tuple(float(x) for x in scores), method)

    # ---------------------------------------------------------------- views

    @property
    def labels(self) -> list[str]:
        """The edges' labels (``"L0H1->L1H2.q"``), in graph order."""
        return [e.label for e in self.edges]

    @property
    def indices(self) -> tuple[int, ...]:
        """The edges' positions in ``graph.edges``."""
        return self._index

    @property
    def nodes(self) -> tuple[Node, ...]:
        """The nodes the edges touch: each sender and each receiver's node(s) (a KV receiver
        under grouped-query attention belongs to every query head it feeds), in graph order."""
        found: set[Node] = set()
        for e in self.edges:
            found.add(e.sender)
            found.update(receiver_nodes(self.graph, e.receiver))
        return tuple(n for n in self.graph.nodes if n in found)

    def mask(self) -> Bool[Tensor, " n_edges"]:
        """``[n_edges]`` True where ``graph.edges`` is in the circuit."""
        out = torch.zeros(self.graph.n_edges, dtype=torch.bool)
        out[list(self._index)] = True
        return out

    def complement(self) -> tuple[Edge, ...]:
        """Every edge of the graph outside the circuit, in graph order."""
        return tuple(self.graph.edge_at(i) for i in self.complement_indices().indices)

    def complement_indices(self) -> EdgeIndices:
        """The positions in ``graph.edges`` of every edge outside the circuit (what edge
        patching takes without an :class:`Edge` per edge)."""
        return EdgeIndices(tuple((~self.mask()).nonzero().flatten().tolist()))

    def __len__(self) -> int:
        return len(self.edges)

    def __iter__(self) -> Iterator[Edge]:
        return iter(self.edges)

    def __contains__(self, edge: object) -> bool:
        try:
            return self.graph.index(edge) in set(self._index)  # type: ignore[arg-type]
        except HookpatchError:
            return False

    def __repr__(self) -> str:
        shown = ", ".join(self.labels[:4]) + (", ..." if len(self) > 4 else "")
        return (f"Circuit({len(self)} of {self.graph.n_edges} edges, {len(self.nodes)} nodes, {self.method}: "
                f"[{shown}])")

    # ---------------------------------------------------------------- files

    def save(self, path: str | Path) -> None:
        """Write the circuit as JSON: format name and version, the graph's sizes, edge labels, scores."""
        data = {
            "format": CIRCUIT_FORMAT, "version": CIRCUIT_VERSION,
            "graph": {"facts": asdict(self.graph.facts), "has_mlps": self.graph.has_mlps},
            "method": self.method, "edges": self.labels,
            "scores": None if self.scores is None else list(self.scores),
        }
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path, graph: Graph | None = None) -> Circuit:
        """Read a circuit written by :meth:`save`.

        ``graph`` (optional): the graph of the model you will use it on; the file's graph sizes
        must match it. Without it the graph is rebuilt from the sizes in the file."""
        try:
            data = json.loads(Path(path).read_text())
            ok = isinstance(data, dict) and data.get("format") == CIRCUIT_FORMAT
        except (OSError, ValueError) as err:
            raise HookpatchError(f"path={str(path)!r}: cannot read a circuit file ({err}).") from None
        if not ok:
            raise HookpatchError(f"path={str(path)!r} is not a circuit file (written by Circuit.save).")
        if data.get("version") != CIRCUIT_VERSION:
            raise HookpatchError(
                f"path={str(path)!r}: circuit format version {data.get('version')!r}; this hookpatch reads "
                f"version {CIRCUIT_VERSION}. Save it again with this version."
            )
        try:
            stored = _graph(ModelFacts(**data["graph"]["facts"]), bool(data["graph"]["has_mlps"]))
        except (KeyError, TypeError) as err:
            raise HookpatchError(f"path={str(path)!r}: the circuit file's graph facts are damaged ({err}).") from None
        if graph is not None:
            if not isinstance(graph, Graph):
                raise HookpatchError(f"graph: expected a Graph (hookpatch.circuits.graph(model)), got "
                                     f"{type(graph).__name__}.")
            if graph.facts != stored.facts or graph.has_mlps != stored.has_mlps:
                raise HookpatchError(
                    f"graph: the circuit in {str(path)!r} was saved for another model ({stored!r}); this graph is "
                    f"{graph!r}. Load it with the graph of the model it was extracted from."
                )
            stored = graph
        scores = data.get("scores")
        scores = None if scores is None else tuple(float(x) for x in scores)
        return cls.from_edges(stored, data["edges"], scores, str(data.get("method", "hand-made")))


def _require_graph(graph: Any) -> None:
    if not isinstance(graph, Graph):
        raise HookpatchError(f"graph: expected a Graph (hookpatch.circuits.graph(model)), got {type(graph).__name__}.")


def receiver_nodes(graph: Graph, receiver: Receiver) -> tuple[Node, ...]:
    """The node(s) a receiver belongs to: a head input's query head(s) (under grouped-query
    attention a KV input feeds several), an MLP, or the logits."""
    if receiver.input == "logits":
        return (graph.nodes[-1],)
    if receiver.input == "mlp":
        return (Node("mlp", receiver.layer),)
    return tuple(Node("head", receiver.layer, h) for h in graph.query_heads(receiver))


# -------------------------------------------------------------------- scores


def edge_scores(graph: Graph, scores: Any, arg: str = "scores") -> Float[Tensor, " n_edges"]:
    """``scores`` checked against the graph: a ``[n_edges]`` tensor, or ``[n_edges, batch]``
    averaged over prompts (float64, on the CPU)."""
    _require_graph(graph)
    if not isinstance(scores, Tensor):
        raise HookpatchError(
            f"{arg}: expected a Tensor of edge scores aligned with graph.edges ([{graph.n_edges}] or "
            f"[{graph.n_edges}, batch]), got {type(scores).__name__}."
        )
    if scores.ndim not in (1, 2) or scores.shape[0] != graph.n_edges:
        raise HookpatchError(
            f"{arg}: shape {tuple(scores.shape)}; expected [{graph.n_edges}] or [{graph.n_edges}, batch] (one score "
            "per edge of graph.edges, in that order). Score the edges of this model's graph."
        )
    out = scores.detach().double().cpu()
    out = out.mean(-1) if out.ndim == 2 else out
    if not bool(out.isfinite().all()):
        raise HookpatchError(f"{arg}: {int((~out.isfinite()).sum())} scores are NaN or infinite; pass finite scores.")
    return out


def _ranking(scores: Tensor, absolute: bool) -> list[int]:
    """Edge indices from highest to lowest (absolute) score; ties keep graph order."""
    key = scores.abs() if absolute else scores
    return key.sort(descending=True, stable=True).indices.tolist()


def _check_bool(value: Any, arg: str) -> bool:
    if not isinstance(value, bool):
        raise HookpatchError(f"{arg}={value!r} must be True or False.")
    return value


def _build(graph: Graph, scores: Tensor, picked: Iterable[int], method: str, do_prune: bool) -> Circuit:
    picked = sorted(set(picked))
    c = _trusted(graph, picked, tuple(scores[picked].tolist()) if picked else (), method)
    return prune(c) if _check_bool(do_prune, "prune") else c


def top_n(graph: Graph, scores: Any, n: int, absolute: bool = True, *, prune: bool = True) -> Circuit:
    """The ``n`` edges of highest score (``|score|`` with ``absolute``), then pruned.

    Ties are broken by graph order (the earlier edge wins)."""
    s = edge_scores(graph, scores)
    n = _count(n, graph)
    return _build(graph, s, _ranking(s, _check_bool(absolute, "absolute"))[:n],
                  f"top_n(n={n}{'' if absolute else ', absolute=False'})", prune)


def threshold(graph: Graph, scores: Any, t: float, absolute: bool = True, *, prune: bool = True) -> Circuit:
    """Every edge whose score (``|score|`` with ``absolute``) is at least ``t``, then pruned."""
    s = edge_scores(graph, scores)
    if isinstance(t, bool) or not isinstance(t, int | float) or t != t:
        raise HookpatchError(f"t={t!r} must be a number: the score an edge needs to enter the circuit.")
    key = s.abs() if _check_bool(absolute, "absolute") else s
    return _build(graph, s, torch.nonzero(key >= t).flatten().tolist(), f"threshold(t={t:g})", prune)


def greedy(graph: Graph, scores: Any, n: int, absolute: bool = True, *, prune: bool = True) -> Circuit:
    """Grow a circuit of ``n`` edges from the logits backwards, then prune it.

    Start from the edges into ``logits``; repeatedly add the highest-|score| edge whose
    receiver's node is already in the circuit (a head's q/k/v input belongs to its head; under
    grouped-query attention a KV input belongs to every query head it feeds) and add its
    sender to the circuit. Ties are broken by graph order. Stops early when no edge is left."""
    s = edge_scores(graph, scores)
    n = _count(n, graph)
    key = s.abs() if _check_bool(absolute, "absolute") else s
    starts = {r: start for r, start, _ in graph._blocks}
    counts = {r: count for r, _, count in graph._blocks}
    heap: list[tuple[float, int]] = []
    opened: set[Receiver] = set()

    def open_receiver(r: Receiver) -> None:
        if r not in opened:
            opened.add(r)
            for i in range(starts[r], starts[r] + counts[r]):
                heapq.heappush(heap, (-float(key[i]), i))

    open_receiver(graph.receivers[-1])
    in_circuit: set[Node] = {graph.nodes[-1]}
    picked: list[int] = []
    while heap and len(picked) < n:
        _, i = heapq.heappop(heap)
        picked.append(i)
        sender = graph.edge_at(i).sender
        if sender not in in_circuit:
            in_circuit.add(sender)
            if sender.kind != "input":
                for r in graph.receivers_of(sender):
                    open_receiver(r)
    return _build(graph, s, picked, f"greedy(n={n})", prune)


def _count(n: Any, graph: Graph) -> int:
    if not is_int(n) or not 0 <= int(n) <= graph.n_edges:
        raise HookpatchError(f"n={n!r} must be an integer from 0 to the number of edges ({graph.n_edges}).")
    return int(n)


def prune(circuit: Circuit) -> Circuit:
    """The circuit without edges off every ``input`` → ``logits`` path.

    An edge stays when its sender is reachable from ``input`` through circuit edges and its
    receiver's node reaches ``logits`` through circuit edges (a head is reached through any of
    its q/k/v inputs; a KV input under grouped-query attention reaches every query head it
    feeds). Pruning twice changes nothing."""
    if not isinstance(circuit, Circuit):
        raise HookpatchError(f"circuit: expected a Circuit, got {type(circuit).__name__}.")
    g = circuit.graph
    index = torch.tensor(circuit.indices, dtype=torch.long)
    receiver, sender = g.edge_ends(index)  # a sender's index is its node's index
    belongs = g.receiver_node_matrix[receiver]  # [edge, node]: the node(s) each edge feeds
    n_nodes = len(g.nodes)
    links = torch.zeros(n_nodes, n_nodes)  # [from, to]: some circuit edge links the two nodes
    links.index_add_(0, sender, belongs.float())
    links_b = links > 0
    from_input = _reach(0, links_b)
    to_logits = _reach(n_nodes - 1, links_b.T)
    kept = (from_input[sender] & (belongs & to_logits).any(-1)).nonzero().flatten().tolist()
    scores = None if circuit.scores is None else tuple(circuit.scores[i] for i in kept)
    method = circuit.method if circuit.method.endswith("+ prune") else f"{circuit.method} + prune"
    return _trusted(g, [circuit.indices[i] for i in kept], scores, method)


def _trusted(graph: Graph, index: Sequence[int], scores: tuple[float, ...] | None, method: str) -> Circuit:
    """A circuit of edge positions already known to be sorted, distinct and in ``graph``
    (extraction and pruning), built without checking each edge again."""
    c = object.__new__(Circuit)
    for name, value in (("graph", graph), ("edges", tuple(graph.edge_at(i) for i in index)), ("scores", scores),
                        ("method", method), ("_index", tuple(index))):
        object.__setattr__(c, name, value)
    return c


def _reach(start: int, links: Bool[Tensor, "node node"]) -> Bool[Tensor, " node"]:
    """The nodes reachable from node ``start`` along ``links[from, to]`` (itself included)."""
    seen = torch.zeros(links.shape[0], dtype=torch.bool)
    seen[start] = True
    while True:
        grown = seen | links[seen].any(0)
        if torch.equal(grown, seen):
            return seen
        seen = grown
