"""The bridge runner: every forward is the TransformerBridge's own, with TransformerLens hooks.

Works for any model the bridge loads. A chunk of ``V`` cells is one ``run_with_hooks`` over
the run's prompts repeated ``V`` times, each patched layer's hook touching only its own
variants' rows; the metric reads the full logits. Cost: every cell pays the whole forward
(all layers, all positions, the full unembedding), which :class:`~hookpatch.runners.FastRunner`
avoids where the model family allows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hookpatch.metrics._base import Metric
from hookpatch.model._facts import ModelFacts, component_info, hook_flags, hook_name, resid_entering
from hookpatch.runners._protocol import CachedRun, Chunk, stacked_hooks


class BridgeRunner:
    """Runs sweeps through the bridge's ``run_with_cache`` and ``run_with_hooks``.

    Example:
        >>> runner = BridgeRunner(model)
        >>> runs = runner.cache_runs({"clean": prompts.clean_tokens}, metric, "z", [0, 1])
    """

    name: str = "bridge"
    chunk_pairs: int | None = None

    def __init__(self, model: Any):
        self.model = model

    def cache_runs(
        self, runs: Mapping[str, Int[Tensor, "batch pos"]], metric: Metric, component: str, layers: Sequence[int]
    ) -> dict[str, CachedRun]:
        """One ``run_with_cache`` per run, keeping only the component at ``layers`` (the sources)."""
        names = [component_info(component).hook_name(layer) for layer in layers]
        out = {}
        with torch.no_grad(), hook_flags(self.model, [component]):  # gated hooks (hook_result, ...) fire
            for run, tokens in runs.items():
                logits, cache = self.model.run_with_cache(tokens, names_filter=names)
                out[run] = CachedRun(tokens, cache, metric(logits))
        return out

    def bytes_per_variant(self, facts: ModelFacts, metric: Metric, component: str, batch: int, n_pos: int) -> int:
        """Activations of one variant's forward (with the hooks ``component``'s config flag turns
        on) plus its full logits."""
        activations = _activation_bytes(facts, batch, n_pos, component)
        return activations + 4 * batch * (n_pos + 1) * facts.d_vocab

    def run_chunk(self, chunk: Chunk, metric: Metric) -> Float[Tensor, "variant batch"]:
        """One ``run_with_hooks`` over the stacked variants; the metric on the full logits."""
        B, P = chunk.run.tokens.shape
        V = len(chunk.layers)
        hooks = stacked_hooks(chunk.component, chunk.layers, chunk.masks, chunk.sources, B, chunk.pos_dim)
        with torch.no_grad(), hook_flags(self.model, [chunk.component]):
            logits = self.model.run_with_hooks(chunk.run.tokens.repeat(V, 1), fwd_hooks=list(hooks.items()))
            return metric(logits.reshape(V, B, P, -1))


    def cache_for_edits(
        self, runs: Mapping[str, Int[Tensor, "batch pos"]], metric: Metric, names: Sequence[str]
    ) -> dict[str, CachedRun]:
        """One ``run_with_cache`` per run keeping ``names``."""
        out = {}
        with torch.no_grad():
            for run, tokens in runs.items():
                logits, cache = self.model.run_with_cache(tokens, names_filter=list(names))
                out[run] = CachedRun(tokens, cache, metric(logits))
        return out

    def run_edits(self, run: CachedRun, edits: Any, metric: Metric) -> Float[Tensor, "variant batch"]:
        """One ``run_with_hooks`` over the stacked variants: each edited head's own copy of the
        block input (``hook_q_input``/``hook_k_input``/``hook_v_input``, turned on for the
        call), the MLP branch's input (``hook_mlp_in``) or the final residual stream gets
        its new value; the metric on the full logits."""
        B, P = run.tokens.shape
        V = edits.n_variants
        n_layers = self.model.cfg.n_layers
        hooks = []
        for site in edits.sites():
            layer, kind = site
            heads = edits.touched(site)
            if not heads:
                continue
            if kind in ("q", "k", "v"):
                hooks.append((hook_name(f"{kind}_input", layer), _per_head_edit(edits, site, heads)))
            elif kind == "mlp":
                hooks.append((hook_name("mlp_in", layer), _whole_edit(edits, site)))
            else:
                hooks.append((resid_entering(n_layers, n_layers), _whole_edit(edits, site)))
        observe = [(hook_name(point, layer), _observer(edits, layer, point)) for layer, point in edits.observed()]
        with torch.no_grad(), hook_flags(self.model, ["q_input", "mlp_in"]):
            logits = self.model.run_with_hooks(run.tokens.repeat(V, 1), fwd_hooks=observe + hooks)
            return metric(logits.reshape(V, B, P, -1))


def _observer(edits: Any, layer: int, point: str) -> Any:
    """A hook handing this forward's activation at ``point`` of block ``layer`` to the edits."""

    def hook(act: Tensor, hook: Any) -> None:
        edits.observe(layer, point, act)

    return hook


def _per_head_edit(edits: Any, site: tuple[int, str], heads: list[int]) -> Any:
    """A hook on ``[rows, pos, head, d_model]`` per-head inputs: the edited heads' new inputs."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        out = act.clone()
        for h in heads:
            out[:, :, h] = edits.edit(site, h, act[:, :, h])
        return out

    return hook


def _whole_edit(edits: Any, site: tuple[int, str]) -> Any:
    """A hook on a ``[rows, pos, d_model]`` input (an MLP's, or the final residual stream)."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        return edits.edit(site, 0, act)

    return hook


def _activation_bytes(facts: ModelFacts, batch: int, n_pos: int, component: str | None = None) -> int:
    """A generous estimate of one forward's float32 activations over ``batch`` rows of ``n_pos``.

    With ``component``, the forward also runs the hooks its config flag turns on, which can
    outweigh the rest: ``result`` adds ``n_heads × d_model`` per position, ``q_input``,
    ``k_input`` or ``v_input`` about three times that (:meth:`ModelFacts.flagged_elements`).
    """
    per_pos = (
        facts.d_model * 10
        + facts.n_heads * (n_pos * 3 + facts.d_head * 4)
        + (facts.d_mlp or 4 * facts.d_model) * 3
    )
    if component is not None:
        per_pos += facts.flagged_elements(component)
    return 4 * batch * n_pos * per_pos
