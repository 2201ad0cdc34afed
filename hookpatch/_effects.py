"""Effects: the per-prompt change an intervention makes, against a stated baseline run.

A sweep stores the metric *after* each patch or ablation. What a researcher compares across
cells is the change it caused, prompt by prompt:

- ``"corrupted"``: patched − corrupted run (denoising patching: what the clean activation restores);
- ``"clean"``: patched − clean run (noising patching and ablations: what the intervention breaks);
- ``"none"``: the values themselves: DLA values are already contributions and attribution
  patching's already estimated changes (only ``"none"`` applies to them); the default for
  readouts such as the logit lens, whose values are the metric read at each layer.

With a normalized metric the baselines are normalized too, so the effect is the normalized
change. :class:`Effects` holds the per-prompt effects with their mean, a paired bootstrap
interval (prompts resampled as pairs) and a sign-flip p-value per cell, corrected across
cells — see :mod:`hookpatch._stats` for the cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from hookpatch._checks import IntLike, as_count, as_int
from hookpatch._provenance import Provenance
from hookpatch._stats import adjust_pvalues, check_bootstrap, check_correction, mean_ci, sign_flip_pvalue
from hookpatch.errors import HookpatchError

BASELINES = ("corrupted", "clean", "none")


def default_baseline(provenance: Provenance) -> str:
    """The baseline a result's effects are read against, from what produced it.

    Denoising patching → ``"corrupted"``; noising patching and ablations → ``"clean"``;
    DLA, attribution and readouts → ``"none"`` (the values as they are). The rule lives on
    the record (:attr:`Provenance.default_baseline`); this is its functional form.
    """
    return provenance.default_baseline


def resolve_baseline(provenance: Provenance, baseline: str | None, has_corrupted: bool) -> str:
    """``baseline`` checked against a result's provenance and runs (``None``: the result's default)."""
    if baseline is None:
        return provenance.default_baseline
    if baseline not in BASELINES:
        raise HookpatchError(
            f"baseline={baseline!r}: expected one of {BASELINES}, or None for the result's default "
            f"({provenance.default_baseline!r})."
        )
    if baseline != "none" and provenance.values_are_changes:
        raise HookpatchError(
            f"baseline={baseline!r}: the values of a {provenance.method} result are already contributions or "
            "changes, not a metric after an intervention; pass baseline=None or 'none'."
        )
    if baseline == "corrupted" and not has_corrupted:
        raise HookpatchError(
            "baseline='corrupted': this result has no corrupted run; pass baseline='clean' or 'none'."
        )
    return baseline


@dataclass(frozen=True)
class Effects:
    """Per-prompt effects over a grid, with their mean, paired CI and p-value per cell.

    Attributes:
        baseline: what each value was compared with: ``"corrupted"``, ``"clean"`` or ``"none"``.
        per_prompt: ``[*grid, batch]`` effect of each cell on each prompt.
        mean: ``[*grid]`` mean effect over prompts.
        ci_low, ci_high: ``[*grid]`` paired percentile-bootstrap interval of the mean effect.
        p: ``[*grid]`` sign-flip permutation p-value that the mean effect is zero.
        p_adjusted: ``[*grid]`` ``p`` corrected across all cells (``correction``; equal to ``p`` if None).
        axes, labels: the grid's axes and labels, as on the result.
        level, n_resamples, n_permutations, seed, alternative, correction: the settings used.
    """

    baseline: str
    per_prompt: Float[Tensor, "*grid batch"]
    mean: Float[Tensor, "*grid"]
    ci_low: Float[Tensor, "*grid"]
    ci_high: Float[Tensor, "*grid"]
    p: Float[Tensor, "*grid"]
    p_adjusted: Float[Tensor, "*grid"]
    axes: tuple[str, ...]
    labels: Mapping[str, tuple[str, ...]]
    level: float
    n_resamples: int
    n_permutations: int
    seed: int
    alternative: str
    correction: str | None


def measure(
    per_prompt: Float[Tensor, "*grid batch"],
    baseline: str,
    axes: tuple[str, ...],
    labels: Mapping[str, tuple[str, ...]],
    *,
    level: float = 0.95,
    n_resamples: IntLike = 1000,
    n_permutations: IntLike = 1000,
    seed: IntLike = 0,
    alternative: str = "two-sided",
    correction: str | None = "holm",
) -> Effects:
    """The :class:`Effects` of per-prompt effects measured against ``baseline`` (see ``SweepResult.effects``)."""
    n_resamples = check_bootstrap(level, n_resamples)
    seed = as_int(seed, "seed")
    n_permutations = as_count(n_permutations, "n_permutations", "random sign patterns, e.g. 1000")
    check_correction(correction)
    effect = per_prompt.detach().float().cpu()
    p = sign_flip_pvalue(effect, n_permutations, seed, alternative)
    low, high = mean_ci(effect, level, n_resamples, seed)
    return Effects(
        baseline=baseline, per_prompt=effect, mean=effect.mean(-1), ci_low=low, ci_high=high, p=p,
        p_adjusted=adjust_pvalues(p, correction), axes=tuple(axes), labels=labels,
        level=level, n_resamples=n_resamples, n_permutations=n_permutations, seed=seed,
        alternative=alternative, correction=correction,
    )
