"""The one sweep engine: many patch variants per forward pass, stacked along the batch axis.

A sweep is a list of cells ``(layer, positions, heads)``; each cell is one variant of the run
(corrupted tokens for denoising, clean for noising or ablation) with the cell's selection
replaced by a source (the other run's activation, or an ablation value). ``V`` cells share a
forward: the run's ``B`` prompts are repeated ``V`` times and each layer's hook patches only
its own rows. A memory budget decides ``V`` (and a runner may cap the computed positions per
chunk, for cache locality); results never depend on either.

The work is data. :func:`plan_jobs` cuts the cells into :class:`CellsJob` s — frozen
dataclasses naming their cells, the run they patch and the :class:`Source` (no model, no
cache, no closure), so they pickle — and an executor
(:class:`~hookpatch.runners.InProcessExecutor` by default) runs them against a
:class:`SweepContext`: the model, its :class:`~hookpatch.runners.Runner`, the metric and the
cached unpatched runs, all of which a worker owns. The engine never asks which runner or
which kind of metric it has.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hookpatch._checks import require_metric_values
from hookpatch.errors import HookpatchError
from hookpatch.hooks._factory import ablation_source
from hookpatch.hooks._selection import Heads, Positions, activation_mask, per_prompt_positions, pos_dim
from hookpatch.metrics._base import Metric
from hookpatch.model._facts import ModelFacts, component_info, model_facts
from hookpatch.runners import CachedRun, Chunk, Executor, Runner, runner_for
from hookpatch.runners._protocol import first_positions
from hookpatch.tasks._promptset import PromptSet

__all__ = ["Cell", "CellsJob", "Source", "SweepContext", "SweepRecipe", "plan_jobs", "run_cells"]

DEFAULT_BUDGET = 2 * 1024**3  # bytes


@dataclass(frozen=True)
class Cell:
    """One variant: patch the sweep's component at ``layer``, at ``positions``, for ``heads``."""

    layer: int
    positions: Positions = None
    heads: Heads = None


@dataclass(frozen=True)
class Source:
    """What a cell writes: the activation of the cached run ``run`` at the cell's hook, as it
    is (``ablation=None``) or ablated (``"zero"``, ``"mean"`` or ``"resample"`` with ``seed``;
    see :func:`hookpatch.hooks._factory.ablation_source`)."""

    run: str
    ablation: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class SweepContext:
    """What a worker owns to run a sweep's jobs: the model and its runner, the prompt set, the
    metric and the cached unpatched runs (run name → :class:`~hookpatch.runners.CachedRun`)."""

    model: Any
    facts: ModelFacts
    prompts: PromptSet
    metric: Metric
    runner: Runner
    runs: Mapping[str, CachedRun]
    recipe: SweepRecipe | None = None  # how a worker builds this context from its own model

    def source(self, source: Source, hook_name: str) -> Tensor:
        """The activation ``source`` writes at ``hook_name``."""
        act = self.runs[source.run].cache[hook_name]
        return act if source.ablation is None else ablation_source(act, source.ablation, seed=source.seed)


@dataclass(frozen=True)
class SweepRecipe:
    """How to build a :class:`SweepContext` from a model: plain, picklable data, so a worker
    that loaded the same model computes its own cached runs instead of receiving them.

    Attributes:
        prompts, metric: the prompt set and the metric (a :class:`Metric`).
        component: the swept component; its activations at ``layers`` are cached.
        layers: the layers the sweep patches.
        fast: the runner choice, as passed to :func:`~hookpatch.runners.runner_for`.
    """

    prompts: PromptSet
    metric: Metric
    component: str
    layers: tuple[int, ...]
    fast: bool | None

    def build(self, model: Any) -> SweepContext:
        """The context on ``model``: its runner and the clean and corrupted runs, cached."""
        runner = runner_for(model, self.fast)
        tokens = {"clean": self.prompts.clean_tokens, "corrupted": self.prompts.corrupted_tokens}
        runs = runner.cache_runs(tokens, self.metric, self.component, list(self.layers))
        return SweepContext(model, model_facts(model), self.prompts, self.metric, runner, runs, self)


@dataclass(frozen=True)
class CellsJob:
    """Patch each of ``cells`` (one stacked forward) into the cached run ``target``.

    Attributes:
        component: the patched component.
        target: the cached run patched into (``"corrupted"`` when denoising).
        source: what the cells write.
        cells: the cells, in the order of the result's rows.
        index: each cell's row in the whole sweep's ``[cell, batch]`` values.
    """

    component: str
    target: str
    source: Source
    cells: tuple[Cell, ...]
    index: tuple[int, ...]

    def run(self, context: SweepContext) -> Float[Tensor, "cell batch"]:
        """The metric per cell and prompt, ``[len(cells), batch]`` (float32, on the CPU)."""
        run = context.runs[self.target]
        B, P = run.tokens.shape
        d = pos_dim(self.component)
        masks = _masks(context, self.component, self.cells, B, P)
        hook = component_info(self.component).hook_name
        layers = [c.layer for c in self.cells]
        chunk = Chunk(
            component=self.component,
            layers=layers,
            masks=masks,
            first_pos=torch.stack([first_positions(m, d, B) for m in masks]),
            run=run,
            sources={layer: context.source(self.source, hook(layer)) for layer in sorted(set(layers))},
            pos_dim=d,
        )
        values = context.runner.run_chunk(chunk, context.metric)
        return require_metric_values(values, (len(self.cells), B)).detach().float().cpu()


def _per_cell(cells: Sequence[Cell], key: Callable[[Cell], Any], build: Callable[[Cell], Tensor]) -> list[Tensor]:
    """``build(cell)`` for each cell, built once per distinct ``key(cell)`` (None: always built)."""
    memo: dict[Any, Tensor] = {}
    out = []
    for c in cells:
        k = key(c)
        value = memo.get(k) if k is not None else None
        if value is None:
            value = build(c)
            if k is not None:
                memo[k] = value
        out.append(value)
    return out


def _masks(context: SweepContext, component: str, cells: Sequence[Cell], B: int, P: int) -> list[Tensor]:
    """Each cell's activation mask; cells with equal positions and heads share one."""
    return _per_cell(
        cells,
        lambda c: _key(c.positions, c.heads),
        lambda c: activation_mask(
            context.facts, component, per_prompt_positions(c.positions, B, P, context.prompts), c.heads
        ),
    )


def _first_positions(context: SweepContext, cells: Sequence[Cell], B: int, P: int) -> list[Tensor]:
    """Per cell and prompt, the first position it patches (``[batch]`` each), for planning;
    cells with equal positions share one."""
    return _per_cell(
        cells,
        lambda c: _key(c.positions),
        lambda c: first_positions(per_prompt_positions(c.positions, B, P, context.prompts), 1, B),
    )


def _key(*selection: Any) -> Any:
    """A memo key for a selection (positions, heads), or None where one is unhashable (a tensor
    or a list: built afresh each time)."""
    if any(isinstance(part, Tensor) for part in selection):
        return None
    try:
        hash(selection)
    except TypeError:
        return None
    return tuple((type(part), part) for part in selection)


def plan_jobs(
    context: SweepContext,
    component: str,
    cells: Sequence[Cell],
    target: str,
    source: Source,
    *,
    memory_budget: int = DEFAULT_BUDGET,
) -> list[CellsJob]:
    """The cells cut into jobs: sorted by where they start (layer, then first patched
    position), so a runner that skips unchanged work starts each chunk as late as it can, and
    cut at the memory budget and the runner's cap on computed (row, position) pairs."""
    run = context.runs[target]
    B, P = run.tokens.shape
    first_pos = _first_positions(context, cells, B, P)
    order = sorted(range(len(cells)), key=lambda i: (cells[i].layer, int(first_pos[i].min())))
    per_variant = context.runner.bytes_per_variant(context.facts, context.metric, component, B, P)
    size = max(1, min(len(cells), memory_budget // max(per_variant, 1)))
    first_read = context.metric.reads.min(-1).values  # [B]
    # (row, position) pairs a variant computes: from its first patched or read position on
    pairs = [int((P - torch.minimum(f.clamp(max=P - 1), first_read)).sum()) for f in first_pos]
    return [
        CellsJob(component, target, source, tuple(cells[i] for i in idx), tuple(idx))
        for idx in _chunks(order, size, pairs, context.runner.chunk_pairs)
    ]


def run_cells(
    context: SweepContext,
    jobs: Sequence[CellsJob],
    executor: Executor,
    *,
    progress: bool = True,
    desc: str = "sweep",
) -> Float[Tensor, "cell batch"]:
    """The metric per cell and prompt, ``[n_cells, batch]``: ``jobs`` run by ``executor``."""
    results = executor.run(jobs, context, progress=progress, desc=desc)
    n_cells = sum(len(job.cells) for job in jobs)
    out = torch.empty(n_cells, len(context.prompts))
    if len(results) != len(jobs):
        raise HookpatchError(
            f"executor= returned {len(results)} results for {len(jobs)} jobs; an executor must return "
            "one result per job, in the jobs' order."
        )
    for job, values in zip(jobs, results, strict=True):
        out[torch.tensor(job.index, dtype=torch.long)] = values
    return out


def _chunks(order: list[int], size: int, weight: Sequence[int], cap: int | None) -> list[list[int]]:
    """``order`` cut into consecutive pieces of at most ``size`` items and (unless one item
    alone exceeds it) at most ``cap`` total ``weight``."""
    chunks: list[list[int]] = []
    total = 0
    for i in order:
        if chunks and len(chunks[-1]) < size and (cap is None or total + weight[i] <= cap):
            chunks[-1].append(i)
            total += weight[i]
        else:
            chunks.append([i])
            total = weight[i]
    return chunks

