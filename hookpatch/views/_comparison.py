"""Comparison scatter: attribution's estimate (x) against activation patching's effect (y).

One point per grid cell (hover: the cell's label and both values), a dashed ``y = x``
diagonal where a perfect linear estimate would lie, and Pearson and Spearman correlation
with their bootstrap CIs in the title.
"""

from __future__ import annotations

import plotly.graph_objects as go

from hookpatch.attribution._compare import Comparison
from hookpatch.errors import HookpatchError
from hookpatch.views._common import METHOD_TITLES, metric_name


def comparison_scatter(comparison: Comparison, *, title: str | None = None) -> go.Figure:
    """Scatter of a :class:`~hookpatch.attribution._compare.Comparison`, cell by cell (or of
    :func:`hookpatch.circuits.compare_edges`' edge comparison, edge by edge).

    Example:
        >>> cmp = compare(model, prompts, LogitDiff(prompts), "z", by=("layer", "head"))
        >>> comparison_scatter(cmp).show()
    """
    if not isinstance(comparison, Comparison):
        raise HookpatchError(
            f"comparison_scatter needs a Comparison from hookpatch.compare(...); got {type(comparison).__name__}."
        )
    df = comparison.to_dataframe()
    method = METHOD_TITLES.get(comparison.attribution.provenance.method, "Attribution")
    name = metric_name(comparison.activation)
    exact = "activation" if "activation" in df else "exact"  # an edge comparison's exact patching effects
    cells = df["label"] if "label" in df else df["edge"]
    x, y = df["attribution"].tolist(), df[exact].tolist()
    lo, hi = min(x + y), max(x + y)
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=x, y=y, mode="markers", name="cells", text=cells.tolist(),
        hovertemplate="%{text}<br>attribution %{x:.4g}<br>activation %{y:.4g}<extra></extra>",
    ))
    fig.add_trace(go.Scatter(
        x=[lo, hi], y=[lo, hi], mode="lines+text", name="y = x", text=["", "y = x"],
        textposition="top left", line={"dash": "dash", "color": "gray"}, hoverinfo="skip",
    ))
    if title is None:
        component = comparison.activation.provenance.component
        title = (f"{method} vs activation patching" + (f" of {component}" if component else "")
                 + f"<br><sup>Pearson r = {comparison.pearson!r}, Spearman ρ = {comparison.spearman!r}"
                 + f" ({comparison.level:.0%} CI)</sup>")
    fig.update_layout(
        title={"text": title},
        xaxis={"title": {"text": f"{method} estimate (Δ {name})"}},
        yaxis={"title": {"text": f"Activation patching effect (Δ {name})"}},
    )
    return fig
