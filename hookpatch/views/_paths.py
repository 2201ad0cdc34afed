"""Path patching views: which senders change the receivers, as heatmaps and ranked bars.

A :func:`hookpatch.circuits.path_patch_sweep` result holds the metric after patching each
sender's path into a fixed set of receivers (say, the name movers' queries). What a reader
compares is the change each path makes, so both views draw :meth:`SweepResult.effects` —
the paired per-prompt change against the result's default baseline (the corrupted run for
denoising, the clean run for noising) with its bootstrap CI and corrected p-value — never the
raw metric. Colours are RdBu centred on 0 (red: the path lowers the metric, blue: raises it);
titles name the receivers and the semantics ("direct" edges or the IOI paper's "ioi").
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from hookpatch._checks import IntLike, as_count
from hookpatch._effects import Effects
from hookpatch.errors import HookpatchError
from hookpatch.results import SweepResult
from hookpatch.views._common import axis_title, label_facets, metric_name, normalized, require_axes

HEATMAP_GRIDS = (("layer", "head"), ("layer", "pos", "head"), ("sender", "receiver"))
BAR_GRIDS = (("layer", "head"), ("layer", "pos", "head"), ("sender",), ("sender", "receiver"))
FACETS_PER_ROW = 4
MAX_NAMED_RECEIVERS = 4
SIGN_COLORS = {True: "#2166ac", False: "#b2182b"}  # blue raises the metric, red lowers it (as RdBu)
HOVER_STATS = ("effect %{customdata[0]:.4g} [%{customdata[1]:.4g}, %{customdata[2]:.4g}]"
               "<br>p (%{meta}) %{customdata[3]:.3g}<extra></extra>")


def path_patching_heatmap(result: SweepResult, *, title: str | None = None) -> go.Figure:
    """Heatmap of each sender's mean effect on the metric through the receivers, midpoint 0.

    Example:
        >>> res = path_patch_sweep(model, prompts, metric, ["L9H9", "L9H6"], receiver_input="q",
        ...                        semantics="ioi", receiver_positions="END")
        >>> path_patching_heatmap(res).show()

    Args:
        result: a :func:`hookpatch.circuits.path_patch_sweep` result over ``("layer", "head")``
            (layer × head), ``("sender", "receiver")`` (sender × receiver; pairs with no edge
            read 0, the unpatched run) or ``("layer", "pos", "head")`` (one layer × position
            heatmap per head, sharing one colour axis, as :func:`patching_heatmap` draws it).
        title: the figure title (default: method, semantics, receivers, direction and metric).

    Returns:
        A figure whose cells are the mean effects (``result.effects().mean``); the hover adds
        the paired CI and the corrected p-value of each cell.
    """
    _require_path_result(result, HEATMAP_GRIDS, "path_patching_heatmap",
                         "Sweep with by=('layer', 'head'), ('sender', 'receiver') or ('layer', 'pos', 'head'); "
                         "for by=('sender',) draw path_patching_bars(result).")
    eff = result.effects()
    title = title if title is not None else default_path_title(result)
    if result.axes == ("layer", "pos", "head"):
        return _head_facets(result, eff, title)
    y_axis, x_axis = result.axes
    x_labels, y_labels = list(result.labels[x_axis]), list(result.labels[y_axis])
    fig = go.Figure(go.Heatmap(
        z=eff.mean.tolist(), x=x_labels, y=y_labels, customdata=_stats(eff).tolist(),
        colorscale="RdBu", zmid=0.0, colorbar={"title": {"text": effect_title(result, eff)}},
        meta=eff.correction or "uncorrected",
        hovertemplate=f"{axis_title(y_axis)} %{{y}}<br>{axis_title(x_axis)} %{{x}}<br>" + HOVER_STATS,
    ))
    fig.update_layout(
        title={"text": title},
        xaxis={"title": {"text": axis_title(x_axis)}, "type": "category", "tickvals": x_labels, "ticktext": x_labels},
        yaxis={"title": {"text": axis_title(y_axis)}, "type": "category", "autorange": "reversed",
               "tickvals": y_labels, "ticktext": y_labels},
    )
    return fig


def path_patching_bars(result: SweepResult, k: IntLike = 10, *, title: str | None = None) -> go.Figure:
    """Bars of the ``k`` senders with the largest ``|mean effect|``, error bars = paired CI.

    Example:
        >>> path_patching_bars(path_patch_sweep(model, prompts, metric, "L9H9", receiver_input="q"), k=5)

    Args:
        result: a :func:`hookpatch.circuits.path_patch_sweep` result over any of its grids.
        k: how many senders to draw, largest ``|mean effect|`` first.
        title: the figure title (default: as :func:`path_patching_heatmap`).

    Returns:
        One bar trace labelled with :func:`sender_labels` (``"L0H3"``, ``"MLP1"``,
        ``"L0H3 @ 4: END"``, ``"L0H3->L2H1.q"``), blue for positive and red for negative effects.
    """
    _require_path_result(result, BAR_GRIDS, "path_patching_bars",
                         "Pass a path_patch_sweep(...) result (any by=).")
    k = as_count(k, "k", "how many senders to draw, e.g. k=10")
    eff = result.effects()
    order = top_cells(eff.mean, k)
    labels = sender_labels(result)
    stats = _stats(eff).reshape(-1, 4)[order]  # [k, 4]: mean, low, high, p_adjusted
    mean, low, high = stats[:, 0], stats[:, 1], stats[:, 2]
    names = [labels[i] for i in order.tolist()]
    fig = go.Figure(go.Bar(
        x=names, y=mean.tolist(), name="effect",
        marker={"color": [SIGN_COLORS[bool(v >= 0)] for v in mean]},
        error_y={"type": "data", "symmetric": False, "array": (high - mean).tolist(),
                 "arrayminus": (mean - low).tolist()},
        customdata=stats.tolist(), meta=eff.correction or "uncorrected",
        hovertemplate="%{x}<br>" + HOVER_STATS,
    ))
    fig.update_layout(
        title={"text": title if title is not None else default_path_title(result)},
        xaxis={"title": {"text": "Sender"}, "type": "category", "tickvals": names, "ticktext": names},
        yaxis={"title": {"text": effect_title(result, eff)}},
    )
    return fig


def sender_labels(result: SweepResult) -> list[str]:
    """Each cell's label in ``result``'s flattened (row-major) order: ``"L0H3"`` for a head,
    ``"L0H3 @ 4: END"`` for a head at a position, the sender's own label (``"input"``,
    ``"MLP1"``) and ``"sender->receiver"`` for one edge."""
    if result.axes == ("sender",):
        return list(result.labels["sender"])
    if result.axes == ("sender", "receiver"):
        return [f"{s}->{r}" for s in result.labels["sender"] for r in result.labels["receiver"]]
    # the layer labels are the layers' numbers (a sweep from layers=[1, 2] starts at "1")
    return [f"L{row['layer_label']}{row['head_label']}" + (f" @ {row['pos_label']}" if "pos" in row else "")
            for _, row in result.cells()]


def top_cells(mean: Float[Tensor, "*grid"], k: int) -> Tensor:
    """Flat indices of the ``k`` cells with the largest ``|mean|``, largest first (ties: grid order)."""
    flat = mean.reshape(-1)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    return order[: min(k, flat.numel())]


def default_path_title(result: SweepResult) -> str:
    """``"Path patching (ioi) into L2H1.q, L2H3.q (denoising): normalized_logit_diff"``."""
    p = result.provenance
    receivers = list(p.receivers or ())
    named = ", ".join(receivers[:MAX_NAMED_RECEIVERS])
    if len(receivers) > MAX_NAMED_RECEIVERS:
        named += f", … ({len(receivers)} receivers)"
    where = " at " + ", ".join(str(x) for x in p.receiver_positions) if p.receiver_positions else ""
    into = named or "the receivers"
    return f"Path patching ({p.semantics}) into {into}{where} ({p.direction}): {metric_name(result)}"


def effect_title(result: SweepResult, eff: Effects) -> str:
    """What a cell's number is: the change of the metric against the baseline run."""
    against = {"corrupted": "patched − corrupted run", "clean": "patched − clean run"}.get(eff.baseline, "value")
    text = f"Δ {metric_name(result)}<br>({against})"
    if normalized(result) and eff.baseline != "none":
        text += "<br>1 = the clean − corrupted gap"
    return text


def _stats(eff: Effects) -> Float[Tensor, "*grid 4"]:
    """Mean, CI bounds and corrected p-value stacked on a last axis, for hover customdata."""
    return torch.stack([eff.mean, eff.ci_low, eff.ci_high, eff.p_adjusted.to(eff.mean.dtype)], -1)


def _require_path_result(result: SweepResult, grids: tuple[tuple[str, ...], ...], view: str, hint: str) -> None:
    """Raise unless ``result`` is a path patching result over one of ``grids``."""
    if not isinstance(result, SweepResult):
        raise HookpatchError(f"{view}(result) needs the SweepResult of path_patch_sweep(...); "
                             f"got {type(result).__name__}.")
    method = result.provenance.method
    if method != "path_patch":
        other = {"patch": "patching_heatmap", "edge_patch": "the result's to_dataframe()"}.get(method)
        raise HookpatchError(
            f"{view}(result) draws path_patch_sweep(...) results; this result's method is {method!r}. "
            "Pass hookpatch.circuits.path_patch_sweep(model, prompts, metric, receivers, ...)"
            + (f", or draw this one with {other}." if other else ".")
        )
    require_axes(result, grids, view, hint)


def _head_facets(result: SweepResult, eff: Effects, title: str) -> go.Figure:
    """One layer × position heatmap of the mean effect per head, one shared colour axis."""
    heads, positions, layers = (list(result.labels[a]) for a in ("head", "pos", "layer"))
    stats = _stats(eff)  # [layer, pos, head, 4]
    cols = min(FACETS_PER_ROW, len(heads))
    rows = math.ceil(len(heads) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=heads, shared_xaxes=True, shared_yaxes=True,
                        horizontal_spacing=0.03, vertical_spacing=0.12 / rows + 0.04)
    for h, head in enumerate(heads):
        fig.add_trace(
            go.Heatmap(
                z=eff.mean[:, :, h].tolist(), x=positions, y=layers, coloraxis="coloraxis", name=head,
                customdata=stats[:, :, h].tolist(), meta=eff.correction or "uncorrected",
                hovertemplate=f"{head}<br>Layer %{{y}}<br>Position %{{x}}<br>" + HOVER_STATS,
            ),
            row=h // cols + 1, col=h % cols + 1,
        )
    label_facets(fig, positions, layers, rows, cols)
    fig.update_layout(
        title={"text": title},
        coloraxis={"colorscale": "RdBu", "cmid": 0.0, "colorbar": {"title": {"text": effect_title(result, eff)}}},
        height=120 + 260 * rows,
    )
    return fig
