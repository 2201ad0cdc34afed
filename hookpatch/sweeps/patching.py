"""Activation patching and ablation sweeps over layer × position × head.

Thin specialisations of :func:`hookpatch.sweeps.engine.run_cells`:

- :func:`patch_sweep` — ``direction="denoising"`` patches clean activations into the
  corrupted run (the default: it finds what suffices to restore the behaviour);
  ``"noising"`` patches corrupted into clean (what is necessary for it);
- :func:`ablation_sweep` — zero, mean or resample ablation of the clean run.

Grids (``by``): ``("layer", "pos")`` for residual stream, attn_out, mlp_out and heads as a
block; ``("layer", "head")`` for heads at all positions; ``("layer", "pos", "head")`` for
heads by position. Heads are query heads for z/q/pattern and KV heads for k/v.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hookpatch.checks import (
    IntLike,
    IntsLike,
    as_int,
    metric_name,
    require_finite_result,
    require_finite_runs,
    require_metric,
    require_metric_values,
)
from hookpatch.errors import HookpatchError
from hookpatch.hooks.factory import ABLATIONS, ablation_source
from hookpatch.metrics.base import Metric
from hookpatch.model.facts import component_info
from hookpatch.model.loading import require_eval
from hookpatch.results import SweepResult
from hookpatch.sweeps.engine import DEFAULT_BUDGET, Cell, Run, fast_cache_names, run_cells
from hookpatch.sweeps.grid import Grid
from hookpatch.tasks.promptset import PromptSet

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
        component: resid_pre/mid/post, attn_out, mlp_out, z, q, k, v, pattern.
        by: the grid axes, one of :data:`hookpatch.sweeps.grid.GRIDS`.
        direction: ``"denoising"`` (clean → corrupted run) or ``"noising"`` (corrupted → clean).
        layers, heads: restrict the grid (default: all).
        positions: the pos axis: column indices or names of the prompt set ("S2"). Default:
            every column; for padded prompts of different lengths, the prompt set's named
            positions (IOI: IO, S1, S1+1, S2, END), since a column may be padding in some prompt.
        memory_budget: bytes one stacked forward may use; decides the chunk size only.
        fast: use the direct block runner (default: when the model family supports it).
        progress: show a progress bar over chunks.

    Returns:
        A :class:`SweepResult` with ``values[*grid, batch]``.
    """
    if direction not in DIRECTIONS:
        raise HookpatchError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}.")
    ctx = _Context.build(model, prompts, metric, component, by, layers, positions, heads, fast, memory_budget)
    run_tokens, source_cache = (
        (prompts.corrupted_tokens, ctx.clean_cache) if direction == "denoising"
        else (prompts.clean_tokens, ctx.corrupted_cache)
    )
    run_cache = ctx.corrupted_cache if direction == "denoising" else ctx.clean_cache
    hook = component_info(component).hook_name
    run = Run(run_tokens, run_cache, lambda layer: source_cache[hook(layer)])
    return ctx.sweep(run, metric, memory_budget, progress, {"direction": direction, "method": "patch"})


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
) -> SweepResult:
    """Ablate ``component`` in the clean run over a grid: ``how`` is zero, mean or resample.

    Mean ablation writes the mean over the prompt set's clean runs; resample writes another
    prompt's activation (a seeded derangement). Example:

        >>> res = ablation_sweep(model, prompts, AnswerLoss(prompts), "z", how="mean")   # layer × head
    """
    if how not in ABLATIONS:
        raise HookpatchError(f"unknown ablation {how!r}; expected one of {ABLATIONS}.")
    seed = as_int(seed, "seed")
    ctx = _Context.build(model, prompts, metric, component, by, layers, positions, heads, fast, memory_budget)
    hook = component_info(component).hook_name
    run = Run(
        prompts.clean_tokens,
        ctx.clean_cache,
        lambda layer: ablation_source(ctx.clean_cache[hook(layer)], how, seed=seed),
    )
    return ctx.sweep(run, metric, memory_budget, progress, {"method": how, "ablation": how, "seed": seed})


def _fast_runner_class() -> Any:
    """The fast block runner's class, or None where it is not installed."""
    try:
        from hookpatch.sweeps.fastpath import FastForward
    except ImportError:
        return None
    return FastForward


@dataclass(frozen=True)
class _Context:
    """Checked inputs of a sweep: its grid and cells, the runner, the two cached runs and the
    metric on each (the baselines)."""

    model: Any
    prompts: PromptSet
    component: str
    grid: Grid
    cells: list[Cell]
    fast: Any
    clean_cache: Any
    corrupted_cache: Any
    clean: Tensor  # [batch]
    corrupted: Tensor  # [batch]

    @classmethod
    def build(cls, model, prompts, metric, component, by, layers, positions, heads, fast, memory_budget) -> _Context:
        require_eval(model)
        as_int(memory_budget, "memory_budget", minimum=1, hint=" (bytes one stacked forward may use, e.g. 2**30)")
        require_metric(metric, prompts)
        grid = Grid.build(model, prompts, component, by, layers, positions, heads)
        runner = None
        if fast is not False:
            FastForward = _fast_runner_class()
            if FastForward is not None and FastForward.supports(model):
                runner = FastForward(model, resid_mid_edits_residual=True)
            elif fast:
                raise HookpatchError("fast=True but this model's family has no fast path; pass fast=None.")
        cells = [Cell(layer, pos, head) for layer, pos, head in grid.cells()]
        B = len(prompts)
        with torch.no_grad():
            if runner is not None:  # both runs in one forward, caching only what the sweep reads
                names = fast_cache_names(component, grid.layers, grid.facts.n_layers, runner.rotary)
                tokens = torch.cat([prompts.clean_tokens, prompts.corrupted_tokens])
                read = metric.read_positions.repeat(2) if isinstance(metric, Metric) else None
                logits, cache = runner.run_with_cache(tokens, names, read_pos=read)
                clean_cache = {name: act[:B] for name, act in cache.items()}
                corrupted_cache = {name: act[B:] for name, act in cache.items()}
                if isinstance(metric, Metric):
                    clean, corrupted = metric.from_final(logits[:B, 0]), metric.from_final(logits[B:, 0])
                else:
                    clean, corrupted = metric(logits[:B]), metric(logits[B:])
            else:
                clean_logits, clean_cache = model.run_with_cache(prompts.clean_tokens)
                corrupted_logits, corrupted_cache = model.run_with_cache(prompts.corrupted_tokens)
                clean, corrupted = metric(clean_logits), metric(corrupted_logits)
        require_finite_runs(metric, {"clean": require_metric_values(clean, (B,)),
                                     "corrupted": require_metric_values(corrupted, (B,))})
        return cls(
            model=model, prompts=prompts, component=component, grid=grid, cells=cells,
            fast=runner, clean_cache=clean_cache, corrupted_cache=corrupted_cache,
            clean=clean.detach().float().cpu(), corrupted=corrupted.detach().float().cpu(),
        )

    def sweep(self, run: Run, metric, memory_budget: int, progress: bool, info: dict) -> SweepResult:
        values = run_cells(
            self.model, self.grid.facts, self.prompts, self.component, self.cells, run, metric,
            memory_budget=memory_budget, fast=self.fast, progress=progress,
            desc=f"{info['method']} {self.component}",
        )
        describe = metric.describe() if isinstance(metric, Metric) else {"name": getattr(metric, "__name__", "metric")}
        result = SweepResult(
            values=values.reshape(*self.grid.shape, len(self.prompts)),
            axes=self.grid.by,
            labels=self.grid.labels,
            clean=self.clean,
            corrupted=self.corrupted,
            info={
                "component": self.component,
                "metric": describe,
                "task": self.prompts.task,
                "runner": "fast" if self.fast is not None else "bridge",
                **self.grid.info(),
                **info,
            },
        )
        done = "patching" if info["method"] == "patch" else f"{info['method']} ablation"
        require_finite_result(result, f"the metric {metric_name(metric)} after {done}")
        return result
