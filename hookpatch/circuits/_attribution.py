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

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from hookpatch._checks import IntLike, as_int, as_metric, metric_name, require_finite_result
from hookpatch._provenance import Provenance, run_facts
from hookpatch.attribution._sites import _checked, release_graphs, run_metric
from hookpatch.circuits._edits import head_delta
from hookpatch.circuits._graph import Graph, Receiver, as_graph
from hookpatch.circuits._senders import cache_names
from hookpatch.errors import HookpatchError
from hookpatch.metrics._base import Metric
from hookpatch.model._facts import hook_flags, hook_name, resid_entering
from hookpatch.model._loading import require_eval
from hookpatch.results import SweepResult
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
        progress: a progress bar over the gradient passes.

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
    names = cache_names(g.facts.n_layers)
    with torch.no_grad():
        t_logits, t_cache = model.run_with_cache(target_tokens, names_filter=names)
        s_logits, s_cache = model.run_with_cache(source_tokens, names_filter=names)
        target_values, source_values = metric(t_logits).float().cpu(), metric(s_logits).float().cpu()
        del t_logits, s_logits
        deltas = sender_deltas(model, g, t_cache, s_cache)  # [sender, batch, pos, d_model]
        first = hook_name("resid_pre", 0)
        shift = s_cache[first] - t_cache[first]  # [batch, pos, d_model]: the input embeddings' difference
    try:
        grads = receiver_gradients(model, g, metric, target_tokens, shift, n_steps, progress)
    finally:
        release_graphs(model)
    values = scores(g, deltas, grads, per_position).cpu()  # [edge, (pos,) batch]
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
    the target run (a head's through :func:`~hookpatch.circuits._edits.head_delta`)."""
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
            out.append(head_delta(model, s.layer, target[name].unsqueeze(0), source[name], s.head)[0])
    return torch.stack(out)


# (receiver input, hook component) per receiver class; heads' inputs are per-head copies
_HOOKS = {"q": "q_input", "k": "k_input", "v": "v_input", "mlp": "mlp_in"}


def receiver_gradients(
    model: Any,
    g: Graph,
    metric: Metric,
    tokens: Tensor,
    shift: Float[Tensor, "batch pos d_model"],
    n_steps: int,
    progress: bool,
) -> dict[tuple[int, str], Tensor]:
    """The metric's gradient at every receiver input, per site ``(layer, input)``: ``[batch,
    pos, head, d_model]`` for q/k/v (KV heads for k/v), ``[batch, pos, d_model]`` for an MLP's
    input and the logits' (the final residual stream); averaged over the EAP-IG points
    ``alpha = k / n_steps`` of the input embeddings ``target + alpha · shift`` (only
    ``alpha = 0``, the target run itself, for EAP)."""
    n = g.facts.n_layers
    sites: list[tuple[tuple[int, str], str]] = []
    for layer in range(n):
        sites += [((layer, kind), hook_name(_HOOKS[kind], layer)) for kind in ("q", "k", "v")]
        if g.has_mlps:
            sites.append(((layer, "mlp"), hook_name("mlp_in", layer)))
    sites.append(((n, "logits"), resid_entering(n, n)))
    total: dict[tuple[int, str], Tensor] = {}
    bar = tqdm(total=n_steps, desc="edge attribution", disable=not progress, leave=False)
    try:
        with hook_flags(model, ["q_input", "mlp_in"]):  # each head's own input copy, the MLP branch's input
            for k in range(n_steps):
                for site, grad in _gradients_at(model, metric, tokens, sites, k / n_steps, shift).items():
                    total[site] = grad if site not in total else total[site] + grad
                bar.update(1)
    finally:
        bar.close()
    return {site: grad / n_steps for site, grad in total.items()}


def _gradients_at(
    model: Any,
    metric: Metric,
    tokens: Tensor,
    sites: list[tuple[tuple[int, str], str]],
    alpha: float,
    shift: Float[Tensor, "batch pos d_model"],
) -> dict[tuple[int, str], Tensor]:
    """One forward and backward with the input embeddings moved by ``alpha · shift``: the
    metric's gradient at each receiver input (a zero leaf added to it, read by it alone)."""
    leaves: dict[tuple[int, str], Tensor] = {}

    def leaf(site: tuple[int, str]) -> Callable[[Tensor, Any], Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            zero = torch.zeros_like(act, requires_grad=True)
            leaves[site] = zero
            return act + zero  # a new tensor: only this receiver reads it

        return hook

    def interpolate(act: Tensor, hook: Any) -> Tensor:
        return act + alpha * shift.to(act.dtype)

    hooks = [(name, leaf(site)) for site, name in sites]
    if alpha:
        hooks = [(hook_name("resid_pre", 0), interpolate), *hooks]
    with torch.enable_grad():
        values = run_metric(model, tokens, metric, hooks, [name for _, name in sites])
        values = _checked(values, (int(tokens.shape[0]),), differentiable=True)
        missing = [site for site, _ in sites if site not in leaves]
        if missing:
            raise HookpatchError(f"the receiver input at {missing[0]} did not fire; the graph cannot attribute "
                                 "this model.")
        keys = list(leaves)
        grads = torch.autograd.grad(values.sum(), [leaves[s] for s in keys], allow_unused=True)
    return {site: torch.zeros_like(leaves[site]) if grad is None else grad.detach()
            for site, grad in zip(keys, grads, strict=True)}


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
