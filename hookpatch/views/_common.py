"""Shared pieces of the figure views: axis checks, axis titles, colour-bar titles, one heatmap.

Nothing here computes beyond the result's own mean and CI; labels are taken from the
result as they are, so a figure's ticks always match ``result.labels``.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go

from hookpatch.errors import HookpatchError
from hookpatch.results import SweepResult

AXIS_TITLES = {"layer": "Layer", "pos": "Position", "head": "Head", "point": "Layer point",
               "component": "Component", "neuron": "Neuron"}

# Display titles by method, or by the kind of ablation for ablations.
METHOD_TITLES = {
    "patch": "Activation patching",
    "zero": "Zero ablation",
    "mean": "Mean ablation",
    "resample": "Resample ablation",
    "attribution": "Attribution patching",
    "integrated_gradients": "Integrated gradients",
    "eap": "EAP",
    "eap_ig": "EAP-IG",
    "logit_lens": "Logit lens",
    "dla": "Direct logit attribution",
    "dla_heads": "Direct logit attribution by head",
    "dla_neurons": "Direct logit attribution by neuron",
}


def require_axes(result: SweepResult, allowed: Sequence[tuple[str, ...]], view: str, hint: str = "") -> None:
    """Raise unless ``result`` is a :class:`SweepResult` over one of the ``allowed`` axes."""
    if not isinstance(result, SweepResult):
        raise HookpatchError(f"{view} needs a SweepResult; got {type(result).__name__}.")
    if tuple(result.axes) not in [tuple(a) for a in allowed]:
        expected = " or ".join(str(tuple(a)) for a in allowed)
        raise HookpatchError(
            f"{view} draws results over {expected}; got axes {tuple(result.axes)}." + (f" {hint}" if hint else "")
        )


def axis_title(axis: str) -> str:
    """The axis title of a grid axis ("Layer", "Position", "Head", ...)."""
    return AXIS_TITLES.get(axis, axis.capitalize())


def metric_name(result: SweepResult) -> str:
    """The metric's name as the result's provenance records it."""
    return result.provenance.metric.name


def normalized(result: SweepResult) -> bool:
    """Whether the result's metric is normalized so that clean = 1 and corrupted = 0."""
    return result.provenance.metric.normalized


def method_title(result: SweepResult) -> str:
    """The method as a title: ``"Activation patching"``, ``"Mean ablation"``, ``"Logit lens"``, ..."""
    p = result.provenance
    key = p.ablation or p.method
    return METHOD_TITLES.get(key, key if key != "unknown" else "Result")


def value_title(result: SweepResult) -> str:
    """What a cell's value is: the metric, a metric change (attribution), or a DLA share."""
    p = result.provenance
    name = metric_name(result)
    if p.kind == "attribution_estimate":
        text = f"estimated Δ {name}"
    elif p.kind == "effect":
        text = f"DLA ({name})"
    elif p.ablation is not None:
        text = f"{name} after ablation"
    else:
        text = name
    if normalized(result) and p.kind != "attribution_estimate":
        text += "<br>1 = clean, 0 = corrupted"
    return text


def default_title(result: SweepResult) -> str:
    """A title from the result's provenance: method, component, direction and metric."""
    p = result.provenance
    text = method_title(result)
    if p.component:
        text += f" of {p.component}"
    if p.direction and p.ablation is None:
        text += f" ({p.direction})"
    return f"{text}: {metric_name(result)}"


def heatmap(
    result: SweepResult, *, title: str | None, zmid: float, colorbar_title: str
) -> go.Figure:
    """A layer × (pos or head) heatmap of the cell means, layer 0 at the top, RdBu around ``zmid``."""
    x_axis = result.axes[1]
    x_labels, y_labels = list(result.labels[x_axis]), list(result.labels["layer"])
    fig = go.Figure(
        go.Heatmap(
            z=result.mean().tolist(),
            x=x_labels,
            y=y_labels,
            colorscale="RdBu",
            zmid=zmid,
            colorbar={"title": {"text": colorbar_title}},
            hovertemplate=f"Layer %{{y}}<br>{axis_title(x_axis)} %{{x}}<br>value %{{z:.4g}}<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": title if title is not None else default_title(result)},
        xaxis={"title": {"text": axis_title(x_axis)}, "type": "category", "tickvals": x_labels,
               "ticktext": x_labels},
        yaxis={"title": {"text": "Layer"}, "type": "category", "autorange": "reversed",
               "tickvals": y_labels, "ticktext": y_labels},
    )
    return fig


def label_facets(fig: go.Figure, positions: list[str], layers: list[str], rows: int, cols: int) -> None:
    """Category axes for a grid of layer × position heatmaps (one per head): positions along
    x, layers down y (layer 0 on top), axis titles on the outer facets only."""
    fig.update_xaxes(type="category", tickvals=positions, ticktext=positions)
    fig.update_yaxes(type="category", autorange="reversed", tickvals=layers, ticktext=layers)
    for c in range(1, cols + 1):
        fig.update_xaxes(title_text="Position", row=rows, col=c)
    for r in range(1, rows + 1):
        fig.update_yaxes(title_text="Layer", row=r, col=1)
