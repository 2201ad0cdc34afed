"""Where a model's layers live, and moving tensors to them: the device-following helpers.

A model loaded with ``load_model(..., device_map=...)`` or ``n_devices=N`` keeps each block on
its own device (``cuda:0`` for the first blocks, ``cuda:1`` for the next, ...). Every tensor
that meets a layer's activation — a patch mask, a source activation, position or answer
indices, a residual stream that joins at that layer — must then sit on *that layer's* device,
not on one global model device (``cfg.device`` is only where the tokens go in). These helpers
answer "which device is block ``L`` on" from the block's own parameters, and move a tensor
there only when it is elsewhere, so a model on one device pays nothing and computes the very
same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Shaped
from torch import Tensor

from hookpatch.errors import HookpatchError


def parameter_device(module: Any, default: torch.device | None = None) -> torch.device:
    """The device of ``module``'s first parameter (its own or a submodule's).

    A module without parameters (an identity norm) has no device of its own: ``default`` is
    returned, or an error when there is none.
    """
    for param in module.parameters():
        return param.device
    if default is not None:
        return default
    raise HookpatchError(
        f"module= {type(module).__name__} has no parameters, so it has no device; pass default= "
        "(e.g. the device of the module before it)."
    )


def layer_device(model: Any, layer: int) -> torch.device:
    """The device of block ``layer`` (``0..n_layers - 1``), read from its parameters; ``layer ==
    n_layers`` means the final norm and unembedding (:func:`unembed_device`)."""
    n_layers = int(model.cfg.n_layers)
    if not 0 <= int(layer) <= n_layers:
        raise HookpatchError(
            f"layer={layer!r} must be a block index 0..{n_layers - 1} (or {n_layers} for the final "
            "norm and unembedding)."
        )
    if int(layer) == n_layers:
        return unembed_device(model)
    return parameter_device(model.blocks[int(layer)])


def unembed_device(model: Any) -> torch.device:
    """The device of the unembedding (where logits and a metric's residual directions live)."""
    return parameter_device(model.unembed)


def model_devices(model: Any) -> list[torch.device]:
    """Every device holding some of ``model``'s parameters, in the order they first appear."""
    return list(dict.fromkeys(p.device for p in model.parameters()))


def is_split(model: Any) -> bool:
    """Whether ``model``'s parameters span more than one device (a ``device_map`` split)."""
    first = None
    for param in model.parameters():
        if first is None:
            first = param.device
        elif param.device != first:
            return True
    return False


def to_device(t: Shaped[Tensor, "*shape"], device: torch.device | str) -> Shaped[Tensor, "*shape"]:
    """``t`` on ``device``: ``t`` itself when it is there already (no copy, same bits)."""
    device = torch.device(device)
    return t if t.device == device else t.to(device)


def follow(t: Shaped[Tensor, "*shape"], like: Tensor) -> Shaped[Tensor, "*shape"]:
    """``t`` on the device of ``like`` (the activation it meets); ``t`` itself when it is there."""
    return t if t.device == like.device else t.to(like.device)


def cat_on(
    tensors: Sequence[Tensor] | Iterable[Tensor], dim: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """``torch.cat`` of tensors that may live on different devices (activations of blocks on
    different devices), on ``device`` (default: the first tensor's)."""
    tensors = list(tensors)
    if not tensors:
        raise HookpatchError("cat_on: tensors= is empty; pass at least one tensor.")
    target = tensors[0].device if device is None else torch.device(device)
    return torch.cat([to_device(t, target) for t in tensors], dim)
