"""Pure tensor operations of the fast path, in the bridge's exact order of operations.

Each function mirrors one step of TransformerBridge's compatibility-mode forward (see
:mod:`hookpatch.runners.fast`), including where it upcasts to float32, so that the fast
path agrees with the bridge to float rounding; :func:`fused_attention` is the one fused
shortcut (torch's SDPA, for when no hook reads the scores or pattern), equal to float32
rounding. Activations are the fast path's packed ``[n, ...]`` rows or ``[batch, pos, ...]``
grids, as each signature says. Nothing here holds state or fires hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor


def python_layer_norm(
    x: Float[Tensor, "*rows d_model"],
    *,
    eps: float,
    center: bool,
    weight: Float[Tensor, " d_model"] | None,
    bias: Float[Tensor, " d_model"] | None,
) -> Float[Tensor, "*rows d_model"]:
    """The bridge's from-scratch norm: ``(x - mean) / sqrt(mean(x^2) + eps) * w + b`` in float32.

    ``center=False`` is RMS normalization. A ``None`` weight or bias is an exact identity
    (the bridge multiplies by ones / adds zeros after folding, which changes no bits).
    """
    dtype = x.dtype
    h = x if dtype in (torch.float32, torch.float64) else x.float()
    if center:
        h = h - h.mean(-1, keepdim=True)
    scale = (h.pow(2).mean(-1, keepdim=True) + eps).sqrt()  # [*rows, 1]
    h = h / scale
    if weight is not None:
        h = h * weight
    if bias is not None:
        h = h + bias
    return h.to(dtype)


def rotate_half(x: Float[Tensor, "*rest d_head"]) -> Float[Tensor, "*rest d_head"]:
    """HF's ``rotate_half``: ``[x1, x2] -> [-x2, x1]`` over the last axis."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    x: Float[Tensor, "n heads d_head"],
    cos: Float[Tensor, "n d_head"],
    sin: Float[Tensor, "n d_head"],
) -> Float[Tensor, "n heads d_head"]:
    """HF's rotate-half rotary embedding, ``x * cos + rotate_half(x) * sin``, per head.

    ``x`` holds packed (row, position) pairs; ``cos``/``sin`` are the tables at each one's position.
    """
    cos = cos.unsqueeze(-2)  # [n, 1, d_head]
    sin = sin.unsqueeze(-2)
    return (x * cos) + (rotate_half(x) * sin)


def causal_mask(
    query_pos: Int[Tensor, "*#lead pos"], n_keys: int, window: int | None = None
) -> Bool[Tensor, "*#lead 1 pos key_pos"]:
    """True where a query at absolute position ``query_pos`` may attend key ``0..n_keys-1``:
    keys at or before it, and with a sliding ``window`` only the last ``window`` of those
    (HuggingFace's ``query - key < window``)."""
    keys = torch.arange(n_keys, device=query_pos.device)
    delta = query_pos.unsqueeze(-1) - keys  # [*lead, pos, key_pos]
    allowed = delta >= 0
    if window is not None:
        allowed = allowed & (delta < window)
    return allowed.unsqueeze(-3)


def soft_cap(x: Float[Tensor, "*shape"], cap: float) -> Float[Tensor, "*shape"]:
    """``cap * tanh(x / cap)``: Gemma 2's soft cap of attention scores and final logits."""
    return torch.tanh(x / cap) * cap


def attention_scores(
    q: Float[Tensor, "batch pos head d_head"],
    k: Float[Tensor, "batch key_pos kv_head d_head"],
    mask: Bool[Tensor, "*#lead #head pos key_pos"],
    scale: float,
    softcap: float | None = None,
) -> Float[Tensor, "batch head pos key_pos"]:
    """Masked ``q.k * scale`` (soft-capped before the mask where ``softcap`` is set);
    grouped-query heads share K through a reshape, never a copy of K.

    Query head ``h`` reads KV head ``h // (n_heads // n_kv_heads)``, as HF's ``repeat_kv``.
    """
    b, p, n_heads, d_head = q.shape
    n_kv = k.shape[2]
    q_g = q.transpose(1, 2).reshape(b, n_kv, (n_heads // n_kv) * p, d_head)  # [b, kv, g*p, d]
    scores = torch.matmul(q_g, k.permute(0, 2, 3, 1))  # [b, kv, g*p, key_pos]
    scores = scores.view(b, n_heads, p, k.shape[1]) * scale
    if softcap is not None:
        scores = soft_cap(scores, softcap)
    return scores.masked_fill(~mask, float("-inf"))


def attention_pattern(
    scores: Float[Tensor, "batch head pos key_pos"], *, float32_softmax: bool
) -> Float[Tensor, "batch head pos key_pos"]:
    """Softmax over keys (optionally in float32, cast back), as the bridge's attention does."""
    if float32_softmax:
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)
    return torch.softmax(scores, dim=-1)


def fused_attention(
    q: Float[Tensor, "batch pos head d_head"],
    k: Float[Tensor, "batch pos kv_head d_head"],
    v: Float[Tensor, "batch pos kv_head d_head"],
    scale: float,
) -> Float[Tensor, "batch pos head d_head"]:
    """``z`` of causal attention over positions ``0..pos-1`` in one fused kernel (torch's SDPA),
    for when no hook needs the scores or the pattern (and there is no soft cap or window); it
    equals :func:`attention_scores`, :func:`attention_pattern` and :func:`mix_values` in
    sequence to float32 rounding, and avoids their two small matmuls per (row, head)."""
    z = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        is_causal=True, scale=scale, enable_gqa=k.shape[2] != q.shape[2],
    )  # [batch, head, pos, d_head]
    return z.transpose(1, 2)


def mix_values(
    pattern: Float[Tensor, "batch head pos key_pos"],
    v: Float[Tensor, "batch key_pos kv_head d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    """``z = pattern @ v`` per head, grouped-query heads sharing V without copying it."""
    b, n_heads, p, n_keys = pattern.shape
    n_kv = v.shape[2]
    pat_g = pattern.reshape(b, n_kv, (n_heads // n_kv) * p, n_keys)  # [b, kv, g*p, key_pos]
    z = torch.matmul(pat_g.to(v.dtype), v.transpose(1, 2))  # [b, kv, g*p, d_head]
    return z.view(b, n_heads, p, v.shape[-1]).transpose(1, 2)
