"""How much of the model's behaviour a circuit carries: faithfulness, completeness, CPR and CMD.

A circuit is *run alone* by exact edge patching in the noising direction: the clean run, with
every edge OUTSIDE the circuit given the corrupted run's sender output (see
:func:`hookpatch.circuits.edge_patch`). Its faithfulness is the normalized mean metric

    f = (mean m(circuit) − mean m(corrupted)) / (mean m(clean) − mean m(corrupted)),

means over prompts, so the full model (every edge kept, nothing patched) is 1 and the empty
circuit (every edge patched: the corrupted run exactly) is 0. Completeness runs the circuit
*removed*: only its own edges get the corrupted sender outputs (a complete circuit leaves
little behind, near 0).

:func:`faithfulness_curve` extracts a circuit per edge budget from edge scores (a fraction of
the graph's edges), runs them all — and a seeded random circuit of the same size per budget —
in ONE :func:`edge_patch` call, and summarizes the curve as in the Mechanistic
Interpretability Benchmark (MIB): CPR, the area under the faithfulness curve (higher is
better), and CMD, the area between the curve and 1 (lower is better). Every number has a
percentile bootstrap interval over prompts: prompts are resampled with replacement and the
normalized means recomputed from the resample (numerator and denominator alike), one
resample shared by every point of the curve.

Convention for the areas: the trapezoid rule on the budget-fraction axis (linear, the
requested fractions, e.g. 0.001 … 1.0), not normalized by the axis' range:
``CPR = Σ (x[i+1] − x[i]) (f[i] + f[i+1]) / 2`` and ``CMD = Σ (x[i+1] − x[i]) (|1 − f[i]| +
|1 − f[i+1]|) / 2``. With the default budgets a perfect curve (f = 1 everywhere) has CPR
0.999 and CMD 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hookpatch._checks import IntLike, as_int
from hookpatch._stats import check_bootstrap
from hookpatch.attribution._compare import Statistic
from hookpatch.circuits._circuit import Circuit, edge_scores, greedy, top_n
from hookpatch.circuits._graph import EdgeIndices, Graph, as_graph
from hookpatch.circuits._patching import edge_patch
from hookpatch.errors import HookpatchError
from hookpatch.metrics._base import Metric
from hookpatch.results import SweepResult
from hookpatch.sweeps._engine import DEFAULT_BUDGET
from hookpatch.tasks._promptset import PromptSet

DEFAULT_BUDGETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
METHODS = ("top_n", "greedy")
ABLATIONS = ("patch", "mean", "zero")


# -------------------------------------------------------------------- statistics


def normalized(
    values: Float[Tensor, "*cells batch"], clean: Float[Tensor, "*runs batch"], corrupted: Float[Tensor, "*runs batch"]
) -> Float[Tensor, "*cells"]:
    """``(mean values − mean corrupted) / (mean clean − mean corrupted)``, means over prompts (the
    runs' leading axes, e.g. bootstrap resamples, broadcast against the cells' trailing ones)."""
    low, high = corrupted.double().mean(-1), clean.double().mean(-1)
    return (values.double().mean(-1) - low) / (high - low)


def trapezoid(x: Sequence[float], y: Float[Tensor, "*rows point"]) -> Float[Tensor, "*rows"]:
    """The trapezoid-rule area under ``y`` over the points ``x`` (last axis)."""
    xs = torch.tensor(list(x), dtype=torch.float64)
    y = y.double()
    return ((xs[1:] - xs[:-1]) * (y[..., 1:] + y[..., :-1]) / 2).sum(-1)


def _bootstrap_index(batch: int, n_resamples: int, seed: int) -> Tensor:
    from transformer_lens.utilities.statistics import derive_generator

    generator = derive_generator(seed, "hookpatch.faithfulness")
    return torch.randint(batch, (n_resamples, batch), generator=generator)


def _resampled(values: Tensor, clean: Tensor, corrupted: Tensor, idx: Tensor) -> Tensor:
    """Normalized means per resample: ``[resample, *cells]``."""
    v = values.double()[..., idx]  # [*cells, resample, batch]
    f = normalized(v, clean.double()[idx], corrupted.double()[idx])  # [*cells, resample]
    return f.movedim(-1, 0)


def _interval(point: Tensor, boot: Tensor, level: float) -> tuple[Tensor, Tensor]:
    """Percentile interval over the resample axis (0), NaN resamples (a zero denominator) left out."""
    q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2], dtype=torch.float64)
    bounds = torch.nanquantile(boot.double(), q, dim=0)
    return bounds[0].to(point.dtype), bounds[1].to(point.dtype)


def _statistic(point: Tensor, boot: Tensor, level: float) -> Statistic:
    low, high = _interval(point, boot, level)
    return Statistic(float(point), float(low), float(high))


# -------------------------------------------------------------------- results


@dataclass(frozen=True)
class Faithfulness:
    """Faithfulness (and completeness) of a list of circuits on one prompt set.

    Attributes:
        circuits: the circuits, in order.
        values: ``[circuit, batch]`` the metric with only the circuit kept (the rest patched).
        clean, corrupted: ``[batch]`` the metric on the unpatched runs.
        faithfulness, ci_low, ci_high: ``[circuit]`` normalized mean and bootstrap interval.
        removed: ``[circuit, batch]`` the metric with the circuit removed (its edges patched),
            or None; completeness, completeness_low, completeness_high: its normalized mean and
            interval (or None).
        result: the underlying :func:`edge_patch` result (provenance included).
    """

    circuits: tuple[Circuit, ...]
    values: Float[Tensor, "circuit batch"]
    clean: Float[Tensor, " batch"]
    corrupted: Float[Tensor, " batch"]
    faithfulness: Float[Tensor, " circuit"]
    ci_low: Float[Tensor, " circuit"]
    ci_high: Float[Tensor, " circuit"]
    removed: Float[Tensor, "circuit batch"] | None
    completeness: Float[Tensor, " circuit"] | None
    completeness_low: Float[Tensor, " circuit"] | None
    completeness_high: Float[Tensor, " circuit"] | None
    result: SweepResult
    level: float
    n_resamples: int
    seed: int

    def __repr__(self) -> str:
        rows = [f"  {len(c):>6} edges: faithfulness {float(f):.3f} [{float(lo):.3f}, {float(hi):.3f}]"
                for c, f, lo, hi in zip(self.circuits, self.faithfulness, self.ci_low, self.ci_high, strict=True)]
        return (f"Faithfulness({len(self.circuits)} circuits, {self.values.shape[-1]} prompts, "
                f"{self.level:.0%} bootstrap CIs\n" + "\n".join(rows) + ")")


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness of circuits extracted at growing edge budgets, with a random baseline.

    Attributes:
        budgets: the requested fractions of the graph's edges (the x axis of CPR and CMD).
        n_edges: ``[budget]`` edges per circuit after extraction and pruning (may be fewer
            than ``round(budget * graph.n_edges)``).
        circuits: the extracted circuit per budget.
        values: ``[budget, batch]`` the metric with only the circuit kept.
        clean, corrupted: ``[batch]`` the unpatched runs' metric.
        faithfulness, ci_low, ci_high: ``[budget]`` normalized means and bootstrap intervals.
        cpr, cmd: the areas (see the module docstring), each a :class:`Statistic` with its interval.
        random_circuits: per draw, the random circuit of each budget: as many edges as
            ``n_edges``, drawn uniformly without replacement (seeded), not pruned.
        random_values: ``[draw, budget, batch]`` the metric with a random circuit kept.
        random_faithfulness: ``[budget]`` its normalized mean, averaged over draws, with
            random_ci_low/random_ci_high; random_cpr, random_cmd: the areas of the random curve
            (averaged over draws), with intervals. All None when ``n_random=0``.
        result: the one :func:`edge_patch` result all circuits were run in.
    """

    budgets: tuple[float, ...]
    n_edges: tuple[int, ...]
    circuits: tuple[Circuit, ...]
    values: Float[Tensor, "budget batch"]
    clean: Float[Tensor, " batch"]
    corrupted: Float[Tensor, " batch"]
    faithfulness: Float[Tensor, " budget"]
    ci_low: Float[Tensor, " budget"]
    ci_high: Float[Tensor, " budget"]
    cpr: Statistic
    cmd: Statistic
    random_circuits: tuple[tuple[Circuit, ...], ...]
    random_values: Float[Tensor, "draw budget batch"] | None
    random_faithfulness: Float[Tensor, " budget"] | None
    random_ci_low: Float[Tensor, " budget"] | None
    random_ci_high: Float[Tensor, " budget"] | None
    random_cpr: Statistic | None
    random_cmd: Statistic | None
    method: str
    seed: int
    level: float
    n_resamples: int
    result: SweepResult

    def __repr__(self) -> str:
        lines = [f"FaithfulnessCurve({self.method}, {len(self.budgets)} budgets, {self.values.shape[-1]} prompts",
                 f"  CPR {self.cpr!r}, CMD {self.cmd!r} ({self.level:.0%} bootstrap CIs)"]
        if self.random_cpr is not None:
            lines.append(f"  random baseline: CPR {self.random_cpr!r}, CMD {self.random_cmd!r}")
        for b, n, f in zip(self.budgets, self.n_edges, self.faithfulness, strict=True):
            lines.append(f"  {b:>6.3g} ({n} edges): {float(f):.3f}")
        return "\n".join(lines) + ")"

    def to_dataframe(self) -> Any:
        """One row per budget: budget, n_edges, faithfulness with its interval, random baseline."""
        import pandas as pd

        rows = []
        for i, b in enumerate(self.budgets):
            row = {"budget": b, "n_edges": self.n_edges[i], "faithfulness": float(self.faithfulness[i]),
                   "ci_low": float(self.ci_low[i]), "ci_high": float(self.ci_high[i])}
            if self.random_faithfulness is not None:
                row["random_faithfulness"] = float(self.random_faithfulness[i])
            rows.append(row)
        return pd.DataFrame(rows)


# -------------------------------------------------------------------- entry points


def faithfulness(
    model: Any,
    prompts: PromptSet,
    metric: Metric | Callable[[Tensor], Tensor],
    circuits: Circuit | Sequence[Any],
    *,
    completeness: bool = False,
    ablation: str = "patch",
    level: float = 0.95,
    n_resamples: IntLike = 1000,
    seed: IntLike = 0,
    graph: Graph | None = None,
    memory_budget: int = DEFAULT_BUDGET,
    fast: bool | None = None,
    progress: bool = False,
    executor: Any = None,
) -> Faithfulness:
    """Faithfulness of each circuit: the clean run with every edge outside it patched from the
    corrupted run (or ablated), normalized so the full model is 1 and the corrupted run (every
    edge ablated) 0.

    Example:
        >>> res = faithfulness(model, prompts, LogitDiff(prompts), [circuit_a, circuit_b], completeness=True)
        >>> res.faithfulness, res.ci_low, res.completeness

    Args:
        model, prompts, metric: as in :func:`edge_patch`.
        circuits: a :class:`Circuit` or a list of them (or of edge lists) of this model's graph.
        completeness: also run each circuit removed (only its edges patched).
        ablation: what replaces the edges outside the circuit: ``"patch"`` (the corrupted run's
            sender outputs; the corrupted run is 0), ``"mean"`` (their mean over the prompts,
            per position) or ``"zero"``; for the last two the model with every edge ablated is 0.
        level, n_resamples, seed: the bootstrap over prompts.
        graph, memory_budget, fast, progress, executor: as in :func:`edge_patch`.

    All circuits (and their removals) run in one :func:`edge_patch` call.
    """
    _check_ablation(ablation)
    n_resamples, seed = check_bootstrap(level, n_resamples), as_int(seed, "seed")
    if not isinstance(completeness, bool):
        raise HookpatchError(f"completeness={completeness!r} must be True or False.")
    g = as_graph(model, graph)
    items = [circuits] if isinstance(circuits, Circuit) else _as_list(circuits)
    checked = tuple(_as_circuit(g, c, i) for i, c in enumerate(items))
    sets = [c.complement_indices() for c in checked] + ([EdgeIndices(c.indices) for c in checked]
                                                        if completeness else [])
    res, values, corrupted = _patch_outside(model, prompts, metric, sets, ablation, g, memory_budget, fast, progress,
                                            executor)
    kept, removed = values[:len(checked)], values[len(checked):] if completeness else None
    idx = _bootstrap_index(values.shape[-1], n_resamples, seed)
    f = normalized(kept, res.clean, corrupted)
    low, high = _interval(f, _resampled(kept, res.clean, corrupted, idx), level)
    comp = comp_low = comp_high = None
    if removed is not None:
        comp = normalized(removed, res.clean, corrupted)
        comp_low, comp_high = _interval(comp, _resampled(removed, res.clean, corrupted, idx), level)
    return Faithfulness(checked, kept, res.clean, corrupted, f, low, high, removed, comp, comp_low, comp_high,
                        res, level, n_resamples, seed)


def faithfulness_curve(
    model: Any,
    prompts: PromptSet,
    metric: Metric | Callable[[Tensor], Tensor],
    scores: Float[Tensor, " n_edges"] | Float[Tensor, "n_edges batch"],
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    method: str = "top_n",
    ablation: str = "patch",
    absolute: bool = True,
    prune: bool = True,
    n_random: IntLike = 1,
    seed: IntLike = 0,
    level: float = 0.95,
    n_resamples: IntLike = 1000,
    graph: Graph | None = None,
    memory_budget: int = DEFAULT_BUDGET,
    fast: bool | None = None,
    progress: bool = False,
    executor: Any = None,
) -> FaithfulnessCurve:
    """Faithfulness of the circuits that edge scores pick at each budget, with CPR, CMD and a random baseline.

    Example:
        >>> curve = faithfulness_curve(model, prompts, LogitDiff(prompts), scores)
        >>> curve.cpr, curve.cmd, curve.random_cpr      # value [CI]
        >>> curve.to_dataframe()

    Args:
        model, prompts, metric: as in :func:`edge_patch`.
        scores: ``[n_edges]`` (or ``[n_edges, batch]``, averaged) scores aligned with ``graph.edges``.
        budgets: increasing fractions of the graph's edges in (0, 1], at least two; a budget
            asks for ``max(1, round(budget * n_edges))`` edges.
        method: ``"top_n"`` or ``"greedy"`` (see :mod:`hookpatch.circuits._circuit`).
        ablation: ``"patch"``, ``"mean"`` or ``"zero"`` (see :func:`faithfulness`).
        absolute, prune: passed to the extraction.
        n_random: random circuits per budget for the baseline (0: none). seed: seeds them and
            the bootstrap.
        level, n_resamples: the bootstrap over prompts.
        graph, memory_budget, fast, progress, executor: as in :func:`edge_patch`.

    Every circuit of the curve, random ones included, runs in one :func:`edge_patch` call.
    """
    _check_ablation(ablation)
    if method not in METHODS:
        raise HookpatchError(f"method={method!r}: expected one of {METHODS} (threshold picks no budget).")
    n_resamples, seed = check_bootstrap(level, n_resamples), as_int(seed, "seed")
    n_random = as_int(n_random, "n_random", minimum=0, hint=": random circuits per budget (0 for none)")
    g = as_graph(model, graph)
    s = edge_scores(g, scores)
    fractions = _check_budgets(budgets)
    extract = top_n if method == "top_n" else greedy
    circuits = tuple(extract(g, s, max(1, round(b * g.n_edges)), absolute, prune=prune) for b in fractions)
    sizes = tuple(len(c) for c in circuits)
    generator = torch.Generator().manual_seed(seed)
    randoms = [[Circuit(g, tuple(g.edge_at(i) for i in torch.randperm(g.n_edges, generator=generator)[:n].tolist()),
                        method="random") for n in sizes] for _ in range(n_random)]
    sets = [c.complement_indices() for c in circuits] + [c.complement_indices() for draw in randoms for c in draw]
    res, values, corrupted = _patch_outside(model, prompts, metric, sets, ablation, g, memory_budget, fast, progress,
                                            executor)
    P = len(fractions)
    kept = values[:P]
    idx = _bootstrap_index(values.shape[-1], n_resamples, seed)
    f = normalized(kept, res.clean, corrupted)
    boot = _resampled(kept, res.clean, corrupted, idx)  # [resample, budget]
    low, high = _interval(f, boot, level)
    cpr = _statistic(trapezoid(fractions, f), trapezoid(fractions, boot), level)
    cmd = _statistic(trapezoid(fractions, (1 - f).abs()), trapezoid(fractions, (1 - boot).abs()), level)
    rand = r_f = r_low = r_high = r_cpr = r_cmd = None
    if n_random:
        rand = values[P:].reshape(n_random, P, -1)
        per_draw = normalized(rand, res.clean, corrupted)  # [draw, budget]
        r_boot = _resampled(rand, res.clean, corrupted, idx)  # [resample, draw, budget]
        r_f = per_draw.mean(0)
        r_low, r_high = _interval(r_f, r_boot.mean(1), level)
        r_cpr = _statistic(trapezoid(fractions, per_draw).mean(), trapezoid(fractions, r_boot).mean(1), level)
        r_cmd = _statistic(trapezoid(fractions, (1 - per_draw).abs()).mean(),
                           trapezoid(fractions, (1 - r_boot).abs()).mean(1), level)
    return FaithfulnessCurve(
        budgets=fractions, n_edges=sizes, circuits=circuits, values=kept, clean=res.clean, corrupted=corrupted,
        faithfulness=f, ci_low=low, ci_high=high, cpr=cpr, cmd=cmd, random_circuits=tuple(tuple(d) for d in randoms),
        random_values=rand, random_faithfulness=r_f,
        random_ci_low=r_low, random_ci_high=r_high, random_cpr=r_cpr, random_cmd=r_cmd, method=method, seed=seed,
        level=level, n_resamples=n_resamples, result=res,
    )


# -------------------------------------------------------------------- checks


def _check_ablation(ablation: Any) -> None:
    if ablation not in ABLATIONS:
        raise HookpatchError(f"ablation={ablation!r}: expected one of {ABLATIONS}.")


def _patch_outside(
    model: Any, prompts: PromptSet, metric: Any, sets: list[Any], ablation: str, g: Graph, memory_budget: int,
    fast: bool | None, progress: bool, executor: Any,
) -> tuple[Any, Tensor, Tensor]:
    """One :func:`edge_patch` call of the clean run with each of ``sets`` patched (from the
    corrupted run, or its mean or zero): the result, the values ``[set, batch]`` and the
    per-prompt 0 point of the normalization — the corrupted run itself for ``"patch"`` (every
    edge patched gives it exactly), else the model with every edge ablated (one more set)."""
    every = [] if ablation == "patch" else [EdgeIndices(tuple(range(g.n_edges)))]
    res = edge_patch(model, prompts, metric, edge_sets=sets + every, direction="noising", graph=g,
                     ablation=None if ablation == "patch" else ablation, memory_budget=memory_budget, fast=fast,
                     progress=progress, executor=executor)
    values = res.values.float()
    if ablation == "patch":
        return res, values, _require_spread(res)
    zero = values[-1]
    if torch.isclose(res.clean.mean(), zero.mean()):
        raise HookpatchError(
            f"the metric has the same mean with every edge {ablation}-ablated as on the clean run, so "
            "faithfulness (1 = clean, 0 = every edge ablated) is undefined; use another metric or ablation."
        )
    return res, values[:-1], zero


def _as_list(circuits: Any) -> list[Any]:
    if isinstance(circuits, str) or not isinstance(circuits, Sequence) or not len(circuits):
        raise HookpatchError(
            f"circuits: expected a Circuit or a non-empty list of Circuits (or edge lists), got {circuits!r:.80}."
        )
    return list(circuits)


def _as_circuit(g: Graph, item: Any, i: int) -> Circuit:
    if isinstance(item, Circuit):
        if item.graph.facts != g.facts or item.graph.has_mlps != g.has_mlps:
            raise HookpatchError(
                f"circuits[{i}] belongs to another model's graph ({item.graph!r}); this model's graph is {g!r}. "
                "Extract the circuit from this model's edge scores."
            )
        return item
    return Circuit(g, g.edge_set(item))


def _check_budgets(budgets: Any) -> tuple[float, ...]:
    try:
        out = tuple(float(b) for b in budgets)
        ok = all(not isinstance(b, bool) for b in budgets)
    except (TypeError, ValueError):
        out, ok = (), False
    if not ok or len(out) < 2 or any(not 0.0 < b <= 1.0 for b in out) or any(
            a >= b for a, b in zip(out, out[1:], strict=False)):
        raise HookpatchError(
            f"budgets={budgets!r}: expected at least two increasing fractions of the edges in (0, 1], "
            f"e.g. {DEFAULT_BUDGETS}."
        )
    return out


def _require_spread(res: SweepResult) -> Tensor:
    """The corrupted run's metric, after checking that its mean differs from the clean run's."""
    assert res.corrupted is not None  # edge_patch always records both runs
    gap = float(res.clean.double().mean() - res.corrupted.double().mean())
    if gap == 0.0:
        raise HookpatchError(
            "metric: its mean is the same on the clean and corrupted runs, so faithfulness (normalized by "
            "their difference) is undefined; use prompts whose corruption changes the metric."
        )
    return res.corrupted
