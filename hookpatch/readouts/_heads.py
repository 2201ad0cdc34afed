"""Rank heads by their effect: the top ``k`` positive and negative, with paired CIs and p-values.

What is ranked is the result's effect (:meth:`hookpatch.results.SweepResult.effects`): for
DLA the contribution itself; for denoising patching the change from the corrupted run (what
patching the head restores); for noising patching and ablations the change from the clean
run. The further an ablation moves the metric, the more the task needs the head: on a
logit-difference ablation the ``"negative"`` list holds the heads whose loss hurts most.
"""

from __future__ import annotations

from typing import Any

from hookpatch._checks import IntLike, as_count
from hookpatch.errors import HookpatchError
from hookpatch.results import SweepResult

COLUMNS = ["sign", "rank", "label", "layer", "head", "effect_mean", "effect_ci_low", "effect_ci_high",
           "p", "p_adjusted", "value_mean", "baseline"]


def rank_heads(result: SweepResult, k: IntLike = 5, *, baseline: str | None = None, **stats: Any) -> Any:
    """A DataFrame of the ``k`` heads with the largest positive and the ``k`` with the largest negative effect.

    Example:
        >>> rank_heads(ablation_sweep(model, prompts, LogitDiff(prompts), "z"), k=3)  # vs the clean run

    Args:
        result: a result over ``("layer", "head")``: DLA by head, head patching or ablation.
        k: heads per sign.
        baseline: what the effect is measured against (:meth:`SweepResult.effect`); ``None``
            takes the result's default: corrupted run for denoising patching, clean run for
            noising and ablations, none (the values) for DLA and attribution.
        **stats: passed to :meth:`SweepResult.effects` (``level``, ``n_resamples``, ``seed``,
            ``correction`` across all heads, ...).

    Returns:
        Columns ``sign`` ("positive"/"negative"), ``rank`` (within the sign, 0 = largest
        ``|effect|``), ``label`` ("L9H7"), ``layer``, ``head``, ``effect_mean``,
        ``effect_ci_low``, ``effect_ci_high`` (paired bootstrap), ``p``, ``p_adjusted``,
        ``value_mean`` (the result's own mean) and ``baseline``; ``df.attrs`` holds the baseline
        and settings. Ready for :func:`hookpatch.views.ranked_heads_bar` and the attention views.
    """
    import pandas as pd

    if not isinstance(result, SweepResult) or tuple(result.axes) != ("layer", "head"):
        axes = tuple(result.axes) if isinstance(result, SweepResult) else type(result).__name__
        raise HookpatchError(
            f"rank_heads needs a result over (layer, head); got axes {axes}. Use "
            "dla_by_head, patch_sweep(..., by=('layer', 'head')) or ablation_sweep(..., 'z')."
        )
    k = as_count(k, "k", "how many heads per sign to list, e.g. k=5")
    df = result.to_dataframe(baseline=baseline, **stats)
    rows = []
    for sign, picked, ascending in (("positive", df["effect_mean"] > 0, False),
                                    ("negative", df["effect_mean"] < 0, True)):
        top = df[picked].sort_values("effect_mean", ascending=ascending, kind="stable").head(k)
        for rank, row in enumerate(top.to_dict("records")):
            rows.append({**{c: row.get(c) for c in COLUMNS}, "sign": sign, "rank": rank})
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs.update(df.attrs)
    return table
