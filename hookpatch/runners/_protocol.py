"""What the sweep engine asks of whatever runs the model: the :class:`Runner` protocol.

A sweep needs two things from a runner: the two unpatched runs (the metric on each, and the
activations the sweep reads from them) and, for a chunk of stacked cells, the metric after
patching each cell. :class:`~hookpatch.runners.BridgeRunner` answers with the bridge's own
``run_with_cache``/``run_with_hooks``; :class:`~hookpatch.runners.FastRunner` with
hookpatch's direct block runner, which computes only what a cell changes. The engine drives
both the same way and never asks which one it has.

Also here: the stacked patching hooks both runners bind (one per patched layer, each touching
only its own variants' rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hookpatch.hooks._factory import replace_where
from hookpatch.metrics._base import Metric
from hookpatch.model._facts import ModelFacts, component_info


@dataclass(frozen=True)
class CachedRun:
    """One unpatched run: its tokens, the activations a sweep reads from it (hook name →
    ``[batch, ...]``) and the metric on it (``[batch]``)."""

    tokens: Int[Tensor, "batch pos"]
    cache: Any  # indexable by hook name: a dict, or the bridge's ActivationCache
    values: Float[Tensor, " batch"]


@dataclass(frozen=True)
class Chunk:
    """``V`` variants of one run stacked along the batch axis, ready for a runner.

    Attributes:
        component: the patched component.
        layers: per variant, the layer it patches.
        masks: per variant, the boolean mask of the entries it replaces (the component's axes,
            batch first, 1 or ``batch`` rows).
        first_pos: ``[V, batch]`` per variant and prompt, the first (query) position patched.
        run: the run patched into.
        sources: layer → the activation written there (broadcastable to the hook's).
        pos_dim: the (query) position axis of the component's activation.
    """

    component: str
    layers: Sequence[int]
    masks: Sequence[Bool[Tensor, "..."]]
    first_pos: Int[Tensor, "variant batch"]
    run: CachedRun
    sources: Mapping[int, Tensor]
    pos_dim: int


@runtime_checkable
class Runner(Protocol):
    """Runs the model for the sweep engine (see the module docstring).

    Attributes:
        name: ``"bridge"`` or ``"fast"``, recorded in results.
        chunk_pairs: at most this many computed (row, position) pairs per chunk (None: no cap;
            only the memory budget decides the chunk size).
    """

    name: str
    chunk_pairs: int | None

    def cache_runs(
        self, runs: Mapping[str, Int[Tensor, "batch pos"]], metric: Metric, component: str, layers: Sequence[int]
    ) -> dict[str, CachedRun]:
        """Run each named token tensor unpatched: the metric and what a sweep of ``component``
        at ``layers`` reads."""
        ...

    def bytes_per_variant(self, facts: ModelFacts, metric: Metric, component: str, batch: int, n_pos: int) -> int:
        """A generous estimate of the memory one stacked variant needs during a chunk that
        patches ``component``."""
        ...

    def run_chunk(self, chunk: Chunk, metric: Metric) -> Float[Tensor, "variant batch"]:
        """The metric per variant and prompt after patching each variant's cell."""
        ...


    def cache_for_edits(
        self, runs: Mapping[str, Int[Tensor, "batch pos"]], metric: Metric, names: Sequence[str]
    ) -> dict[str, CachedRun]:
        """Run each named token tensor unpatched: the metric, the activations ``names`` and
        whatever :meth:`run_edits` reads from a run."""
        ...

    def run_edits(self, run: CachedRun, edits: Any, metric: Metric) -> Float[Tensor, "variant batch"]:
        """The metric per variant and prompt after applying receiver ``edits`` (a
        :class:`hookpatch.circuits._edits.ReceiverEdits`: what some heads', MLPs' or the
        logits' inputs become, per variant) to ``run``."""
        ...


def stacked_hooks(
    component: str,
    layers: Sequence[int],
    masks: Sequence[Tensor],
    sources: Mapping[int, Tensor],
    batch: int,
    pos_dim: int,
) -> dict[str, partial]:
    """One hook per patched layer whose mask selects only that layer's variant rows
    (``V = len(layers)`` variants of ``batch`` rows each, stacked in order)."""
    info = component_info(component)
    V = len(layers)
    hooks = {}
    for layer in sorted(set(layers)):
        stacked = []
        for at, m in zip(layers, masks, strict=True):
            m = m.expand(batch, *m.shape[1:])
            stacked.append(m if at == layer else torch.zeros_like(m))
        mask = torch.cat(stacked)  # [V * batch, ...]
        source = sources[layer]
        if source.ndim and source.shape[0] == batch > 1:  # per-prompt sources; [1, ...] broadcasts
            source = source.repeat(V, *([1] * (source.ndim - 1)))  # [V * batch, ...]
        hooks[info.hook_name(layer)] = partial(replace_where, mask=mask, source=source, pos_dim=pos_dim)
    return hooks


def selected_positions(mask: Tensor, pos_dim: int, batch: int) -> Bool[Tensor, "batch pos"]:
    """Per prompt, the (query) positions where ``mask`` selects anything."""
    along = mask.movedim(pos_dim, -1)
    return along.reshape(along.shape[0], -1, along.shape[-1]).any(1).expand(batch, -1)


def first_positions(mask: Tensor, pos_dim: int, batch: int) -> Int[Tensor, " batch"]:
    """Per prompt, the earliest position ``mask`` selects (``n_pos`` where it selects none)."""
    along = selected_positions(mask, pos_dim, batch)
    return torch.where(along.any(-1), along.int().argmax(-1), along.shape[-1])

