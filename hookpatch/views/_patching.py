"""Patching heatmap: the metric after patching each cell, layer × position or layer × head.

Colours are RdBu centred on 0 (red below, blue above); a normalized metric says
"1 = clean, 0 = corrupted" in the colour-bar title. A ``("layer", "pos", "head")`` result
gets one small layer × position heatmap per head (facets titled with the head labels,
four per row) sharing one colour axis, so colours compare across heads. The hover adds each
cell's effect — against the corrupted run for denoising, the clean run for noising, the value
itself for attribution — with its paired CI and corrected p-value.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from hookpatch.results import SweepResult
from hookpatch.views._common import default_title, heatmap, label_facets, require_axes, value_title
from hookpatch.views._effects import with_effect_hover

FACETS_PER_ROW = 4


def patching_heatmap(result: SweepResult, *, title: str | None = None) -> go.Figure:
    """Heatmap of a patching (or attribution) result's cell means, midpoint 0.

    Example:
        >>> res = patch_sweep(model, prompts, Normalized.from_model(model, LogitDiff(prompts)))
        >>> patching_heatmap(res).show()

    Args:
        result: a result over ``("layer", "pos")``, ``("layer", "head")`` or
            ``("layer", "pos", "head")``.
        title: the figure title (default: method, component, direction and metric).
    """
    require_axes(
        result,
        [("layer", "pos"), ("layer", "head"), ("layer", "pos", "head")],
        "patching_heatmap",
        "Sweep with by=('layer', 'pos'), ('layer', 'head') or ('layer', 'pos', 'head').",
    )
    if result.axes == ("layer", "pos", "head"):
        return with_effect_hover(_head_facets(result, title), result)
    return with_effect_hover(heatmap(result, title=title, zmid=0.0, colorbar_title=value_title(result)), result)


def _head_facets(result: SweepResult, title: str | None) -> go.Figure:
    heads, positions, layers = (list(result.labels[a]) for a in ("head", "pos", "layer"))
    mean = result.mean()  # [layer, pos, head]
    cols = min(FACETS_PER_ROW, len(heads))
    rows = math.ceil(len(heads) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=heads, shared_xaxes=True, shared_yaxes=True,
                        horizontal_spacing=0.03, vertical_spacing=0.12 / rows + 0.04)
    for h, head in enumerate(heads):
        fig.add_trace(
            go.Heatmap(
                z=mean[:, :, h].tolist(), x=positions, y=layers, coloraxis="coloraxis", name=head,
                hovertemplate=f"{head}<br>Layer %{{y}}<br>Position %{{x}}<br>value %{{z:.4g}}<extra></extra>",
            ),
            row=h // cols + 1, col=h % cols + 1,
        )
    label_facets(fig, positions, layers, rows, cols)
    fig.update_layout(
        title={"text": title if title is not None else default_title(result)},
        coloraxis={"colorscale": "RdBu", "cmid": 0.0, "colorbar": {"title": {"text": value_title(result)}}},
        height=120 + 260 * rows,
    )
    return fig
