"""Checks shared by the variants: is this a compatibility-mode bridge whose parts the fast path
reproduces exactly? Each returns None when it is, else a short reason naming the first part
it cannot reproduce (the fast path then refuses the model and the bridge's own hooks run it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hookpatch.runners.fast._weights import ModelWeights, rope_table

# cos/sin that depend on the position only (not on the layer or the sequence length).
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Config flags that change the forward in ways no variant reproduces.
REFUSED_FLAGS = (
    "use_attn_in", "parallel_attn_mlp", "gated_q_proj", "rotary_adjacent_pairs",
    "rotary_interleaved_cos_sin", "qk_norm_after_rope", "attn_only",
)


@dataclass(frozen=True)
class Variant:
    """One architecture variant: whether a bridge has its layout, what it cannot reproduce in
    one that does, and its weights as a :class:`ModelWeights`."""

    name: str
    claims: Callable[[Any], bool]  # the bridge has this variant's component layout
    reason: Callable[[Any], str | None]  # None: the variant reproduces this bridge exactly
    extract: Callable[[Any], ModelWeights]


def components() -> Any:
    """TransformerLens's generalized bridge components (imported lazily: it is heavy)."""
    from transformer_lens.model_bridge import generalized_components as gc

    return gc


def bad_bridge(model: Any) -> str | None:
    """Not a bridge, not in compatibility mode, or flags no variant reproduces."""
    if not (hasattr(model, "blocks") and hasattr(model, "cfg") and hasattr(model, "adapter")):
        return f"{type(model).__name__} is not a TransformerBridge"
    if not getattr(model, "compatibility_mode", False):
        return "compatibility mode is off (call model.enable_compatibility_mode())"
    cfg = model.cfg
    for flag in REFUSED_FLAGS:
        if getattr(cfg, flag, False):
            return f"cfg.{flag} is set"
    if getattr(cfg, "attention_dir", "causal") != "causal":
        return "attention is not causal"
    if getattr(cfg, "normalization_type", None) not in ("LN", "LNPre", "RMS", "RMSPre"):
        return f"normalization_type={getattr(cfg, 'normalization_type', None)!r}"
    if not isinstance(getattr(model.unembed, "original_component", None), torch.nn.Linear):
        return "unembed is not a linear layer"
    return None


def bad_output(model: Any, *, softcap_ok: bool) -> str | None:
    """The adapter transforms the logits beyond (where allowed) a final soft cap."""
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter

    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if cap is not None and cap > 0 and not softcap_ok:
        return "output logits are soft-capped"
    transform = type(model.adapter).apply_output_logits_transform
    if transform is not ArchitectureAdapter.apply_output_logits_transform:
        return "the adapter transforms output logits"
    return None


def bad_norm(norm: Any, *, offset_ok: bool = False) -> str | None:
    """A norm the fast path cannot reproduce (weights stored as offsets from 1 unless allowed)."""
    gc = components()
    if type(norm) not in (gc.NormalizationBridge, gc.RMSNormalizationBridge):
        return f"norm is {type(norm).__name__}"
    if norm.uses_weight_offset and not offset_ok:
        return "norm weights are offsets from 1"
    return None


def bad_block_layout(block: Any, submodules: set[str]) -> str | None:
    """The block is not a plain BlockBridge with exactly these submodules."""
    if type(block) is not components().BlockBridge:
        return f"block is {type(block).__name__}, expected BlockBridge"
    if set(getattr(block, "submodules", {})) != submodules:
        return f"block has submodules {sorted(getattr(block, 'submodules', {}))}, expected {sorted(submodules)}"
    return None


def bad_mlp(mlp: Any) -> str | None:
    """Not ``in -> act -> out`` nor the gated ``(act(gate) * in) -> out``."""
    gc = components()
    if type(mlp) is gc.GatedMLPBridge:
        if set(mlp.submodules) != {"gate", "in", "out"}:
            return "gated MLP lacks gate/in/out"
        return None
    if type(mlp) is gc.MLPBridge:
        act = getattr(mlp.original_component, "act", None)
        if set(mlp.submodules) != {"in", "out"} or not callable(act):
            return "MLP is not in -> act -> out"
        return None
    return f"MLP is {type(mlp).__name__}"


def bad_rotary_attention(attn: Any, submodules: set[str], allowed: tuple[str, ...] = ()) -> str | None:
    """Not a rotary attention with these submodules, or an HF attention attribute (soft cap,
    sinks, sliding window...) outside ``allowed`` that changes the scores."""
    gc = components()
    if type(attn) is not gc.PositionEmbeddingsAttentionBridge:
        return f"attention is {type(attn).__name__}, expected PositionEmbeddingsAttentionBridge"
    if set(getattr(attn, "submodules", {})) != submodules:
        return f"attention has submodules {sorted(attn.submodules)}, expected {sorted(submodules)}"
    hf = attn.original_component
    for attr in ("attn_logit_softcapping", "sinks", "key_multiplier", "sliding_window"):
        if attr not in allowed and getattr(hf, attr, None) is not None:
            return f"attention has {attr}"
    if not getattr(attn, "is_causal", True) or getattr(hf, "is_causal", True) is False:
        return "attention is not causal self-attention"
    hf_cfg = getattr(hf, "config", None)
    if getattr(hf_cfg, "clip_qkv", None) is not None:
        return "attention clips q/k/v"
    rope = getattr(hf_cfg, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
        return "attention uses llama-4 query scaling"
    return None


def bad_rotary(model: Any, *, per_layer_type_ok: bool = False) -> str | None:
    """The rotary table depends on more than the position (and, unless allowed, the layer
    type), or covers part of each head."""
    rot = getattr(getattr(model, "rotary_emb", None), "original_component", None)
    if rot is None:
        return "rotary model without a rotary_emb component"
    kinds = getattr(rot, "rope_type", "default")
    kinds = set(kinds.values()) if isinstance(kinds, dict) else {kinds}
    if not kinds <= set(ROPE_TYPES) or (hasattr(rot, "layer_types") and not per_layer_type_ok):
        return f"rotary type {getattr(rot, 'rope_type', None)!r} depends on more than position"
    for table in rotary_tables(model):
        cos, _ = rope_table(model, 1, table)
        if cos.shape[-1] != model.cfg.d_head:
            return f"rotary covers {cos.shape[-1]} of d_head={model.cfg.d_head} dims"
    return None


def rotary_tables(model: Any) -> list[str | None]:
    """Per layer, which of the rotary module's tables it uses: HF's layer type where the module
    keeps one table per type (Gemma 3), else None (one table for all)."""
    rot = getattr(getattr(model, "rotary_emb", None), "original_component", None)
    types = getattr(getattr(model.original_model, "config", None), "layer_types", None)
    if not hasattr(rot, "layer_types") or not types:
        return [None] * model.cfg.n_layers
    return list(types)


def first_reason(*checks: Callable[[], str | None]) -> str | None:
    """The first non-None reason among lazily evaluated checks."""
    for check in checks:
        reason = check()
        if reason is not None:
            return reason
    return None
