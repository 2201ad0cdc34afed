"""Attribution patching and integrated gradients on the grids of activation patching.

Attribution patching (AtP) replaces each activation patch by its first-order estimate:
for the denoising direction, ``grad_corrupted(metric) · (a_clean − a_corrupted)``, the
change in the metric if the clean activation were patched into the corrupted run;
``direction="noising"`` uses ``grad_clean(metric) · (a_corrupted − a_clean)``. The gradient
is that of patching itself: taken at the activation as a patch writes it, in place, so
every reader sees it (at ``resid_mid`` the residual skip as well as the MLP branch). The
element-wise products are summed over the entries a grid cell patches (``d_model``,
``d_head``, heads at a position, all positions, key positions of a pattern row), so every
grid of :func:`hookpatch.sweeps.patch_sweep` is available: ``("layer", "pos")``,
``("layer", "head")``, ``("layer", "pos", "head")`` and ``("layer",)``.

Values are *effects*: the estimated change ``patched − unpatched`` of the metric, per prompt
(activation patching's ``SweepResult`` holds the patched metric itself; subtract its
``corrupted`` (denoising) or ``clean`` (noising) baseline to compare, as
:func:`hookpatch.attribution._compare` does).

Integrated gradients (``steps=N > 1``), the scheme: for each component site (one layer's
hook) separately, the site's activation is moved (in place, as a patch) along the
straight line ``a(alpha) = a_base + alpha · (a_target − a_base)`` while every other
activation is recomputed by the model from there (downstream sites stay free, upstream ones are the base
run's); the metric's gradient at the site is averaged over the left Riemann points
``alpha = k/N, k = 0..N-1`` and multiplied by ``a_target − a_base``. This is IG of the
function ``f(a) = metric(run with this site set to a)``, so by completeness the sum of a
layer's attributions over all its entries converges to the activation-patching effect of
patching the whole site (all positions and heads), and ``steps=1`` (``alpha = 0`` only) is
exactly plain attribution patching. This is the per-site interpolation of Marks et al.
(sparse feature circuits), not EAP-IG's interpolation of the input embeddings.

Cost: AtP is one no-grad forward plus one forward + backward for all layers together;
IG is ``n_layers × ceil(N / steps_per_pass)`` forward + backward passes of
``steps_per_pass × batch`` rows. Prompts are batched; prompts do not interact, so the
gradient of ``metric(logits).sum()`` is each prompt's own gradient.

Grouped-query attention: ``k``, ``v``, ``k_input`` and ``v_input`` are attributed per KV
head (labels ``"KV0"``), ``q``/``z``/``pattern``/``result``/``q_input`` per query head
(``"H3"``); ``provenance.grid.kv_head_feeds`` lists the query heads each KV head feeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hookpatch._checks import IntLike, IntsLike, as_metric, metric_name, require_finite_result
from hookpatch._provenance import Provenance, grid_facts, run_facts
from hookpatch.attribution._sites import MetricLike, check_options, n_passes, site_attributions
from hookpatch.model._facts import component_info, hook_flags
from hookpatch.model._loading import require_eval
from hookpatch.results import SweepResult
from hookpatch.sweeps._grid import Grid
from hookpatch.tasks._promptset import PromptSet


def attribution_sweep(
    model: Any,
    prompts: PromptSet,
    metric: MetricLike,
    component: str = "resid_pre",
    *,
    by: Sequence[str] = ("layer", "pos"),
    direction: str = "denoising",
    steps: IntLike = 1,
    layers: IntsLike = None,
    positions: Any = None,
    heads: IntsLike = None,
    steps_per_pass: IntLike = 8,
    progress: bool = True,
    executor: Any = None,
) -> SweepResult:
    """Attribution patching (``steps=1``) or integrated gradients of ``component`` over a grid.

    Example:
        >>> atp = attribution_sweep(model, prompts, LogitDiff(prompts), "resid_pre")      # layer × pos
        >>> heads = attribution_sweep(model, prompts, metric, "z", by=("layer", "head"))
        >>> ig = attribution_sweep(model, prompts, metric, "z", by=("layer", "head"), steps=32)

    Args:
        model: a TransformerBridge in eval mode.
        prompts: the clean/corrupted prompt set.
        metric: a differentiable :class:`Metric` (or callable ``logits[..., batch, pos, vocab]
            → [..., batch]``).
        component: resid_pre/mid/post, attn_out, mlp_out, z, q, k, v, pattern, result,
            q_input, k_input, v_input or mlp_in, as in :func:`hookpatch.sweeps.patch_sweep`
            (the flags of the last five are turned on for the call and restored).
        by: the grid axes, as in :func:`hookpatch.sweeps.patch_sweep`.
        direction: ``"denoising"`` (gradient on the corrupted run × (clean − corrupted)) or
            ``"noising"`` (gradient on the clean run × (corrupted − clean)).
        steps: 1 for attribution patching; N > 1 for integrated gradients (module docstring).
        layers, heads: restrict the grid (default: all).
        positions: the pos axis: column indices or names of the prompt set ("S2"). Default:
            every column; for padded prompts of different lengths, the prompt set's named
            positions (IOI: IO, S1, S1+1, S2, END), since a column may be padding in some prompt.
        steps_per_pass: interpolation points stacked into one forward (IG; lower saves memory).
        progress: progress bar over the IG sites.
        executor: runs integrated gradients' jobs, one per layer's site (default: in this
            process; :class:`~hookpatch.runners.RayExecutor` spreads them over workers).
            Attribution patching (``steps=1``) is one pass and always runs here.

    Returns:
        A :class:`SweepResult` whose ``values[*grid, batch]`` are estimated metric changes
        (patched − unpatched); its ``provenance`` has kind ``"attribution_estimate"``, method,
        steps, direction, component, metric and grid.
    """
    steps, steps_per_pass = check_options(direction, steps, steps_per_pass)
    require_eval(model)
    metric = as_metric(metric, prompts)
    grid = Grid.build(model, prompts, component, by, layers, positions, heads)
    columns = grid.columns(prompts) if "pos" in grid.by else None
    hook = component_info(component).hook_name
    with hook_flags(model, [component]):  # e.g. hook_result fires only with use_attn_result
        sites = site_attributions(
            model, prompts, metric, [hook(layer) for layer in grid.layers], direction=direction,
            steps=steps, steps_per_pass=steps_per_pass, progress=progress, executor=executor,
        )
    values = torch.stack([_reduce(grid, columns, sites.attributions[hook(layer)].cpu()) for layer in grid.layers])
    base, target = sites.base, sites.target
    clean, corrupted = (target, base) if direction == "denoising" else (base, target)
    provenance = Provenance(
        kind="attribution_estimate",
        method="attribution" if steps == 1 else "integrated_gradients",
        component=component,
        direction=direction,
        steps=steps,
        passes=n_passes(len(grid.layers), steps, steps_per_pass),
        runner="bridge",
        grid=grid_facts(grid),
        **run_facts(model, prompts, metric),
    )
    result = SweepResult(
        values=values.reshape(*grid.shape, len(prompts)),
        axes=grid.by,
        labels=grid.labels,
        clean=clean,
        corrupted=corrupted,
        provenance=provenance,
    )
    require_finite_result(result, f"the attribution of {metric_name(metric)} (its gradient)")
    return result


def integrated_gradients_sweep(
    model: Any,
    prompts: PromptSet,
    metric: MetricLike,
    component: str = "resid_pre",
    *,
    steps: int = 16,
    **kwargs: Any,
) -> SweepResult:
    """Integrated gradients over a grid: :func:`attribution_sweep` with ``steps`` (default 16).

    Example:
        >>> ig = integrated_gradients_sweep(model, prompts, LogitDiff(prompts), "z", by=("layer", "head"))
    """
    return attribution_sweep(model, prompts, metric, component, steps=steps, **kwargs)


def _reduce(grid: Grid, columns: Tensor | None, attribution: Float[Tensor, "batch ..."]) -> Float[Tensor, "..."]:
    """One site's element-wise attribution summed onto the grid cells: ``[*cells, batch]``."""
    per_pos = component_info(grid.component).per_position(attribution)  # [batch, pos] or [batch, pos, head]
    if grid.heads is not None:
        per_pos = per_pos[:, :, list(grid.heads)]
    elif per_pos.ndim == 3:
        per_pos = per_pos.sum(-1)
    if columns is None:
        out = per_pos.sum(1)  # [batch] or [batch, head]
    else:
        index = columns.T.to(per_pos.device)  # [batch, n_pos]
        if per_pos.ndim == 3:
            index = index.unsqueeze(-1).expand(-1, -1, per_pos.shape[-1])
        out = per_pos.gather(1, index)  # [batch, n_pos(, head)]
    return out.movedim(0, -1)
