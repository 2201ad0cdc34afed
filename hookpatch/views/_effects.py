"""Effect hover text for heatmaps: each cell's mean effect, paired CI and corrected p-value.

A heatmap colours the mean value; the hover adds what a reader comparing cells needs — the
change against the result's baseline run with its paired bootstrap interval and the
sign-flip p-value corrected across cells, all from :meth:`SweepResult.effects`.
"""

from __future__ import annotations

import plotly.graph_objects as go
import torch

from hookpatch.results import SweepResult

AGAINST = {"corrupted": " vs corrupted", "clean": " vs clean", "none": ""}


def with_effect_hover(fig: go.Figure, result: SweepResult) -> go.Figure:
    """Add the effects to the hover of ``fig``'s heatmaps: one heatmap, or one per head (facets)."""
    eff = result.effects()
    stats = torch.stack([eff.mean, eff.ci_low, eff.ci_high, eff.p_adjusted], -1)  # [*grid, 4]
    text = (f"<br>effect{AGAINST[eff.baseline]} %{{customdata[0]:.4g}} "
            f"[%{{customdata[1]:.4g}}, %{{customdata[2]:.4g}}]"
            f"<br>p ({eff.correction or 'uncorrected'}) %{{customdata[3]:.3g}}<extra></extra>")
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    for h, trace in enumerate(heatmaps):
        cells = stats[:, :, h] if result.axes == ("layer", "pos", "head") else stats  # [layer, x, 4]
        trace.customdata = cells.tolist()
        trace.hovertemplate = trace.hovertemplate.replace("<extra></extra>", text)
    return fig
