"""The one sweep engine: many patch variants per forward pass, stacked along the batch axis.

A sweep is a list of cells ``(layer, positions, heads)``; each cell is one variant of the run
(corrupted tokens for denoising, clean for noising or ablation) with the cell's selection
replaced by a source (the other run's activation, or an ablation value). ``V`` cells share a
forward: the run's ``B`` prompts are repeated ``V`` times and each layer's hook patches only
its own rows. A memory budget decides ``V`` (on the fast path also a cap on the computed
positions, :data:`FAST_CHUNK_PAIRS`, for cache locality); results never depend on either.

Two runners execute a chunk:

- the fast path (:mod:`hookpatch.sweeps.fastpath`) computes each stacked row only from its
  cell's layer (joining from the run's cached residual stream there) and from its first
  patched position on (earlier positions equal the unpatched run, whose cached keys and
  values they contribute), packing the computed (row, position) pairs of all cells, whatever
  their layers, into the same matrices, so its FLOPs are close to the minimal ones. A patch
  after attention (z, attn_out, resid_mid, mlp_out, resid_post) changes only the rest of its
  block at the patched positions: those rows finish the block there and join at the next one
  (:data:`RESUMABLE`). It reads only where a :class:`Metric` reads (a plain callable gets
  every position), and a linear metric through its residual directions, not the logits;
- the generic path runs the bridge itself with ``run_with_hooks`` (any model the bridge loads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hookpatch.checks import require_metric_values
from hookpatch.hooks.factory import replace_where
from hookpatch.hooks.selection import Heads, Positions, activation_mask, per_prompt_positions, pos_dim
from hookpatch.metrics.base import Metric
from hookpatch.model.facts import ModelFacts, component_info
from hookpatch.tasks.promptset import PromptSet

DEFAULT_BUDGET = 2 * 1024**3  # bytes
# The fast path's matmuls reach their throughput by ~256 packed rows; far beyond, each layer's
# fresh [rows, d_mlp] buffers outgrow the caches and cost page faults. A fast-path chunk stops
# at this many computed (row, position) pairs (or at the memory budget, if that comes first).
FAST_CHUNK_PAIRS = 2048


# component -> (its hook point in the block, the residual stream the rest of the block adds to):
# the fast path finishes a patched block from there (FastForward.resume_block).
RESUMABLE = {
    "z": ("attn.hook_z", "hook_resid_pre"),
    "attn_out": ("hook_attn_out", "hook_resid_pre"),
    "resid_mid": ("hook_resid_mid", "hook_resid_mid"),
    "mlp_out": ("hook_mlp_out", "hook_resid_mid"),
    "resid_post": ("hook_resid_post", None),
}


@dataclass(frozen=True)
class Cell:
    """One variant: patch ``component`` at ``layer``, at ``positions``, for ``heads``."""

    layer: int
    positions: Positions = None
    heads: Heads = None


@dataclass(frozen=True)
class Run:
    """What a sweep patches into: the run's tokens and cache, and the per-layer sources."""

    tokens: Int[Tensor, "batch pos"]
    cache: Any  # the unpatched run's activations (ActivationCache or dict); the fast path's: fast_cache_names
    sources: Callable[[int], Tensor]  # layer -> source activation, broadcastable to the hook's


def fast_cache_names(component: str, layers: Sequence[int], n_layers: int, rotary: bool) -> list[str]:
    """What the fast path reads from a run's cache for a sweep of ``component`` at ``layers``: the
    component (the source), every block's residual stream, keys and values (where rows join
    and what frozen positions contribute), and for :data:`RESUMABLE` components the residual
    the patched block's rest adds to and the final residual stream."""
    key = "attn.hook_rot_k" if rotary else "attn.hook_k"
    hook = component_info(component).hook_name
    names = [hook(layer) for layer in layers]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.{key}", f"blocks.{layer}.attn.hook_v"]
    if component in RESUMABLE:
        base = RESUMABLE[component][1]
        names += [f"blocks.{layer}.{base}" for layer in layers] if base else []
        names.append(f"blocks.{n_layers - 1}.hook_resid_post")
    return list(dict.fromkeys(names))


def run_cells(
    model: Any,
    facts: ModelFacts,
    prompts: PromptSet,
    component: str,
    cells: Sequence[Cell],
    run: Run,
    metric: Metric | Callable[[Tensor], Tensor],
    *,
    memory_budget: int = DEFAULT_BUDGET,
    fast: Any = None,
    progress: bool = True,
    desc: str = "sweep",
) -> Float[Tensor, "cell batch"]:
    """The metric per cell and prompt, ``[len(cells), batch]``."""
    info = component_info(component)
    B, P = run.tokens.shape
    d = pos_dim(component)
    masks = [
        activation_mask(facts, component, per_prompt_positions(c.positions, B, P, prompts), c.heads)
        for c in cells
    ]
    first_pos = [_first_positions(m, d, B) for m in masks]
    # Cells sorted by where they start, so a fast-path chunk starts as late as it can.
    order = sorted(range(len(cells)), key=lambda i: (cells[i].layer, int(first_pos[i].min())))
    reads_only = isinstance(metric, Metric)  # else the fast path computes every position
    per_variant = _bytes_per_variant(facts, B, P, fast is not None and reads_only)
    chunk = max(1, min(len(cells), memory_budget // max(per_variant, 1)))
    pairs = [int((P - f.clamp(max=P - 1)).sum()) if reads_only else B * P for f in first_pos]
    cap = FAST_CHUNK_PAIRS if fast is not None else None
    out = torch.empty(len(cells), B)
    bar = tqdm(total=len(cells), desc=desc, disable=not progress, leave=False)
    try:
        for idx in _chunks(order, chunk, pairs, cap):
            values = _run_chunk(
                model, info.name, [cells[i] for i in idx], [masks[i] for i in idx],
                torch.stack([first_pos[i] for i in idx]), run, metric, fast, d,
            )
            out[torch.tensor(idx)] = values.detach().float().cpu()
            bar.update(len(idx))
    finally:
        bar.close()
    return out


def _chunks(order: list[int], size: int, weight: Sequence[int], cap: int | None) -> list[list[int]]:
    """``order`` cut into consecutive pieces of at most ``size`` items and (unless one item
    alone exceeds it) at most ``cap`` total ``weight``."""
    chunks: list[list[int]] = []
    total = 0
    for i in order:
        if chunks and len(chunks[-1]) < size and (cap is None or total + weight[i] <= cap):
            chunks[-1].append(i)
            total += weight[i]
        else:
            chunks.append([i])
            total = weight[i]
    return chunks


def _selected_positions(mask: Tensor, d: int, B: int) -> Bool[Tensor, "batch pos"]:
    """Per prompt, the (query) positions where ``mask`` selects anything."""
    along = mask.movedim(d, -1)
    return along.reshape(along.shape[0], -1, along.shape[-1]).any(1).expand(B, -1)


def _first_positions(mask: Tensor, d: int, B: int) -> Int[Tensor, " batch"]:
    """Per prompt, the earliest position ``mask`` selects (``n_pos`` where it selects none)."""
    along = _selected_positions(mask, d, B)
    return torch.where(along.any(-1), along.int().argmax(-1), along.shape[-1])


def _bytes_per_variant(facts: ModelFacts, B: int, P: int, reads_only: bool) -> int:
    """A generous estimate of the memory one stacked variant needs during a forward
    (``reads_only``: logits at one position per prompt rather than all)."""
    per_pos = facts.d_model * 10 + facts.n_heads * (P * 3 + facts.d_head * 4) + (facts.d_mlp or 4 * facts.d_model) * 3
    logits = 0 if reads_only else P * facts.d_vocab
    return 4 * B * (P * per_pos + logits + facts.d_vocab)


def _stacked_hooks(
    component: str, cells: Sequence[Cell], masks: Sequence[Tensor], run: Run, B: int, d: int
) -> dict[str, partial]:
    """One hook per patched layer whose mask selects only that layer's variant rows."""
    info = component_info(component)
    V = len(cells)
    hooks = {}
    for layer in sorted({c.layer for c in cells}):
        stacked = []
        for c, m in zip(cells, masks, strict=True):
            m = m.expand(B, *m.shape[1:])
            stacked.append(m if c.layer == layer else torch.zeros_like(m))
        mask = torch.cat(stacked)  # [V * B, ...]
        source = run.sources(layer)
        if source.ndim and source.shape[0] == B > 1:  # per-prompt sources; [1, ...] broadcasts
            source = source.repeat(V, *([1] * (source.ndim - 1)))  # [V * B, ...]
        hooks[info.hook_name(layer)] = partial(replace_where, mask=mask, source=source, pos_dim=d)
    return hooks


def _run_chunk(
    model: Any,
    component: str,
    cells: Sequence[Cell],
    masks: Sequence[Tensor],
    first_pos: Int[Tensor, "variant batch"],
    run: Run,
    metric: Metric | Callable[[Tensor], Tensor],
    fast: Any,
    d: int,
) -> Float[Tensor, "variant batch"]:
    """Metric values ``[V, B]`` for one chunk of cells."""
    B, P = run.tokens.shape
    V = len(cells)
    with torch.no_grad():
        if fast is not None:
            values = _run_fast(model, fast, component, cells, masks, first_pos, run, metric, d)
        else:
            hooks = _stacked_hooks(component, cells, masks, run, B, d)
            logits = model.run_with_hooks(run.tokens.repeat(V, 1), fwd_hooks=list(hooks.items()))
            values = metric(logits.reshape(V, B, P, -1))
    return require_metric_values(values, (V, B))


def _run_fast(
    model: Any,
    fast: Any,
    component: str,
    cells: Sequence[Cell],
    masks: Sequence[Tensor],
    first_pos: Int[Tensor, "variant batch"],
    run: Run,
    metric: Metric | Callable[[Tensor], Tensor],
    d: int,
) -> Tensor:
    """The fast path: variant ``v``'s rows join at its cell's layer (or, for a
    :data:`RESUMABLE` component, at the next one) and compute from their first patched
    position (or read position, if earlier) on."""
    from hookpatch.sweeps.fastpath import frozen_kv_from_cache

    V, B = first_pos.shape
    P = run.tokens.shape[1]
    layers = torch.tensor([c.layer for c in cells])  # [V]
    if component in RESUMABLE:
        resid = _finish_patched_blocks(fast, component, cells, masks, run, B, d)
        start, hooks = layers + 1, {}
    else:
        resid = torch.cat([run.cache[f"blocks.{c.layer}.hook_resid_pre"] for c in cells])
        start, hooks = layers, _stacked_hooks(component, cells, masks, run, B, d)
    if isinstance(metric, Metric):
        read = metric.read_positions.to(first_pos.device)  # [B]
        active_from = torch.minimum(first_pos, read).flatten()  # [V * B]
        read_pos = read.repeat(V).unsqueeze(-1)  # [V * B, 1]
    else:  # a callable may read any position: return them all
        active_from = torch.zeros(V * B, dtype=torch.long)
        read_pos = torch.arange(P).expand(V * B, P)
    final = fast.run(  # the unembedding's input at the reads
        resid, start.repeat_interleave(B), hooks=hooks, read_pos=read_pos, active_from=active_from,
        frozen_kv=frozen_kv_from_cache(run.cache, int(start.min()), model), unembed=False,
    )
    if isinstance(metric, Metric):
        return metric.from_unembed_input(final.view(V, B, -1), model, fast.unembed)
    return metric(fast.unembed(final).view(V, B, P, -1))


def _finish_patched_blocks(
    fast: Any,
    component: str,
    cells: Sequence[Cell],
    masks: Sequence[Tensor],
    run: Run,
    B: int,
    d: int,
) -> Float[Tensor, "rows pos d_model"]:
    """For a :data:`RESUMABLE` component: per variant row, the residual stream entering the
    block after the cell's layer — the run's, except at the patched positions, where the
    patched block is finished from the patched activation (``[V * B, pos, d_model]``)."""
    from hookpatch.sweeps.fastpath import FastHook

    point, base_point = RESUMABLE[component]
    info = component_info(component)
    n = fast.n_layers
    after = lambda i: f"blocks.{i + 1}.hook_resid_pre" if i + 1 < n else f"blocks.{n - 1}.hook_resid_post"  # noqa: E731
    layers = [c.layer for c in cells]
    resid = torch.cat([run.cache[after(layer)] for layer in layers])  # [V * B, pos, d_model], a new tensor
    for layer in sorted(set(layers)):
        vs = [v for v, at in enumerate(layers) if at == layer]
        name = info.hook_name(layer)
        hook = _stacked_hooks(component, [cells[v] for v in vs], [masks[v] for v in vs], run, B, d)[name]
        own = run.cache[name]  # [B, pos, ...]: the run's own activation
        act = hook(own.repeat(len(vs), *([1] * (own.ndim - 1))), FastHook(name, layer, 0))
        where = torch.cat([_selected_positions(masks[v], d, B) for v in vs]).to(act.device)  # [len(vs) * B, pos]
        base = None
        if base_point is not None:
            base = run.cache[f"blocks.{layer}.{base_point}"].repeat(len(vs), 1, 1)[where]  # [n, d_model]
        rows = (torch.tensor(vs).unsqueeze(-1) * B + torch.arange(B)).flatten().to(resid.device)  # [len(vs) * B]
        block = resid[rows]
        block[where] = fast.resume_block(layer, point, base, act[where])
        resid[rows] = block
    return resid
