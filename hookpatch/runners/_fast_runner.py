"""The fast runner: sweeps on hookpatch's direct block runner (:class:`FastForward`).

Each stacked row is computed only from its cell's layer (joining from the run's cached
residual stream there) and from its first patched position on (earlier positions equal the
unpatched run, whose cached keys and values they contribute), and the computed (row,
position) pairs of all cells, whatever their layers, share the same matrices, so its FLOPs are
close to the minimal ones. A patch after attention (the component table's ``resume_point``:
z, attn_out, resid_mid, mlp_out, resid_post) changes only the rest of its block at the
patched positions: those rows finish the block there and join at the next one. The run stops
at the unembedding's input at the positions the metric reads, and a linear metric reads it
through its residual directions.

Before a model's first fast sweep, :func:`probe` runs a short token sequence through both
this runner and the bridge and compares the logits; a model whose fast logits differ falls
back to the bridge (with a warning). The verdict is kept per model, keyed weakly, and checked
again when the model's parameters change (moved, cast or edited in place).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hookpatch.metrics._base import Metric
from hookpatch.model._facts import ModelFacts, component_info
from hookpatch.runners._bridge import _activation_bytes
from hookpatch.runners._protocol import CachedRun, Chunk, selected_positions, stacked_hooks
from hookpatch.runners.fast import FastForward, FastHook, frozen_kv_from_cache

# The fast path's matmuls reach their throughput by ~256 packed rows; far beyond, each layer's
# fresh [rows, d_mlp] buffers outgrow the caches and cost page faults. A fast-path chunk stops
# at this many computed (row, position) pairs (or at the memory budget, if that comes first).
FAST_CHUNK_PAIRS = 2048
PROBE_POSITIONS = 8  # tokens in the probe sequence
PROBE_TOLERANCE = 1e-4  # max |fast - bridge| logit difference in float32, times max(1, max |logit|)


def fast_cache_names(component: str, layers: Sequence[int], n_layers: int, rotary: bool) -> list[str]:
    """What the fast runner reads from a run's cache for a sweep of ``component`` at ``layers``:
    the component (the source), every block's residual stream, keys and values (where rows
    join and what frozen positions contribute), and for components with a ``resume_point`` the
    residual the patched block's rest adds to and the final residual stream."""
    key = "attn.hook_rot_k" if rotary else "attn.hook_k"
    info = component_info(component)
    names = [info.hook_name(layer) for layer in layers]
    for layer in range(n_layers):
        names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.{key}", f"blocks.{layer}.attn.hook_v"]
    if info.resume_point is not None:
        base = info.resume_base
        names += [f"blocks.{layer}.{base}" for layer in layers] if base else []
        names.append(f"blocks.{n_layers - 1}.hook_resid_post")
    return list(dict.fromkeys(names))


class FastRunner:
    """Runs sweeps on :class:`FastForward` (GPT-2 and Llama/Qwen2-style families).

    Build it through :func:`hookpatch.runners.runner_for`, which checks the family and the
    probe first.
    """

    name: str = "fast"
    chunk_pairs: int | None = FAST_CHUNK_PAIRS

    def __init__(self, model: Any):
        self.model = model
        self.fast = FastForward(model)

    def cache_runs(
        self, runs: Mapping[str, Int[Tensor, "batch pos"]], metric: Metric, component: str, layers: Sequence[int]
    ) -> dict[str, CachedRun]:
        """All runs in one forward from the embeddings, caching only what the sweep reads and
        computing logits only at the metric's reads."""
        fast = self.fast
        names = fast_cache_names(component, layers, fast.n_layers, fast.rotary)
        tokens = torch.cat(list(runs.values()))  # [n_runs * batch, pos]
        B = next(iter(runs.values())).shape[0]
        reads = metric.reads.to(tokens.device).repeat(len(runs), 1)  # [n_runs * batch, n_read]
        store: dict[str, Tensor] = {}
        with torch.no_grad():
            resid = fast.embed(tokens)
            hooks = {n: partial(_keep, store) for n in names if n != "blocks.0.hook_resid_pre"}
            logits = fast.run(resid, 0, hooks=hooks, read_pos=reads)  # [n_runs * batch, n_read, d_vocab]
            store["blocks.0.hook_resid_pre"] = resid.detach()
            out = {}
            for i, (run, run_tokens) in enumerate(runs.items()):
                rows = slice(i * B, (i + 1) * B)
                cache = {name: act[rows] for name, act in store.items()}
                out[run] = CachedRun(run_tokens, cache, metric.from_reads(logits[rows]))
        return out

    def bytes_per_variant(self, facts: ModelFacts, metric: Metric, batch: int, n_pos: int) -> int:
        """Activations of one variant's forward; logits only where a metric reads several
        positions (one read goes through the residual stream or a single row)."""
        n_read = int(metric.reads.shape[-1])
        logits = 0 if n_read == 1 else n_read * facts.d_vocab
        return _activation_bytes(facts, batch, n_pos) + 4 * batch * (logits + facts.d_vocab)

    def run_chunk(self, chunk: Chunk, metric: Metric) -> Float[Tensor, "variant batch"]:
        """Variant ``v``'s rows join at its cell's layer (or, after a ``resume_point``
        component, at the next one) and compute from their first patched position (or first
        read position, if earlier) on; the metric reads the unembedding's input at its reads."""
        fast = self.fast
        V, B = chunk.first_pos.shape
        layers = torch.tensor(list(chunk.layers))  # [V]
        with torch.no_grad():
            point = component_info(chunk.component).resume_point
            if point is not None:
                resid = self._finish_patched_blocks(chunk, point)
                start, hooks = layers + 1, {}
            else:
                resid = torch.cat([chunk.run.cache[f"blocks.{layer}.hook_resid_pre"] for layer in chunk.layers])
                hooks = stacked_hooks(chunk.component, chunk.layers, chunk.masks, chunk.sources, B, chunk.pos_dim)
                start = layers
            reads = metric.reads.to(chunk.first_pos.device)  # [B, n_read]
            active_from = torch.minimum(chunk.first_pos, reads.min(-1).values).flatten()  # [V * B]
            final = fast.run(  # the unembedding's input at the reads: [V * B, n_read, d_model]
                resid, start.repeat_interleave(B), hooks=hooks, read_pos=reads.repeat(V, 1),
                active_from=active_from, unembed=False,
                frozen_kv=frozen_kv_from_cache(chunk.run.cache, int(start.min()), self.model),
            )
            return metric.from_read_inputs(final.view(V, B, *final.shape[1:]), self.model, fast.unembed)

    def _finish_patched_blocks(self, chunk: Chunk, point: str) -> Float[Tensor, "rows pos d_model"]:
        """Per variant row, the residual stream entering the block after the cell's layer —
        the run's, except at the patched positions, where the patched block is finished from
        the patched activation at ``point`` (``[V * B, pos, d_model]``)."""
        fast, run, d = self.fast, chunk.run, chunk.pos_dim
        info = component_info(chunk.component)
        B = run.tokens.shape[0]
        n = fast.n_layers
        layers = list(chunk.layers)
        resid = torch.cat([run.cache[_after(layer, n)] for layer in layers])  # [V * B, pos, d_model], a new tensor
        for layer in sorted(set(layers)):
            vs = [v for v, at in enumerate(layers) if at == layer]
            name = info.hook_name(layer)
            masks = [chunk.masks[v] for v in vs]
            hook = stacked_hooks(chunk.component, [layer] * len(vs), masks, chunk.sources, B, d)[name]
            own = run.cache[name]  # [B, pos, ...]: the run's own activation
            act = hook(own.repeat(len(vs), *([1] * (own.ndim - 1))), FastHook(name, layer))
            where = torch.cat([selected_positions(m, d, B) for m in masks]).to(act.device)  # [len(vs) * B, pos]
            base = None
            if info.resume_base is not None:
                base = run.cache[f"blocks.{layer}.{info.resume_base}"].repeat(len(vs), 1, 1)[where]  # [n, d_model]
            rows = (torch.tensor(vs).unsqueeze(-1) * B + torch.arange(B)).flatten().to(resid.device)  # [len(vs) * B]
            block = resid[rows]
            block[where] = fast.resume_block(layer, point, base, act[where])
            resid[rows] = block
        return resid


def _after(layer: int, n_layers: int) -> str:
    """The residual stream entering the block after ``layer`` (the final one after the last)."""
    return f"blocks.{layer + 1}.hook_resid_pre" if layer + 1 < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


def _keep(store: dict[str, Tensor], act: Tensor, hook: Any) -> None:
    """A caching hook: a detached copy of the activation under its hook name."""
    store[hook.name] = act.detach().clone()


# model -> (parameter version key, None if the fast path matches the bridge, else the reason)
_VERDICTS: weakref.WeakKeyDictionary[Any, tuple[tuple, str | None]] = weakref.WeakKeyDictionary()


def _version(model: Any) -> tuple:
    """Changes whenever a parameter is replaced, moved, cast or edited in place."""
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in model.parameters())


def probe(model: Any) -> str | None:
    """None if the fast path's logits equal the bridge's on a short probe sequence (within
    :data:`PROBE_TOLERANCE` × max(1, max |logit|) in float32; a tolerance scaled to the
    dtype's precision otherwise), else the reason they do not. Cached per model until its
    parameters change."""
    key = _version(model)
    cached = _VERDICTS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    verdict = _compare_logits(model)
    _VERDICTS[model] = (key, verdict)
    return verdict


def _compare_logits(model: Any) -> str | None:
    cfg = model.cfg
    n = max(1, min(PROBE_POSITIONS, int(cfg.n_ctx)))
    tokens = (torch.arange(n).unsqueeze(0) * 7 + 1) % int(cfg.d_vocab)  # [1, n]: varied ids
    device = next(iter(model.parameters())).device
    tokens = tokens.to(device)
    with torch.no_grad():
        reference = model(tokens).float()  # [1, n, d_vocab]
        fast = FastForward(model)
        got = fast.run(fast.embed(tokens), 0).float()
    eps = torch.finfo(next(iter(model.parameters())).dtype).eps
    scale = max(1.0, float(reference.abs().max()))
    tol = (PROBE_TOLERANCE if eps <= torch.finfo(torch.float32).eps else 16 * eps) * scale
    diff = float((got - reference).abs().max()) if got.shape == reference.shape else float("inf")
    if diff <= tol:
        return None
    name = getattr(cfg, "model_name", None) or type(model).__name__
    return (
        f"on a {n}-token probe the fast path's logits differ from the bridge's by up to {diff:.3g} "
        f"(tolerance {tol:.3g}) for model {name!r}"
    )
