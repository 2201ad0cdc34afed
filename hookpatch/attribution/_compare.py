"""How well attribution patching predicts activation patching, cell by cell, with CIs.

:func:`compare` runs :func:`hookpatch.sweeps.patch_sweep` and
:func:`hookpatch.attribution.attribution_sweep` on the same grid; :func:`compare_results`
takes two finished results. Both methods are put on one scale, the metric *change* per
prompt (activation patching's patched metric minus its unpatched baseline: the corrupted
run when denoising, the clean run when noising). On the cell means (mean over prompts) it
reports Pearson and Spearman correlation (Spearman = Pearson of average ranks, ties get
their mean rank), top-k overlap (``|top-k by |value| of both| / k``, ties broken by cell
order) and sign agreement (fraction of cells whose signs match, ``|x| <= sign_tol`` counting
as 0). Each has a percentile bootstrap CI over prompts: resample prompts with replacement
(seeded), recompute both methods' cell means and the statistic; all resamples at once.

Cells that neither method moves (BOS, positions before the first differing token) hold
exact zeros in attribution and float noise (~1e-7) in activation patching; they count as
sign 0 under ``sign_tol`` but Spearman ranks them by that noise, so restrict ``positions=``
to the informative columns when the rank correlation matters.

Cost: the two sweeps, plus ``n_resamples × cells × batch`` numbers for the bootstrap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hookpatch._checks import IntLike, IntsLike, as_int, as_metric
from hookpatch._stats import check_bootstrap
from hookpatch._summary import axes_line, what_was_done
from hookpatch.attribution._atp import attribution_sweep
from hookpatch.attribution._sites import MetricLike, check_options
from hookpatch.errors import HookpatchError
from hookpatch.results import SweepResult
from hookpatch.sweeps._grid import Grid
from hookpatch.tasks._promptset import PromptSet

STATISTICS = ("pearson", "spearman", "top_k_overlap", "sign_agreement")
DEFAULT_K = 10  # cells in the top-k overlap, unless the grid has fewer


@dataclass(frozen=True)
class Statistic:
    """A statistic on the cell means, with its bootstrap interval over prompts."""

    value: float
    ci_low: float
    ci_high: float

    def __repr__(self) -> str:
        return f"{self.value:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]"


@dataclass(frozen=True)
class Comparison:
    """Activation patching vs attribution on one grid.

    Attributes:
        activation: the activation-patching result (values = patched metric).
        attribution: the attribution result (values = estimated metric change).
        activation_effect: ``[*grid, batch]`` activation patching as a metric change.
        pearson, spearman, top_k_overlap, sign_agreement: statistics of the cell means.
        k: the k of the top-k overlap; level, n_resamples, seed: the bootstrap's settings.
    """

    activation: SweepResult
    attribution: SweepResult
    activation_effect: Float[Tensor, "*grid batch"]
    pearson: Statistic
    spearman: Statistic
    top_k_overlap: Statistic
    sign_agreement: Statistic
    k: int
    sign_tol: float
    level: float
    n_resamples: int
    seed: int

    def __repr__(self) -> str:
        """A few lines: the grid, the two methods, the four statistics and the worst cell."""
        res = self.attribution
        gap = (res.mean() - self.activation_effect.mean(-1)).abs().float().nan_to_num(nan=-1.0)
        worst = tuple(int(i) for i in torch.unravel_index(gap.argmax(), gap.shape))
        stats = [f"{name} {stat!r}" for name, stat in self.statistics().items()]
        return "\n".join([
            f"Comparison({self.activation.provenance.method} vs {what_was_done(res.provenance)}, "
            f"{res.values.shape[-1]} prompts",
            f"  axes: {axes_line(res.axes, res.labels)}",
            f"  {', '.join(stats[:2])}",
            f"  {', '.join(stats[2:])} (k={self.k}; {self.level:.0%} bootstrap CIs over prompts)",
            f"  largest disagreement: {res.cell_label(worst)} (|attribution − activation| = {float(gap[worst]):.4g})",
        ]) + ")"

    def statistics(self) -> dict[str, Statistic]:
        """Name → :class:`Statistic` for the four statistics."""
        return {name: getattr(self, name) for name in STATISTICS}

    def to_dataframe(self) -> Any:
        """One row per cell: axis indices and labels, activation and attribution means, difference.

        ``activation`` and ``attribution`` are metric changes (mean over prompts), ready for a
        scatter plot; ``difference = attribution − activation``.
        """
        import pandas as pd

        res = self.attribution
        act = self.activation_effect.mean(-1)
        att = res.mean()
        rows = []
        for index, row in res.cells():
            row["activation"] = float(act[index])
            row["attribution"] = float(att[index])
            row["difference"] = row["attribution"] - row["activation"]
            rows.append(row)
        return pd.DataFrame(rows)

    def disagreements(self, n: int = 10) -> Any:
        """The ``n`` cells where the two methods differ most, sorted by ``|difference|``."""
        df = self.to_dataframe()
        order = df["difference"].abs().sort_values(ascending=False, kind="stable").index
        return df.loc[order[:n]].reset_index(drop=True)

    def summary(self) -> dict[str, str]:
        """Statistic name → ``"value [low, high]"``."""
        return {name: repr(stat) for name, stat in self.statistics().items()}


def compare(
    model: Any,
    prompts: PromptSet,
    metric: MetricLike,
    component: str = "resid_pre",
    *,
    by: Sequence[str] = ("layer", "pos"),
    direction: str = "denoising",
    steps: IntLike = 1,
    steps_per_pass: IntLike = 8,
    layers: IntsLike = None,
    positions: Any = None,
    heads: IntsLike = None,
    k: IntLike | None = None,
    sign_tol: float = 1e-6,
    level: float = 0.95,
    n_resamples: IntLike = 1000,
    seed: IntLike = 0,
    fast: bool | None = None,
    progress: bool = True,
    executor: Any = None,
) -> Comparison:
    """Run activation patching and attribution (``steps`` > 1: IG) on one grid and compare them.

    Example:
        >>> cmp = compare(model, prompts, LogitDiff(prompts), "z", by=("layer", "head"), k=5)
        >>> cmp.pearson, cmp.top_k_overlap          # value [CI]
        >>> cmp.disagreements(5)                    # cells where the linear estimate fails most

    Args:
        model, prompts, metric, component, by, direction, layers, positions, heads: as in
            :func:`hookpatch.sweeps.patch_sweep` (the metric must be differentiable).
        steps: attribution's interpolation points (1 = attribution patching).
        steps_per_pass: interpolation points stacked into one forward (IG; lower saves memory).
        k: cells in the top-k overlap (at most the number of cells); default 10, or every
            cell of a grid with fewer.
        sign_tol: values with ``|x| <= sign_tol`` count as sign 0 in the sign agreement.
        level, n_resamples, seed: the bootstrap over prompts.
        fast: activation patching's runner choice. progress: progress bars.
        executor: runs activation patching's jobs and integrated gradients' (default: in this process).
    """
    from hookpatch.sweeps._patching import patch_sweep

    cells = math.prod(Grid.build(model, prompts, component, by, layers, positions, heads).shape)
    _check_statistics(k, sign_tol, level, n_resamples, seed, cells)  # before minutes of sweeping
    steps, steps_per_pass = check_options(direction, steps, steps_per_pass)
    metric = as_metric(metric, prompts)  # wrapped once for both methods
    grid = dict(by=by, direction=direction, layers=layers, positions=positions, heads=heads, progress=progress)
    # attribution first: it refuses a metric without gradients after a few passes, not a whole sweep
    attribution = attribution_sweep(
        model, prompts, metric, component, steps=steps, steps_per_pass=steps_per_pass, executor=executor, **grid
    )
    activation = patch_sweep(model, prompts, metric, component, fast=fast, executor=executor, **grid)
    return compare_results(
        activation, attribution, k=k, sign_tol=sign_tol, level=level, n_resamples=n_resamples, seed=seed
    )


def compare_results(
    activation: SweepResult,
    attribution: SweepResult,
    *,
    k: IntLike | None = None,
    sign_tol: float = 1e-6,
    level: float = 0.95,
    n_resamples: IntLike = 1000,
    seed: IntLike = 0,
) -> Comparison:
    """Compare a finished activation-patching result with an attribution result on its grid.

    ``k`` defaults to 10 cells, or to every cell of a grid with fewer.
    """
    _check_pair(activation, attribution)
    n_cells = int(torch.tensor(attribution.shape).prod()) if attribution.shape else 1
    k, n_resamples, seed = _check_statistics(k, sign_tol, level, n_resamples, seed, n_cells)
    effect = activation.effect().float().cpu()  # patched − corrupted (denoising) or − clean (noising)
    act = effect.reshape(n_cells, -1)
    att = attribution.values.float().cpu().reshape(n_cells, -1)
    stats = bootstrap_statistics(act, att, k=k, sign_tol=sign_tol, level=level, n_resamples=n_resamples, seed=seed)
    return Comparison(
        activation=activation, attribution=attribution, activation_effect=effect, k=k,
        sign_tol=sign_tol, level=level, n_resamples=n_resamples, seed=seed, **stats,
    )


def bootstrap_statistics(
    exact: Float[Tensor, "cell batch"],
    estimate: Float[Tensor, "cell batch"],
    *,
    k: int,
    sign_tol: float,
    level: float,
    n_resamples: int,
    seed: int,
) -> dict[str, Statistic]:
    """The four statistics of the cell means and their paired percentile bootstrap CIs.

    Prompts are resampled with
    replacement from the generator ``derive_generator(seed, "hookpatch.compare")``, both
    methods' cell means recomputed on the same resample, the statistic taken per resample,
    NaNs (a constant resample) dropped, and the ``(1 − level)/2`` quantiles reported.
    """
    from transformer_lens.utilities.statistics import derive_generator

    batch = exact.shape[-1]
    generator = derive_generator(seed, "hookpatch.compare")
    idx = torch.randint(batch, (n_resamples, batch), generator=generator)
    boot_exact, boot_est = exact[:, idx].mean(-1).T, estimate[:, idx].mean(-1).T  # [resample, cell]
    point_exact, point_est = exact.mean(-1)[None], estimate.mean(-1)[None]
    fns: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "pearson": pearson,
        "spearman": spearman,
        "top_k_overlap": lambda a, b: top_k_overlap(a, b, k),
        "sign_agreement": lambda a, b: sign_agreement(a, b, sign_tol),
    }
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    out = {}
    for name in STATISTICS:
        fn = fns[name]
        value = float(fn(point_exact, point_est)[0])
        boot = fn(boot_exact, boot_est).double()
        boot = boot[~boot.isnan()]
        low, high = torch.quantile(boot, q).tolist() if len(boot) else (float("nan"), float("nan"))
        out[name] = Statistic(value, low, high)
    return out


def _check_statistics(
    k: Any, sign_tol: Any, level: Any, n_resamples: Any, seed: Any, n_cells: int | None = None
) -> tuple[int, int, int]:
    """The checked ``(k, n_resamples, seed)``; ``k=None`` is 10, or ``n_cells`` if fewer."""
    if k is None:
        k = DEFAULT_K if n_cells is None else min(DEFAULT_K, n_cells)
    k = as_int(k, "k", minimum=1, hint=": the number of cells in the top-k overlap")
    if n_cells is not None and k > n_cells:
        raise HookpatchError(f"k={k!r} must be an integer from 1 to the number of cells ({n_cells}).")
    n_resamples = check_bootstrap(level, n_resamples)
    if not isinstance(sign_tol, (int, float)) or not sign_tol >= 0:
        raise HookpatchError(f"sign_tol={sign_tol!r} must be >= 0.")
    return k, n_resamples, as_int(seed, "seed")


def _check_pair(activation: SweepResult, attribution: SweepResult) -> None:
    if activation.provenance.method != "patch":
        raise HookpatchError(
            f"activation= must be an activation-patching result (patch_sweep); got a "
            f"{activation.provenance.method_label!r} result. Attribution estimates the "
            "effect of patching, so compare it with patch_sweep in the same direction."
        )
    if activation.axes != attribution.axes or dict(activation.labels) != dict(attribution.labels):
        raise HookpatchError(
            f"the two results are on different grids (axes {activation.axes} vs {attribution.axes}, "
            "or different labels); run both with the same component, by, layers, positions and heads."
        )
    if activation.values.shape != attribution.values.shape:
        raise HookpatchError(
            f"values shaped {tuple(activation.values.shape)} and {tuple(attribution.values.shape)} differ; "
            "run both on the same prompt set."
        )
    if attribution.provenance.kind != "attribution_estimate":
        raise HookpatchError(
            f"attribution= must be an attribution result (attribution_sweep); got a "
            f"{attribution.provenance.method_label!r} result."
        )
    for key in ("component", "direction", "prompts_fingerprint"):
        a, b = getattr(activation.provenance, key), getattr(attribution.provenance, key)
        if a is not None and b is not None and a != b:
            raise HookpatchError(f"activation patching used {key}={a!r} but attribution {key}={b!r}; use the same.")


def pearson(a: Float[Tensor, "row cell"], b: Float[Tensor, "row cell"]) -> Float[Tensor, " row"]:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (NaN if one is constant)."""
    a, b = a.double() - a.double().mean(-1, keepdim=True), b.double() - b.double().mean(-1, keepdim=True)
    denom = (a.square().sum(-1) * b.square().sum(-1)).sqrt()
    return torch.where(denom > 0, (a * b).sum(-1) / denom, torch.full_like(denom, float("nan")))


def average_ranks(x: Float[Tensor, "row cell"]) -> Float[Tensor, "row cell"]:
    """1-based ranks along the last axis; tied values share their mean rank."""
    x = x.double().contiguous()
    ordered = x.sort(-1).values
    below = torch.searchsorted(ordered, x, right=False)  # values strictly smaller
    upto = torch.searchsorted(ordered, x, right=True)  # values smaller or equal
    return (below + upto + 1).double() / 2


def spearman(a: Float[Tensor, "row cell"], b: Float[Tensor, "row cell"]) -> Float[Tensor, " row"]:
    """Spearman correlation per row: Pearson of the average ranks."""
    return pearson(average_ranks(a), average_ranks(b))


def top_k_indices(x: Float[Tensor, "row cell"], k: int) -> Int[Tensor, "row topk"]:
    """The ``k`` cells of largest ``|x|`` per row; ties keep the earlier cell."""
    return x.abs().sort(dim=-1, descending=True, stable=True).indices[..., :k]


def top_k_overlap(a: Float[Tensor, "row cell"], b: Float[Tensor, "row cell"], k: int) -> Float[Tensor, " row"]:
    """``|top-k(a) ∩ top-k(b)| / k`` per row, top-k by absolute value."""
    mask_a = torch.zeros(a.shape, dtype=torch.bool).scatter(-1, top_k_indices(a, k), True)
    mask_b = torch.zeros(b.shape, dtype=torch.bool).scatter(-1, top_k_indices(b, k), True)
    return (mask_a & mask_b).sum(-1).double() / k


def sign_agreement(
    a: Float[Tensor, "row cell"], b: Float[Tensor, "row cell"], tol: float = 0.0
) -> Float[Tensor, " row"]:
    """Fraction of cells with the same sign; ``|x| <= tol`` counts as sign 0."""

    def sign(x: Tensor) -> Tensor:
        return torch.where(x.abs() <= tol, torch.zeros_like(x), x.sign())

    return (sign(a) == sign(b)).double().mean(-1)
