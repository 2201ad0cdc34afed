"""The hook factory: patch or ablate any component at chosen positions and heads.

Each factory returns ``(hook_name, hook)`` for ``model.run_with_hooks(fwd_hooks=[...])``;
``hook`` is the module-level :func:`replace_where` bound with ``functools.partial`` to plain
tensors and ints, so it pickles and never holds a model or a cache. Hooks write into the
activation in place and return it, as TransformerLens' own patching does: a
TransformerBridge propagates a *returned* new ``hook_resid_mid`` to only one of its two
readers (the MLP input or the residual), while an in-place edit reaches both. The one
exception is ``mlp_in``, whose hook receives ``resid_mid`` itself: there a patch returns a
new tensor so that only the MLP branch sees it (the table's ``in_place``). The source
tensors and any cache are never modified.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hookpatch._checks import IntLike, as_int
from hookpatch.errors import HookpatchError
from hookpatch.hooks._selection import Heads, Positions, activation_mask, per_prompt_positions
from hookpatch.model._facts import component_info, edits_in_place, model_facts
from hookpatch.tasks._promptset import PromptSet

ABLATIONS = ("zero", "mean", "resample")


def replace_where(
    activation: Float[Tensor, "..."],
    hook: Any,
    *,
    mask: Bool[Tensor, "..."],
    source: Float[Tensor, "..."],
    pos_dim: int,
    in_place: bool | None = None,
) -> Float[Tensor, "..."]:
    """``activation`` with the entries selected by ``mask`` taken from ``source``.

    ``mask`` and ``source`` cover all positions of the activation (or broadcast over them).
    The edit is made in place, or as a new tensor where the component table says a hook's
    tensor is shared with other readers (``in_place=None``: as the table says for
    ``hook.name``).
    """
    if source.ndim and source.shape[pos_dim] != activation.shape[pos_dim] and source.shape[pos_dim] > 1:
        raise HookpatchError(
            f"{hook.name}: the source activation has {source.shape[pos_dim]} positions but the run "
            f"has {activation.shape[pos_dim]}; patch between prompts of the same length."
        )
    patched = torch.where(mask.to(activation.device), source.to(activation.device, activation.dtype), activation)
    if in_place is None:
        in_place = edits_in_place(getattr(hook, "name", ""))
    return activation.copy_(patched) if in_place else patched


def patch_hook(
    model: Any,
    component: str,
    layer: IntLike,
    source: Float[Tensor, "batch ..."],
    *,
    positions: Positions = None,
    heads: Heads = None,
    prompts: PromptSet | None = None,
) -> tuple[str, partial]:
    """A hook writing ``source`` (e.g. ``clean_cache[hook_name]``) into the run at the selection.

    ``source`` is one activation tensor with ``component``'s axes (``[batch, pos, d_model]``,
    ``[batch, pos, head, d_head]``, ...); its feature axes are checked against the model here,
    when the hook is made, not when it fires. A flag-gated component (``result``,
    ``q_input``/``k_input``/``v_input``, ``mlp_in``) fires only inside
    :func:`hookpatch.model.hook_flags` (both for caching the source and for the patched run).

    Example:
        >>> name, hook = patch_hook(model, "z", 9, clean_cache["blocks.9.attn.hook_z"], heads=7,
        ...                         positions="END", prompts=prompts)
        >>> model.run_with_hooks(prompts.corrupted_tokens, fwd_hooks=[(name, hook)])
    """
    facts = model_facts(model)
    layer = facts.check_layer(layer)
    info = component_info(component)
    facts.check_activation(component, source, "source")
    d = info.pos_dim
    pos_mask = per_prompt_positions(positions, source.shape[0], source.shape[d], prompts)
    mask = activation_mask(facts, component, pos_mask, heads)
    hook = partial(replace_where, mask=mask, source=source.detach(), pos_dim=d, in_place=info.in_place)
    return info.hook_name(layer), hook


def ablation_source(
    reference: Float[Tensor, "batch ..."], how: str, *, seed: IntLike = 0
) -> Float[Tensor, "..."]:
    """What an ablation writes: zeros, the mean over the reference prompts, or other prompts'
    activations (a seeded derangement, so no prompt gets its own activation back)."""
    if how in ("mean", "resample") and reference.shape[0] == 0:
        raise HookpatchError(
            f"{how} ablation needs reference activations of at least one prompt; reference= has "
            "none (an empty batch). Pass the cached activation of a non-empty prompt set."
        )
    if how == "zero":
        return torch.zeros((), dtype=reference.dtype)
    if how == "mean":
        return reference.detach().mean(0, keepdim=True)
    if how == "resample":
        n = reference.shape[0]
        if n < 2:
            raise HookpatchError("resample ablation needs at least two prompts to draw from.")
        g = torch.Generator().manual_seed(as_int(seed, "seed"))
        perm = torch.randperm(n, generator=g)
        fixed = perm == torch.arange(n)
        perm[fixed] = perm[fixed].roll(1) if int(fixed.sum()) > 1 else (perm[fixed] + 1) % n
        return reference.detach()[perm.to(reference.device)]
    raise HookpatchError(f"unknown ablation {how!r}; expected one of {ABLATIONS}.")


def ablate_hook(
    model: Any,
    component: str,
    layer: IntLike,
    reference: Float[Tensor, "batch ..."],
    *,
    how: str = "zero",
    positions: Positions = None,
    heads: Heads = None,
    prompts: PromptSet | None = None,
    seed: IntLike = 0,
) -> tuple[str, partial]:
    """A hook ablating the selection: ``"zero"``, ``"mean"`` over ``reference`` (the
    activation on a reference set, e.g. ``cache[hook_name]``) or ``"resample"`` from it.

    Example:
        >>> name, hook = ablate_hook(model, "z", 3, cache["blocks.3.attn.hook_z"], how="mean", heads=0)
    """
    facts = model_facts(model)
    layer = facts.check_layer(layer)
    info = component_info(component)
    facts.check_activation(component, reference, "reference")
    d = info.pos_dim
    source = ablation_source(reference, how, seed=seed)
    pos_mask = per_prompt_positions(positions, reference.shape[0], reference.shape[d], prompts)
    mask = activation_mask(facts, component, pos_mask, heads)
    return info.hook_name(layer), partial(replace_where, mask=mask, source=source, pos_dim=d, in_place=info.in_place)
