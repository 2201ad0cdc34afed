"""Rank heads by a per-head result (DLA, patching, ablation): top-k positive and negative."""

from __future__ import annotations

from typing import Any

from hookpatch.errors import HookpatchError
from hookpatch.results import SweepResult


def rank_heads(result: SweepResult, k: int = 5, *, baseline: str | None = None) -> Any:
    """A DataFrame of the ``k`` most positive and ``k`` most negative heads by mean.

    Columns: ``sign`` ("positive"/"negative"), ``rank``, ``label`` ("L9H7"), ``layer``,
    ``head``, ``mean``, ``ci_low``, ``ci_high`` — ready for the attention views.
    ``baseline="clean"`` (or ``"corrupted"``) ranks the effect instead: each prompt's value
    minus that run's metric, as an ablation or a patch is read.
    """
    import dataclasses

    import pandas as pd

    if baseline is not None:
        if baseline not in ("clean", "corrupted") or getattr(result, baseline) is None:
            raise HookpatchError(
                f"baseline={baseline!r}: expected 'clean' or 'corrupted', a run this result has."
            )
        result = dataclasses.replace(result, values=result.values - getattr(result, baseline))

    if tuple(result.axes) != ("layer", "head"):
        raise HookpatchError(
            f"rank_heads needs a result over (layer, head); got axes {tuple(result.axes)}. Use "
            "dla_by_head or patch_sweep(..., by=('layer', 'head'))."
        )
    if k < 1:
        raise HookpatchError(f"k={k}: ask for at least one head.")
    df = result.to_dataframe()
    rows = []
    for sign, frame in (("positive", df.sort_values("mean", ascending=False)),
                        ("negative", df.sort_values("mean", ascending=True))):
        picked = frame[frame["mean"] > 0] if sign == "positive" else frame[frame["mean"] < 0]
        for rank, (_, row) in enumerate(picked.head(k).iterrows()):
            rows.append({"sign": sign, "rank": rank, "label": row["label"], "layer": int(row["layer"]),
                         "head": int(row["head"]), "mean": row["mean"],
                         "ci_low": row["ci_low"], "ci_high": row["ci_high"]})
    return pd.DataFrame(rows, columns=["sign", "rank", "label", "layer", "head", "mean", "ci_low", "ci_high"])
