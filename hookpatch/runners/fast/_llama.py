"""Llama, Mistral and Qwen2: RMSNorm, rotary positions, grouped-query attention, gated MLP.

q/k/v projections may carry biases (Qwen2). Scores are ``q.k * scaling`` (HF's own
``scaling``), softmaxed in float32. Mistral's sliding window (when
``config.sliding_window`` is set, ``use_sliding_window`` not False and the layer is a sliding
layer) limits each query to the last ``window`` keys.
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
    bad_rotary,
    bad_rotary_attention,
    first_reason,
)
from hookpatch.runners.fast._weights import (
    LayerWeights,
    ModelWeights,
    identity,
    mlp_act,
    norm_fn,
    proj,
    unembed_proj,
)

ATTENTION = {"q", "k", "v", "o"}


def claims(model: Any) -> bool:
    """Rotary positions, one norm before each sublayer, and attention without q/k norms."""
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "positional_embedding_type", None) != "rotary" or not hasattr(model, "blocks"):
        return False
    block = model.blocks[0]
    return set(getattr(block, "submodules", {})) == {"ln1", "attn", "ln2", "mlp"} and set(
        getattr(block.attn, "submodules", {})
    ) == ATTENTION


def windows(model: Any) -> list[int | None]:
    """Per layer, the sliding attention window (None: full attention), read from HF's config."""
    hf_cfg = getattr(model.original_model, "config", None)
    window = getattr(hf_cfg, "sliding_window", None)
    if window is None or getattr(hf_cfg, "use_sliding_window", True) is False:
        return [None] * model.cfg.n_layers
    types = getattr(hf_cfg, "layer_types", None) or ["sliding_attention"] * model.cfg.n_layers
    return [int(window) if t == "sliding_attention" else None for t in types]


def bad_layer_types(model: Any) -> str | None:
    hf_cfg = getattr(model.original_model, "config", None)
    for t in getattr(hf_cfg, "layer_types", None) or ():
        if t not in ("full_attention", "sliding_attention"):
            return f"a layer has attention type {t!r}"
    return None


def _bad_block(block: Any) -> str | None:
    return first_reason(
        lambda: bad_block_layout(block, {"ln1", "attn", "ln2", "mlp"}),
        lambda: bad_norm(block.ln1),
        lambda: bad_norm(block.ln2),
        lambda: bad_mlp(block.mlp),
        lambda: bad_rotary_attention(block.attn, ATTENTION, allowed=("sliding_window",)),
    )


def reason(model: Any) -> str | None:
    """Why this bridge is not a Llama-style model the fast path reproduces (None: it is)."""
    return first_reason(
        lambda: bad_bridge(model),
        lambda: bad_output(model, softcap_ok=False),
        lambda: bad_layer_types(model),
        lambda: next(filter(None, map(_bad_block, model.blocks)), None),
        lambda: bad_norm(model.ln_final),
        lambda: bad_rotary(model),
    )


def extract(model: Any) -> ModelWeights:
    """The blocks, final norm and unembedding of a Llama-style bridge."""
    cfg = model.cfg
    layers = []
    for block, window in zip(model.blocks, windows(model), strict=True):
        attn, mlp = block.attn, block.mlp
        layers.append(LayerWeights(
            ln1=norm_fn(block.ln1, cfg) if hasattr(block, "ln1") else identity,
            ln2=norm_fn(block.ln2, cfg) if hasattr(block, "ln2") else identity,
            q=proj(attn.q), k=proj(attn.k), v=proj(attn.v), o=proj(attn.o),
            mlp_in=proj(getattr(mlp, "in")), gate=proj(mlp.gate) if hasattr(mlp, "gate") else None,
            mlp_out=proj(mlp.out), act=mlp_act(mlp, cfg),
            scale=float(getattr(attn.original_component, "scaling", cfg.d_head**-0.5)),
            float32_softmax=True, window=window,
        ))
    return ModelWeights(layers, norm_fn(model.ln_final, cfg), unembed_proj(model), rotary=True)


VARIANT = Variant("llama", claims, reason, extract)
