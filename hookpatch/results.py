"""Labelled results: per-prompt values over a grid, with the labels a figure or table needs.

Every sweep returns one :class:`SweepResult`: ``values[*grid, batch]`` keeps each prompt's
metric; the axes (``layer``, ``pos``, ``head``) carry labels ("3: friend", "L9H7"); the
clean and corrupted baselines and the metric's normalization travel with it. Mean and
bootstrap CI are derived; ``to_dataframe`` gives one row per cell; ``save``/``load`` round-trip.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from hookpatch.errors import HookpatchError
from hookpatch.metrics.base import PerPrompt


@dataclass(frozen=True)
class SweepResult:
    """A metric per grid cell and prompt, with axis labels and baselines.

    Attributes:
        values: ``[*grid, batch]`` metric after each patch/ablation, per prompt.
        axes: names of the grid axes, e.g. ``("layer", "pos")`` or ``("layer", "head")``.
        labels: axis name → one label per index along that axis.
        clean, corrupted: ``[batch]`` metric on the unpatched clean and corrupted runs (a
            readout of one run keeps that run's metric in ``clean`` and no ``corrupted``).
        info: what was done: component, direction or ablation, metric description, ...
    """

    values: Float[Tensor, "*grid batch"]
    axes: tuple[str, ...]
    labels: Mapping[str, tuple[str, ...]]
    clean: Float[Tensor, " batch"]
    corrupted: Float[Tensor, " batch"] | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        """The grid shape (without the prompt axis)."""
        return tuple(self.values.shape[:-1])

    def mean(self) -> Float[Tensor, "*grid"]:
        """Mean over prompts, one value per cell."""
        return PerPrompt(self.values).mean()

    def ci(self, level: float = 0.95, n_resamples: int = 1000, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Bootstrap interval of the mean over prompts, per cell."""
        return PerPrompt(self.values).ci(level, n_resamples, seed)

    def cell_label(self, index: tuple[int, ...]) -> str:
        """A readable label of one cell, e.g. ``"L9H7"`` or ``"L3 @ 5: friend"``."""
        parts = dict(zip(self.axes, index))
        text = f"L{parts['layer']}" if "layer" in parts else ""
        if "head" in parts:
            text += self.labels["head"][parts["head"]]
        if "pos" in parts:
            text += f" @ {self.labels['pos'][parts['pos']]}"
        return text.strip()

    def cells(self) -> list[tuple[tuple[int, ...], dict[str, Any]]]:
        """Every cell's index and a row of its axis indices and labels (``"layer_label"``, …, ``"label"``)."""
        out = []
        for index in itertools.product(*(range(n) for n in self.shape)):
            row: dict[str, Any] = {}
            for axis, i in zip(self.axes, index):
                row[axis] = i
                row[f"{axis}_label"] = self.labels[axis][i]
            row["label"] = self.cell_label(index)
            out.append((index, row))
        return out

    def to_dataframe(self, ci: bool = True) -> Any:
        """One row per cell: axis indices and labels, mean, and (optionally) the CI bounds."""
        import pandas as pd

        mean = self.mean()
        low, high = self.ci() if ci else (None, None)
        rows = []
        for index, row in self.cells():
            row["mean"] = float(mean[index])
            if ci:
                row["ci_low"], row["ci_high"] = float(low[index]), float(high[index])
            rows.append(row)
        return pd.DataFrame(rows)

    def save(self, path: str | Path) -> None:
        """Write the result to ``path`` (a torch file of tensors and plain data)."""
        torch.save(
            {
                "values": self.values.detach().cpu(),
                "axes": list(self.axes),
                "labels": {k: list(v) for k, v in self.labels.items()},
                "clean": self.clean.detach().cpu(),
                "corrupted": None if self.corrupted is None else self.corrupted.detach().cpu(),
                "info": dict(self.info),
                "kind": "hookpatch.SweepResult",
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path) -> "SweepResult":
        """Read a result written by :meth:`save`."""
        data = torch.load(path, weights_only=True)
        if not isinstance(data, dict) or data.get("kind") != "hookpatch.SweepResult":
            raise HookpatchError(f"{path} is not a hookpatch sweep result.")
        return cls(
            values=data["values"],
            axes=tuple(data["axes"]),
            labels={k: tuple(v) for k, v in data["labels"].items()},
            clean=data["clean"],
            corrupted=data["corrupted"],
            info=data["info"],
        )
