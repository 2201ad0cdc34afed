"""Which entries of an activation a hook touches: a boolean mask built from positions/heads.

A selection is data: for component ``c`` the mask has ``c``'s axes with size 1 on the
feature axis, so ``torch.where(mask, source, activation)`` patches exactly the chosen
(prompt, position, head) entries. Positions may be ``None`` (all), an int or a list of
ints (the same columns for every prompt), a name of the prompt set (``"S2"``: one column per
prompt) or a per-prompt tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from hookpatch._checks import IntsLike, as_int_list, as_ints
from hookpatch.errors import HookpatchError
from hookpatch.model._facts import COMPONENTS, ModelFacts, component_info
from hookpatch.tasks._promptset import PromptSet

# Checked when a mask is built (the annotations stay open so that check speaks, see checks.py):
Positions = Any  # None (all), one integer or several, a position name ("S2"), or a [batch] tensor
Heads = IntsLike  # None (all), one integer or several


def per_prompt_positions(
    positions: Positions, n_prompts: int, n_pos: int, prompts: PromptSet | None = None
) -> Bool[Tensor, "batch pos"]:
    """A ``[batch, pos]`` mask of the selected positions, checked against lengths and padding.

    Positions that are the same for every prompt give a ``[1, pos]`` mask, which broadcasts
    over any batch.
    """
    if positions is None:
        return torch.ones(1, n_pos, dtype=torch.bool)
    if isinstance(positions, str):
        if prompts is None:
            raise HookpatchError(f"position name {positions!r} needs the prompt set; pass prompts=.")
        positions = prompts.position(positions).cpu()
    if isinstance(positions, Tensor) and positions.ndim != 0:
        if positions.is_floating_point() or positions.dtype == torch.bool:
            raise HookpatchError(
                f"positions= as a tensor must hold integer columns, one per prompt; got {positions.dtype}."
            )
        if positions.ndim != 1 or positions.shape[0] != n_prompts:
            raise HookpatchError(
                f"per-prompt positions must be a [batch={n_prompts}] tensor; got shape "
                f"{tuple(positions.shape)}."
            )
        cols = positions.cpu().long()
        _check_columns(cols, n_pos, prompts, per_prompt=True)
        mask = torch.zeros(n_prompts, n_pos, dtype=torch.bool)
        mask[torch.arange(n_prompts), cols] = True
        return mask
    cols = torch.tensor(as_ints(positions, "positions"), dtype=torch.long)
    _check_columns(cols, n_pos, prompts, per_prompt=False)
    mask = torch.zeros(1, n_pos, dtype=torch.bool)
    mask[:, cols] = True
    return mask


def _check_columns(cols: Int[Tensor, " n"], n_pos: int, prompts: PromptSet | None, per_prompt: bool) -> None:
    bad = cols[(cols < 0) | (cols >= n_pos)]
    if len(bad):
        raise HookpatchError(
            f"position {int(bad[0])} is out of range: the prompts have {n_pos} positions (0..{n_pos - 1})."
        )
    if prompts is not None:
        lengths = prompts.lengths.cpu()
        limit = lengths if per_prompt else lengths.min().expand(len(cols))
        on_pad = cols >= limit
        if on_pad.any():
            col = int(cols[on_pad][0])
            short = int((lengths <= col).nonzero()[0])
            raise HookpatchError(
                f"position {col} is padding in prompt {short} ({int(lengths[short])} tokens); patch "
                "positions every prompt has, or use a named position such as 'END'."
            )


def head_mask(heads: Heads, n_heads: int, component: str) -> Bool[Tensor, " head"]:
    """A mask over the component's head axis (query heads, or KV heads for k, v, k_input, v_input)."""
    mask = torch.zeros(n_heads, dtype=torch.bool)
    if heads is None:
        mask[:] = True
        return mask
    for h in as_int_list(heads, "heads"):
        if not 0 <= h < n_heads:
            kind = "KV heads" if component_info(component).head_axis == "kv_head" else "heads"
            raise HookpatchError(
                f"head {h!r} is out of range for {component!r}: this model has {n_heads} {kind} "
                f"(0..{n_heads - 1})."
            )
        mask[h] = True
    return mask


def activation_mask(
    facts: ModelFacts,
    component: str,
    pos_mask: Bool[Tensor, "batch pos"],
    heads: Heads = None,
) -> Bool[Tensor, "..."]:
    """The mask for ``component``'s activation: its axes, with the (query) position axis from
    ``pos_mask``, the head axis from ``heads`` and size 1 on every other axis (features, and
    the key positions of a pattern), e.g. ``[batch, pos, head, 1]`` for z."""
    info = component_info(component)
    shape = [1] * len(info.axes)
    shape[0], shape[info.pos_dim] = pos_mask.shape
    mask = pos_mask.reshape(shape)  # batch and positions keep their order, so a reshape places them
    if info.head_dim is None:
        if heads is not None:
            with_heads = sorted(c.name for c in COMPONENTS.values() if c.head_axis is not None)
            raise HookpatchError(
                f"component {component!r} has no heads; drop heads= or patch one with heads ({', '.join(with_heads)})."
            )
        return mask
    hm = head_mask(heads, facts.n_heads_of(component), component)
    head_shape = [1] * len(info.axes)
    head_shape[info.head_dim] = len(hm)
    return mask & hm.reshape(head_shape)


def pos_dim(component: str) -> int:
    """The (query) position axis of ``component``'s activation."""
    return component_info(component).pos_dim
