"""Ablation heatmap: the metric after ablating each head (or layer × position cell).

The colour midpoint is the clean run's metric (mean over prompts): white = no change, red = the
ablation lowered the metric, blue = it raised it. Since the mean change is the mean value
minus that midpoint, the colours read as effects; the hover gives each cell's effect against
the clean run with its paired CI and corrected p-value.
"""

from __future__ import annotations

import plotly.graph_objects as go

from hookpatch.errors import HookpatchError
from hookpatch.results import SweepResult
from hookpatch.views._common import heatmap, require_axes, value_title
from hookpatch.views._effects import with_effect_hover


def ablation_heatmap(result: SweepResult, *, title: str | None = None) -> go.Figure:
    """Heatmap of an ablation result's cell means, colour midpoint = the clean baseline mean.

    Example:
        >>> res = ablation_sweep(model, prompts, AnswerLoss(prompts), "z", how="mean")
        >>> ablation_heatmap(res).show()

    Args:
        result: an :func:`hookpatch.sweeps.ablation_sweep` result over ``("layer", "head")``
            or ``("layer", "pos")``.
        title: the figure title (default: ablation, component and metric).
    """
    require_axes(result, [("layer", "head"), ("layer", "pos")], "ablation_heatmap",
                 "Run ablation_sweep with by=('layer', 'head') or ('layer', 'pos').")
    if result.provenance.ablation is None:
        raise HookpatchError(
            f"ablation_heatmap draws ablation results (zero, mean or resample); this result's "
            f"method is {result.provenance.method!r}. Use patching_heatmap for patching and attribution results."
        )
    clean = float(result.clean.float().mean())
    colorbar = f"{value_title(result)}<br>midpoint = clean {clean:.4g}"
    return with_effect_hover(heatmap(result, title=title, zmid=clean, colorbar_title=colorbar), result)
