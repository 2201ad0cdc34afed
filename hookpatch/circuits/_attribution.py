"""Edge attribution: a first-order score for every edge of the graph at once (EAP, EAP-IG).

Exact edge patching (:func:`hookpatch.circuits.edge_patch`) costs a forward per edge set; with
tens of thousands of edges a screen is needed. Edge attribution patching (EAP, Syed et al.
2023) estimates the effect of patching edge ``s -> r`` as

    score(s -> r) = sum over positions of  Δ_s · ∂metric / ∂(input of r)

with ``Δ_s`` the sender's output in the source run minus in the target run (as edge patching
adds it) and the gradient taken in the target run at the receiver's own input: a head's own
copy of the residual stream for its query, key or value (per KV head under grouped-query
attention, never un-grouped), an MLP's input, the final residual stream. It is exactly the
derivative at 0 of exact edge patching with the edge scaled by a weight (the tests check it
against central finite differences of :func:`edge_patch`): one forward and one backward on
the target run score every edge, plus a no-grad forward of the source run.

EAP-IG (Hanna et al. 2024, the inputs variant) replaces the gradient by its mean along the
straight line between the two runs' input embeddings: at ``alpha = k / steps`` for
``k = 0..steps-1`` (left Riemann points, so ``steps=1`` is EAP itself) the embeddings are
``target + alpha (source - target)``, every activation is recomputed from there, and the
receivers' gradients are averaged; ``Δ_s`` stays the two runs' difference.

The result is a :class:`~hookpatch.results.SweepResult` of kind ``"attribution_estimate"``
over ``("edge",)`` (or ``("edge", "pos")`` per position), labelled by edge
(``"L0H1->L2H3.q"``), one value per prompt: estimated changes of the metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hookpatch._checks import IntLike, as_int, as_metric, metric_name, require_finite_result
from hookpatch._provenance import Provenance, run_facts
from hookpatch.attribution._sites import _checked, capture, release_graphs, run_metric
from hookpatch.circuits._graph import Graph, Receiver, as_graph
from hookpatch.circuits._senders import head_delta
from hookpatch.errors import HookpatchError
from hookpatch.metrics._base import Metric
from hookpatch.model._facts import hook_flags, hook_name, resid_entering
from hookpatch.model._loading import require_eval
from hookpatch.results import SweepResult
from hookpatch.runners._executor import require_executor
from hookpatch.tasks._promptset import PromptSet

METHODS = ("eap", "eap-ig")
DIRECTIONS = ("denoising", "noising")


def edge_attribution(
    model: Any,
    prompts: PromptSet,
    metric: Metric | Callable[[Tensor], Tensor],
    *,
    method: str = "eap",
    steps: IntLike = 5,
    direction: str = "denoising",
    per_position: bool = False,
    graph: Graph | None = None,
    progress: bool = True,
    steps_per_job: IntLike | None = None,
    executor: Any = None,
) -> SweepResult:
    """Attribution scores of every edge of the graph (see the module docstring).

    Example:
        >>> eap = edge_attribution(model, prompts, LogitDiff(prompts))                # every edge
        >>> ig = edge_attribution(model, prompts, metric, method="eap-ig", steps=5)
        >>> top = ig.mean().abs().topk(20).indices                                     # edge indices

    Args:
        model: a TransformerBridge in eval mode whose blocks the graph can express.
        prompts: the clean/corrupted prompt set.
        metric: a differentiable :class:`Metric` (or a callable ``logits → [..., batch]``).
        method: ``"eap"`` (the gradient in the target run) or ``"eap-ig"`` (its mean along
            the input embeddings' straight line, ``steps`` points).
        steps: EAP-IG's interpolation points (default 5; ignored by EAP).
        direction: ``"denoising"`` (scores of patching the clean run's sender outputs into
            the corrupted run) or ``"noising"`` (corrupted into clean).
        per_position: keep the position axis (``values[edge, pos, batch]``).
        graph: the model's graph (default: built from the model).
        progress: a progress bar over EAP-IG's jobs.
        steps_per_job, executor: EAP-IG's points after the first (``alpha > 0``) are cut into
            jobs of ``steps_per_job`` points (default: one job), each scoring its own points,
            run by ``executor`` (default: in this process; a
            :class:`~hookpatch.runners.RayExecutor` with ``steps_per_job=1`` spreads them over
            its workers). The first point, the target run itself, always runs here.

    Returns:
        A :class:`SweepResult` of kind ``"attribution_estimate"`` over ``("edge",)`` (or
        ``("edge", "pos")``), values ``[edge, (pos,) batch]`` in ``graph.edges`` order.
    """
    if method not in METHODS:
        raise HookpatchError(f"method={method!r}: expected one of {METHODS}.")
    if direction not in DIRECTIONS:
        raise HookpatchError(f"direction={direction!r}: expected one of {DIRECTIONS}.")
    if not isinstance(per_position, bool):
        raise HookpatchError(f"per_position={per_position!r} must be True or False.")
    n_steps = 1 if method == "eap" else as_int(steps, "steps", minimum=1, hint=" (interpolation points, e.g. 5)")
    require_eval(model)
    g = as_graph(model, graph)
    metric = as_metric(metric, prompts)
    target_tokens, source_tokens = prompts.corrupted_tokens, prompts.clean_tokens
    if direction == "noising":
        target_tokens, source_tokens = source_tokens, target_tokens
    per_job = n_steps - 1 if steps_per_job is None else as_int(
        steps_per_job, "steps_per_job", minimum=1, hint=" (EAP-IG points per job, e.g. 1 to spread them)")
    executor = require_executor(executor)
    names = sender_outputs(g.facts.n_layers)
    first = names[0]
    source_values, s_cache = capture(model, source_tokens, names, metric)  # stops at the unembedding's input
    sites = receiver_sites(g)
    try:  # the target run itself (alpha = 0): its gradients, metric and sender outputs
        grads, target_values, t_cache = step_gradients(model, metric, target_tokens, sites, g.facts.n_layers,
                                                        0.0, None, keep=names)
    finally:
        release_graphs(model)
    with torch.no_grad():
        deltas = sender_deltas(model, g, t_cache, s_cache)  # [sender, batch, pos, d_model]
    values = scores(g, deltas, grads, per_position)
    if n_steps > 1:
        recipe = EdgeIGRecipe(prompts, metric, g, direction)
        context = EdgeIGContext(model, g, metric, target_tokens, s_cache[first] - t_cache[first], deltas, recipe)
        ks = list(range(1, n_steps))
        jobs = [StepsJob(tuple(ks[i : i + per_job]), n_steps, per_position) for i in range(0, len(ks), per_job)]
        for part in executor.run(jobs, context, progress=progress, desc="edge attribution (EAP-IG)"):
            values = values + part.to(values.device)
        values = values / n_steps
    source_values, target_values = source_values.cpu(), target_values.cpu()
    values = values.cpu()  # [edge, (pos,) batch]
    clean, corrupted = (source_values, target_values) if direction == "denoising" else (target_values, source_values)
    provenance = Provenance(
        kind="attribution_estimate", method="eap" if method == "eap" else "eap_ig", direction=direction,
        steps=n_steps, passes=n_steps, runner="bridge", **run_facts(model, prompts, metric),
    )
    labels: dict[str, tuple[str, ...]] = {"edge": tuple(e.label for e in g.edges)}
    axes: tuple[str, ...] = ("edge",)
    if per_position:
        labels["pos"] = tuple(prompts.position_labels())
        axes = ("edge", "pos")
    result = SweepResult(values=values, axes=axes, labels=labels, clean=clean, corrupted=corrupted,
                         provenance=provenance)
    require_finite_result(result, f"the edge attribution of {metric_name(metric)} (its gradient)")
    return result


def sender_deltas(model: Any, g: Graph, target: Any, source: Any) -> Float[Tensor, "sender batch pos d_model"]:
    """``Δ_s`` of every sender in ``g.senders`` order: its output in the source run minus in
    the target run (a head's through :func:`~hookpatch.circuits._senders.head_delta`)."""
    out = []
    for s in g.senders:
        if s.kind == "input":
            name = hook_name("resid_pre", 0)
            out.append(source[name] - target[name])
        elif s.kind == "mlp":
            name = hook_name("mlp_out", s.layer)
            out.append(source[name] - target[name])
        else:
            assert s.head is not None
            name = hook_name("z", s.layer)
            out.append(head_delta(model, s.layer, target[name], source[name], s.head))
    return torch.stack(out)


def sender_outputs(n_layers: int) -> list[str]:
    """The hooks holding every sender's output: the embeddings, each block's z and MLP output."""
    return [hook_name("resid_pre", 0)] + [hook_name(c, layer) for layer in range(n_layers) for c in ("z", "mlp_out")]


Site = tuple[int, str]


def receiver_sites(g: Graph) -> list[tuple[Site, str]]:
    """Where receiver gradients are read, as ``((layer, input), hook name)``: each head's query,
    key and value (before q/k norms and rotary; carried back to its own input by
    :func:`_head_input_gradients`), each block's input (kept, for ``ln1``'s Jacobian), each
    MLP's input and the final residual stream."""
    n = g.facts.n_layers
    sites: list[tuple[Site, str]] = []
    for layer in range(n):
        sites += [((layer, kind), hook_name(kind, layer)) for kind in ("q", "k", "v")]
        sites.append(((layer, "input"), hook_name("resid_pre", layer)))
        if g.has_mlps:
            sites.append(((layer, "mlp"), hook_name("mlp_in", layer)))
    sites.append(((n, "logits"), resid_entering(n, n)))
    return sites


def step_gradients(
    model: Any,
    metric: Metric,
    tokens: Tensor,
    sites: list[tuple[Site, str]],
    n_layers: int,
    alpha: float,
    shift: Float[Tensor, "batch pos d_model"] | None,
    keep: Sequence[str] = (),
) -> tuple[dict[Site, Tensor], Float[Tensor, " batch"], dict[str, Tensor]]:
    """The metric's gradient at every receiver input with the input embeddings moved by
    ``alpha · shift``: ``[batch, pos, head, d_model]`` for q/k/v (KV heads for k/v), ``[batch,
    pos, d_model]`` for an MLP's input and the logits'; also the metric and copies of the
    activations at ``keep``."""
    kept: dict[str, Tensor] = {}
    with hook_flags(model, ["mlp_in"]):  # the MLP branch's own input
        grads, values = _gradients_at(model, metric, tokens, sites, alpha, shift, kept if keep else None, keep)
        return _head_input_gradients(model, n_layers, grads), values, kept


@dataclass(frozen=True)
class EdgeIGContext:
    """What a worker owns to run EAP-IG's :class:`StepsJob` s: the model and its graph, the
    metric, the target run's tokens, the input embeddings' difference (source − target) and
    every sender's output difference."""

    model: Any
    graph: Graph
    metric: Metric
    tokens: Tensor
    shift: Float[Tensor, "batch pos d_model"]
    deltas: Float[Tensor, "sender batch pos d_model"]
    recipe: EdgeIGRecipe | None = None


@dataclass(frozen=True)
class EdgeIGRecipe:
    """How to build an :class:`EdgeIGContext` from a model (plain, picklable data): both runs
    captured at every sender output with two no-grad forwards."""

    prompts: PromptSet
    metric: Metric
    graph: Graph
    direction: str

    def build(self, model: Any) -> EdgeIGContext:
        target_tokens, source_tokens = self.prompts.corrupted_tokens, self.prompts.clean_tokens
        if self.direction == "noising":
            target_tokens, source_tokens = source_tokens, target_tokens
        names = sender_outputs(self.graph.facts.n_layers)
        _, s_cache = capture(model, source_tokens, names, self.metric)
        _, t_cache = capture(model, target_tokens, names, self.metric)
        with torch.no_grad():
            deltas = sender_deltas(model, self.graph, t_cache, s_cache)
        shift = s_cache[names[0]] - t_cache[names[0]]
        return EdgeIGContext(model, self.graph, self.metric, target_tokens, shift, deltas, self)


@dataclass(frozen=True)
class StepsJob:
    """EAP-IG's points ``alpha = k / n_steps`` for ``k`` in ``steps``: the edge scores of the sum
    of their gradients, ``[edge, (pos,) batch]`` (divided by ``n_steps`` by the caller)."""

    steps: tuple[int, ...]
    n_steps: int
    per_position: bool

    def run(self, context: EdgeIGContext) -> Tensor:
        model, g = context.model, context.graph
        sites = receiver_sites(g)
        total: dict[Site, Tensor] = {}
        try:
            for k in self.steps:
                grads, _, _ = step_gradients(model, context.metric, context.tokens, sites, g.facts.n_layers,
                                             k / self.n_steps, context.shift)
                for site, grad in grads.items():
                    total[site] = grad if site not in total else total[site] + grad
        finally:
            release_graphs(model)
        with torch.no_grad():
            return scores(g, context.deltas, total, self.per_position).cpu()


def _head_input_gradients(model: Any, n_layers: int, grads: dict[tuple[int, str], Tensor]) -> dict[
        tuple[int, str], Tensor]:
    """Gradients at each head's own input, ``[batch, pos, head, d_model]``, from those at its
    query, key and value (``attn.hook_q``/``hook_k``/``hook_v``, before q/k norms and rotary):
    a head's projection is ``ln1(x) @ W[h] + b[h]`` of the block input ``x``, so the gradient
    at its copy of ``x`` is ``ln1``'s Jacobian at ``x`` (transposed) applied to
    ``grad @ W[h]^T`` — per head (per KV head for keys and values), without running the
    model on a copy of the residual stream per head."""
    out = {site: grad for site, grad in grads.items() if site[1] in ("mlp", "logits")}
    for layer in range(n_layers):
        block = model.blocks[layer]
        x = grads[(layer, "input")]  # the block input itself (kept, not a gradient)
        for kind, weight in (("q", block.attn.W_Q), ("k", block.attn.W_K), ("v", block.attn.W_V)):
            grad = grads[(layer, kind)]  # [batch, pos, head, d_head]
            with torch.no_grad():
                upstream = torch.einsum("bphe,hde->bphd", grad, weight.detach().to(grad.dtype))
            with torch.enable_grad():
                copies = x.unsqueeze(2).expand(-1, -1, grad.shape[2], -1).clone().requires_grad_(True)
                (vjp,) = torch.autograd.grad(block.ln1(copies), copies, grad_outputs=upstream.to(copies.dtype))
            out[(layer, kind)] = vjp.detach()
    return out


def _gradients_at(
    model: Any,
    metric: Metric,
    tokens: Tensor,
    sites: list[tuple[tuple[int, str], str]],
    alpha: float,
    shift: Float[Tensor, "batch pos d_model"] | None,
    store: dict[str, Tensor] | None = None,
    keep: Sequence[str] = (),
) -> tuple[dict[tuple[int, str], Tensor], Float[Tensor, " batch"]]:
    """One forward and backward with the input embeddings moved by ``alpha · shift``: the
    metric's gradient at each receiver input (a zero leaf added to it, read by it alone), each
    block's input (kept as it is), and the metric; with ``store``, copies of the activations at
    ``keep`` go there."""
    leaves: dict[tuple[int, str], Tensor] = {}
    kept: dict[tuple[int, str], Tensor] = {}

    def leaf(site: tuple[int, str]) -> Callable[[Tensor, Any], Tensor | None]:
        def hook(act: Tensor, hook: Any) -> Tensor | None:
            if site[1] == "input":  # the block input: kept for ln1's Jacobian, not differentiated
                kept[site] = act.detach()
                return None
            zero = torch.zeros_like(act, requires_grad=True)
            leaves[site] = zero
            return act + zero  # a new tensor: only this receiver reads it

        return hook

    def interpolate(act: Tensor, hook: Any) -> Tensor:
        assert shift is not None
        return act + alpha * shift.to(act.dtype)

    def copy(name: str) -> Callable[[Tensor, Any], None]:
        def hook(act: Tensor, hook: Any) -> None:
            assert store is not None
            store[name] = act.detach().clone()

        return hook

    hooks: list[tuple[str, Any]] = [(name, copy(name)) for name in keep] if store is not None else []
    hooks += [(name, leaf(site)) for site, name in sites]
    if alpha:
        hooks = [(hook_name("resid_pre", 0), interpolate), *hooks]
    with torch.enable_grad():
        values = run_metric(model, tokens, metric, hooks, [name for _, name in sites])
        values = _checked(values, (int(tokens.shape[0]),), differentiable=True)
        missing = [site for site, _ in sites if site not in leaves and site not in kept]
        if missing:
            raise HookpatchError(f"the receiver input at {missing[0]} did not fire; the graph cannot attribute "
                                 "this model.")
        keys = list(leaves)
        grads = torch.autograd.grad(values.sum(), [leaves[s] for s in keys], allow_unused=True)
    out = {site: torch.zeros_like(leaves[site]) if grad is None else grad.detach()
           for site, grad in zip(keys, grads, strict=True)}
    return {**out, **kept}, values.detach().float()


def scores(
    g: Graph, deltas: Float[Tensor, "sender batch pos d_model"], grads: dict[tuple[int, str], Tensor],
    per_position: bool, chunk: int = 64,
) -> Tensor:
    """``Δ_s · gradient`` of every edge in ``g.edges`` order: ``[edge, batch]`` summed over
    positions, or ``[edge, pos, batch]``. One batched matmul per ``chunk`` receivers: every
    sender against every receiver, ``[batch, sender, (pos ·) d_model] @ [batch, (pos ·) d_model,
    receiver]``, of which each receiver keeps its prefix of senders."""
    S, B, P, d = deltas.shape
    if per_position:  # rows are (batch, position) pairs; contract d_model only
        left = deltas.float().permute(1, 2, 0, 3).reshape(B * P, S, d)  # [B * P, S, d]
    else:  # contract positions and d_model together
        left = deltas.float().permute(1, 0, 2, 3).reshape(B, S, P * d)  # [B, S, P * d]
    blocks = g._blocks
    out = []
    for lo in range(0, len(blocks), chunk):
        part = blocks[lo : lo + chunk]
        columns = []
        for receiver, _, _ in part:
            grad = grads[(receiver.layer, receiver.input)]
            if receiver.input in ("q", "k", "v"):
                grad = grad[:, :, _head(receiver)]  # [B, pos, d_model]
            columns.append(grad.float())
        right = torch.stack(columns, -1)  # [B, pos, d_model, R]
        right = right.reshape(B * P, d, -1) if per_position else right.reshape(B, P * d, -1)
        product = torch.bmm(left, right)  # [rows, S, R]
        for j, (_, _, count) in enumerate(part):
            block = product[:, :count, j]  # [rows, count]
            if per_position:
                out.append(block.view(B, P, count).permute(2, 1, 0))  # [count, pos, batch]
            else:
                out.append(block.transpose(0, 1))  # [count, batch]
    return torch.cat(out)


def _head(receiver: Receiver) -> int:
    assert receiver.head is not None
    return receiver.head
