"""One transformer block on packed rows, as the bridge's compatibility-mode forward computes it.

The block reads a :class:`~hookpatch.runners.fast._weights.LayerWeights` (what this layer
computes) and never asks which architecture it belongs to: a None q/k norm, post-norm, soft
cap or window is simply skipped. Hook points fire in the bridge's order and shapes; a point
nothing is bound to costs one dict lookup. The per-head hook points ``hook_q_input`` /
``hook_k_input`` / ``hook_v_input`` (each head's copy of the residual stream before ``ln1``)
and ``attn.hook_result`` (each head's output before the sum over heads) are only
materialised when bound: unbound, the block runs the fused projections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from hookpatch.runners.fast import _ops as ops
from hookpatch.runners.fast._layout import Bound, Layout, all_keys, fire, fire_packed, fire_rows
from hookpatch.runners.fast._weights import LayerWeights, Norm, Proj

# Per-head copies of the block input, one per head the projection reads: (hook, projection).
SPLIT_INPUTS = (("hook_q_input", "q"), ("hook_k_input", "k"), ("hook_v_input", "v"))


def linear(x: Tensor, proj: Proj) -> Tensor:
    """``x @ proj.weight.T + proj.bias``."""
    return F.linear(x, proj.weight, proj.bias)


def fire_heads_first(lh: Bound, point: str, x: Float[Tensor, "n head d_head"], layout: Layout) -> Tensor:
    """:func:`fire_packed` for a point the bridge fires as ``[batch, head, pos, d_head]``
    (the q/k norms' outputs, between its transpose and rotary)."""
    if point not in lh:
        return x
    return layout.pack(fire(lh, point, layout.full(x).transpose(1, 2)).transpose(1, 2))


def _per_head_proj(
    x: Float[Tensor, "n head d_model"], proj: Proj, d_head: int
) -> Float[Tensor, "n head d_head"]:
    """Head ``h``'s slice of ``proj`` applied to head ``h``'s own input."""
    n_heads = x.shape[1]
    w = proj.weight.view(n_heads, d_head, -1)  # [head, d_head, d_model]
    out = torch.einsum("nhm,hdm->nhd", x, w)
    return out if proj.bias is None else out + proj.bias.view(n_heads, d_head)


def _qkv(
    x: Float[Tensor, "n d_model"],
    w: LayerWeights,
    lh: Bound,
    keys: Layout,
    queries: Layout,
    query_rows: Int[Tensor, " n_query"] | None,
    heads: tuple[int, int, int],
) -> tuple[Tensor, Tensor, Tensor]:
    """q ``[n_query, head, d_head]``, k and v ``[n, kv_head, d_head]`` straight after their
    projections, through the per-head input hooks when any is bound."""
    n_heads, n_kv, d_head = heads
    out = []
    for (point, name), n, layout in zip(SPLIT_INPUTS, (n_heads, n_kv, n_kv), (queries, keys, keys), strict=True):
        proj: Proj = getattr(w, name)
        rows = query_rows if name == "q" else None
        if point in lh:  # each head reads its own (editable) copy of the block input
            xs = x if rows is None else x[rows]
            split = fire_packed(lh, point, xs.unsqueeze(1).expand(-1, n, -1).contiguous(), layout)  # [n, head, d_model]
            out.append(_per_head_proj(w.ln1(split), proj, d_head))
        else:
            out.append(linear(w.ln1(x) if rows is None else w.ln1(x[rows]), proj).unflatten(-1, (n, d_head)))
    return out[0], out[1], out[2]


def block(
    x: Float[Tensor, "n d_model"],
    w: LayerWeights,
    lh: Bound,
    keys: Layout,
    queries: Layout,
    query_rows: Int[Tensor, " n_query"] | None,
    kv: tuple[Tensor, Tensor] | None,
    heads: tuple[int, int, int],
) -> Float[Tensor, "_ d_model"]:
    """One block on packed rows ``x`` (laid out by ``keys``); with ``query_rows`` only those
    rows (laid out by ``queries``) go past the keys and values, and are returned.

    ``heads`` is ``(n_heads, n_kv_heads, d_head)``; ``kv`` the known keys and values of the
    positions ``keys`` does not compute (see :func:`~hookpatch.runners.fast._layout.all_keys`).
    """
    x = fire_packed(lh, "hook_resid_pre", x, keys)
    xq = x if query_rows is None else x[query_rows]
    if lh.keys().isdisjoint(("hook_q_input", "hook_k_input", "hook_v_input")):
        h = w.ln1(x)  # [n, d_model], shared by q, k and v
        hq = h if query_rows is None else h[query_rows]
        q = linear(hq, w.q).unflatten(-1, (heads[0], heads[2]))  # [n_query, head, d_head]
        k = linear(h, w.k).unflatten(-1, (heads[1], heads[2]))  # [n, kv_head, d_head]
        v = linear(h, w.v).unflatten(-1, (heads[1], heads[2]))
    else:
        q, k, v = _qkv(x, w, lh, keys, queries, query_rows, heads)
    q = fire_packed(lh, "attn.hook_q", q, queries)
    k = fire_packed(lh, "attn.hook_k", k, keys)
    v = fire_packed(lh, "attn.hook_v", v, keys)
    if w.q_norm is not None and w.k_norm is not None and w.qk_norm_flat:  # [n, head * d_head]
        q = fire_packed(lh, "attn.hook_q_normed", w.q_norm(q.flatten(-2)), queries).view(q.shape)
        k = fire_packed(lh, "attn.hook_k_normed", w.k_norm(k.flatten(-2)), keys).view(k.shape)
    elif w.q_norm is not None and w.k_norm is not None:
        q = fire_heads_first(lh, "attn.hook_q_normed", w.q_norm(q), queries)
        k = fire_heads_first(lh, "attn.hook_k_normed", w.k_norm(k), keys)
    if queries.rope is not None and keys.rope is not None:
        q = fire_packed(lh, "attn.hook_rot_q", ops.apply_rotary(q, *queries.rope[w.rope_table]), queries)
        k = fire_packed(lh, "attn.hook_rot_k", ops.apply_rotary(k, *keys.rope[w.rope_table]), keys)
    k_all = all_keys(k, keys, None if kv is None else kv[0])  # [rows, key_pos, kv_head, d_head]
    v_all = all_keys(v, keys, None if kv is None else kv[1])
    q_all = queries.attn_full(q)  # [rows, pos, head, d_head]
    # torch's fused kernel where the mask is plain causal (on CPU it is slower than the two
    # matmuls below once it needs an explicit mask, as for a sliding window)
    fused = queries.causal and w.window is None and w.softcap is None and q.dtype == torch.float32
    if fused and "attn.hook_attn_scores" not in lh and "attn.hook_pattern" not in lh:
        z = ops.fused_attention(q_all, k_all, v_all, w.scale)
    else:
        mask = ops.causal_mask(queries.query_pos, k_all.shape[1], w.window)
        scores = ops.attention_scores(q_all, k_all, mask, w.scale, w.softcap)
        scores = fire_rows(lh, "attn.hook_attn_scores", scores, queries)  # [rows, head, pos, key_pos]
        pattern = ops.attention_pattern(scores, float32_softmax=w.float32_softmax)
        pattern = fire_rows(lh, "attn.hook_pattern", pattern, queries)
        z = ops.mix_values(pattern, v_all)
    z = fire_rows(lh, "attn.hook_z", z, queries)  # [rows, pos, head, d_head]
    attn_out = attn_output(queries.attn_pack(z), w, lh, queries)  # [n_query, d_model]
    return finish(xq, attn_out, w, lh, queries)


def attn_output(
    z: Float[Tensor, "n head d_head"], w: LayerWeights, lh: Bound, layout: Layout | None
) -> Float[Tensor, "n d_model"]:
    """``hook_attn_out`` from z: the output projection (per head through ``attn.hook_result``
    when bound), then the post-attention norm where the variant has one (the bridge's
    ``hook_attn_out`` is that norm's output)."""
    if "attn.hook_result" in lh:
        n_heads, d_head = z.shape[-2:]
        w_o = w.o.weight.view(w.o.weight.shape[0], n_heads, d_head)  # [d_model, head, d_head]
        result = torch.einsum("nhd,mhd->nhm", z, w_o)  # [n, head, d_model]
        out = fire_packed(lh, "attn.hook_result", result, layout).sum(-2)
        out = out if w.o.bias is None else out + w.o.bias
    else:
        out = linear(z.flatten(-2), w.o)
    return fire_packed(lh, "hook_attn_out", post_norm(out, w.post_attn), layout)


def finish(
    x: Float[Tensor, "n d_model"],
    attn_out: Float[Tensor, "n d_model"],
    w: LayerWeights,
    lh: Bound,
    layout: Layout | None,
) -> Float[Tensor, "n d_model"]:
    """The rest of a block from its attention output (``hook_attn_out``): ``hook_resid_post``.

    An edit at ``hook_resid_mid`` reaches both the MLP and the residual sum, as an in-place
    edit does on the bridge (TransformerLens's patching edits in place)."""
    mid = fire_packed(lh, "hook_resid_mid", x + attn_out, layout)
    mlp_out = fire_packed(lh, "hook_mlp_out", mlp(mid, w, lh, layout), layout)
    return fire_packed(lh, "hook_resid_post", mid + mlp_out, layout)


def post_norm(x: Float[Tensor, "n d_model"], norm: Norm | None) -> Float[Tensor, "n d_model"]:
    """``norm(x)``, or ``x`` for a variant without post-sublayer norms."""
    return x if norm is None else norm(x)


def mlp(
    mid: Float[Tensor, "n d_model"], w: LayerWeights, lh: Bound, layout: Layout | None
) -> Float[Tensor, "n d_model"]:
    """``act(h W_in) W_out``, or ``(act(h W_gate) * h W_in) W_out`` when gated, on
    ``h = ln2(mid)`` (``hook_mlp_in`` is a copy of ``mid`` that only the MLP branch reads: an
    edit there, in place or not, never reaches the residual sum), then the
    post-MLP norm where the variant has one (the bridge's ``hook_mlp_out`` is its output)."""
    h = w.ln2(fire_packed(lh, "hook_mlp_in", mid.clone(), layout) if "hook_mlp_in" in lh else mid)
    if w.gate is None:
        pre = fire_packed(lh, "mlp.hook_pre", linear(h, w.mlp_in), layout)  # [n, d_mlp]
        post = w.act(pre)
    else:
        pre = fire_packed(lh, "mlp.hook_pre", linear(h, w.gate), layout)
        post = w.act(pre) * fire_packed(lh, "mlp.hook_pre_linear", linear(h, w.mlp_in), layout)
    return post_norm(linear(fire_packed(lh, "mlp.hook_post", post, layout), w.mlp_out), w.post_mlp)
