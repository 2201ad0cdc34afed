"""Exact edge patching and path patching, over a grid of senders.

- :func:`edge_patch` — patch a set of edges (or several sets, one row each) exactly: every
  receiver's input becomes its input in the run being patched plus, for each patched edge
  into it, the sender's output in the other run minus its output in this same forward (so
  with every edge patched each node reads what it read in the other run, and the metric is
  the other run's). One edge of a head into a later head's query is TransformerLens's direct
  path patching.
- :func:`path_patch_sweep` — every sender of a grid into a set of receivers (which heads change
  the name movers' queries?), with ``semantics="direct"`` (the edges alone) or ``"ioi"`` (the
  IOI paper's path patching: the sender patched while every other head is frozen, the
  receivers' inputs recorded, then only those patched).

Both run on the sweep machinery: a runner (the fast path where the model's family has one), a
memory budget, an executor over picklable jobs, a progress bar, and a typed
:class:`~hookpatch.results.SweepResult` whose effects are paired per-prompt changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from hookpatch._checks import (
    IntsLike,
    as_int,
    as_metric,
    metric_name,
    require_finite_result,
    require_finite_runs,
    require_metric_values,
)
from hookpatch._provenance import GridFacts, Provenance, run_facts
from hookpatch.circuits._engine import (
    CircuitContext,
    CircuitRecipe,
    PathVariant,
    ablated_run,
    check_positions,
    edge_indices,
    plan_jobs,
    run_jobs,
)
from hookpatch.circuits._graph import RECEIVER_INPUTS, Edge, EdgeIndices, Graph, Node, Receiver, as_graph, sends_to
from hookpatch.errors import HookpatchError
from hookpatch.metrics._base import Metric
from hookpatch.model._loading import require_eval
from hookpatch.results import SweepResult
from hookpatch.runners import Runner, require_executor
from hookpatch.sweeps._engine import DEFAULT_BUDGET
from hookpatch.sweeps._grid import Grid
from hookpatch.tasks._promptset import PromptSet

DIRECTIONS = ("denoising", "noising")
EDGE_ABLATIONS = ("mean", "zero")
SEMANTICS = ("direct", "ioi")
SWEEP_GRIDS = (("layer", "head"), ("layer", "pos", "head"), ("sender",), ("sender", "receiver"))


def edge_patch(
    model: Any,
    prompts: PromptSet,
    metric: Metric | Callable[[Tensor], Tensor],
    edges: Any = None,
    *,
    edge_sets: Sequence[Any] | None = None,
    direction: str = "denoising",
    ablation: str | None = None,
    positions: Any = None,
    graph: Graph | None = None,
    memory_budget: int = DEFAULT_BUDGET,
    fast: bool | None = None,
    progress: bool = False,
    executor: Any = None,
) -> SweepResult:
    """Exact edge patching: the metric with the given edges patched, per prompt.

    Example:
        >>> res = edge_patch(model, prompts, metric, ["L0H1->L2H3.q", "MLP0->logits"])
        >>> res.values[0]                                   # [batch]
        >>> res = edge_patch(model, prompts, metric, edge_sets=[circuit_a, circuit_b])

    Args:
        model: a TransformerBridge in eval mode whose blocks the graph can express.
        prompts: the clean/corrupted prompt set.
        metric: a :class:`Metric` (or a callable ``logits → [..., batch]``).
        edges: one edge set: labels (``"L0H1->L2H3.q"``), ``(sender, receiver)`` pairs or
            :class:`~hookpatch.circuits.Edge` s. Or pass ``edge_sets``.
        edge_sets: several edge sets, each patched on its own (one row of the result each).
        direction: ``"denoising"`` (the clean run's sender outputs into the corrupted run) or
            ``"noising"`` (corrupted into clean).
        ablation: None (the other run's sender outputs), ``"mean"`` (their mean over the
            prompts, per position) or ``"zero"`` (zero: a head's z, an MLP's output, the
            embeddings), each written along the patched edges into the run ``direction`` names.
        positions: where the edges are patched (columns or position names, resolved per
            prompt; None: every position). A sender's write at a position reaches receivers at
            that same position.
        graph: the model's graph (default: built from the model).
        memory_budget, fast, progress, executor: as in :func:`hookpatch.patch_sweep`.

    Returns:
        A :class:`SweepResult` over ``("edge_set",)``: ``values[set, batch]``, labelled with
        each set's size (``"3 edges"``) or, for one edge, its label.
    """
    if ablation is not None and ablation not in EDGE_ABLATIONS:
        raise HookpatchError(f"ablation={ablation!r}: expected None (the other run), or one of {EDGE_ABLATIONS}.")
    if (edges is None) == (edge_sets is None):
        raise HookpatchError("edge_patch: pass exactly one of edges= (one edge set) and edge_sets= (several).")
    ctx = _Context.build(model, prompts, metric, graph, fast, direction)
    g = ctx.work.graph
    if edge_sets is None:
        sets = [_index_set(g, edges)]
    else:
        if isinstance(edge_sets, str | Edge) or not isinstance(edge_sets, Sequence):
            raise HookpatchError(
                "edge_sets= must be a list of edge sets (each a list of edges); for one set pass edges=."
            )
        sets = [_index_set(g, s) for s in edge_sets]
    labels = tuple(g.edge_at(s[0]).label if len(s) == 1 else f"{len(s)} edges" for s in sets)
    variants = [PathVariant(edges=s) for s in sets]
    receiver_positions = check_positions(positions, prompts, prompts.n_pos, "positions")
    source = None
    if ablation is not None:
        ctx, source = ctx.with_ablated_source(ablation), ablation
    return ctx.run(
        "direct", variants, ("edge_set",), {"edge_set": labels}, receiver_positions=receiver_positions, source=source,
        freeze_mlps=False, memory_budget=memory_budget, progress=progress, executor=executor,
        method="edge_patch", receivers=None, grid=None,
    )


def path_patch_sweep(
    model: Any,
    prompts: PromptSet,
    metric: Metric | Callable[[Tensor], Tensor],
    receivers: Any = None,
    *,
    receiver_input: str | None = None,
    by: Sequence[str] = ("layer", "head"),
    semantics: str = "direct",
    direction: str = "denoising",
    freeze_mlps: bool = False,
    layers: IntsLike = None,
    positions: Any = None,
    heads: IntsLike = None,
    receiver_positions: Any = None,
    graph: Graph | None = None,
    memory_budget: int = DEFAULT_BUDGET,
    fast: bool | None = None,
    progress: bool = True,
    executor: Any = None,
) -> SweepResult:
    """Path patching from every sender of a grid into a set of receivers.

    Example:
        >>> # which heads change the name movers' queries (IOI paper, figure 3)?
        >>> res = path_patch_sweep(model, prompts, metric, ["L9H9", "L9H6", "L10H0"], receiver_input="q",
        ...                        semantics="ioi", receiver_positions="END")
        >>> res = path_patch_sweep(model, prompts, metric, receiver_input="logits")  # direct effects
        >>> res = path_patch_sweep(model, prompts, metric, ["L2H3.q", "L2H3.k"], by=("sender", "receiver"))

    Args:
        model, prompts, metric: as in :func:`hookpatch.patch_sweep`.
        receivers: receiver labels (``"L9H9.q"``, ``"L9KV1.k"``, ``"MLP3"``, ``"logits"``), or
            node labels (``"L9H9"``) with ``receiver_input`` naming which input.
        receiver_input: ``"q"``, ``"k"``, ``"v"``, ``"mlp"`` or ``"logits"`` (the last needs no
            ``receivers``); under grouped-query attention ``"k"``/``"v"`` of a query head mean
            its KV head's input.
        by: the sender grid: ``("layer", "head")`` (each head at every position),
            ``("layer", "pos", "head")`` (each head at each position), ``("sender",)`` (every
            sender: input, heads, MLPs), or ``("sender", "receiver")`` (each sender into each
            receiver on its own; pairs with no edge keep the unpatched run).
        semantics: ``"direct"``: the edges from the sender into the receivers are patched
            exactly (nothing else changes; the receivers' own outputs propagate). ``"ioi"``:
            the IOI paper's path patching — a first run patches the sender while every other
            head is frozen to the run being patched (MLPs recomputed, or frozen with
            ``freeze_mlps``) and records the receivers' inputs; a second run patches only those.
        direction: ``"denoising"`` (clean senders into the corrupted run) or ``"noising"``.
        freeze_mlps: ``"ioi"`` only; freezing the MLPs makes it equal ``"direct"`` for
            receivers in one layer.
        layers, heads, positions: restrict the sender grid (senders must come before a receiver).
        receiver_positions: where receivers' inputs are patched (columns or names; None: all).
        graph, memory_budget, fast, progress, executor: as in :func:`edge_patch`.

    Returns:
        A :class:`SweepResult` over the sender grid, ``values[*grid, batch]``.
    """
    if semantics not in SEMANTICS:
        raise HookpatchError(f"semantics={semantics!r}: expected one of {SEMANTICS}.")
    if not isinstance(freeze_mlps, bool):
        raise HookpatchError(f"freeze_mlps={freeze_mlps!r} must be True or False.")
    if freeze_mlps and semantics != "ioi":
        raise HookpatchError("freeze_mlps=True only applies to semantics='ioi' (direct patching changes no MLP).")
    by = (by,) if isinstance(by, str) else tuple(by)
    if by not in SWEEP_GRIDS:
        raise HookpatchError(f"by={by}: expected one of {SWEEP_GRIDS}.")
    ctx = _Context.build(model, prompts, metric, graph, fast, direction)
    g = ctx.work.graph
    targets = _receivers(g, receivers, receiver_input)
    where_receivers = check_positions(receiver_positions, prompts, prompts.n_pos, "receiver_positions")
    variants, labels, grid = _sender_grid(model, prompts, g, targets, by, layers, positions, heads, semantics)
    return ctx.run(
        semantics, variants, by, labels, receiver_positions=where_receivers, freeze_mlps=freeze_mlps,
        memory_budget=memory_budget, progress=progress, executor=executor, method="path_patch",
        receivers=tuple(r.label for r in targets), grid=grid,
    )


def _index_set(g: Graph, edges: Any) -> tuple[int, ...]:
    """One edge set as sorted positions in ``g.edges``: :class:`EdgeIndices` as they are
    (checked to lie in the graph), anything else through :meth:`Graph.edge_set`."""
    if isinstance(edges, EdgeIndices):
        ix = edges.indices
        if ix and (ix[0] < 0 or ix[-1] >= g.n_edges or any(a >= b for a, b in zip(ix, ix[1:], strict=False))):
            raise HookpatchError(f"EdgeIndices: expected sorted positions in 0..{g.n_edges - 1} without repeats.")
        return ix
    return edge_indices(g, g.edge_set(edges))


def _receivers(g: Graph, receivers: Any, receiver_input: str | None) -> list[Receiver]:
    """The receivers asked for, checked and without repeats."""
    if receiver_input is not None and receiver_input not in RECEIVER_INPUTS:
        raise HookpatchError(f"receiver_input={receiver_input!r}: expected one of {RECEIVER_INPUTS} (or None).")
    if receiver_input == "logits":
        if receivers not in (None, "logits", ["logits"], ("logits",)):
            raise HookpatchError("receiver_input='logits' needs no receivers= (the logits are one receiver).")
        return [g.receivers[-1]]
    if receivers is None:
        raise HookpatchError(
            "receivers= is needed: receiver labels ('L9H9.q', 'MLP3', 'logits'), or node labels ('L9H9') "
            "with receiver_input='q'|'k'|'v'|'mlp'; or receiver_input='logits'."
        )
    items = [receivers] if isinstance(receivers, str | Node | Receiver) else list(receivers)
    if not items:
        raise HookpatchError("receivers=[] names no receiver.")
    out: list[Receiver] = []
    for item in items:
        if receiver_input is None or isinstance(item, Receiver) or (isinstance(item, str) and "." in item):
            r = g.receiver(item)  # type: ignore[arg-type]  # a Node is refused there with a clear message
            if receiver_input is not None and r.input != receiver_input:
                raise HookpatchError(
                    f"receivers: {r.label} is a {r.input!r} input but receiver_input={receiver_input!r}."
                )
            out.append(r)
            continue
        node = g.node(item)
        if node.kind == "input":
            raise HookpatchError("receivers: 'input' only sends; it has no inputs to patch.")
        wanted = "mlp" if node.kind == "mlp" else receiver_input
        if node.kind == "mlp" and receiver_input != "mlp":
            raise HookpatchError(f"receivers: {node.label} is an MLP; its only input is receiver_input='mlp'.")
        if node.kind == "head" and receiver_input == "mlp":
            raise HookpatchError(f"receivers: {node.label} is a head; receiver_input must be 'q', 'k' or 'v'.")
        out += [r for r in g.receivers_of(node) if r.input == wanted]
    return list(dict.fromkeys(out))


def _sender_grid(
    model: Any, prompts: PromptSet, g: Graph, targets: list[Receiver], by: tuple[str, ...],
    layers: Any, positions: Any, heads: Any, semantics: str,
) -> tuple[list[PathVariant], dict[str, tuple[str, ...]], GridFacts | None]:
    """The variants of a sender grid, its labels and its grid record."""
    sender_index = {s: i for i, s in enumerate(g.senders)}
    receiver_index = {r: i for i, r in enumerate(g.receivers)}

    def variant(sender: Node, into: Sequence[Receiver], position: Any = None) -> PathVariant:
        reached = [r for r in into if sends_to(sender, r)]
        if semantics == "direct":
            return PathVariant(edges=edge_indices(g, [Edge(sender, r) for r in reached]), positions=position)
        return PathVariant(senders=(sender_index[sender],), receivers=tuple(receiver_index[r] for r in reached),
                           positions=position)

    if by in (("sender",), ("sender", "receiver")):
        if heads is not None or positions is not None:
            raise HookpatchError(f"heads= and positions= restrict a grid by head or pos; by={by} has neither.")
        allowed = None if layers is None else set(Grid.build(model, prompts, "z", ("layer",), layers).layers)
        senders = [s for s in g.senders if any(sends_to(s, r) for r in targets)
                   and (allowed is None or (s.kind != "input" and s.layer in allowed))]
        if not senders:
            raise HookpatchError(_no_sender_message(targets, layers))
        if by == ("sender",):
            return [variant(s, targets) for s in senders], {"sender": tuple(s.label for s in senders)}, None
        variants = [variant(s, [r]) for s in senders for r in targets]
        return variants, {"sender": tuple(s.label for s in senders), "receiver": tuple(r.label for r in targets)}, None
    grid = Grid.build(model, prompts, "z", by, layers, positions, heads)
    reaching = [layer for layer in grid.layers if any(sends_to(Node("head", layer, 0), r) for r in targets)]
    if layers is not None and len(reaching) < len(grid.layers):
        bad = sorted(set(grid.layers) - set(reaching))
        raise HookpatchError(
            f"layers={list(grid.layers)}: heads in layer(s) {bad} are at or after every receiver "
            f"({', '.join(r.label for r in targets)}), so no edge leads from them to a receiver. "
            "A receiver must come after its sender; pick earlier sender layers or later receivers."
        )
    if not reaching:
        raise HookpatchError(_no_sender_message(targets, layers))
    labels = dict(grid.labels)
    labels["layer"] = tuple(str(layer) for layer in reaching)
    variants = [
        variant(Node("head", layer, head), targets, pos)
        for layer, pos, head in grid.cells() if layer in reaching
    ]
    facts = GridFacts(layers=tuple(reaching), positions=None if grid.positions is None else tuple(grid.positions),
                      heads=None if grid.heads is None else tuple(grid.heads))
    return variants, labels, facts


def _no_sender_message(targets: list[Receiver], layers: Any) -> str:
    where = "" if layers is None else f" among layers={layers!r}"
    return (f"no sender{where} comes before the receivers ({', '.join(r.label for r in targets)}); "
            "a receiver must be after its sender (a layer-0 head's inputs read only the embeddings).")


@dataclass(frozen=True)
class _Context:
    """Checked inputs of an edge or path patching call: the model's graph, the metric (wrapped
    once), the runner and the two cached runs with the metric on each (the baselines)."""

    model: Any
    prompts: PromptSet
    metric: Metric
    runner: Runner
    work: CircuitContext
    direction: str
    clean: Tensor
    corrupted: Tensor

    @classmethod
    def build(cls, model: Any, prompts: PromptSet, metric: Any, graph: Graph | None, fast: bool | None,
              direction: str) -> _Context:
        require_eval(model)
        if direction not in DIRECTIONS:
            raise HookpatchError(f"direction={direction!r}: expected one of {DIRECTIONS}.")
        metric = as_metric(metric, prompts)
        work = CircuitRecipe(prompts, metric, as_graph(model, graph), fast).build(model)
        B = len(prompts)
        clean, corrupted = work.runs["clean"].values, work.runs["corrupted"].values
        require_finite_runs(metric, {"clean": require_metric_values(clean, (B,)),
                                     "corrupted": require_metric_values(corrupted, (B,))})
        return cls(model, prompts, metric, work.runner, work, direction,
                   clean.detach().float().cpu(), corrupted.detach().float().cpu())

    def with_ablated_source(self, ablation: str) -> _Context:
        """This context with one more cached run, named ``ablation``, for edges to take their
        sender outputs from: the other run's mean over prompts, per position (``"mean"``), or
        zeros (``"zero"``)."""
        other = "clean" if self.direction == "denoising" else "corrupted"
        work = self.work
        runs = {**work.runs, ablation: ablated_run(work.runs[other], ablation, work.graph.facts.n_layers)}
        recipe = work.recipe and dataclasses.replace(work.recipe, ablation=ablation, ablated_from=other)
        return dataclasses.replace(self, work=dataclasses.replace(work, runs=runs, recipe=recipe))

    def run(
        self, semantics: str, variants: list[PathVariant], axes: tuple[str, ...], labels: dict[str, tuple[str, ...]],
        *, receiver_positions: tuple[int | str, ...] | None, freeze_mlps: bool, memory_budget: int,
        progress: bool, executor: Any, method: str, receivers: tuple[str, ...] | None, grid: GridFacts | None,
        source: str | None = None,
    ) -> SweepResult:
        as_int(memory_budget, "memory_budget", minimum=1, hint=" (bytes one stacked forward may use, e.g. 2**30)")
        executor = require_executor(executor)
        target, other = ("corrupted", "clean") if self.direction == "denoising" else ("clean", "corrupted")
        source = other if source is None else source
        f = self.work.graph.facts
        B, P = len(self.prompts), self.prompts.n_pos
        per_variant = self.runner.bytes_per_variant(f, self.metric, "resid_pre", B, P)
        per_variant += 4 * B * P * f.d_model * (3 * f.n_layers + 2)  # edits, recorded inputs, the first run's sums
        if semantics == "direct":  # every sender's output difference, per variant
            per_variant += 4 * B * P * f.d_model * (1 + f.n_layers * (f.n_heads + 1))
        size = memory_budget // max(per_variant, 1)
        if self.runner.chunk_pairs is not None:  # the runner's cap on computed (row, position) pairs
            size = min(size, self.runner.chunk_pairs // (B * P))
        jobs = plan_jobs(semantics, target, source, variants, size,
                         receiver_positions=receiver_positions, freeze_mlps=freeze_mlps)
        desc = f"{method.replace('_', ' ')} ({semantics})" if method == "path_patch" else "edge patch"
        values = run_jobs(self.work, jobs, executor, progress=progress, desc=desc)
        shape = tuple(len(labels[a]) for a in axes)
        provenance = Provenance(
            kind="patched_metric", method=method, direction=self.direction, runner=self.runner.name, grid=grid,
            receivers=receivers, semantics=semantics, freeze_mlps=freeze_mlps if semantics == "ioi" else None,
            ablation=None if source in ("clean", "corrupted") else source,
            receiver_positions=receiver_positions, **run_facts(self.model, self.prompts, self.metric),
        )
        result = SweepResult(values=values.reshape(*shape, B), axes=axes, labels=labels, clean=self.clean,
                             corrupted=self.corrupted, provenance=provenance)
        require_finite_result(result, f"the metric {metric_name(self.metric)} after {method.replace('_', ' ')}")
        return result
