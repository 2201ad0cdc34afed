"""Qwen3 and OLMo-2: rotary attention with RMSNorms on the queries and keys, before rotary.

* Qwen3: Llama's block; the q/k norms have one ``[d_head]`` weight shared by every head
  (HF's ``q_norm``/``k_norm``, which the bridge runs on ``[batch, head, pos, d_head]``:
  ``attn.hook_q_normed`` and ``attn.hook_k_normed`` fire in that layout).
* OLMo-2: no norm before either sublayer, one after each (the bridge's ``hook_attn_out`` and
  ``hook_mlp_out`` are their outputs), and q/k norms over all heads together
  (``[batch, pos, head * d_head]``, where the hooks fire too).

Everything else is :mod:`._llama`'s, sliding window included.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hookpatch.runners.fast import _llama
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
from hookpatch.runners.fast._weights import ModelWeights, norm_fn

ATTENTION = {"q", "k", "v", "o", "q_norm", "k_norm"}
PRE_NORM = {"ln1", "attn", "ln2", "mlp"}  # Qwen3
POST_NORM = {"attn", "ln1_post", "mlp", "ln2_post"}  # OLMo-2


def claims(model: Any) -> bool:
    """Rotary positions, one norm before (Qwen3) or after (OLMo-2) each sublayer, and q/k norms."""
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "positional_embedding_type", None) != "rotary" or not hasattr(model, "blocks"):
        return False
    block = model.blocks[0]
    return set(getattr(block, "submodules", {})) in (PRE_NORM, POST_NORM) and set(
        getattr(block.attn, "submodules", {})
    ) == ATTENTION


def _flat(attn: Any) -> bool:
    """The q/k norms normalize all heads together (OLMo-2's, before the split into heads)."""
    return getattr(attn, "_qk_norm_phase", None) == "pre_reshape"


def bad_qk_norms(attn: Any, *, offset_ok: bool = False, flat_ok: bool = False) -> str | None:
    """The q/k norms are not one ``[d_head]`` norm shared by the heads (or, where allowed, one
    norm over all heads), before rotary."""
    phase_ok = _flat(attn) if flat_ok else getattr(attn, "_qk_norm_phase", None) == "post_reshape"
    if not phase_ok or getattr(attn, "_qk_norm_per_head", False):
        return "q/k norms are not one [d_head] RMSNorm shared by the heads"
    return first_reason(
        lambda: bad_norm(attn.q_norm, offset_ok=offset_ok), lambda: bad_norm(attn.k_norm, offset_ok=offset_ok)
    )


def _bad_block(block: Any) -> str | None:
    post = set(getattr(block, "submodules", {})) == POST_NORM
    layout = POST_NORM if post else PRE_NORM
    return first_reason(
        lambda: bad_block_layout(block, layout),
        *(lambda norm=norm: bad_norm(getattr(block, norm)) for norm in sorted(layout - {"attn", "mlp"})),
        lambda: bad_mlp(block.mlp),
        lambda: bad_rotary_attention(block.attn, ATTENTION, allowed=("sliding_window",)),
        lambda: bad_qk_norms(block.attn, flat_ok=post),
    )


def reason(model: Any) -> str | None:
    """Why this bridge is not a Qwen3-style model the fast path reproduces (None: it is)."""
    return first_reason(
        lambda: bad_bridge(model),
        lambda: bad_output(model, softcap_ok=False),
        lambda: _llama.bad_layer_types(model),
        lambda: next(filter(None, map(_bad_block, model.blocks)), None),
        lambda: bad_norm(model.ln_final),
        lambda: bad_rotary(model),
    )


def extract(model: Any) -> ModelWeights:
    """Llama's weights plus each layer's q/k norms (and OLMo-2's post-sublayer norms)."""
    cfg = model.cfg
    base = _llama.extract(model)
    layers = [
        replace(
            w,
            q_norm=norm_fn(block.attn.q_norm, cfg),
            k_norm=norm_fn(block.attn.k_norm, cfg),
            qk_norm_flat=_flat(block.attn),
            post_attn=norm_fn(block.ln1_post, cfg) if hasattr(block, "ln1_post") else None,
            post_mlp=norm_fn(block.ln2_post, cfg) if hasattr(block, "ln2_post") else None,
        )
        for w, block in zip(base.layers, model.blocks, strict=True)
    ]
    return replace(base, layers=layers)


VARIANT = Variant("qwen3", claims, reason, extract)
