"""Integrated gradients as picklable jobs, one per site, so an executor can spread them.

Integrated gradients interpolates one hook point (a *site*) at a time: for each site,
``ceil(steps / steps_per_pass)`` forward + backward passes, independent of every other site.
A :class:`SiteJob` is one site's passes; it returns the sum of the metric's gradient over the
site's interpolation points. An executor runs the jobs against an :class:`IGContext` (the
model, the base tokens, each site's difference ``target − base`` and the metric), which a
worker rebuilds from the context's :class:`IGRecipe` (prompts, metric, sites, direction, the
hook flags that were on) with two no-grad forwards of its own. The job list and each job's
arithmetic are the same wherever they run, so results are too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hookpatch.metrics._base import Metric
from hookpatch.model._facts import COMPONENTS, hook_flags
from hookpatch.tasks._promptset import PromptSet


def flagged_components(model: Any) -> tuple[str, ...]:
    """The components whose hook flags are on for ``model`` now: a worker turns the same on."""
    return tuple(c.name for c in COMPONENTS.values() if c.flag and getattr(model.cfg, c.flag, False))


@dataclass(frozen=True)
class IGContext:
    """What a worker owns to run :class:`SiteJob` s: the model, the base run's tokens (the run
    whose gradient is taken), each site's ``target − base`` difference and the metric."""

    model: Any
    tokens: Int[Tensor, "batch pos"]
    diffs: Mapping[str, Tensor]
    metric: Metric
    flags: tuple[str, ...] = ()
    recipe: IGRecipe | None = None


@dataclass(frozen=True)
class IGRecipe:
    """How to build an :class:`IGContext` from a model: plain, picklable data.

    Attributes:
        prompts, metric: the prompt set and the metric.
        names: the sites' hook names.
        direction: ``"denoising"`` (the gradient on the corrupted run) or ``"noising"``.
        flags: components whose hook flags must be on (:func:`flagged_components`).
    """

    prompts: PromptSet
    metric: Metric
    names: tuple[str, ...]
    direction: str
    flags: tuple[str, ...] = ()

    def build(self, model: Any) -> IGContext:
        """The context on ``model``: both runs captured at every site (two no-grad forwards)."""
        from hookpatch.attribution._sites import capture

        base_tokens, target_tokens = base_and_target(self.prompts, self.direction)
        with hook_flags(model, self.flags):
            _, target = capture(model, target_tokens, list(self.names), self.metric)
            _, base = capture(model, base_tokens, list(self.names), self.metric)
        diffs = {n: target[n] - base[n] for n in self.names}
        return IGContext(model, base_tokens, diffs, self.metric, self.flags, self)


def base_and_target(prompts: PromptSet, direction: str) -> tuple[Tensor, Tensor]:
    """``(base tokens, target tokens)``: the run the gradient is taken on, and the other."""
    if direction == "denoising":
        return prompts.corrupted_tokens, prompts.clean_tokens
    return prompts.clean_tokens, prompts.corrupted_tokens


@dataclass(frozen=True)
class SiteJob:
    """One site's integrated-gradients passes: the points ``alpha = k / steps``, ``k = 0..steps-1``,
    ``steps_per_pass`` of them stacked per forward."""

    name: str
    steps: int
    steps_per_pass: int

    def run(self, context: IGContext) -> Float[Tensor, "batch ..."]:
        """The sum of the gradient at the site over its points (float32 where the model is; on the CPU)."""
        from hookpatch.attribution._sites import _interpolated_gradient

        diff = context.diffs[self.name]
        alphas = torch.arange(self.steps, dtype=torch.float32) / self.steps
        batch = int(context.tokens.shape[0])
        total: Tensor | None = None
        with hook_flags(context.model, context.flags):
            for chunk in alphas.split(self.steps_per_pass):
                grad = _interpolated_gradient(context.model, context.tokens, self.name, diff,
                                              chunk.to(diff.device), context.metric, batch)
                total = grad if total is None else total + grad
        assert total is not None
        return total.cpu()


def site_jobs(names: Sequence[str], steps: int, steps_per_pass: int) -> list[SiteJob]:
    """One job per site, in ``names`` order."""
    return [SiteJob(name, steps, steps_per_pass) for name in names]
