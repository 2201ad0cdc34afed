"""Logit-lens line: the metric read at each layer point ("0_pre", "0_mid", …, "final_post").

One line per result (e.g. the ``final_scale`` and ``renormalized`` conventions side by side),
each with an optional shaded bootstrap CI band; hover shows the point label and the value.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from hookpatch.errors import HookpatchError
from hookpatch.results import SweepResult
from hookpatch.views._common import metric_name, require_axes, value_title

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def logit_lens_line(
    results: SweepResult | Sequence[SweepResult],
    *,
    names: Sequence[str] | None = None,
    ci: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Line of the logit lens' mean metric over layer points, one trace per result.

    Example:
        >>> lens = [logit_lens(model, prompts, metric, convention=c) for c in ("final_scale", "renormalized")]
        >>> logit_lens_line(lens).show()

    Args:
        results: one :func:`hookpatch.readouts._logit_lens` result or several on the same points.
        names: legend names, one per result (default: each result's convention).
        ci: draw each result's bootstrap CI as a shaded band (trace named "<name> CI").
        title: the figure title.
    """
    results = [results] if isinstance(results, SweepResult) else list(results)
    if not results:
        raise HookpatchError("logit_lens_line needs at least one logit_lens result.")
    for result in results:
        require_axes(result, [("point",)], "logit_lens_line", "Pass logit_lens(...) results.")
    if any(r.labels["point"] != results[0].labels["point"] for r in results):
        raise HookpatchError("logit_lens_line: the results have different layer points; use the same incl_mid.")
    if names is None:
        names = [r.provenance.convention or f"result {i}" for i, r in enumerate(results)]
    elif len(names) != len(results):
        raise HookpatchError(f"names has {len(names)} entries for {len(results)} results; give one per result.")
    points = list(results[0].labels["point"])
    fig = go.Figure()
    for i, (result, name) in enumerate(zip(results, names, strict=True)):
        color = COLORS[i % len(COLORS)]
        if ci:
            low, high = result.ci()
            fig.add_trace(go.Scatter(
                x=points + points[::-1], y=high.tolist() + low.tolist()[::-1], fill="toself", mode="lines",
                line={"width": 0, "color": color}, opacity=0.2, name=f"{name} CI", legendgroup=name,
                showlegend=False, hoverinfo="skip",
            ))
        fig.add_trace(go.Scatter(
            x=points, y=result.mean().tolist(), mode="lines+markers", name=name, legendgroup=name,
            line={"color": color}, hovertemplate=f"{name}<br>%{{x}}: %{{y:.4g}}<extra></extra>",
        ))
    fig.update_layout(
        title={"text": title if title is not None else f"Logit lens: {metric_name(results[0])}"},
        xaxis={"title": {"text": "Layer point"}, "type": "category", "tickvals": points, "ticktext": points},
        yaxis={"title": {"text": value_title(results[0])}},
        hovermode="closest",
    )
    return fig
