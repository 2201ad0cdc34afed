"""Activation patching and ablation sweeps over layer × position × head.

Thin specialisations of :func:`hookpatch.sweeps._engine.run_cells`:

- :func:`patch_sweep` — ``direction="denoising"`` patches clean activations into the
  corrupted run (the default: it finds what suffices to restore the behaviour);
  ``"noising"`` patches corrupted into clean (what is necessary for it);
- :func:`ablation_sweep` — zero, mean or resample ablation of the clean run.

Grids (``by``): ``("layer", "pos")`` for the residual stream, attn_out, mlp_out, mlp_in and
heads as a block; ``("layer", "head")`` for heads at all positions; ``("layer", "pos",
"head")`` for heads by position. Heads are query heads for z/q/pattern/result/q_input and KV
heads for k/v/k_input/v_input (the component table in :mod:`hookpatch.model` says which).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from hookpatch._checks import (
    IntLike,
    IntsLike,
    as_int,
    as_metric,
    metric_name,
    require_finite_result,
    require_finite_runs,
    require_metric_values,
)
from hookpatch._provenance import Provenance, grid_facts, run_facts
from hookpatch.errors import HookpatchError
from hookpatch.hooks._factory import ABLATIONS
from hookpatch.metrics._base import Metric
from hookpatch.model._loading import require_eval
from hookpatch.results import SweepResult
from hookpatch.runners import Runner, require_executor
from hookpatch.sweeps._engine import DEFAULT_BUDGET, Cell, Source, SweepContext, SweepRecipe, plan_jobs, run_cells
from hookpatch.sweeps._grid import Grid
from hookpatch.tasks._promptset import PromptSet

DIRECTIONS = ("denoising", "noising")


def patch_sweep(
    model: Any,
    prompts: PromptSet,
    metric: Metric | Callable[[Tensor], Tensor],
    component: str = "resid_pre",
    *,
    by: Sequence[str] = ("layer", "pos"),
    direction: str = "denoising",
    layers: IntsLike = None,
    positions: Any = None,
    heads: IntsLike = None,
    memory_budget: int = DEFAULT_BUDGET,
    fast: bool | None = None,
    progress: bool = True,
    executor: Any = None,  # an Executor; checked by require_executor
) -> SweepResult:
    """Activation patching of ``component`` over a grid, one result per cell and prompt.

    Example:
        >>> res = patch_sweep(model, prompts, LogitDiff(prompts), "resid_pre")        # layer × pos
        >>> res = patch_sweep(model, prompts, metric, "z", by=("layer", "head"))       # heads
        >>> res = patch_sweep(model, prompts, metric, "z", by=("layer", "pos", "head"))

    Args:
        model: a TransformerBridge in eval mode.
        prompts: the clean/corrupted prompt set.
        metric: a :class:`Metric` (or a callable ``logits[..., batch, pos, vocab] → [..., batch]``).
        component: resid_pre/mid/post, attn_out, mlp_out, z, q, k, v, pattern, or one whose
            hook needs a config flag, which the sweep turns on and restores: result (each
            head's output before the sum), q_input, k_input, v_input (each head's copy of the
            residual stream; per KV head for k/v under grouped-query attention), mlp_in (the
            MLP branch's input; the residual skip keeps the unpatched value).
        by: the grid axes: ``("layer", "pos")``, ``("layer", "head")``, ``("layer", "pos",
            "head")`` or ``("layer",)``.
        direction: ``"denoising"`` (clean → corrupted run) or ``"noising"`` (corrupted → clean).
        layers, heads: restrict the grid (default: all).
        positions: the pos axis: column indices or names of the prompt set ("S2"). Default:
            every column; for padded prompts of different lengths, the prompt set's named
            positions (IOI: IO, S1, S1+1, S2, END), since a column may be padding in some prompt.
        memory_budget: bytes one stacked forward may use; decides the chunk size only.
        fast: None (default) uses hookpatch's direct block runner where the model family has
            one and it matches the bridge on a probe (else the bridge's hooks, with a warning
            if the probe failed); False always the bridge's hooks; True the fast runner or an
            error.
        progress: show a progress bar over jobs (stacked chunks of cells).
        executor: runs the sweep's jobs (default: :class:`hookpatch.runners.InProcessExecutor`,
            in order, in this process).

    Returns:
        A :class:`SweepResult` with ``values[*grid, batch]``.
    """
    if direction not in DIRECTIONS:
        raise HookpatchError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}.")
    ctx = _Context.build(model, prompts, metric, component, by, layers, positions, heads, fast, memory_budget)
    target, source = ("corrupted", "clean") if direction == "denoising" else ("clean", "corrupted")
    return ctx.sweep(target, Source(source), memory_budget, progress, executor,
                     {"direction": direction, "method": "patch"})


def ablation_sweep(
    model: Any,
    prompts: PromptSet,
    metric: Metric | Callable[[Tensor], Tensor],
    component: str = "z",
    *,
    how: str = "zero",
    by: Sequence[str] = ("layer", "head"),
    layers: IntsLike = None,
    positions: Any = None,
    heads: IntsLike = None,
    seed: IntLike = 0,
    memory_budget: int = DEFAULT_BUDGET,
    fast: bool | None = None,
    progress: bool = True,
    executor: Any = None,  # an Executor; checked by require_executor
) -> SweepResult:
    """Ablate ``component`` in the clean run over a grid: ``how`` is zero, mean or resample.

    Mean ablation writes the mean over the prompt set's clean runs; resample writes another
    prompt's activation (a seeded derangement). Example:

        >>> res = ablation_sweep(model, prompts, AnswerLoss(prompts), "z", how="mean")   # layer × head

    Args:
        how: ``"zero"``, ``"mean"`` or ``"resample"``.
        seed: the resample derangement's seed (recorded for every ablation).
        component, by, layers, positions, heads, memory_budget, fast, progress, executor: as
            in :func:`patch_sweep` (every component there can be ablated).

    Returns:
        A :class:`SweepResult` with ``values[*grid, batch]``: the metric after each ablation;
        its effects are read against the clean run.
    """
    if how not in ABLATIONS:
        raise HookpatchError(f"unknown ablation {how!r}; expected one of {ABLATIONS}.")
    seed = as_int(seed, "seed")
    ctx = _Context.build(model, prompts, metric, component, by, layers, positions, heads, fast, memory_budget)
    return ctx.sweep("clean", Source("clean", how, seed), memory_budget, progress, executor,
                     {"method": "ablation", "ablation": how, "seed": seed})


@dataclass(frozen=True)
class _Context:
    """Checked inputs of a sweep: its grid and cells, the metric (wrapped once into a
    :class:`Metric`), the runner, the two cached runs and the metric on each (the baselines)."""

    model: Any
    prompts: PromptSet
    component: str
    grid: Grid
    cells: list[Cell]
    metric: Metric
    runner: Runner
    work: SweepContext  # what the jobs run against
    clean: Tensor  # [batch]
    corrupted: Tensor  # [batch]

    @classmethod
    def build(cls, model, prompts, metric, component, by, layers, positions, heads, fast, memory_budget) -> _Context:
        require_eval(model)
        as_int(memory_budget, "memory_budget", minimum=1, hint=" (bytes one stacked forward may use, e.g. 2**30)")
        metric = as_metric(metric, prompts)
        grid = Grid.build(model, prompts, component, by, layers, positions, heads)
        cells = [Cell(layer, pos, head) for layer, pos, head in grid.cells()]
        B = len(prompts)
        work = SweepRecipe(prompts, metric, component, tuple(grid.layers), fast).build(model)
        runner = work.runner
        clean, corrupted = work.runs["clean"].values, work.runs["corrupted"].values
        require_finite_runs(metric, {"clean": require_metric_values(clean, (B,)),
                                     "corrupted": require_metric_values(corrupted, (B,))})
        return cls(
            model=model, prompts=prompts, component=component, grid=grid, cells=cells, metric=metric,
            runner=runner, work=work,
            clean=clean.detach().float().cpu(), corrupted=corrupted.detach().float().cpu(),
        )

    def sweep(
        self, target: str, source: Source, memory_budget: int, progress: bool, executor: Any,
        how: dict[str, Any],
    ) -> SweepResult:
        """Patch every cell's ``source`` into the cached run ``target``; ``how`` holds the
        provenance fields of the intervention (method, direction or ablation and seed)."""
        metric = self.metric
        executor = require_executor(executor)
        provenance = Provenance(
            kind="patched_metric", component=self.component, runner=self.runner.name,
            grid=grid_facts(self.grid), **run_facts(self.model, self.prompts, metric), **how,
        )
        jobs = plan_jobs(self.work, self.component, self.cells, target, source, memory_budget=memory_budget)
        desc = f"{provenance.method_label} {self.component}"
        values = run_cells(self.work, jobs, executor, progress=progress, desc=desc)
        result = SweepResult(
            values=values.reshape(*self.grid.shape, len(self.prompts)),
            axes=self.grid.by,
            labels=self.grid.labels,
            clean=self.clean,
            corrupted=self.corrupted,
            provenance=provenance,
        )
        done = "patching" if provenance.method == "patch" else provenance.method_label
        require_finite_result(result, f"the metric {metric_name(metric)} after {done}")
        return result
