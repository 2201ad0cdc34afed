"""The final LayerNorm as DLA and the logit lens apply it, in both conventions.

``"final_scale"``: divide by the scale the final LayerNorm used on the real run (cached as
``ln_final.hook_scale``), after centering for LayerNorm. This is linear, so per-component
parts sum to the metric; it is the DLA convention and the logit lens of TransformerLens' GPT-2
small pronoun case study. ``"renormalized"``: normalize each intermediate residual with its
own scale, the "true" logit lens (the final scale belongs to the final residual stream, whose
norm usually differs greatly from an early layer's, so it misreads early layers).

On a model split over devices, :func:`gathered` first moves a cache's activations to the
unembedding's device, where the readouts stack layers and unembed.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hookpatch.errors import HookpatchError
from hookpatch.hooks._devices import is_split, to_device, unembed_device
from hookpatch.model._facts import hook_name

CONVENTIONS = ("final_scale", "renormalized")


def gathered(model: Any, cache: Any, *, head_results: bool = False) -> Any:
    """``cache`` with every activation on the unembedding's device when ``model`` is split over
    devices (stacking layers needs one device); ``cache`` untouched on a single-device model.

    ``head_results``: compute each head's output (``attn.hook_result``) first, where each
    layer's ``z`` and ``W_O`` still share a device.
    """
    if not is_split(model):
        return cache
    if head_results:
        cache.compute_head_results()
    return cache.to(unembed_device(model))


def at_end(stack: Float[Tensor, "n batch pos d_model"], end: Int[Tensor, " batch"]) -> Float[Tensor, "n batch d_model"]:
    """Each prompt's residual vectors at its own END position."""
    rows = torch.arange(stack.shape[1], device=stack.device)
    return stack[:, rows, end.to(stack.device)]


def center(model: Any, x: Tensor) -> Tensor:
    """LayerNorm's centering (RMSNorm does none)."""
    if getattr(model.cfg, "normalization_type", None) in ("LN", "LNPre"):
        return x - x.mean(-1, keepdim=True)
    return x


def apply_final_ln(
    model: Any,
    cache: Any,
    x: Float[Tensor, "n batch d_model"],
    end: Int[Tensor, " batch"],
    convention: str,
) -> Float[Tensor, "n batch d_model"]:
    """``x`` (vectors at each prompt's END) through the final LayerNorm in ``convention``."""
    if convention not in CONVENTIONS:
        raise HookpatchError(f"unknown convention {convention!r}; expected one of {CONVENTIONS}.")
    x = center(model, x)
    if convention == "final_scale":
        rows = torch.arange(x.shape[1], device=x.device)
        scale = cache[hook_name("ln_final_scale")][rows, end.to(x.device)]  # [batch, 1]
        return x / scale
    eps = float(getattr(model.cfg, "eps", 1e-5))
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def unembed(model: Any, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_vocab"]:
    """Logits from normalized residual vectors (``W_U``, ``b_U``), on the unembedding's device."""
    W_U = model.W_U
    return to_device(x, W_U.device) @ W_U + model.b_U
