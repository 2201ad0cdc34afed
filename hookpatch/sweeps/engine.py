"""The one sweep engine: many patch variants per forward pass, stacked along the batch axis.

A sweep is a list of cells ``(layer, positions, heads)``; each cell is one variant of the run
(corrupted tokens for denoising, clean for noising or ablation) with the cell's selection
replaced by a source (the other run's activation, or an ablation value). ``V`` cells share a
forward: the run's ``B`` prompts are repeated ``V`` times and each layer's hook patches only
its own rows. A memory budget decides ``V``; results never depend on it.

Two runners execute a chunk:

- the fast path (:mod:`hookpatch.sweeps.fastpath`) starts at the chunk's earliest patched
  layer from the run's cached residual stream, reuses the cached keys/values of positions
  before the earliest patched position, and computes logits only where the metric reads;
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
    cache: Any  # ActivationCache of the unpatched run (residual stream, keys, values)
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
    first_pos = [_first_position(m, d) for m in masks]
    order = sorted(range(len(cells)), key=lambda i: (cells[i].layer, first_pos[i]))
    per_variant = _bytes_per_variant(facts, B, P, fast is not None)
    chunk = max(1, min(len(cells), memory_budget // max(per_variant, 1)))
    out = torch.empty(len(cells), B)
    bar = tqdm(total=len(cells), desc=desc, disable=not progress, leave=False)
    try:
        for start in range(0, len(order), chunk):
            idx = order[start : start + chunk]
            values = _run_chunk(
                model, facts, prompts, info.name, [cells[i] for i in idx], [masks[i] for i in idx],
                min(first_pos[i] for i in idx), run, metric, fast, d,
            )
            out[torch.tensor(idx)] = values.detach().float().cpu()
            bar.update(len(idx))
    finally:
        bar.close()
    return out


def _first_position(mask: Tensor, d: int) -> int:
    """The earliest position any prompt has selected in ``mask``."""
    along = mask.movedim(d, -1).reshape(-1, mask.shape[d]).any(0)
    hits = along.nonzero()
    return int(hits[0]) if len(hits) else mask.shape[d]


def _bytes_per_variant(facts: ModelFacts, B: int, P: int, fast: bool) -> int:
    """A generous estimate of the memory one stacked variant needs during a forward."""
    per_pos = facts.d_model * 10 + facts.n_heads * (P * 3 + facts.d_head * 4) + (facts.d_mlp or 4 * facts.d_model) * 3
    logits = 0 if fast else P * facts.d_vocab
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
    facts: ModelFacts,
    prompts: PromptSet,
    component: str,
    cells: Sequence[Cell],
    masks: Sequence[Tensor],
    first_pos: int,
    run: Run,
    metric: Metric | Callable[[Tensor], Tensor],
    fast: Any,
    d: int,
) -> Float[Tensor, "variant batch"]:
    """Metric values ``[V, B]`` for one chunk of cells."""
    B, P = run.tokens.shape
    V = len(cells)
    hooks = _stacked_hooks(component, cells, masks, run, B, d)
    is_metric = isinstance(metric, Metric)
    with torch.no_grad():
        if fast is not None:
            start = min(c.layer for c in cells)
            read = metric.read_positions if is_metric else None
            offset = min(first_pos, int(read.min()), P - 1) if is_metric else 0
            resid = run.cache[f"blocks.{start}.hook_resid_pre"][:, offset:]
            resid = resid.repeat(V, 1, 1)  # [V * B, P - offset, d_model]
            from hookpatch.sweeps.fastpath import prefix_kv_from_cache

            prefix = None
            if offset:  # the run's keys/values before `offset`, once per stacked variant
                prefix = [
                    (k.repeat(V, 1, 1, 1), v.repeat(V, 1, 1, 1))
                    for k, v in prefix_kv_from_cache(run.cache, start, offset, model)
                ]
            logits = fast.run(
                resid, start, hooks=hooks,
                read_pos=None if read is None else read.repeat(V),
                offset=offset, prefix_kv=prefix,
            )
            if is_metric:
                values = metric.from_final(logits.reshape(V, B, -1))
            else:
                values = metric(logits.reshape(V, B, P, -1))
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
