"""A model as data for the fast block runner: what each block computes, and its live weights.

A variant module (``_gpt2``, ``_llama``, ``_qwen3``, ``_gemma2``) reads a bridge into a
:class:`ModelWeights`: which norms and where, which positional scheme (and rotary table per
layer), q/k norms or not, soft caps, the attention window of each layer, the MLP kind, and
the weights themselves. The block runner reads only this description; it never asks which
architecture it runs. Weights are detached views in ``nn.Linear`` layout (``[out, in]``;
GPT-2's ``Conv1D`` weights are transposed views), so nothing large is copied and later
in-place weight edits stay visible.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from hookpatch.runners.fast._ops import python_layer_norm

Norm = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Proj:
    """A projection ``x @ weight.T + bias`` with ``weight`` in ``[out, in]`` layout."""

    weight: Float[Tensor, "d_out d_in"]
    bias: Float[Tensor, " d_out"] | None


@dataclass(frozen=True)
class LayerWeights:
    """Everything one block computes.

    The block is ``mid = x + post_attn(attn(ln1(x)))`` then ``mid + post_mlp(mlp(ln2(mid)))``;
    the optional parts are None where a variant lacks them (a None post-norm is the identity).
    """

    ln1: Norm
    ln2: Norm
    q: Proj
    k: Proj
    v: Proj
    o: Proj
    mlp_in: Proj
    gate: Proj | None  # None: an ungated MLP, ``act(h W_in) W_out``
    mlp_out: Proj
    act: Callable[[Tensor], Tensor]
    scale: float  # attention score multiplier
    float32_softmax: bool
    q_norm: Norm | None = None  # on ``[..., head, d_head]`` (per head), before rotary
    k_norm: Norm | None = None
    qk_norm_flat: bool = False  # the q/k norms normalize all heads together (OLMo-2)
    post_attn: Norm | None = None  # on the attention output; hook_attn_out is after it
    post_mlp: Norm | None = None  # on the MLP output; hook_mlp_out is after it
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap), before the mask
    window: int | None = None  # a query attends only keys less than ``window`` positions back
    rope_table: str | None = None  # which rotary table (Gemma 3: one per HF layer type)


@dataclass(frozen=True)
class ModelWeights:
    """The whole model for the fast path: blocks, embedding, final norm and unembedding."""

    layers: list[LayerWeights]
    ln_final: Norm
    unembed: Proj
    rotary: bool  # rotary positions (else learned absolute positions added to the embedding)
    embed_scale: float | None = None  # embeddings multiplied by this (in their dtype)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap)


def identity(x: Tensor) -> Tensor:
    """The norm of a block without one at that place (OLMo-2 has no pre-sublayer norms)."""
    return x


def proj(bridge: Any) -> Proj:
    """A LinearBridge's live weight as an ``[out, in]`` view (Conv1D stores ``[in, out]``)."""
    module = bridge.original_component
    weight = module.weight.detach()
    if not isinstance(module, torch.nn.Linear):  # HF Conv1D: [in, out], y = x @ W + b
        weight = weight.T
    bias = getattr(module, "bias", None)
    return Proj(weight, None if bias is None else bias.detach())


def unembed_proj(model: Any) -> Proj:
    """The unembedding as a projection (a zero bias dropped: adding it changes no bits)."""
    unembed = model.unembed.original_component
    bias = getattr(unembed, "bias", None)
    return Proj(unembed.weight.detach(), None if bias is None or _all(bias, 0.0) else bias.detach())


def norm_fn(bridge: Any, cfg: Any) -> Norm:
    """The exact function the bridge's norm computes in compatibility mode.

    The native path (RMSNorm bridges; any norm once ``cfg.layer_norm_folding`` is set) is
    the wrapped HF module itself, with its own eps (and, for Gemma's offset norms, its own
    ``1 + weight``); the python path is centering (LN only), division by
    ``sqrt(mean(x^2) + cfg.eps)``, then the weight (``1 + weight`` for offset norms) and the
    bias when not trivial.
    """
    module = bridge.original_component
    if bridge.use_native_layernorm_autograd or getattr(cfg, "layer_norm_folding", False):
        return module
    weight, bias = module.weight.detach(), getattr(module, "bias", None)
    if bridge.uses_weight_offset:
        weight = 1.0 + weight
    bias = None if bias is None or bridge.uses_rms_norm else bias.detach()
    return functools.partial(
        python_layer_norm,
        eps=float(getattr(cfg, "eps", 1e-5)),
        center=not bridge.uses_rms_norm,
        weight=None if _all(weight, 1.0) else weight,
        bias=None if bias is None or _all(bias, 0.0) else bias,
    )


def _all(t: Tensor, value: float) -> bool:
    """Whether every entry of ``t`` equals ``value`` (a no-op weight or bias to drop); False for
    a tensor on the ``meta`` device, whose values cannot be read (it is kept, and its shape
    still flows through the block)."""
    return t.device.type != "meta" and bool((t == value).all())


def fused(act: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``act``, or torch's one-pass kernel for the same function: HF's ``NewGELUActivation``
    (GPT-2's ``gelu_new``) spends five passes over the ``[rows, d_mlp]`` activation."""
    from transformers.activations import NewGELUActivation

    if type(act) is NewGELUActivation:
        return functools.partial(F.gelu, approximate="tanh")  # equal to float rounding
    return act


def mlp_act(mlp: Any, cfg: Any) -> Callable[[Tensor], Tensor]:
    """The MLP's activation function, as the bridge applies it."""
    gated = hasattr(mlp, "gate")
    if gated and getattr(mlp, "_use_processed_weights", False):
        from transformer_lens.model_bridge.generalized_components import gated_mlp

        return fused(gated_mlp.resolve_activation_fn(cfg))
    hf_mlp = mlp.original_component
    return fused(hf_mlp.act_fn if gated else hf_mlp.act)


def rope_table(
    model: Any, n_pos: int, layer_type: str | None = None
) -> tuple[Float[Tensor, "n_pos d_head"], Float[Tensor, "n_pos d_head"]]:
    """cos and sin for absolute positions ``0..n_pos-1``, from the model's own HF rotary module
    (for ``layer_type``'s table where the module keeps one per HF layer type, as Gemma 3's)."""
    rot = model.rotary_emb.original_component
    w = model.blocks[0].attn.q.original_component.weight
    positions = torch.arange(n_pos, device=w.device).unsqueeze(0)  # [1, n_pos]
    x = torch.empty(0, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        cos, sin = rot(x, positions) if layer_type is None else rot(x, positions, layer_type)
    return cos[0], sin[0]
