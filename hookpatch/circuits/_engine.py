"""The circuit engine: many edge or path interventions per forward, as picklable jobs.

A variant is one intervention on the target run: a set of edges patched exactly (``"direct"``
semantics), or senders whose effect reaches some receivers with every other head frozen
(``"ioi"`` semantics, as in the IOI paper). ``V`` variants of a ``B``-prompt run share one
stacked forward, as in the sweep engine; a :class:`CircuitJob` names its variants by indices
into the graph (no model, cache or closure), so it pickles, and an executor runs it against a
:class:`CircuitContext`, which a worker owns. The runner turns the job's
:mod:`~hookpatch.circuits._edits` into hooks of its own kind and never learns which semantics
produced them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hookpatch._checks import require_metric_values
from hookpatch.circuits._edits import AddEdits, SetEdits
from hookpatch.circuits._graph import Edge, Graph, Node, Receiver, Site
from hookpatch.circuits._senders import cache_names, frozen_run_inputs
from hookpatch.errors import HookpatchError
from hookpatch.metrics._base import Metric
from hookpatch.runners import CachedRun, Runner, runner_for
from hookpatch.tasks._promptset import PromptSet

Position = int | str | None  # a column, a position name of the prompt set, or every position


@dataclass(frozen=True)
class CircuitContext:
    """What a worker owns to run circuit jobs: the model, its graph and runner, the prompt set,
    the metric and the cached unpatched runs (``"clean"``, ``"corrupted"``)."""

    model: Any
    graph: Graph
    prompts: PromptSet
    metric: Metric
    runner: Runner
    runs: Mapping[str, CachedRun]
    recipe: CircuitRecipe | None = None  # how a worker builds this context from its own model


@dataclass(frozen=True)
class CircuitRecipe:
    """How to build a :class:`CircuitContext` from a model: plain, picklable data, so a worker
    that loaded the same model computes its own cached runs instead of receiving them.

    Attributes:
        prompts, metric, graph: the prompt set, the metric and the model's graph.
        fast: the runner choice, as passed to :func:`~hookpatch.runners.runner_for`.
        ablation: ``"mean"`` or ``"zero"`` to add a cached run of that name whose sender
            outputs are ``ablated_from``'s, averaged over prompts or zeroed (see
            :func:`ablated_run`); None for none.
    """

    prompts: PromptSet
    metric: Metric
    graph: Graph
    fast: bool | None
    ablation: str | None = None
    ablated_from: str = "clean"

    def build(self, model: Any) -> CircuitContext:
        """The context on ``model``: its runner and the clean and corrupted runs, cached at
        every sender output and receiver input, plus the ablated run if asked for."""
        runner = runner_for(model, self.fast)
        tokens = {"clean": self.prompts.clean_tokens, "corrupted": self.prompts.corrupted_tokens}
        runs = dict(runner.cache_for_edits(tokens, self.metric, cache_names(self.graph.facts.n_layers)))
        if self.ablation is not None:
            runs[self.ablation] = ablated_run(runs[self.ablated_from], self.ablation, self.graph.facts.n_layers)
        return CircuitContext(model, self.graph, self.prompts, self.metric, runner, runs, self)


def ablated_run(run: CachedRun, ablation: str, n_layers: int) -> CachedRun:
    """``run`` with every cached sender output and receiver input replaced by its mean over
    prompts, per position (``"mean"``), or by zeros (``"zero"``): the run edges take their
    sender outputs from when they are ablated rather than patched."""
    cache = {}
    for name in cache_names(n_layers):
        act = run.cache[name]
        value = act.mean(0, keepdim=True) if ablation == "mean" else torch.zeros_like(act[:1])
        cache[name] = value.expand_as(act)
    return CachedRun(run.tokens, cache, run.values)


@dataclass(frozen=True)
class PathVariant:
    """One intervention. ``"direct"``: the edges ``edges`` (indices into ``graph.edges``) are
    patched. ``"ioi"``: the senders ``senders`` (indices into ``graph.senders``) reach the
    receivers ``receivers`` (indices into ``graph.receivers``) with every other head frozen.
    ``positions``: where the senders' writes are taken (None: every position)."""

    edges: tuple[int, ...] = ()
    senders: tuple[int, ...] = ()
    receivers: tuple[int, ...] = ()
    positions: Position = None


@dataclass(frozen=True)
class CircuitJob:
    """Run ``variants`` (one stacked forward) on the cached run ``target``, with ``source`` the
    other run.

    Attributes:
        semantics: ``"direct"`` (exact edge patching) or ``"ioi"`` (path patching through a
            run with the other heads frozen).
        target, source: the cached runs patched into and taken from.
        variants: the interventions, in the order of the result's rows.
        index: each variant's row in the whole call's ``[variant, batch]`` values.
        receiver_positions: the positions receivers are patched at (None: all).
        freeze_mlps: ``"ioi"`` only: freeze the MLPs in the first run too.
    """

    semantics: str
    target: str
    source: str
    variants: tuple[PathVariant, ...]
    index: tuple[int, ...]
    receiver_positions: tuple[int | str, ...] | None = None
    freeze_mlps: bool = False

    def run(self, context: CircuitContext) -> Float[Tensor, "variant batch"]:
        """The metric per variant and prompt, ``[len(variants), batch]`` (float32, on the CPU)."""
        with torch.no_grad():
            return self._run(context)

    def _run(self, context: CircuitContext) -> Float[Tensor, "variant batch"]:
        target, source = context.runs[self.target], context.runs[self.source]
        B, P = target.tokens.shape
        receivers = position_mask(self.receiver_positions, context.prompts, B, P)  # [B, pos]
        senders = torch.stack([position_mask(_one(v.positions), context.prompts, B, P) for v in self.variants])
        if self.semantics == "direct":
            edits: Any = _add_edits(context, self.variants, target, source, senders & receivers)
        else:
            edits = _set_edits(context, self.variants, target, source, senders, receivers, self.freeze_mlps)
        values = context.runner.run_edits(target, edits, context.metric)
        return require_metric_values(values, (len(self.variants), B)).detach().float().cpu()


def _one(position: Position) -> tuple[int | str, ...] | None:
    return None if position is None else (position,)


def site_of(receiver: Receiver) -> Site:
    """The edit site of a receiver: ``(layer, input)``; the logits sit at ``n_layers``."""
    return receiver.layer, receiver.input


def _heads_at(graph: Graph, kind: str) -> int:
    f = graph.facts
    return f.n_heads if kind == "q" else f.n_kv_heads if kind in ("k", "v") else 1


def _add_edits(
    context: CircuitContext,
    variants: Sequence[PathVariant],
    target: CachedRun,
    source: CachedRun,
    pos_mask: Bool[Tensor, "variant batch pos"],
) -> AddEdits:
    graph = context.graph
    rows = torch.cat([torch.full((len(v.edges),), i, dtype=torch.long) for i, v in enumerate(variants)])
    index = torch.tensor([e for v in variants for e in v.edges], dtype=torch.long)  # [pairs]
    receiver, sender = graph.edge_ends(index)  # indices into graph.receivers and graph.senders
    used = torch.unique(sender)  # the senders any variant patches an edge from, in graph order
    senders = [graph.senders[i] for i in used.tolist()]
    local = torch.searchsorted(used, sender)  # each pair's sender among them
    weights: dict[Site, Tensor] = {}
    for r in torch.unique(receiver).tolist():  # receivers grouped into sites: a layer's q, k, v, MLP, logits
        target_receiver = graph.receivers[r]
        site = site_of(target_receiver)
        w = weights.get(site)
        if w is None:
            w = weights[site] = torch.zeros(len(variants), len(senders), _heads_at(graph, target_receiver.input))
        at = receiver == r
        w[rows[at], local[at], target_receiver.head or 0] = 1
    return AddEdits(context.model, tuple(senders), source.cache, target.cache, weights, pos_mask)


def _set_edits(
    context: CircuitContext,
    variants: Sequence[PathVariant],
    target: CachedRun,
    source: CachedRun,
    sender_mask: Bool[Tensor, "variant batch pos"],
    receiver_mask: Bool[Tensor, "batch pos"],
    freeze_mlps: bool,
) -> SetEdits:
    graph = context.graph
    V = len(variants)
    senders: list[list[Node]] = [[graph.senders[i] for i in v.senders] for v in variants]
    receivers: list[list[Receiver]] = [[graph.receivers[i] for i in v.receivers] for v in variants]
    heads: dict[Site, Tensor] = {}  # site -> [V, head]
    for v, rs in enumerate(receivers):
        for r in rs:
            site = site_of(r)
            h = heads.get(site)
            if h is None:
                h = heads[site] = torch.zeros(V, _heads_at(graph, r.input), dtype=torch.bool)
            h[v, r.head or 0] = True
    # with every other head frozen the first run is position-wise: a sender's write at a position
    # reaches the residual stream there only, so only the receiver positions need it
    values = frozen_run_inputs(
        context.model, senders, sender_mask & receiver_mask, list(heads), target.cache, source.cache, freeze_mlps
    )
    return SetEdits(values, heads, receiver_mask.unsqueeze(0).expand(V, -1, -1))


def position_mask(
    positions: Sequence[int | str] | None, prompts: PromptSet, batch: int, n_pos: int
) -> Bool[Tensor, "batch pos"]:
    """Per prompt, the columns ``positions`` (indices, or names of the prompt set resolved per
    prompt) select; every column for None."""
    if positions is None:
        return torch.ones(batch, n_pos, dtype=torch.bool)
    mask = torch.zeros(batch, n_pos, dtype=torch.bool)
    rows = torch.arange(batch)
    for p in positions:
        col = prompts.position(p).cpu() if isinstance(p, str) else torch.full((batch,), int(p))
        mask[rows, col % n_pos] = True
    return mask


def check_positions(positions: Any, prompts: PromptSet, n_pos: int, arg: str) -> tuple[int | str, ...] | None:
    """``positions`` as a tuple of columns and names, checked (None stays None)."""
    if positions is None:
        return None
    items = [positions] if isinstance(positions, int | str) else list(positions)
    out: list[int | str] = []
    for p in items:
        if isinstance(p, str):
            prompts.position(p)  # raises naming the known positions
            out.append(p)
        elif isinstance(p, int) and not isinstance(p, bool) and -n_pos <= p < n_pos:
            out.append(p % n_pos)
        else:
            raise HookpatchError(
                f"{arg}={positions!r}: expected None (every position), a column index in "
                f"[-{n_pos}, {n_pos}) or a position name of the prompt set ({sorted(prompts.positions)}), "
                "or a list of them."
            )
    if not out:
        raise HookpatchError(f"{arg}=[] selects no position; pass None for every position.")
    return tuple(dict.fromkeys(out))


def plan_jobs(
    semantics: str,
    target: str,
    source: str,
    variants: Sequence[PathVariant],
    size: int,
    *,
    receiver_positions: tuple[int | str, ...] | None,
    freeze_mlps: bool,
) -> list[CircuitJob]:
    """The variants cut into jobs of at most ``size``, in order."""
    size = max(1, size)
    return [
        CircuitJob(
            semantics, target, source, tuple(variants[i : i + size]), tuple(range(i, min(i + size, len(variants)))),
            receiver_positions=receiver_positions, freeze_mlps=freeze_mlps,
        )
        for i in range(0, len(variants), size)
    ]


def run_jobs(
    context: CircuitContext, jobs: Sequence[CircuitJob], executor: Any, *, progress: bool, desc: str
) -> Float[Tensor, "variant batch"]:
    """The metric per variant and prompt: ``jobs`` run by ``executor``, gathered in order."""
    results = executor.run(jobs, context, progress=progress, desc=desc)
    if len(results) != len(jobs):
        raise HookpatchError(
            f"executor= returned {len(results)} results for {len(jobs)} jobs; an executor must return "
            "one result per job, in the jobs' order."
        )
    n = sum(len(job.variants) for job in jobs)
    out = torch.empty(n, len(context.prompts))
    for job, values in zip(jobs, results, strict=True):
        out[torch.tensor(job.index, dtype=torch.long)] = values
    return out


def edge_indices(graph: Graph, edges: Sequence[Edge]) -> tuple[int, ...]:
    """The indices of ``edges`` in ``graph.edges``."""
    return tuple(graph.indices(edges))
