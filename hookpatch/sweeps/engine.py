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
  their layers, into the same matrices, so its FLOPs are close to the minimal ones; it
  computes logits only where a :class:`Metric` reads (a plain callable gets every position);
- the generic path runs the bridge itself with ``run_with_hooks`` (any model the bridge loads).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hookpatch.errors import HookpatchError
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
    cache: Any  # the unpatched run's activations (ActivationCache or dict): residual stream, keys, values
    sources: Callable[[int], Tensor]  # layer -> source activation, broadcastable to the hook's


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


def _first_positions(mask: Tensor, d: int, B: int) -> Int[Tensor, " batch"]:
    """Per prompt, the earliest position ``mask`` selects (``n_pos`` where it selects none)."""
    along = mask.movedim(d, -1)
    along = along.reshape(along.shape[0], -1, along.shape[-1]).any(1)  # [1 or batch, pos]
    first = torch.where(along.any(-1), along.int().argmax(-1), along.shape[-1])
    return first.expand(B)


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
        for c, m in zip(cells, masks):
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
    hooks = _stacked_hooks(component, cells, masks, run, B, d)
    with torch.no_grad():
        if fast is not None:
            values = _run_fast(model, fast, cells, hooks, first_pos, run, metric)
        else:
            logits = model.run_with_hooks(run.tokens.repeat(V, 1), fwd_hooks=list(hooks.items()))
            values = metric(logits.reshape(V, B, P, -1))
    if not isinstance(values, Tensor) or tuple(values.shape) != (V, B):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise HookpatchError(
            f"the metric returned {shape} for logits shaped [{V}, {B}, pos, d_vocab]; it must return "
            f"one value per prompt, [..., batch] (here [{V}, {B}]). Reduce over prompts outside the metric."
        )
    return values


def _run_fast(
    model: Any,
    fast: Any,
    cells: Sequence[Cell],
    hooks: dict[str, partial],
    first_pos: Int[Tensor, "variant batch"],
    run: Run,
    metric: Metric | Callable[[Tensor], Tensor],
) -> Tensor:
    """The fast path: variant ``v``'s rows join at its cell's layer and compute from their
    first patched position (or read position, if earlier) on."""
    from hookpatch.sweeps.fastpath import frozen_kv_from_cache

    V, B = first_pos.shape
    P = run.tokens.shape[1]
    layers = [c.layer for c in cells]
    first = min(layers)
    per_layer = torch.stack([run.cache[f"blocks.{l}.hook_resid_pre"] for l in range(first, max(layers) + 1)])
    which = torch.tensor(layers, device=per_layer.device) - first  # [V]
    resid = per_layer[which].flatten(0, 1)  # [V * B, P, d_model]: each row's residual at its layer
    start = torch.tensor(layers).repeat_interleave(B)  # [V * B]
    if isinstance(metric, Metric):
        read = metric.read_positions.to(first_pos.device)  # [B]
        active_from = torch.minimum(first_pos, read)  # [V, B]
        read_pos = read.repeat(V)  # [V * B]
    else:  # a callable may read any position: return them all
        active_from = torch.zeros_like(first_pos)
        read_pos = torch.arange(P).expand(V * B, P)
    logits = fast.run(
        resid, start, hooks=hooks, read_pos=read_pos, active_from=active_from.flatten(),
        frozen_kv=frozen_kv_from_cache(run.cache, first, model),
    )
    if isinstance(metric, Metric):
        return metric.from_final(logits.reshape(V, B, -1))
    return metric(logits.reshape(V, B, P, -1))
