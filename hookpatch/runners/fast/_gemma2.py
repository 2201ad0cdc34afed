"""Gemma 2 and 3: offset RMSNorm before and after each sublayer, a scaled embedding, soft caps,
sliding-window layers, and (Gemma 3) q/k norms and a rotary table per layer type.

What differs from :mod:`._llama`:

* every RMSNorm scales by ``1 + weight`` (HF's ``Gemma2RMSNorm``, run as is);
* the block is ``mid = x + post_attn(attn(ln1(x)))``, ``x' = mid + post_mlp(mlp(ln2(mid)))``;
  the bridge's ``hook_attn_out`` and ``hook_mlp_out`` are the post-norms' outputs;
* token embeddings are multiplied by ``sqrt(d_model)`` (HF's ``embed_scale``, in the
  embedding's dtype);
* attention scores are ``q.k * query_pre_attn_scalar ** -0.5`` (HF's ``scaling``), then
  soft-capped ``cap * tanh(s / cap)`` before the mask;
* layers HF marks ``sliding_attention`` attend only the last ``sliding_window`` keys;
* final logits are soft-capped (:attr:`ModelWeights.final_softcap`), so they are not linear
  in the residual stream;
* Gemma 3 adds :mod:`._qwen3`'s q/k norms (offset RMSNorms here) and drops the attention soft
  cap; its rotary module keeps one table per layer type (local and global bases), and each
  layer uses its type's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hookpatch.runners.fast import _llama, _qwen3
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
    rotary_tables,
)
from hookpatch.runners.fast._weights import ModelWeights, norm_fn

BLOCK = {"ln1", "ln1_post", "attn", "ln2", "ln2_post", "mlp"}
ATTENTION = {"q", "k", "v", "o"}
QK_NORMED = ATTENTION | {"q_norm", "k_norm"}  # Gemma 3


def claims(model: Any) -> bool:
    """Rotary positions and norms before and after each sublayer."""
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "positional_embedding_type", None) != "rotary" or not hasattr(model, "blocks"):
        return False
    block = model.blocks[0]
    return set(getattr(block, "submodules", {})) == BLOCK and set(getattr(block.attn, "submodules", {})) in (
        ATTENTION, QK_NORMED
    )


def _bad_block(block: Any) -> str | None:
    return first_reason(
        lambda: bad_block_layout(block, BLOCK),
        *(lambda norm=norm: bad_norm(getattr(block, norm), offset_ok=True) for norm in sorted(BLOCK - {"attn", "mlp"})),
        lambda: bad_mlp(block.mlp),
        lambda: bad_rotary_attention(
            block.attn, set(block.attn.submodules) & QK_NORMED, allowed=("sliding_window", "attn_logit_softcapping")
        ),
        lambda: _qwen3.bad_qk_norms(block.attn, offset_ok=True) if "q_norm" in block.attn.submodules else None,
    )


def _bad_embedding(model: Any) -> str | None:
    scale = getattr(model.embed.original_component, "embed_scale", None)
    if scale is None or getattr(scale, "numel", lambda: 1)() != 1:
        return "the embedding has no scalar embed_scale"
    return None


def reason(model: Any) -> str | None:
    """Why this bridge is not a Gemma 2-style model the fast path reproduces (None: it is)."""
    return first_reason(
        lambda: bad_bridge(model),
        lambda: bad_output(model, softcap_ok=True),
        lambda: _llama.bad_layer_types(model),
        lambda: _bad_embedding(model),
        lambda: next(filter(None, map(_bad_block, model.blocks)), None),
        lambda: bad_norm(model.ln_final, offset_ok=True),
        lambda: bad_rotary(model, per_layer_type_ok=True),
    )


def _cap(value: Any) -> float | None:
    """A soft cap as a float, None where disabled (unset or not positive)."""
    return float(value) if value is not None and float(value) > 0 else None


def extract(model: Any) -> ModelWeights:
    """Llama's weights plus the post-norms, soft caps, the embedding scale and (Gemma 3) the
    q/k norms and each layer's rotary table."""
    cfg = model.cfg
    base = _llama.extract(model)
    layers = []
    for w, block, table in zip(base.layers, model.blocks, rotary_tables(model), strict=True):
        attn = block.attn
        qk = "q_norm" in attn.submodules
        layers.append(replace(
            w,
            post_attn=norm_fn(block.ln1_post, cfg),
            post_mlp=norm_fn(block.ln2_post, cfg),
            softcap=_cap(getattr(attn.original_component, "attn_logit_softcapping", None)),
            q_norm=norm_fn(attn.q_norm, cfg) if qk else None,
            k_norm=norm_fn(attn.k_norm, cfg) if qk else None,
            rope_table=table,
        ))
    return replace(
        base,
        layers=layers,
        embed_scale=float(model.embed.original_component.embed_scale),
        final_softcap=_cap(getattr(cfg, "output_logits_soft_cap", None)),
    )


VARIANT = Variant("gemma2", claims, reason, extract)
