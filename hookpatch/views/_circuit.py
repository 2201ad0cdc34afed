"""Circuit views: a circuit drawn as a layered graph, and its faithfulness curve.

:func:`circuit_graph` draws a :class:`~hookpatch.circuits.Circuit` the way circuit papers do:
one row per layer (the input at the bottom, the logits at the top), each layer's heads along
its row and its MLP a little above them (it reads after the layer's attention), and one line
per edge from the sender to the receiver. A line's colour is the sign of the score that picked
the edge (blue raises the metric, red lowers it, as RdBu) and its width grows with ``|score|``;
the receiver's input shows in the dash (query solid, key dashed, value dotted), in a small
offset where the line meets the head (q left, k centre, v right) and in the hover text
(``L0H1->L2H3.q``).

:func:`faithfulness_curve_plot` draws a :class:`~hookpatch.circuits.FaithfulnessCurve`:
faithfulness against the edge budget on a log axis, the bootstrap band, the random circuits of
the same sizes, the full model (1) and the corrupted run (0), and CPR/CMD in the title.
Both only reshape numbers their input already holds.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from hookpatch.circuits import Circuit, FaithfulnessCurve, Graph, Node
from hookpatch.circuits._circuit import receiver_nodes
from hookpatch.circuits._graph import Edge
from hookpatch.errors import HookpatchError

POSITIVE, NEGATIVE, UNSCORED = "#2166ac", "#b2182b", "#8c8c8c"  # RdBu's ends; grey without scores
DASHES = {"q": "solid", "k": "dash", "v": "dot", "mlp": "solid", "logits": "solid"}
OFFSETS = {"q": -0.18, "k": 0.0, "v": 0.18}  # where a head's q, k, v inputs meet it, in head widths
MIN_WIDTH, MAX_WIDTH, UNSCORED_WIDTH = 1.0, 8.0, 2.0
MLP_LIFT = 0.45  # an MLP sits this far above its layer's heads: it reads after their attention
X_AXES = ("fraction", "edges")


# -------------------------------------------------------------------- circuit graph


def circuit_graph(circuit: Circuit, *, title: str | None = None) -> go.Figure:
    """A circuit as a layered graph: nodes on one row per layer, one line per edge.

    Example:
        >>> c = top_n(graph(model), edge_attribution(model, prompts, metric).mean(), 20)
        >>> circuit_graph(c).show()

    Args:
        circuit: the circuit to draw (:func:`hookpatch.circuits.top_n`, ``greedy``,
            ``threshold`` or :meth:`Circuit.from_edges`).
        title: the figure title (default: edge count, graph size and how the circuit was made).

    Returns:
        A figure with one line trace per edge (``name`` = the edge's label, ``meta`` = its label,
        receiver input and score), then one marker trace of the nodes the edges touch
        (``meta["kind"] == "nodes"``), one faint trace of the graph's other nodes
        (``"other nodes"``), then legend-only traces (``"legend"``) explaining dashes and colours.
        Under grouped-query attention a key/value edge reaches every query head its KV head
        feeds, so its trace has one segment per head.
    """
    if not isinstance(circuit, Circuit):
        raise HookpatchError(
            f"circuit_graph(circuit) needs a Circuit (hookpatch.circuits.top_n(graph, scores, n), greedy, "
            f"threshold or Circuit.from_edges); got {type(circuit).__name__}."
        )
    _check_title(title, "circuit_graph")
    g = circuit.graph
    widths = edge_widths(circuit)
    fig = go.Figure()
    for i, edge in enumerate(circuit.edges):
        score = None if circuit.scores is None else circuit.scores[i]
        fig.add_trace(_edge_trace(g, edge, score, float(widths[i])))
    nodes = circuit.nodes
    if nodes:
        fig.add_trace(_node_trace(circuit, nodes))
    inside = set(nodes)
    others = [n for n in g.nodes if n not in inside]
    if others:  # the rest of the graph, faint, so rows read as layers of heads
        at = [node_position(g, n) for n in others]
        fig.add_trace(go.Scatter(
            x=[p[0] for p in at], y=[p[1] for p in at], mode="markers", name="other nodes", showlegend=False,
            marker={"size": 7, "color": "#dddddd"}, hoverinfo="text",
            hovertext=[f"{n.label} (not in the circuit)" for n in others], meta={"kind": "other nodes"},
        ))
    for name, dash, color in (("query input", "solid", UNSCORED), ("key input", "dash", UNSCORED),
                              ("value input", "dot", UNSCORED), ("score > 0 (raises the metric)", "solid", POSITIVE),
                              ("score < 0 (lowers the metric)", "solid", NEGATIVE)):
        if color != UNSCORED and circuit.scores is None:
            continue
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=name, meta={"kind": "legend"},
                                 line={"color": color, "dash": dash, "width": 2}, hoverinfo="skip"))
    n_layers, n_heads = g.facts.n_layers, g.facts.n_heads
    rows = ["input", *(f"layer {layer}" for layer in range(n_layers)), "logits"]
    fig.update_layout(
        title={"text": title if title is not None else default_circuit_title(circuit)},
        xaxis={"visible": False, "range": [-0.8, n_heads + (0.8 if g.has_mlps else -0.2)]},
        yaxis={"title": {"text": "Layer"}, "tickvals": list(range(n_layers + 2)), "ticktext": rows,
               "range": [-0.5, n_layers + 1.5], "zeroline": False, "showgrid": False},
        height=min(1400, 250 + 90 * (n_layers + 2)), plot_bgcolor="white", hovermode="closest",
    )
    if not circuit.edges:
        fig.add_annotation(text="empty circuit: no edges", showarrow=False, x=(n_heads - 1) / 2, y=(n_layers + 1) / 2)
    return fig


def node_position(graph: Graph, node: Node) -> tuple[float, float]:
    """Where :func:`circuit_graph` draws ``node``: ``(x, y)`` with y the row (input 0, layer
    ``l`` at ``l + 1``, an MLP ``MLP_LIFT`` above its heads, logits ``n_layers + 1``) and x the
    head index (an MLP right of the heads; input and logits centred)."""
    centre = (graph.facts.n_heads - 1) / 2
    if node.kind == "input":
        return centre, 0.0
    if node.kind == "logits":
        return centre, float(graph.facts.n_layers + 1)
    if node.kind == "mlp":
        return float(graph.facts.n_heads), node.layer + 1 + MLP_LIFT
    assert node.head is not None
    return float(node.head), float(node.layer + 1)


def edge_widths(circuit: Circuit) -> Float[Tensor, " edge"]:
    """Line widths per edge: ``MIN_WIDTH`` at score 0 up to ``MAX_WIDTH`` at the largest
    ``|score|``, linear in ``|score|`` (``UNSCORED_WIDTH`` for all when scores are None)."""
    if circuit.scores is None:
        return torch.full((len(circuit),), UNSCORED_WIDTH, dtype=torch.float64)
    size = torch.tensor(circuit.scores, dtype=torch.float64).abs()
    top = float(size.max()) if len(size) else 0.0
    return MIN_WIDTH + (MAX_WIDTH - MIN_WIDTH) * (size / top if top > 0 else size * 0)


def edge_color(score: float | None) -> str:
    """An edge's colour: blue for a score ≥ 0, red below 0, grey without a score."""
    return UNSCORED if score is None else (POSITIVE if score >= 0 else NEGATIVE)


def default_circuit_title(circuit: Circuit) -> str:
    """``"Circuit: 12 of 262 edges, 7 nodes (top_n(n=13) + prune)"``."""
    return (f"Circuit: {len(circuit)} of {circuit.graph.n_edges} edges, {len(circuit.nodes)} nodes "
            f"({circuit.method})")


def _edge_trace(g: Graph, edge: Edge, score: float | None, width: float) -> go.Scatter:
    """One edge as a line from its sender to each node its receiver belongs to, hoverable at
    both ends and the middle."""
    x0, y0 = node_position(g, edge.sender)
    receiver = edge.receiver
    xs: list[float | None] = []
    ys: list[float | None] = []
    for node in receiver_nodes(g, receiver):
        x1, y1 = node_position(g, node)
        x1 += OFFSETS.get(receiver.input, 0.0)
        if xs:
            xs.append(None)
            ys.append(None)
        xs += [x0, (x0 + x1) / 2, x1]
        ys += [y0, (y0 + y1) / 2, y1]
    text = edge.label + ("" if score is None else f"<br>score {score:+.4g}")
    return go.Scatter(
        x=xs, y=ys, mode="lines", name=edge.label, showlegend=False,
        line={"color": edge_color(score), "width": width, "dash": DASHES[receiver.input]}, opacity=0.8,
        hoverinfo="text", hovertext=[None if x is None else text for x in xs],
        meta={"kind": "edge", "label": edge.label, "input": receiver.input, "score": score},
    )


def _node_trace(circuit: Circuit, nodes: tuple[Node, ...]) -> go.Scatter:
    """The circuit's nodes as labelled markers; hover: label, edges in and out, Σ|score| out."""
    g = circuit.graph
    incoming = {n: 0 for n in nodes}
    outgoing = {n: 0 for n in nodes}
    weight = {n: 0.0 for n in nodes}
    for i, e in enumerate(circuit.edges):
        outgoing[e.sender] += 1
        weight[e.sender] += 0.0 if circuit.scores is None else abs(circuit.scores[i])
        for n in receiver_nodes(g, e.receiver):
            incoming[n] += 1
    positions = [node_position(g, n) for n in nodes]
    hover = []
    for n in nodes:
        text = f"{n.label}<br>{incoming[n]} edges in, {outgoing[n]} edges out"
        if circuit.scores is not None and outgoing[n]:
            text += f"<br>Σ|score| out {weight[n]:.4g}"
        hover.append(text)
    symbols = {"input": "diamond", "logits": "diamond", "head": "circle", "mlp": "square"}
    return go.Scatter(
        x=[p[0] for p in positions], y=[p[1] for p in positions], mode="markers+text", name="nodes",
        showlegend=False, text=[n.label for n in nodes], textposition="top center",
        marker={"size": 16, "color": "#f7f7f7", "line": {"color": "#333333", "width": 1.5},
                "symbol": [symbols[n.kind] for n in nodes]},
        hoverinfo="text", hovertext=hover, meta={"kind": "nodes"},
    )


# -------------------------------------------------------------------- faithfulness curve


def faithfulness_curve_plot(curve: FaithfulnessCurve, *, x: str = "fraction", title: str | None = None) -> go.Figure:
    """Faithfulness against the edge budget, with its bootstrap band and the random baseline.

    Example:
        >>> curve = faithfulness_curve(model, prompts, metric, scores.mean(), budgets=(0.01, 0.1, 1.0))
        >>> faithfulness_curve_plot(curve).show()

    Args:
        curve: a :func:`hookpatch.circuits.faithfulness_curve` result.
        x: ``"fraction"`` (the requested budgets, the axis CPR and CMD integrate over) or
            ``"edges"`` (each circuit's edge count after pruning); both on a log axis.
        title: the figure title (default: the method, CPR and CMD with their intervals, and the
            random baseline's).

    Returns:
        Traces, in order: the band's upper and lower edges (``ci_high``, then ``ci_low``
        filled to it), the faithfulness line, and when the curve has a random baseline its band
        and its mean line; plus horizontal lines at 1 (full model) and 0 (corrupted run).
    """
    if not isinstance(curve, FaithfulnessCurve):
        raise HookpatchError(
            "faithfulness_curve_plot(curve) needs the FaithfulnessCurve of hookpatch.circuits.faithfulness_curve("
            f"model, prompts, metric, scores); got {type(curve).__name__}."
        )
    if x not in X_AXES:
        raise HookpatchError(f"x={x!r}: expected one of {X_AXES} (budget fractions or edge counts on the x axis).")
    _check_title(title, "faithfulness_curve_plot")
    xs = list(curve.budgets) if x == "fraction" else [float(n) for n in curve.n_edges]
    if min(xs) <= 0:
        raise HookpatchError(
            f"x='edges': a circuit of this curve has 0 edges after pruning (n_edges {curve.n_edges}), which a log "
            "axis cannot show; draw it with x='fraction'."
        )
    level = f"{curve.level:.0%}"
    custom = [[b, n] for b, n in zip(curve.budgets, curve.n_edges, strict=True)]
    hover = ("budget %{customdata[0]:.3g} (%{customdata[1]} edges)<br>faithfulness %{y:.4g}"
             "<extra>%{fullData.name}</extra>")
    fig = go.Figure()
    _band(fig, xs, curve.ci_low, curve.ci_high, f"{level} CI", "rgba(33,102,172,0.2)")
    fig.add_trace(go.Scatter(x=xs, y=curve.faithfulness.tolist(), mode="lines+markers", name="circuit",
                             line={"color": POSITIVE, "width": 2}, customdata=custom, hovertemplate=hover))
    if curve.random_faithfulness is not None:
        assert curve.random_ci_low is not None and curve.random_ci_high is not None
        _band(fig, xs, curve.random_ci_low, curve.random_ci_high, f"random {level} CI", "rgba(140,140,140,0.2)")
        fig.add_trace(go.Scatter(x=xs, y=curve.random_faithfulness.tolist(), mode="lines+markers",
                                 name="random circuits (same sizes)", line={"color": UNSCORED, "dash": "dash"},
                                 customdata=custom, hovertemplate=hover))
    fig.add_hline(y=1.0, line={"color": "#333333", "dash": "dot", "width": 1}, annotation_text="full model (1)",
                  annotation_position="bottom right")
    fig.add_hline(y=0.0, line={"color": "#333333", "dash": "dot", "width": 1}, annotation_text="corrupted run (0)",
                  annotation_position="top right")
    ticks = sorted(set(xs))
    fig.update_layout(
        title={"text": title if title is not None else default_curve_title(curve)},
        xaxis={"type": "log", "title": {"text": "edge budget (fraction of the graph's edges)" if x == "fraction"
                                        else "edges in the circuit"},
               "tickvals": ticks, "ticktext": [f"{t:.3g}" for t in ticks]},
        yaxis={"title": {"text": "faithfulness<br>1 = full model, 0 = corrupted run"}},
        hovermode="closest",
    )
    return fig


def default_curve_title(curve: FaithfulnessCurve) -> str:
    """``"Faithfulness of top_n circuits: CPR 0.968 [0.964, 0.971], CMD 0.022 [0.019, 0.026]"``,
    with a second line for the random baseline's CPR and CMD."""
    text = f"Faithfulness of {curve.method} circuits: CPR {curve.cpr!r}, CMD {curve.cmd!r}"
    if curve.random_cpr is not None:
        text += f"<br><sup>random circuits: CPR {curve.random_cpr!r}, CMD {curve.random_cmd!r} " \
                f"({curve.level:.0%} bootstrap CIs)</sup>"
    return text


def _band(fig: go.Figure, xs: list[float], low: Tensor, high: Tensor, name: str, color: str) -> None:
    """A filled band: the upper edge (no legend), then the lower edge filled up to it."""
    fig.add_trace(go.Scatter(x=xs, y=high.tolist(), mode="lines", line={"width": 0}, showlegend=False,
                             name=f"{name} high", hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=xs, y=low.tolist(), mode="lines", line={"width": 0}, fill="tonexty",
                             fillcolor=color, name=name, hoverinfo="skip"))


def _check_title(title: Any, view: str) -> None:
    if title is not None and not isinstance(title, str):
        raise HookpatchError(f"{view}: title={title!r} must be a string or None (the default title).")
