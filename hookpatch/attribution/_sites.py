"""Gradient × difference at named hook points: the engine under attribution patching.

:func:`site_attributions` works on raw TransformerLens hook names and returns one
element-wise attribution tensor per site, shaped like the hooked activation (batch first).
The grid functions in :mod:`hookpatch.attribution._atp` reduce these onto layer × pos × head.

How gradients are taken on a TransformerBridge: a forward hook adds ``delta``, a zero leaf
tensor that requires grad, to the activation *in place* and returns it — the very edit
activation patching makes (:func:`hookpatch.hooks._factory.replace_where` writes in place
too) — and the backward is driven with :func:`torch.autograd.grad` on the deltas only. So
the gradient with respect to ``delta`` is the derivative of patching the activation: every
reader of the activation sees the edit (at ``hook_resid_mid``, an alias of ``ln2.hook_in``
under compatibility mode, both the MLP branch and the residual skip; a *returned*
``act + delta`` would reach the MLP branch only), and adding zeros changes no value.
This sidesteps the bridge's reshaped hook views (``retain_grad`` on the tensor a hook sees
is inert at ``hook_z``, ``hook_q/k/v``), leaves no ``.grad`` on any parameter and does not
touch their ``requires_grad``. Hooks are added through ``model.hooks``, which removes them
in a ``finally`` block.

Cost: plain attribution (``steps=1``) is one no-grad forward on the target run and one
forward + backward on the base run, whatever the number of sites. With a :class:`Metric`
the forwards stop at the unembedding's input and unembed only the read positions
(:func:`run_metric`), which saves most of the unembedding in both directions. Integrated gradients
with ``steps=N`` add one no-grad base forward, then for every site ``ceil(N /
steps_per_pass)`` forward + backward passes over ``steps_per_pass × batch`` rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hookpatch._checks import IntLike, as_count, as_metric, require_finite_runs, require_metric_values
from hookpatch.attribution._jobs import IGContext, IGRecipe, flagged_components, site_jobs
from hookpatch.errors import HookpatchError
from hookpatch.metrics._base import Metric
from hookpatch.model._facts import edits_in_place, hook_name
from hookpatch.model._loading import require_eval
from hookpatch.runners._executor import require_executor
from hookpatch.tasks._promptset import PromptSet

DIRECTIONS = ("denoising", "noising")
MetricLike = Metric | Callable[[Tensor], Tensor]  # what public calls accept; wrapped by as_metric


@dataclass(frozen=True)
class SiteAttributions:
    """Element-wise attributions per hook point, and the metric on both unpatched runs.

    Attributes:
        attributions: hook name → ``mean gradient × (target − base)`` shaped like the hooked
            activation (``[batch, ...]``, float32); summing it over any set of entries gives
            the linear estimate of patching those entries.
        base, target: ``[batch]`` metric on the run that is patched (corrupted when
            denoising) and on the run the patch comes from (clean when denoising).
        direction: ``"denoising"`` or ``"noising"``.
        steps: interpolation points (1 = plain attribution patching).
    """

    attributions: Mapping[str, Float[Tensor, "batch ..."]]
    base: Float[Tensor, " batch"]
    target: Float[Tensor, " batch"]
    direction: str
    steps: int


def check_options(direction: str, steps: IntLike, steps_per_pass: IntLike) -> tuple[int, int]:
    """``(steps, steps_per_pass)`` as Python ints; raise on an unknown direction or a
    non-positive step count (numpy and torch integers are accepted)."""
    if direction not in DIRECTIONS:
        raise HookpatchError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}.")
    return (
        as_count(steps, "steps", "the number of interpolation points (1 = plain attribution patching, "
                 "16-64 for integrated gradients)"),
        as_count(steps_per_pass, "steps_per_pass", "how many interpolation points one forward stacks "
                 "along the batch (lower it to save memory)"),
    )


def site_attributions(
    model: Any,
    prompts: PromptSet,
    metric: MetricLike,
    hook_names: Sequence[str],
    *,
    direction: str = "denoising",
    steps: IntLike = 1,
    steps_per_pass: IntLike = 8,
    progress: bool = True,
    executor: Any = None,
) -> SiteAttributions:
    """Gradient × (target − base) at each hook point in ``hook_names``, per prompt.

    Example:
        >>> sa = site_attributions(model, prompts, LogitDiff(prompts), ["blocks.1.hook_resid_pre"])
        >>> sa.attributions["blocks.1.hook_resid_pre"].sum(-1)     # [batch, pos]

    Args:
        model: a TransformerBridge in eval mode.
        prompts: the clean/corrupted prompt set.
        metric: a differentiable :class:`Metric` (or callable ``logits → [..., batch]``).
        hook_names: TransformerLens hook names, each firing once per forward.
        direction: ``"denoising"`` (gradient on the corrupted run, times clean − corrupted) or
            ``"noising"`` (gradient on the clean run, times corrupted − clean).
        steps: 1 for attribution patching; N > 1 for integrated gradients with the left
            Riemann points ``alpha = k/N``, ``k = 0..N-1``, interpolating one site at a time
            (see :mod:`hookpatch.attribution._atp`).
        steps_per_pass: interpolation points stacked into one forward (IG only).
        progress: show a progress bar over IG's sites.
        executor: runs IG's per-site jobs (:mod:`hookpatch.attribution._jobs`; default: in
            this process; a :class:`~hookpatch.runners.RayExecutor` spreads the sites over its
            workers). Plain attribution patching is one pass and always runs here.
    """
    steps, steps_per_pass = check_options(direction, steps, steps_per_pass)
    metric = as_metric(metric, prompts)
    require_eval(model)
    if torch.is_inference_mode_enabled():
        raise HookpatchError(
            "attribution needs autograd but torch.inference_mode() is on; call it outside "
            "inference mode (torch.no_grad() is fine: gradients are enabled locally)."
        )
    names = list(dict.fromkeys(hook_names))
    if not names:
        raise HookpatchError("hook_names is empty; pass at least one hook point.")
    for name in names:
        if name not in model.hook_dict:
            raise HookpatchError(
                f"hook point {name!r} does not exist on this model; use a name from "
                "model.hook_dict (e.g. 'blocks.0.hook_resid_pre')."
            )
    base_tokens, target_tokens = (
        (prompts.corrupted_tokens, prompts.clean_tokens)
        if direction == "denoising"
        else (prompts.clean_tokens, prompts.corrupted_tokens)
    )
    base_run, target_run = ("corrupted", "clean") if direction == "denoising" else ("clean", "corrupted")
    target, target_acts = capture(model, target_tokens, names, metric)
    require_finite_runs(metric, {target_run: target})
    try:
        if steps == 1:
            base, base_acts, grads = atp_gradients(model, base_tokens, names, metric)
            require_finite_runs(metric, {base_run: base})
        else:
            base, base_acts = capture(model, base_tokens, names, metric)
            require_finite_runs(metric, {base_run: base})
            diffs = {n: target_acts[n] - base_acts[n] for n in names}
            flags = flagged_components(model)
            context = IGContext(model, base_tokens, diffs, metric, flags,
                                IGRecipe(prompts, metric, tuple(names), direction, flags))
            grads = ig_gradients(context, steps, steps_per_pass, progress, executor)
    finally:
        release_graphs(model)
    attributions = {n: grads[n].float() * (target_acts[n].float() - base_acts[n].float()) for n in names}
    return SiteAttributions(attributions, base.cpu(), target.cpu(), direction, steps)


def release_graphs(model: Any) -> None:
    """Detach every tensor a module kept from the last forward (the bridge's attention keeps
    its last ``_pattern``), so no autograd graph, and the activations it holds, outlives a
    gradient run."""
    for module in model.modules():
        for key, value in list(vars(module).items()):
            if isinstance(value, Tensor) and value.grad_fn is not None:
                setattr(module, key, value.detach())


class _Stopped(Exception):
    """Raised by the hook at the unembedding's input: the forward ends there."""


# Sites at or after the final norm need the unembedding to run.
_LATE_SITES = ("ln_final.", "unembed.", "hook_unembed")


def run_metric(
    model: Any,
    tokens: Int[Tensor, "rows pos"],
    metric: Metric,
    fwd_hooks: Sequence[tuple[str, Callable[..., Any]]],
    sites: Sequence[str],
    lead: tuple[int, ...] = (),
) -> Tensor:
    """The metric of one forward of ``tokens`` under ``fwd_hooks``, ``[*lead, batch]`` (``tokens``
    stacks ``prod(lead)`` copies of the prompts).

    Where the metric reads fewer than all positions (and no site is at or after the final
    norm) the forward stops at the unembedding's input and only the read positions are
    unembedded, a linear metric through its directions, so neither the forward nor the
    backward pays for logits nobody reads. A metric reading every position (a wrapped plain
    callable) gets the model's full logits.
    """
    rows = int(tokens.shape[0])
    batch = rows // math.prod(lead)
    reads = metric.reads  # [batch, n_read]
    if reads.shape[-1] >= tokens.shape[-1] or any(n.startswith(_LATE_SITES) for n in sites):
        with model.hooks(fwd_hooks=list(fwd_hooks)):
            logits = model(tokens)
        return metric(logits.reshape(*lead, batch, *logits.shape[1:]))
    held: dict[str, Tensor] = {}

    def stop(act: Tensor, hook: Any) -> None:
        held["final"] = act
        raise _Stopped

    try:
        with model.hooks(fwd_hooks=[*fwd_hooks, (hook_name("unembed_in"), stop)]):
            model(tokens)
    except _Stopped:
        pass
    if "final" not in held:
        raise HookpatchError(
            f"the model's forward never reached {hook_name('unembed_in')!r}; pass a TransformerBridge "
            "(hookpatch.load_model loads one)."
        )
    final = held["final"]  # [rows, pos, d_model]: the unembedding's input
    read = reads.to(final.device).repeat(rows // batch, 1)  # [rows, n_read]
    final = final[torch.arange(rows, device=final.device).unsqueeze(-1), read]  # [rows, n_read, d_model]
    return metric.from_read_inputs(final.reshape(*lead, batch, *final.shape[1:]), model)


def capture(
    model: Any, tokens: Int[Tensor, "batch pos"], names: Sequence[str], metric: Metric
) -> tuple[Float[Tensor, " batch"], dict[str, Tensor]]:
    """One no-grad forward: the metric and a detached copy of the activation at each hook."""
    acts: dict[str, Tensor] = {}

    def make(name: str) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any) -> None:
            acts[name] = act.detach().clone()

        return hook

    with torch.no_grad():
        values = run_metric(model, tokens, metric, [(n, make(n)) for n in names], names)
    _check_fired(names, acts)
    return _checked(values, (int(tokens.shape[0]),), differentiable=False).detach().float(), acts


def atp_gradients(
    model: Any, tokens: Int[Tensor, "batch pos"], names: Sequence[str], metric: Metric
) -> tuple[Float[Tensor, " batch"], dict[str, Tensor], dict[str, Tensor]]:
    """One forward + backward on ``tokens``: metric, activations and d metric / d activation.

    Every prompt's metric depends on that prompt's activations only, so the gradient of
    ``metric(logits).sum()`` holds each prompt's own gradient in its batch row.
    """
    deltas: dict[str, Tensor] = {}
    acts: dict[str, Tensor] = {}

    def make(name: str) -> Callable[..., Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            delta = _zero_leaf(act, name)
            deltas[name], acts[name] = delta, act.detach().clone()
            return _add_in_place(act, delta, name)

        return hook

    batch = int(tokens.shape[0])
    with torch.enable_grad():
        values = run_metric(model, tokens, metric, [(n, make(n)) for n in names], names)
        values = _checked(values, (batch,), differentiable=True)
        _check_fired(names, deltas)
        grads = torch.autograd.grad(values.sum(), [deltas[n] for n in names], allow_unused=True)
    return values.detach().float(), acts, _named_grads(names, grads)


def ig_gradients(
    context: IGContext, steps: int, steps_per_pass: int, progress: bool, executor: Any = None
) -> dict[str, Tensor]:
    """Mean gradient at each site along ``base + alpha · diff``, one site interpolated at a time.

    ``alpha`` runs over ``k / steps`` for ``k = 0..steps-1``; ``steps_per_pass`` of them are
    stacked along the batch in one forward. With ``steps=1`` the only point is ``alpha=0``,
    the base run itself, so this equals :func:`atp_gradients`. Each site is one
    :class:`~hookpatch.attribution._jobs.SiteJob`, run by ``executor``.
    """
    names = list(context.diffs)
    sums = require_executor(executor).run(site_jobs(names, steps, steps_per_pass), context, progress=progress,
                                          desc="integrated gradients")
    return {n: total.to(context.diffs[n].device) / steps for n, total in zip(names, sums, strict=True)}


def _interpolated_gradient(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    name: str,
    diff: Tensor,
    alphas: Float[Tensor, " step"],
    metric: Metric,
    batch: int,
) -> Tensor:
    """Sum over ``alphas`` of the gradient at ``name`` with its activation shifted by ``alpha · diff``."""
    n = int(alphas.shape[0])
    holder: dict[str, Tensor] = {}

    def hook(act: Tensor, hook: Any) -> Tensor:
        shift = (alphas.view(n, 1, *([1] * (diff.ndim - 1))) * diff.unsqueeze(0).float()).to(act.dtype)
        delta = _zero_leaf(act, name)
        holder[name] = delta
        return _add_in_place(act, shift.reshape(act.shape) + delta, name)

    with torch.enable_grad():
        values = run_metric(model, tokens.repeat(n, 1), metric, [(name, hook)], [name], lead=(n,))
        values = _checked(values, (n, batch), differentiable=True)
        _check_fired([name], holder)
        (grad,) = torch.autograd.grad(values.sum(), [holder[name]], allow_unused=True)
    return _named_grads([name], [grad])[name].reshape(n, *diff.shape).sum(0)


def _add_in_place(act: Tensor, delta: Tensor, name: str) -> Tensor:
    """``act`` with ``delta`` added the way activation patching edits hook ``name``: in place,
    so it reaches every reader of the activation (a returned ``act + delta`` would miss the
    residual skip at ``hook_resid_mid``; see the module docstring), or, where the component
    table says the hooked tensor is shared (``hook_mlp_in`` receives ``resid_mid`` itself),
    as a new tensor that only the branch behind the hook reads."""
    return act.add_(delta) if edits_in_place(name) else act + delta


def _zero_leaf(act: Tensor, name: str) -> Tensor:
    if not isinstance(act, Tensor) or not act.is_floating_point():
        kind = act.dtype if isinstance(act, Tensor) else type(act).__name__
        raise HookpatchError(
            f"the activation at {name!r} is {kind}, not a floating-point tensor, so it is not "
            "differentiable; attribute a float activation (resid_pre, z, pattern, ...)."
        )
    return torch.zeros_like(act, requires_grad=True)


def _checked(values: Any, shape: tuple[int, ...], *, differentiable: bool) -> Tensor:
    values = require_metric_values(values, shape)
    if differentiable and not values.requires_grad:
        raise HookpatchError(
            "the metric is not differentiable: its values carry no gradient (an argmax or accuracy, "
            "a .detach(), or a torch.no_grad() inside it). Attribution patching needs a smooth "
            "metric such as LogitDiff, AnswerLoss or KLToClean; use patch_sweep otherwise."
        )
    return values


def _check_fired(names: Sequence[str], seen: Mapping[str, Tensor]) -> None:
    missing = [n for n in names if n not in seen]
    if missing:
        raise HookpatchError(
            f"hook point {missing[0]!r} did not fire during the forward pass (a gated hook such "
            "as hook_result needs its set_use_* flag); choose a hook point the model runs."
        )


def _named_grads(names: Sequence[str], grads: Sequence[Tensor | None]) -> dict[str, Tensor]:
    out = {}
    for name, grad in zip(names, grads, strict=True):
        if grad is None:
            raise HookpatchError(
                f"no gradient reaches {name!r} from the metric: the metric does not depend "
                "differentiably on that activation. Choose a component upstream of the logits."
            )
        out[name] = grad.detach()
    return out


def n_passes(n_sites: int, steps: int, steps_per_pass: int) -> int:
    """Forward + backward passes an attribution over ``n_sites`` costs."""
    return 1 if steps == 1 else n_sites * math.ceil(steps / steps_per_pass)
