"""Ranked-heads bars: the top positive and negative heads of a head ranking, with CIs.

Draws a :func:`hookpatch.readouts.rank_heads` table as bars labelled ``"L9H7"`` in the
table's order, blue for positive and red for negative heads (as in the RdBu heatmaps),
error bars from the table's ``ci_low``/``ci_high``.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from hookpatch.errors import HookpatchError

COLUMNS = ("sign", "label", "mean", "ci_low", "ci_high")
SIGN_COLORS = {"positive": "#2166ac", "negative": "#b2182b"}


def ranked_heads_bar(table: Any, *, title: str | None = None, value_title: str = "mean") -> go.Figure:
    """Bars of the ranked heads' means, one trace per sign, error bars from the CI columns.

    Example:
        >>> ranked_heads_bar(rank_heads(dla_by_head(model, prompts, metric), k=3)).show()

    Args:
        table: a :func:`hookpatch.readouts.rank_heads` DataFrame.
        title: the figure title (default "Top heads").
        value_title: the y axis title (what the ranked values are, e.g. "DLA (logit_diff)").
    """
    missing = [c for c in COLUMNS if c not in getattr(table, "columns", ())]
    if missing:
        raise HookpatchError(
            f"ranked_heads_bar needs a rank_heads(...) DataFrame with columns {list(COLUMNS)}; "
            f"missing {missing}."
        )
    if len(table) == 0:
        raise HookpatchError("ranked_heads_bar: the head table is empty (no head has a nonzero mean).")
    fig = go.Figure()
    for sign, rows in table.groupby("sign", sort=False):
        mean = rows["mean"]
        fig.add_trace(go.Bar(
            x=list(rows["label"]), y=mean.tolist(), name=str(sign),
            marker={"color": SIGN_COLORS.get(str(sign), "#777777")},
            error_y={"type": "data", "symmetric": False, "array": (rows["ci_high"] - mean).tolist(),
                     "arrayminus": (mean - rows["ci_low"]).tolist()},
            hovertemplate="%{x}: %{y:.4g}<extra></extra>",
        ))
    labels = list(table["label"])
    fig.update_layout(
        title={"text": title if title is not None else "Top heads"},
        xaxis={"title": {"text": "Head"}, "type": "category", "tickvals": labels, "ticktext": labels},
        yaxis={"title": {"text": value_title}},
    )
    return fig
