"""How well edge attribution (EAP, EAP-IG) predicts exact edge patching, edge by edge, with CIs.

:func:`edge_attribution` scores every edge of the graph from one backward pass; it is a
linearisation, so before trusting a circuit built from it one wants to know where it is
right. :func:`compare_edges` patches a sample of edges exactly, one edge at a time
(:func:`edge_patch` with ``edge_sets=[[e] for e in edges]``; the effect of an edge is the
patched metric minus the unpatched run being patched, per prompt) and compares those effects
with the attribution scores of the same edges, on one scale: the metric change per prompt.

The statistics are those of :mod:`hookpatch.attribution._compare` (node-level
``compare``), computed by the same functions on the edges' means over prompts: Pearson,
Spearman, top-k overlap by ``|value|`` and sign agreement (``|x| <= sign_tol`` counts as
sign 0), each with a paired percentile bootstrap CI over prompts (the same resampled prompts
for both methods). :meth:`EdgeComparison.disagreements` lists the edges with the largest
``|attribution − exact|``, :meth:`EdgeComparison.sign_flips` those whose signs differ.

Which edges: a model has far more edges than one can patch one by one (GPT-2 small: ~32k),
so by default the comparison takes the ``n_top`` edges of largest ``|mean score|`` (where a
circuit comes from, and where a linear estimate is most likely to overshoot) plus
``n_random`` edges drawn uniformly (seeded) from the rest (small scores, where one checks that
attribution does not miss a large exact effect). A graph with at most ``n_top + n_random``
edges is compared whole. ``edges=`` picks them by hand.

Cost: one forward per compared edge (stacked into batches by :func:`edge_patch`'s memory
budget), plus the attribution if ``scores`` is not given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hookpatch._checks import IntLike, as_int, as_metric
from hookpatch.attribution._compare import (
    Comparison,
    _check_statistics,
    bootstrap_statistics,
)
from hookpatch.circuits._attribution import DIRECTIONS, edge_attribution
from hookpatch.circuits._graph import Graph, as_graph
from hookpatch.circuits._patching import edge_patch
from hookpatch.errors import HookpatchError
from hookpatch.metrics._base import Metric
from hookpatch.results import SweepResult
from hookpatch.sweeps._engine import DEFAULT_BUDGET
from hookpatch.tasks._promptset import PromptSet

DEFAULT_TOP = 50  # edges of largest |score| compared by default
DEFAULT_RANDOM = 50  # edges drawn at random from the rest


@dataclass(frozen=True, repr=False)
class EdgeComparison(Comparison):
    """Exact edge patching vs edge attribution on a set of edges (a :class:`Comparison` whose
    cells are edges).

    Attributes:
        activation: the exact edge-patching result, ``values[edge, batch]`` = patched metric
            (axis ``"edge_set"``, each set one edge, labelled by the edge).
        attribution: the attribution scores of the compared edges (axis ``"edge"``).
        activation_effect: ``[edge, batch]`` exact effects (patched − unpatched target run).
        pearson, spearman, top_k_overlap, sign_agreement: statistics of the edge means with
            paired bootstrap CIs over prompts; k, sign_tol, level, n_resamples, seed as in
            :class:`Comparison`.
        edges: the compared edges' labels, in graph order.
        selected: per edge how it was chosen: ``"top"`` (largest ``|score|``), ``"random"``,
            ``"all"`` (the whole graph) or ``"given"`` (``edges=``).
        scores: the attribution of every edge of the graph the selection was made from.
    """

    edges: tuple[str, ...]
    selected: tuple[str, ...]
    scores: SweepResult

    @property
    def exact(self) -> Float[Tensor, "edge batch"]:
        """Exact effects per edge and prompt (``activation_effect``)."""
        return self.activation_effect

    @property
    def estimate(self) -> Float[Tensor, "edge batch"]:
        """Attribution scores per edge and prompt."""
        return self.attribution.values.float()

    def __repr__(self) -> str:
        gap = (self.estimate.mean(-1) - self.exact.mean(-1)).abs()
        worst = int(gap.argmax())
        kinds = ", ".join(f"{n} {s}" for s, n in _counts(self.selected).items())
        stats = [f"{name} {stat!r}" for name, stat in self.statistics().items()]
        flips = len(self.sign_flips(n=None))
        p = self.attribution.provenance
        return "\n".join([
            f"EdgeComparison(exact edge patching vs {p.method or 'attribution'} ({p.direction}), "
            f"{len(self.edges)} edges ({kinds}) of {self.scores.values.shape[0]}, {self.exact.shape[-1]} prompts",
            f"  {', '.join(stats[:2])}",
            f"  {', '.join(stats[2:])} (k={self.k}; {self.level:.0%} bootstrap CIs over prompts)",
            f"  largest disagreement: {self.edges[worst]} (|attribution − exact| = {float(gap[worst]):.4g}); "
            f"{flips} sign flip{'' if flips == 1 else 's'}",
        ]) + ")"

    def to_dataframe(self) -> Any:
        """One row per compared edge: ``edge`` (label), ``sender``, ``receiver``,
        ``selected``, ``exact`` and ``attribution`` (mean metric change over prompts),
        ``difference = attribution − exact``, and ``sign_flip`` (signs differ under
        ``sign_tol``)."""
        import pandas as pd

        exact, est = self.exact.mean(-1), self.estimate.mean(-1)
        flips = _signs(exact, self.sign_tol) != _signs(est, self.sign_tol)
        rows = []
        for i, label in enumerate(self.edges):
            sender, receiver = label.split("->", 1)
            rows.append({
                "edge": label, "sender": sender, "receiver": receiver, "selected": self.selected[i],
                "exact": float(exact[i]), "attribution": float(est[i]),
                "difference": float(est[i] - exact[i]), "sign_flip": bool(flips[i]),
            })
        return pd.DataFrame(rows)

    def disagreements(self, n: int = 10) -> Any:
        """The ``n`` edges where attribution and exact patching differ most, by
        ``|attribution − exact|`` (ties keep graph order)."""
        return super().disagreements(n)

    def sign_flips(self, n: int | None = 10) -> Any:
        """Edges whose attribution and exact effect have different signs (``|x| <= sign_tol``
        counting as 0), largest ``|exact|`` first: the edges a circuit built from the
        scores would get backwards. ``n=None`` lists them all."""
        df = self.to_dataframe()
        df = df[df["sign_flip"]]
        order = df["exact"].abs().sort_values(ascending=False, kind="stable").index
        return df.loc[order if n is None else order[:n]].reset_index(drop=True)


def compare_edges(
    model: Any,
    prompts: PromptSet,
    metric: Metric | Callable[[Tensor], Tensor],
    scores: Any = None,  # SweepResult | None, checked here with a HookpatchError
    *,
    edges: Any = None,
    n_top: IntLike = DEFAULT_TOP,
    n_random: IntLike = DEFAULT_RANDOM,
    method: str = "eap",
    steps: IntLike = 5,
    direction: str = "denoising",
    k: IntLike | None = None,
    sign_tol: float = 1e-6,
    level: float = 0.95,
    n_resamples: IntLike = 1000,
    seed: IntLike = 0,
    graph: Graph | None = None,
    memory_budget: int = DEFAULT_BUDGET,
    fast: bool | None = None,
    progress: bool = True,
    executor: Any = None,
) -> EdgeComparison:
    """Compare edge attribution with exact single-edge patching (see the module docstring).

    Example:
        >>> cmp = compare_edges(model, prompts, LogitDiff(prompts))                 # EAP
        >>> cmp = compare_edges(model, prompts, metric, method="eap-ig", steps=5)
        >>> cmp.spearman, cmp.top_k_overlap                  # value [CI]
        >>> cmp.disagreements(5), cmp.sign_flips()            # which edges, with labels

    Args:
        model, prompts, metric: as in :func:`edge_attribution` (a differentiable metric).
        scores: an :func:`edge_attribution` result (``per_position=False``) on these prompts
            and in this ``direction``; default: computed here with ``method`` and ``steps``.
        edges: the edges to compare (labels, pairs or :class:`Edge` s). Default: the whole
            graph if it has at most ``n_top + n_random`` edges, else the ``n_top`` edges of
            largest ``|mean score|`` plus ``n_random`` drawn (with ``seed``) from the rest.
        n_top, n_random: the default selection's sizes (50 and 50).
        method, steps: the attribution computed when ``scores`` is None (``"eap"`` or
            ``"eap-ig"``).
        direction: ``"denoising"`` (clean senders into the corrupted run) or ``"noising"``.
        k: edges in the top-k overlap; default 10, or every compared edge if fewer.
        sign_tol: ``|x| <= sign_tol`` counts as sign 0 (sign agreement and sign flips).
        level, n_resamples, seed: the paired bootstrap over prompts; ``seed`` also draws the
            random edges.
        graph: the model's graph (default: built from the model).
        memory_budget, fast, executor: the exact edge patching's, as in :func:`edge_patch`.
        progress: progress bars.

    Returns:
        An :class:`EdgeComparison`.
    """
    if direction not in DIRECTIONS:
        raise HookpatchError(f"direction={direction!r}: expected one of {DIRECTIONS}.")
    g = as_graph(model, graph)
    seed = as_int(seed, "seed")
    n_top = as_int(n_top, "n_top", minimum=0, hint=" (edges of largest |score| compared, e.g. 50)")
    n_random = as_int(n_random, "n_random", minimum=0, hint=" (edges drawn from the rest, e.g. 50)")
    if edges is None and n_top + n_random < 2:
        raise HookpatchError(f"n_top + n_random = {n_top + n_random}: compare at least 2 edges (e.g. 50 and 50).")
    metric = as_metric(metric, prompts)
    if scores is None:
        scores = edge_attribution(model, prompts, metric, method=method, steps=steps, direction=direction,
                                  graph=g, progress=progress)
    else:
        _check_scores(scores, g, prompts, direction)
    chosen, selected = _select(g, scores, edges, n_top, n_random, seed)
    k, n_resamples, seed = _check_statistics(k, sign_tol, level, n_resamples, seed, len(chosen))
    labels = tuple(g.edges[i].label for i in chosen)
    exact = edge_patch(model, prompts, metric, edge_sets=[[label] for label in labels], direction=direction,
                       graph=g, memory_budget=memory_budget, fast=fast, progress=progress, executor=executor)
    effect = exact.effect().float().cpu()  # [edge, batch]: patched − the run being patched
    estimate = replace(scores, values=scores.values[list(chosen)], labels={"edge": labels})
    stats = bootstrap_statistics(effect, estimate.values.float().cpu(), k=k, sign_tol=sign_tol, level=level,
                                 n_resamples=n_resamples, seed=seed)
    return EdgeComparison(
        activation=exact, attribution=estimate, activation_effect=effect, k=k, sign_tol=sign_tol, level=level,
        n_resamples=n_resamples, seed=seed, edges=labels, selected=selected, scores=scores, **stats,
    )


def _check_scores(scores: Any, g: Graph, prompts: PromptSet, direction: str) -> None:
    """Refuse scores that are not an edge attribution of this graph, prompt set and direction."""
    fix = "compute them with edge_attribution(model, prompts, metric) or pass scores=None"
    if not isinstance(scores, SweepResult):
        raise HookpatchError(f"scores: expected an edge_attribution result (a SweepResult), got "
                             f"{type(scores).__name__}; {fix}.")
    if scores.provenance.kind != "attribution_estimate" or tuple(scores.axes) != ("edge",):
        extra = " (per_position=True keeps a position axis; use per_position=False)" if "pos" in scores.axes else ""
        raise HookpatchError(
            f"scores: expected an edge_attribution result over ('edge',) of kind 'attribution_estimate', got "
            f"axes {tuple(scores.axes)} of kind {scores.provenance.kind!r}{extra}; {fix}."
        )
    if tuple(scores.labels["edge"]) != tuple(e.label for e in g.edges):
        raise HookpatchError(f"scores: its edges are not this model's graph edges; {fix}.")
    if scores.values.shape[-1] != len(prompts) or scores.provenance.prompts_fingerprint not in (
        None, prompts.fingerprint(),
    ):
        raise HookpatchError(f"scores: they were computed on other prompts ({scores.values.shape[-1]} vs "
                             f"{len(prompts)}); {fix} on these prompts.")
    if scores.provenance.direction not in (None, direction):
        raise HookpatchError(f"scores: they were computed with direction={scores.provenance.direction!r} but "
                             f"direction={direction!r}; pass the same direction.")


def _select(
    g: Graph, scores: SweepResult, edges: Any, n_top: int, n_random: int, seed: int
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Indices of the compared edges (graph order) and how each was chosen."""
    if edges is not None:
        chosen = tuple(g.index(e) for e in g.edge_set(edges))
        if len(chosen) < 2:
            raise HookpatchError(f"edges: {len(chosen)} distinct edge(s) given; correlations need at least 2.")
        return chosen, ("given",) * len(chosen)
    n = g.n_edges
    if n <= n_top + n_random:
        return tuple(range(n)), ("all",) * n
    from transformer_lens.utilities.statistics import derive_generator

    size = scores.values.float().mean(-1).abs()
    top = size.sort(descending=True, stable=True).indices[:n_top]
    rest = torch.ones(n, dtype=torch.bool)
    rest[top] = False
    pool = rest.nonzero().squeeze(-1)
    draw = torch.randperm(len(pool), generator=derive_generator(seed, "hookpatch.compare_edges"))[:n_random]
    kind = {int(i): "top" for i in top} | {int(pool[j]): "random" for j in draw}
    chosen = tuple(sorted(kind))
    return chosen, tuple(kind[i] for i in chosen)


def _signs(x: Tensor, tol: float) -> Tensor:
    return torch.where(x.abs() <= tol, torch.zeros_like(x), x.sign())


def _counts(items: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out
