"""GPT-2: LayerNorm, learned absolute positions, joint q/k/v projection, GELU MLP.

Attention scores are ``q.k / sqrt(d_head)`` (further divided by ``layer + 1`` where
``cfg.scale_attn_by_inverse_layer_idx`` is set), softmaxed in the activations' dtype.
"""

from __future__ import annotations

from typing import Any

from hookpatch.runners.fast._support import (
    Variant,
    bad_block_layout,
    bad_bridge,
    bad_mlp,
    bad_norm,
    bad_output,
    components,
    first_reason,
)
from hookpatch.runners.fast._weights import (
    LayerWeights,
    ModelWeights,
    mlp_act,
    norm_fn,
    proj,
    unembed_proj,
)


def claims(model: Any) -> bool:
    """Learned positions and a joint q/k/v attention."""
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "positional_embedding_type", None) == "standard" and hasattr(model, "blocks")


def _bad_attention(attn: Any) -> str | None:
    gc = components()
    if type(attn) is not gc.JointQKVAttentionBridge:
        return f"attention is {type(attn).__name__}, expected JointQKVAttentionBridge"
    if set(getattr(attn, "submodules", {})) - {"qkv"} != {"q", "k", "v", "o"}:
        return f"attention has submodules {sorted(attn.submodules)}"
    if getattr(attn, "_reorder_and_upcast_attn", False):
        return "attention reorders and upcasts"
    if getattr(attn, "is_cross_attention", False) or not getattr(attn, "is_causal", True):
        return "attention is not causal self-attention"
    return None


def _bad_block(block: Any) -> str | None:
    return first_reason(
        lambda: bad_block_layout(block, {"ln1", "attn", "ln2", "mlp"}),
        lambda: bad_norm(block.ln1),
        lambda: bad_norm(block.ln2),
        lambda: bad_mlp(block.mlp),
        lambda: _bad_attention(block.attn),
    )


def reason(model: Any) -> str | None:
    """Why this bridge is not a GPT-2 the fast path reproduces (None: it is)."""
    return first_reason(
        lambda: bad_bridge(model),
        lambda: bad_output(model, softcap_ok=False),
        lambda: next(filter(None, map(_bad_block, model.blocks)), None),
        lambda: bad_norm(model.ln_final),
    )


def _layer(block: Any, cfg: Any, layer: int) -> LayerWeights:
    scale = cfg.d_head**-0.5
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer + 1)
    attn, mlp = block.attn, block.mlp
    gated = hasattr(mlp, "gate")
    return LayerWeights(
        ln1=norm_fn(block.ln1, cfg), ln2=norm_fn(block.ln2, cfg),
        q=proj(attn.q), k=proj(attn.k), v=proj(attn.v), o=proj(attn.o),
        mlp_in=proj(getattr(mlp, "in")), gate=proj(mlp.gate) if gated else None,
        mlp_out=proj(mlp.out), act=mlp_act(mlp, cfg), scale=scale, float32_softmax=False,
    )


def extract(model: Any) -> ModelWeights:
    """The blocks, final norm and unembedding of a GPT-2 bridge."""
    cfg = model.cfg
    return ModelWeights(
        layers=[_layer(block, cfg, i) for i, block in enumerate(model.blocks)],
        ln_final=norm_fn(model.ln_final, cfg), unembed=unembed_proj(model), rotary=False,
    )


VARIANT = Variant("gpt2", claims, reason, extract)
