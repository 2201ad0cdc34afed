"""Labelled results: per-prompt values over a grid, with the labels a figure or table needs.

Every sweep returns one :class:`SweepResult`: ``values[*grid, batch]`` keeps each prompt's
metric; the axes (``layer``, ``pos``, ``head``) carry labels ("3: friend", "L9H7"); the
clean and corrupted baselines and the metric's normalization travel with it. The mean value
is derived, and so are the effects — each prompt's change against the clean or corrupted
run, with a paired CI and p-value per cell (:mod:`hookpatch._effects`); ``to_dataframe``
gives one row per cell; ``save``/``load`` round-trip, provenance included.

What produced a result is a typed, frozen :class:`Provenance` (kind, method, component,
direction or ablation, metric, model and how it was loaded, prompt-set fingerprint, runner,
grid, hookpatch version).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hookpatch._checks import IntLike
from hookpatch._effects import Effects, measure, resolve_baseline
from hookpatch._provenance import GridFacts, MetricSpec, Provenance, ResultKind
from hookpatch._results_io import FORMAT_VERSION, legacy_info, load_result, save_result
from hookpatch._summary import axes_line, what_was_done
from hookpatch.errors import HookpatchError
from hookpatch.metrics._base import PerPrompt

__all__ = ["FORMAT_VERSION", "GridFacts", "MetricSpec", "Provenance", "ResultKind", "SweepResult"]


@dataclass(frozen=True)
class SweepResult:
    """Per-prompt values over a labelled grid, with baselines and a typed provenance.

    One type holds every kind of result; ``provenance.kind`` says what the values are — the
    metric after an intervention (``"patched_metric"``), an effect already (``"effect"``,
    DLA), a gradient estimate of a patching effect (``"attribution_estimate"``) or the metric
    read off a run (``"readout"``, the logit lens) — and so which baseline its effects use.

    Attributes:
        values: ``[*grid, batch]`` value per cell and prompt.
        axes: names of the grid axes, e.g. ``("layer", "pos")`` or ``("layer", "head")``.
        labels: axis name → one label per index along that axis.
        clean, corrupted: ``[batch]`` metric on the unpatched clean and corrupted runs (a
            readout of one run keeps that run's metric in ``clean`` and no ``corrupted``).
        provenance: what produced the values (:class:`hookpatch.results.Provenance`).
        terms: per-prompt parts that are not on the grid, by name: DLA's constant term
            ``"bias"`` ``[batch]``, per-layer attention biases ``"attn_bias"`` ``[layer, batch]``,
            the MLP bias ``"mlp_bias"`` ``[batch]`` (grid + terms = the metric).
    """

    values: Float[Tensor, "*grid batch"]
    axes: tuple[str, ...]
    labels: Mapping[str, tuple[str, ...]]
    clean: Float[Tensor, " batch"]
    corrupted: Float[Tensor, " batch"] | None = None
    provenance: Provenance = field(default_factory=Provenance.unknown)
    terms: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.provenance, Provenance):
            raise HookpatchError(
                f"provenance= must be a hookpatch.results.Provenance; got {type(self.provenance).__name__}."
            )

    @property
    def kind(self) -> ResultKind:
        """What the values are: ``"patched_metric"``, ``"effect"``, ``"attribution_estimate"`` or ``"readout"``."""
        return self.provenance.kind

    @property
    def info(self) -> dict[str, Any]:
        """The provenance as the untyped dict of earlier hookpatch versions, for old code only.

        Derived from :attr:`provenance` and :attr:`terms` each time (a copy: changing it
        changes nothing); read the typed :attr:`provenance` instead.
        """
        return legacy_info(self.provenance, self.terms)

    @property
    def shape(self) -> tuple[int, ...]:
        """The grid shape (without the prompt axis)."""
        return tuple(self.values.shape[:-1])

    def __repr__(self) -> str:
        """A few lines: what was done, the axes with sizes and labels, baselines, extreme cells."""
        lines = [f"SweepResult({what_was_done(self.provenance)}, {self.values.shape[-1]} prompts",
                 f"  axes: {axes_line(self.axes, self.labels)}"]
        runs = [(name, run) for name, run in (("clean", self.clean), ("corrupted", self.corrupted)) if run is not None]
        lines.append("  runs without intervention (mean over prompts): "
                     + ", ".join(f"{name} {float(run.float().mean()):.4g}" for name, run in runs))
        mean = self.mean().float()
        finite = mean.isfinite()
        if mean.ndim and bool(finite.any()):
            ends = []
            for word, fill, pick in (("max", -math.inf, torch.argmax), ("min", math.inf, torch.argmin)):
                flat = int(pick(torch.where(finite, mean, fill)))
                index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), mean.shape))
                label = self.cell_label(index) or ", ".join(
                    self.labels[a][i] for a, i in zip(self.axes, index, strict=True)
                )
                ends.append(f"{word} {float(mean[index]):.4g} at {label}")
            lines.append("  mean over prompts: " + ", ".join(ends))
        return "\n".join(lines) + ")"

    def mean(self) -> Float[Tensor, "*grid"]:
        """Mean over prompts, one value per cell."""
        return PerPrompt(self.values).mean()

    def ci(self, level: float = 0.95, n_resamples: IntLike = 1000, seed: IntLike = 0) -> tuple[Tensor, Tensor]:
        """Bootstrap interval of the mean *value* over prompts, per cell (the interval around :meth:`mean`).

        This is not the interval of an effect: prompts differ in their clean and corrupted
        metric, so the spread of the values can dwarf the change a patch made. Next to an
        effect show :meth:`effects`' paired interval. For readouts (DLA, logit lens) and
        attribution, whose values are the effects, the two intervals are the same.
        """
        return PerPrompt(self.values).ci(level, n_resamples, seed)

    def effect(self, baseline: str | None = None) -> Float[Tensor, "*grid batch"]:
        """Per-prompt change against a baseline run: ``values − clean`` or ``values − corrupted``.

        Example:
            >>> patch_sweep(model, prompts, metric, "z", by=("layer", "head")).effect().mean(-1)

        Args:
            baseline: ``"corrupted"``, ``"clean"``, ``"none"`` (the values as they are) or
                ``None``: denoising patching → ``"corrupted"``, noising patching and ablations →
                ``"clean"``, readouts and attribution (already contributions or changes) → ``"none"``.

        Returns:
            ``[*grid, batch]`` effects (in normalized units for a normalized metric).
        """
        name = resolve_baseline(self.provenance, baseline, self.corrupted is not None)
        if name == "none":
            return self.values
        run = self.clean if name == "clean" else self.corrupted
        if run is None:
            raise HookpatchError("this result has no corrupted run; pass baseline='clean' or 'none'.")
        return self.values - run.to(self.values)

    def effects(
        self,
        baseline: str | None = None,
        *,
        level: float = 0.95,
        n_resamples: IntLike = 1000,
        n_permutations: IntLike = 1000,
        seed: IntLike = 0,
        alternative: str = "two-sided",
        correction: str | None = "holm",
    ) -> Effects:
        """Per-cell mean effect, paired bootstrap CI and sign-flip p-value, corrected across cells.

        Example:
            >>> eff = ablation_sweep(model, prompts, LogitDiff(prompts), "z").effects()
            >>> eff.mean, eff.ci_low, eff.ci_high, eff.p_adjusted   # each [layer, head]

        Args:
            baseline: as in :meth:`effect` (``None``: the result's default).
            level, n_resamples: the paired bootstrap's confidence level and resamples.
            n_permutations: random sign patterns of the p-value (exact for 12 prompts or fewer).
            seed: seeds both, as TransformerLens' ``PatchingResult`` does.
            alternative: ``"two-sided"``, ``"greater"`` or ``"less"``.
            correction: across all cells: ``"holm"`` (family-wise), ``"bh"`` (false discovery
                rate) or ``None``.

        Returns:
            An :class:`hookpatch._effects.Effects` with ``[*grid]`` statistics.
        """
        name = resolve_baseline(self.provenance, baseline, self.corrupted is not None)
        return measure(self.effect(name), name, tuple(self.axes), self.labels, level=level,
                       n_resamples=n_resamples, n_permutations=n_permutations, seed=seed,
                       alternative=alternative, correction=correction)

    def cell_label(self, index: tuple[int, ...]) -> str:
        """A readable label of one cell, e.g. ``"L9H7"`` or ``"L3 @ 5: friend"``."""
        parts = dict(zip(self.axes, index, strict=True))
        text = f"L{self.labels['layer'][parts['layer']]}" if "layer" in parts else ""
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
            for axis, i in zip(self.axes, index, strict=True):
                row[axis] = i
                row[f"{axis}_label"] = self.labels[axis][i]
            row["label"] = self.cell_label(index)
            out.append((index, row))
        return out

    def to_dataframe(self, ci: bool = True, *, baseline: str | None = None, **stats: Any) -> Any:
        """One row per cell: axis labels, the mean value, and the mean effect with its statistics.

        Columns: the axis indices and labels, ``label``, ``value_mean`` (the metric after the
        intervention), ``baseline`` (what the effect is measured against), ``effect_mean`` and,
        with ``ci=True``, ``effect_ci_low``/``effect_ci_high`` (paired bootstrap), ``p`` and
        ``p_adjusted`` (sign-flip test, corrected across cells). ``df.attrs`` records the baseline
        and the statistics' settings.

        Args:
            ci: compute the interval and p-values (the costly part).
            baseline: as in :meth:`effect`.
            **stats: passed to :meth:`effects` (``level``, ``n_resamples``, ``seed``, ``correction``, ...).
        """
        import pandas as pd

        value_mean = self.mean()
        if ci:
            eff = self.effects(baseline, **stats)
            name, effect_mean = eff.baseline, eff.mean
        else:
            name = resolve_baseline(self.provenance, baseline, self.corrupted is not None)
            effect_mean = self.effect(name).mean(-1)
        rows = []
        for index, row in self.cells():
            row["value_mean"] = float(value_mean[index])
            row["baseline"] = name
            row["effect_mean"] = float(effect_mean[index])
            if ci:
                row["effect_ci_low"], row["effect_ci_high"] = float(eff.ci_low[index]), float(eff.ci_high[index])
                row["p"], row["p_adjusted"] = float(eff.p[index]), float(eff.p_adjusted[index])
            rows.append(row)
        df = pd.DataFrame(rows)
        df.attrs["baseline"] = name
        if ci:
            df.attrs.update(level=eff.level, n_resamples=eff.n_resamples, n_permutations=eff.n_permutations,
                            seed=eff.seed, alternative=eff.alternative, correction=eff.correction)
        return df

    def save(self, path: str | Path) -> None:
        """Write the result to ``path``: a torch file of tensors and plain data, with a format version.

        The provenance is saved with it; :meth:`load` reads this format and the previous one.
        """
        save_result(self, path)

    @classmethod
    def load(cls, path: str | Path) -> SweepResult:
        """Read a result written by :meth:`save`, by this version of hookpatch or the previous one.

        A missing, truncated or foreign file (e.g. one written with ``torch.save(result)``,
        which pickles the object), or one of an unknown format version, is refused with an
        error naming the path.
        """
        return load_result(cls, path)
