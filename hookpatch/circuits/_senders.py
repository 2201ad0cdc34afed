"""What senders write: output differences between two runs, and the IOI paper's frozen run.

A sender's output is what it adds to the residual stream: the embeddings for the input, its
share of the attention output for a head, the MLP's output for an MLP. Its *difference* between
a source run and a target run (``Δ_s``, ``[batch, pos, d_model]``) is what edge attribution
multiplies by a gradient, and what edge patching adds to a receiver's input (there with the
target side taken in the patched forward itself). For a head it is the change of its block's
attention output when that head alone takes the source run's z (``(z_S - z_T)[h] @ W_O[h]``
where no norm follows attention; through the post-attention norm on Gemma 2/3, where heads do
not add up on their own).

:func:`frozen_run_inputs` is the first run of path patching as in the IOI paper: the senders take
the source run's outputs while every other head is frozen to the target run, so the residual
stream changes only by the senders' writes and, unless frozen too, what the MLPs make of them —
position by position, without any attention. It returns the residual stream the receivers read.

All of it reads the cached unpatched runs and the model's own modules (``W_O``, the norms and
MLPs of the TransformerBridge), whichever runner ran the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hookpatch.circuits._graph import Node, Site
from hookpatch.model._facts import hook_name, resid_entering


def cache_names(n_layers: int) -> list[str]:
    """What sender differences and the frozen run read from each cached run."""
    names = [hook_name("resid_pre", 0), resid_entering(n_layers, n_layers)]
    for layer in range(n_layers):
        names += [hook_name(c, layer) for c in ("z", "attn_out", "mlp_out", "resid_pre", "resid_mid")]
    return names


def attn_out_from_z(model: Any, layer: int, z: Float[Tensor, "*rows head d_head"]) -> Float[Tensor, "*rows d_model"]:
    """Block ``layer``'s ``hook_attn_out`` from its z: the output projection, then the
    post-attention norm where the block has one."""
    attn = model.blocks[layer].attn
    out = torch.einsum("...hd,hdm->...m", z, attn.W_O)
    if attn.b_O is not None:
        out = out + attn.b_O
    post = getattr(model.blocks[layer], "ln1_post", None)
    return out if post is None else post(out)


def linear_heads(model: Any, layer: int) -> bool:
    """Whether a head's write is ``z_h @ W_O[h]`` alone (no norm after attention)."""
    return getattr(model.blocks[layer], "ln1_post", None) is None


def head_delta(
    model: Any,
    layer: int,
    z: Float[Tensor, "*n batch pos head d_head"],
    z_source: Float[Tensor, "batch pos head d_head"],
    head: int,
) -> Float[Tensor, "*n batch pos d_model"]:
    """How block ``layer``'s attention output moves when head ``head`` alone takes the source
    run's z instead of ``z``: ``(z_source - z)[h] @ W_O[h]``, or through the post-attention
    norm where the block has one."""
    if linear_heads(model, layer):
        dz = z_source[..., head, :] - z[..., head, :]  # [n, B, pos, d_head]
        return dz @ model.blocks[layer].attn.W_O[head]
    swapped = z.clone()
    swapped[..., head, :] = z_source[..., head, :]
    return attn_out_from_z(model, layer, swapped) - attn_out_from_z(model, layer, z)


def head_change(
    model: Any,
    layer: int,
    target: Any,  # caches: hook name -> [batch, ...] (a dict or an ActivationCache)
    source: Any,
    heads: Float[Tensor, "variant head"],
) -> Float[Tensor, "variant batch pos d_model"]:
    """How block ``layer``'s attention output moves, per variant, when the heads weighted 1 in
    ``heads`` take the source run's z (together: through the post-attention norm, heads do not
    add up on their own)."""
    name = hook_name("z", layer)
    z_t, z_s = target[name], source[name]  # [B, pos, head, d_head]
    if linear_heads(model, layer):  # the heads' own writes, one head at a time
        out = z_t.new_zeros(heads.shape[0], *z_t.shape[:2], model.cfg.d_model)
        for h in heads.ne(0).any(0).nonzero().flatten().tolist():
            out += heads[:, h].to(out.dtype).view(-1, 1, 1, 1) * head_delta(model, layer, z_t, z_s, h)
        return out
    w = heads.to(z_t.dtype)[:, None, None, :, None]  # [V, 1, 1, head, 1]
    return attn_out_from_z(model, layer, z_t + (z_s - z_t) * w) - target[hook_name("attn_out", layer)]


def mlp_out(model: Any, layer: int, mid: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_model"]:
    """Block ``layer``'s ``hook_mlp_out`` from its MLP input: ``ln2``, the MLP, the
    post-MLP norm where the block has one."""
    block = model.blocks[layer]
    out = block.mlp(block.ln2(mid))
    post = getattr(block, "ln2_post", None)
    return out if post is None else post(out)


def frozen_run_inputs(
    model: Any,
    senders: Sequence[Sequence[Node]],
    sender_mask: Bool[Tensor, "variant batch pos"],
    sites: Sequence[Site],
    target: Any,  # caches: hook name -> [batch, ...] (a dict or an ActivationCache)
    source: Any,
    freeze_mlps: bool,
) -> dict[Site, Float[Tensor, "rows pos d_model"]]:
    """The first run of IOI path patching, per variant: ``senders[v]`` take the source run's
    outputs at ``sender_mask[v]``, every other head is frozen to the target run, MLPs are
    recomputed (or frozen with ``freeze_mlps``). Returns, for each receiver site ``(layer,
    kind)``, the residual stream its receivers read (``[V * batch, pos, d_model]``): the
    block input for q/k/v, the MLP input for ``"mlp"``, the final stream for ``"logits"``.

    With heads frozen, the residual stream differs from the target run's only by a sum ``acc``
    of the senders' writes and the MLPs' responses, at the sender positions; the MLPs are
    position-wise, so each one runs on just those positions.
    """
    n_layers = model.cfg.n_layers
    n_heads = model.cfg.n_heads
    V = len(senders)
    B, P, d_model = target[hook_name("resid_pre", 0)].shape
    mask = sender_mask.unsqueeze(-1).to(target[hook_name("resid_pre", 0)].dtype)  # [V, B, pos, 1]
    wanted = set(sites)
    acc = torch.zeros(V, B, P, d_model, dtype=mask.dtype)
    if any(s.kind == "input" for group in senders for s in group):
        name = hook_name("resid_pre", 0)
        use = torch.tensor([any(s.kind == "input" for s in group) for group in senders], dtype=mask.dtype)
        acc = acc + use.view(V, 1, 1, 1) * (source[name] - target[name]) * mask
    out: dict[Site, Tensor] = {}

    def record(site: Site, base: Tensor) -> None:
        if site in wanted:
            out[site] = (base + acc).flatten(0, 1)

    for layer in range(n_layers):
        base = target[hook_name("resid_pre", layer)]
        for kind in ("q", "k", "v"):
            record((layer, kind), base)
        heads = torch.zeros(V, n_heads)
        for v, group in enumerate(senders):
            for s in group:
                if s.kind == "head" and s.layer == layer:
                    heads[v, s.head] = 1
        if bool(heads.any()):
            acc = acc + head_change(model, layer, target, source, heads) * mask
        record((layer, "mlp"), target[hook_name("resid_mid", layer)])
        mlp_senders = torch.tensor([any(s.kind == "mlp" and s.layer == layer for s in group) for group in senders])
        name = hook_name("mlp_out", layer)
        if bool(mlp_senders.any()):
            write = (source[name] - target[name]) * mask  # [V, B, pos, d_model]
            acc = acc + mlp_senders.view(V, 1, 1, 1).to(acc.dtype) * write
        if not freeze_mlps:
            moved = acc.ne(0).any(-1) & ~mlp_senders.view(V, 1, 1)  # [V, B, pos]: MLPs that see a change
            if bool(moved.any()):
                mid = target[hook_name("resid_mid", layer)].expand(V, -1, -1, -1)
                new = mlp_out(model, layer, (mid + acc)[moved])  # [n, d_model]
                acc[moved] += new - target[name].expand(V, -1, -1, -1)[moved]
    record((n_layers, "logits"), target[resid_entering(n_layers, n_layers)])
    return out
