"""Which bridges the fast path can run, and the weights it runs them on.

:func:`unsupported_reason` whitelists exactly the compatibility-mode component layout of
GPT-2-style (LayerNorm, learned positions, GELU MLP) and Llama/Qwen2-style (RMSNorm, rotary,
gated MLP, grouped-query attention) bridges, and names the first thing it cannot reproduce.
:func:`extract_layers` then collects each block's live weights as detached views in
``nn.Linear`` layout (``[out, in]``; GPT-2's ``Conv1D`` weights are transposed views), so
nothing large is copied and later in-place weight edits stay visible.
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

from hookpatch.sweeps._fast_ops import python_layer_norm

Norm = Callable[[Tensor], Tensor]
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # cos/sin depend on position only


@dataclass(frozen=True)
class Proj:
    """A projection ``x @ weight.T + bias`` with ``weight`` in ``[out, in]`` layout."""

    weight: Float[Tensor, "d_out d_in"]
    bias: Float[Tensor, " d_out"] | None


@dataclass(frozen=True)
class LayerWeights:
    """Everything one block needs; ``gate`` is None for an ungated MLP."""

    ln1: Norm
    ln2: Norm
    q: Proj
    k: Proj
    v: Proj
    o: Proj
    mlp_in: Proj
    gate: Proj | None
    mlp_out: Proj
    act: Callable[[Tensor], Tensor]
    scale: float  # attention score multiplier
    float32_softmax: bool


def _components() -> Any:
    from transformer_lens.model_bridge import generalized_components as gc

    return gc


def _bad_cfg_flag(cfg: Any) -> str | None:
    flags = (
        "use_split_qkv_input", "use_attn_in", "use_attn_result", "use_hook_mlp_in",
        "parallel_attn_mlp", "gated_q_proj", "rmsnorm_uses_offset", "rotary_adjacent_pairs",
        "rotary_interleaved_cos_sin", "qk_norm_after_rope", "attn_only",
    )
    for flag in flags:
        if getattr(cfg, flag, False):
            return f"cfg.{flag} is set"
    cap = getattr(cfg, "output_logits_soft_cap", None)
    if cap is not None and cap > 0:
        return "output logits are soft-capped"
    if getattr(cfg, "attention_dir", "causal") != "causal":
        return "attention is not causal"
    if getattr(cfg, "normalization_type", None) not in ("LN", "LNPre", "RMS", "RMSPre"):
        return f"normalization_type={getattr(cfg, 'normalization_type', None)!r}"
    return None


def _bad_attention(attn: Any, rotary: bool) -> str | None:
    gc = _components()
    expected = gc.PositionEmbeddingsAttentionBridge if rotary else gc.JointQKVAttentionBridge
    if type(attn) is not expected:
        return f"attention is {type(attn).__name__}, expected {expected.__name__}"
    if set(getattr(attn, "submodules", {})) - {"qkv"} != {"q", "k", "v", "o"}:
        return f"attention has submodules {sorted(attn.submodules)} (q/k norms or gates)"
    hf = attn.original_component
    for attr in ("attn_logit_softcapping", "sinks", "key_multiplier", "sliding_window"):
        if getattr(hf, attr, None) is not None:
            return f"attention has {attr}"
    if getattr(attn, "_reorder_and_upcast_attn", False):
        return "attention reorders and upcasts"
    if getattr(attn, "is_cross_attention", False) or not getattr(attn, "is_causal", True):
        return "attention is not causal self-attention"
    hf_cfg = getattr(hf, "config", None)
    if getattr(hf_cfg, "clip_qkv", None) is not None:
        return "attention clips q/k/v"
    rope = getattr(hf_cfg, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
        return "attention uses llama-4 query scaling"
    return None


def _bad_block(block: Any, rotary: bool) -> str | None:
    gc = _components()
    if type(block) is not gc.BlockBridge:
        return f"block is {type(block).__name__}, expected BlockBridge"
    if set(getattr(block, "submodules", {})) != {"ln1", "attn", "ln2", "mlp"}:
        return f"block has submodules {sorted(getattr(block, 'submodules', {}))}"
    for ln in (block.ln1, block.ln2):
        if type(ln) not in (gc.NormalizationBridge, gc.RMSNormalizationBridge):
            return f"norm is {type(ln).__name__}"
        if ln.uses_weight_offset:
            return "norm weights are offsets from 1"
    mlp = block.mlp
    if type(mlp) is gc.GatedMLPBridge:
        if set(mlp.submodules) != {"gate", "in", "out"}:
            return "gated MLP lacks gate/in/out"
    elif type(mlp) is gc.MLPBridge:
        act = getattr(mlp.original_component, "act", None)
        if set(mlp.submodules) != {"in", "out"} or not callable(act):
            return "MLP is not in -> act -> out"
    else:
        return f"MLP is {type(mlp).__name__}"
    return _bad_attention(block.attn, rotary)


def _bad_rotary(model: Any) -> str | None:
    rot = getattr(getattr(model, "rotary_emb", None), "original_component", None)
    if rot is None:
        return "rotary model without a rotary_emb component"
    if getattr(rot, "rope_type", "default") not in ROPE_TYPES or hasattr(rot, "layer_types"):
        return f"rotary type {getattr(rot, 'rope_type', None)!r} depends on more than position"
    cos, _ = rope_table(model, 1)
    if cos.shape[-1] != model.cfg.d_head:
        return f"rotary covers {cos.shape[-1]} of d_head={model.cfg.d_head} dims"
    return None


def unsupported_reason(model: Any) -> str | None:
    """Why the fast path cannot reproduce ``model``'s forward, or None when it can."""
    gc = _components()
    if not (hasattr(model, "blocks") and hasattr(model, "cfg") and hasattr(model, "adapter")):
        return f"{type(model).__name__} is not a TransformerBridge"
    if not getattr(model, "compatibility_mode", False):
        return "compatibility mode is off (call model.enable_compatibility_mode())"
    cfg = model.cfg
    bad = _bad_cfg_flag(cfg)
    if bad:
        return bad
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter

    transform = type(model.adapter).apply_output_logits_transform
    if transform is not ArchitectureAdapter.apply_output_logits_transform:
        return "the adapter transforms output logits"
    pos_type = getattr(cfg, "positional_embedding_type", None)
    if pos_type not in ("standard", "rotary"):
        return f"positional_embedding_type={pos_type!r}"
    rotary = pos_type == "rotary"
    hf_layer_types = getattr(getattr(model.original_model, "config", None), "layer_types", None)
    if hf_layer_types and any(t != "full_attention" for t in hf_layer_types):
        return "some layers do not use full attention"
    for block in model.blocks:
        bad = _bad_block(block, rotary)
        if bad:
            return bad
    if type(model.ln_final) not in (gc.NormalizationBridge, gc.RMSNormalizationBridge):
        return f"ln_final is {type(model.ln_final).__name__}"
    if not isinstance(getattr(model.unembed, "original_component", None), torch.nn.Linear):
        return "unembed is not a linear layer"
    return _bad_rotary(model) if rotary else None


def _proj(bridge: Any) -> Proj:
    """A LinearBridge's live weight as an ``[out, in]`` view (Conv1D stores ``[in, out]``)."""
    module = bridge.original_component
    weight = module.weight.detach()
    if not isinstance(module, torch.nn.Linear):  # HF Conv1D: [in, out], y = x @ W + b
        weight = weight.T
    bias = getattr(module, "bias", None)
    return Proj(weight, None if bias is None else bias.detach())


def norm_fn(bridge: Any, cfg: Any) -> Norm:
    """The exact function the bridge's norm computes in compatibility mode.

    The native path (RMSNorm bridges; any norm once ``cfg.layer_norm_folding`` is set) is
    the wrapped HF module itself, with its own eps; the python path is centering (LN only),
    division by ``sqrt(mean(x^2) + cfg.eps)``, then the weight and bias when not trivial.
    """
    module = bridge.original_component
    if bridge.use_native_layernorm_autograd or getattr(cfg, "layer_norm_folding", False):
        return module
    weight, bias = module.weight.detach(), getattr(module, "bias", None)
    bias = None if bias is None or bridge.uses_rms_norm else bias.detach()
    return functools.partial(
        python_layer_norm,
        eps=float(getattr(cfg, "eps", 1e-5)),
        center=not bridge.uses_rms_norm,
        weight=None if bool((weight == 1).all()) else weight,
        bias=None if bias is None or not bool(bias.any()) else bias,
    )


def _layer(block: Any, cfg: Any, layer: int, rotary: bool) -> LayerWeights:
    attn, mlp = block.attn, block.mlp
    if rotary:  # PositionEmbeddingsAttentionBridge: HF's scaling, float32 softmax
        scale = float(getattr(attn.original_component, "scaling", cfg.d_head**-0.5))
    else:  # JointQKVAttentionBridge: 1/sqrt(d_head), optionally / (layer + 1)
        scale = cfg.d_head**-0.5
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer + 1)
    gated = hasattr(mlp, "gate")
    if gated and getattr(mlp, "_use_processed_weights", False):
        from transformer_lens.model_bridge.generalized_components import gated_mlp

        act = gated_mlp.resolve_activation_fn(cfg)
    else:
        hf_mlp = mlp.original_component
        act = hf_mlp.act_fn if gated else hf_mlp.act
    return LayerWeights(
        ln1=norm_fn(block.ln1, cfg), ln2=norm_fn(block.ln2, cfg),
        q=_proj(attn.q), k=_proj(attn.k), v=_proj(attn.v), o=_proj(attn.o),
        mlp_in=_proj(getattr(mlp, "in")), gate=_proj(mlp.gate) if gated else None,
        mlp_out=_proj(mlp.out), act=_fused(act), scale=scale, float32_softmax=rotary,
    )


def _fused(act: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``act``, or torch's one-pass kernel for the same function: HF's ``NewGELUActivation``
    (GPT-2's ``gelu_new``) spends five passes over the ``[rows, d_mlp]`` activation."""
    from transformers.activations import NewGELUActivation

    if type(act) is NewGELUActivation:
        return functools.partial(F.gelu, approximate="tanh")  # equal to float rounding
    return act


def extract_layers(model: Any) -> list[LayerWeights]:
    """Per-block weights of a supported bridge (see :func:`unsupported_reason`)."""
    rotary = model.cfg.positional_embedding_type == "rotary"
    return [_layer(block, model.cfg, i, rotary) for i, block in enumerate(model.blocks)]


def rope_table(
    model: Any, n_pos: int
) -> tuple[Float[Tensor, "n_pos d_head"], Float[Tensor, "n_pos d_head"]]:
    """cos and sin for absolute positions ``0..n_pos-1``, from the model's own HF rotary module."""
    rot = model.rotary_emb.original_component
    w = model.blocks[0].attn.q.original_component.weight
    positions = torch.arange(n_pos, device=w.device).unsqueeze(0)  # [1, n_pos]
    with torch.no_grad():
        cos, sin = rot(torch.empty(0, device=w.device, dtype=w.dtype), positions)
    return cos[0], sin[0]
