"""Direct logit attribution views: bars per component, heatmap per head.

:func:`dla_bars` draws a :func:`hookpatch.readouts.dla_by_component` result (embeddings and
each layer's attention and MLP output) as bars with bootstrap-CI error bars;
:func:`dla_heads_heatmap` draws a :func:`hookpatch.readouts.dla_by_head` result as a
layer × head heatmap in RdBu around 0.
"""

from __future__ import annotations

import plotly.graph_objects as go

from hookpatch.results import SweepResult
from hookpatch.views._common import heatmap, metric_name, require_axes, value_title


def dla_bars(result: SweepResult, *, title: str | None = None) -> go.Figure:
    """Bars of each component's mean DLA, error bars = the bootstrap CI over prompts.

    Example:
        >>> dla_bars(dla_by_component(model, prompts, LogitDiff(prompts))).show()
    """
    require_axes(result, [("component",)], "dla_bars", "Pass dla_by_component(...); for heads use dla_heads_heatmap.")
    labels = list(result.labels["component"])
    mean = result.mean()
    low, high = result.ci()
    fig = go.Figure(
        go.Bar(
            x=labels, y=mean.tolist(), name="DLA",
            error_y={"type": "data", "symmetric": False, "array": (high - mean).tolist(),
                     "arrayminus": (mean - low).tolist()},
            marker={"color": ["#2166ac" if float(v) >= 0 else "#b2182b" for v in mean]},
            hovertemplate="%{x}: %{y:.4g}<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": title if title is not None else f"Direct logit attribution by component: {metric_name(result)}"},
        xaxis={"title": {"text": "Component"}, "type": "category", "tickvals": labels, "ticktext": labels},
        yaxis={"title": {"text": value_title(result)}},
    )
    return fig


def dla_heads_heatmap(result: SweepResult, *, title: str | None = None) -> go.Figure:
    """Layer × head heatmap of each head's mean DLA, RdBu with midpoint 0.

    Example:
        >>> dla_heads_heatmap(dla_by_head(model, prompts, LogitDiff(prompts))).show()
    """
    require_axes(result, [("layer", "head")], "dla_heads_heatmap", "Pass dla_by_head(...).")
    default = f"Direct logit attribution by head: {metric_name(result)}"
    return heatmap(result, title=title if title is not None else default, zmid=0.0, colorbar_title=value_title(result))
