"""Ranked-heads bars: the top positive and negative heads of a head ranking, with paired CIs.

Draws a :func:`hookpatch.readouts.rank_heads` table as bars of each head's mean effect,
labelled ``"L9H7"`` in the table's order, blue for positive and red for negative heads (as in
the RdBu heatmaps), error bars from the table's paired interval ``effect_ci_low``/``effect_ci_high``.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from hookpatch.errors import HookpatchError

COLUMNS = ("sign", "label", "effect_mean", "effect_ci_low", "effect_ci_high")
SIGN_COLORS = {"positive": "#2166ac", "negative": "#b2182b"}
BASELINE_TITLES = {"corrupted": "effect (patched − corrupted run)", "clean": "effect (intervened − clean run)",
                   "none": "mean"}


def ranked_heads_bar(table: Any, *, title: str | None = None, value_title: str | None = None) -> go.Figure:
    """Bars of the ranked heads' mean effects, one trace per sign, error bars from the paired CI.

    Example:
        >>> ranked_heads_bar(rank_heads(dla_by_head(model, prompts, metric), k=3)).show()

    Args:
        table: a :func:`hookpatch.readouts.rank_heads` DataFrame.
        title: the figure title (default "Top heads").
        value_title: the y axis title (default: what the effect is measured against, from the
            table's ``baseline``; e.g. "DLA (logit_diff)" for a DLA ranking).
    """
    missing = [c for c in COLUMNS if c not in getattr(table, "columns", ())]
    if missing:
        raise HookpatchError(
            f"ranked_heads_bar needs a rank_heads(...) DataFrame with columns {list(COLUMNS)}; "
            f"missing {missing}."
        )
    if len(table) == 0:
        raise HookpatchError("ranked_heads_bar: the head table is empty (no head has a nonzero mean effect).")
    p_column = "p_adjusted" if "p_adjusted" in table.columns else None
    fig = go.Figure()
    for sign, rows in table.groupby("sign", sort=False):
        mean, low, high = rows["effect_mean"], rows["effect_ci_low"], rows["effect_ci_high"]
        extra = [rows[p_column]] if p_column else []
        fig.add_trace(go.Bar(
            x=list(rows["label"]), y=mean.tolist(), name=str(sign),
            marker={"color": SIGN_COLORS.get(str(sign), "#777777")},
            error_y={"type": "data", "symmetric": False, "array": (high - mean).tolist(),
                     "arrayminus": (mean - low).tolist()},
            customdata=[list(v) for v in zip(low, high, *extra, strict=True)],
            hovertemplate="%{x}: %{y:.4g} [%{customdata[0]:.4g}, %{customdata[1]:.4g}]"
                          + ("<br>p (adjusted) %{customdata[2]:.3g}" if p_column else "") + "<extra></extra>",
        ))
    labels = list(table["label"])
    if value_title is None:
        value_title = BASELINE_TITLES.get(str(table.attrs.get("baseline")), "effect")
    fig.update_layout(
        title={"text": title if title is not None else "Top heads"},
        xaxis={"title": {"text": "Head"}, "type": "category", "tickvals": labels, "ticktext": labels},
        yaxis={"title": {"text": value_title}},
    )
    return fig
