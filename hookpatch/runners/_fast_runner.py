"""The fast runner: sweeps on hookpatch's direct block runner (:class:`FastForward`).

Each stacked row is computed only from its cell's layer (joining from the run's cached
residual stream there) and from its first patched position on (earlier positions equal the
unpatched run, whose cached keys and values they contribute), and the computed (row,
position) pairs of all cells, whatever their layers, share the same matrices, so its FLOPs are
close to the minimal ones. A patch after attention (the component table's ``resume_point``:
z, attn_out, resid_mid, mlp_out, resid_post) changes only the rest of its block at the
patched positions the metric can see (at or before a read; in the last block the reads
themselves): those rows finish the block there and join at the next one. A z patch moves the
block's attention output by the patched heads' share of the output projection alone (one
``d_head``-wide matmul per head instead of the whole ``W_O``), where no norm follows it. Both
the unpatched runs and the patched ones stop at the unembedding's input at the positions the
metric reads, and a linear metric reads it through its residual directions.

Before a model's first fast sweep, :func:`probe` runs a short token sequence through both
this runner and the bridge and compares the logits; a model whose fast logits differ falls
back to the bridge (with a warning). The verdict is kept per model, keyed weakly, and checked
again when the model's parameters change (moved, cast or edited in place).

On a model split over devices (``load_model(..., n_devices=N)``) each cached activation stays on
its block's device; rows gathered from several blocks are stacked on one device, and
:class:`FastForward` moves them to each block's device as they run, so the metric values come
back on the unembedding's device, as the bridge's would.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hookpatch.hooks._devices import cat_on, to_device
from hookpatch.metrics._base import Metric
from hookpatch.model._facts import (
    ModelFacts,
    attention_key,
    block_point,
    component_info,
    hook_name,
    resid_entering,
)
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
    info = component_info(component)
    names = [info.hook_name(layer) for layer in layers]
    for layer in range(n_layers):
        names += [resid_entering(layer, n_layers), attention_key(layer, rotary), hook_name("v", layer)]
    if info.resume_point is not None:
        base = info.resume_base
        names += [block_point(layer, base) for layer in layers] if base else []
        if info.resume_point == "attn.hook_z":  # the run's own output projection, moved per patched head
            names += [hook_name("attn_out", layer) for layer in layers]
        names.append(resid_entering(n_layers, n_layers))
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
        stopping at the unembedding's input at the metric's reads (a linear metric reads it
        through its residual directions, never forming the ``d_vocab``-wide logits)."""
        fast = self.fast
        return self._cache(runs, metric, fast_cache_names(component, layers, fast.n_layers, fast.rotary))

    def bytes_per_variant(self, facts: ModelFacts, metric: Metric, component: str, batch: int, n_pos: int) -> int:
        """Activations of one variant's forward (with the per-head tensors ``component``'s hook
        point materializes when bound); logits only where a metric reads several positions (one
        read goes through the residual stream or a single row)."""
        n_read = int(metric.reads.shape[-1])
        logits = 0 if n_read == 1 else n_read * facts.d_vocab
        return _activation_bytes(facts, batch, n_pos, component) + 4 * batch * (logits + facts.d_vocab)

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
                resid = self._finish_patched_blocks(chunk, point, metric.reads)
                start, hooks = layers + 1, {}
            else:
                resid = cat_on([chunk.run.cache[hook_name("resid_pre", layer)] for layer in chunk.layers])
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

    def _finish_patched_blocks(
        self, chunk: Chunk, point: str, metric_reads: Int[Tensor, "batch n_read"]
    ) -> Float[Tensor, "rows pos d_model"]:
        """Per variant row, the residual stream entering the block after the cell's layer —
        the run's, except at the patched positions the metric can see, where the patched block
        is finished from the patched activation at ``point`` (``[V * B, pos, d_model]``).

        Positions after a prompt's last read never reach it (causal attention), and in the last
        block only the read positions themselves do, so the block is finished only there: the
        other positions keep the unpatched run's residual, which nothing downstream reads."""
        fast, run, d = self.fast, chunk.run, chunk.pos_dim
        info = component_info(chunk.component)
        B = run.tokens.shape[0]
        n = fast.n_layers
        layers = list(chunk.layers)
        resid = cat_on([run.cache[_after(layer, n)] for layer in layers])  # [V * B, pos, d_model], a new tensor
        reach = _reaching_reads(metric_reads, B, run.tokens.shape[1], last=False)  # [B, pos]
        reach_last = _reaching_reads(metric_reads, B, run.tokens.shape[1], last=True)
        for layer in sorted(set(layers)):
            vs = [v for v, at in enumerate(layers) if at == layer]
            name = info.hook_name(layer)
            masks = [chunk.masks[v] for v in vs]
            hook = stacked_hooks(chunk.component, [layer] * len(vs), masks, chunk.sources, B, d)[name]
            own = run.cache[name]  # [B, pos, ...]: the run's own activation
            act = hook(own.repeat(len(vs), *([1] * (own.ndim - 1))), FastHook(name, layer))
            # only the patched positions the metric can see: at or before a read (causal
            # attention), and in the last block the reads themselves
            seen = (reach_last if layer == n - 1 else reach).to(act.device).repeat(len(vs), 1)
            where = torch.cat([selected_positions(m, d, B) for m in masks]).to(act.device) & seen  # [len(vs) * B, pos]
            base = None
            if info.resume_base is not None:
                base = run.cache[block_point(layer, info.resume_base)].repeat(len(vs), 1, 1)[where]  # [n, d_model]
            rows = (torch.tensor(vs).unsqueeze(-1) * B + torch.arange(B)).flatten().to(resid.device)  # [len(vs) * B]
            block = resid[rows]
            at = to_device(where, block.device)  # the block is on the stacked rows' device; act on the layer's
            if point == "attn.hook_z" and fast.head_output_is_linear(layer) and base is not None:
                # hook_attn_out = the run's own + the patched heads' share of W_O (exact up to
                # float rounding): 1 / n_heads of the output projection per patched head
                heads = torch.cat([m.expand(B, *act.shape[1:-1], 1)[..., 0] for m in masks]).to(act.device)[where]
                own_z = own.repeat(len(vs), *([1] * (own.ndim - 1)))[where]  # [n, head, d_head]
                attn_out = run.cache[hook_name("attn_out", layer)].repeat(len(vs), 1, 1)[where]  # [n, d_model]
                attn_out += fast.head_output_delta(layer, act[where] - own_z, heads.to(act.device))
                block[at] = to_device(fast.resume_block(layer, "hook_attn_out", base, attn_out), block.device)
            else:
                block[at] = to_device(fast.resume_block(layer, point, base, act[where]), block.device)
            resid[rows] = block
        return resid


    def cache_for_edits(
        self, runs: Mapping[str, Int[Tensor, "batch pos"]], metric: Metric, names: Sequence[str]
    ) -> dict[str, CachedRun]:
        """All runs in one forward, caching ``names`` plus every block's residual stream, keys
        and values (where edited rows join, and what their frozen positions contribute)."""
        fast = self.fast
        needed = list(names) + fast_cache_names("resid_pre", [], fast.n_layers, fast.rotary)
        needed.append(resid_entering(fast.n_layers, fast.n_layers))
        return self._cache(runs, metric, list(dict.fromkeys(needed)))

    def run_edits(self, run: CachedRun, edits: Any, metric: Metric) -> Float[Tensor, "variant batch"]:
        """Variant ``v``'s rows join at the first layer it edits and compute from the first
        position it edits (or the first read, if earlier) on. An edited head's query, key or
        value is recomputed from that head's own input alone (``ln1`` and its rows of the
        projection), with no per-head copy of the residual stream for the other heads; where
        every variant starts with such edits in one block, only the edited heads' attention
        runs there (:meth:`_first_block_by_heads`). What the edits observe of this forward is
        the run's own value wherever a row is not computed."""
        fast = self.fast
        V = edits.n_variants
        B = run.tokens.shape[0]
        n = fast.n_layers
        with torch.no_grad():
            start = edits.start_layers(n)  # [V]
            reads = metric.reads.to(run.tokens.device)  # [B, n_read]
            first = edits.first_positions().to(reads.device)  # [V, B]
            active_from = torch.minimum(first, reads.min(-1).values).flatten()  # [V * B]
            for layer, point in edits.observed():
                if layer < int(start.min()):  # no row computes it: the run's own value
                    own = run.cache[hook_name(point, layer)]  # [B, pos, ...]
                    edits.observe(layer, point, own.repeat(V, *([1] * (own.ndim - 1))))
            resid, done = None, int(start.min()) - 1  # done: blocks no row computes again
            if bool((start == start[0]).all()) and int(start[0]) < n:
                resid = self._first_block_by_heads(run, edits, int(start[0]), reads, active_from)
                if resid is not None:
                    done, start = int(start[0]), start + 1
            if resid is None:
                resid = cat_on([run.cache[resid_entering(int(layer), n)] for layer in start.tolist()])
            row_start = start.to(resid.device).repeat_interleave(B)  # [V * B]
            first_layer = int(start.min())
            hooks = self._edit_hooks(edits, after=done)
            for layer, point in edits.observed():
                if layer > done:  # the others are observed above or by _first_block_by_heads
                    own = run.cache[hook_name(point, layer)]  # [B, pos, ...]
                    hooks[hook_name(point, layer)] = partial(_observe, edits, layer, point, own, row_start, active_from)
            final_edit = None
            if (n, "logits") in edits.sites() and edits.touched((n, "logits")):
                final_edit = partial(_edit_final, edits, (n, "logits"), reads.repeat(V, 1), run.tokens.shape[1])
            final = fast.run(
                resid, row_start, hooks=hooks, read_pos=reads.repeat(V, 1), active_from=active_from,
                unembed=False, frozen_kv=frozen_kv_from_cache(run.cache, min(first_layer, n), self.model)
                if first_layer < n else [], final_edit=final_edit,
            )
            return metric.from_read_inputs(final.view(V, B, *final.shape[1:]), self.model, fast.unembed)

    def _first_block_by_heads(
        self, run: CachedRun, edits: Any, layer: int, reads: Int[Tensor, "batch n_read"],
        active_from: Int[Tensor, " rows"],
    ) -> Float[Tensor, "rows pos d_model"] | None:
        """The residual stream entering block ``layer + 1`` when every variant's first edits are
        of q/k/v inputs in block ``layer``: only the heads whose query, key or value changes
        run their attention; the block's output moves by their share of the output projection
        (or through the post-attention norm), and the MLP runs at the positions that change and
        that the metric can see. None where this does not apply (an MLP input edited in the
        same block, an MLP output observed there, or queries normed across heads)."""
        fast, n = self.fast, self.fast.n_layers
        sites = [site for site in edits.sites() if site[0] == layer and edits.touched(site)]
        observed = [point for at, point in edits.observed() if at == layer]
        if any(kind not in ("q", "k", "v") for _, kind in sites) or "mlp_out" in observed:
            return None
        if not fast.heads_z_supported(layer):
            return None
        V = edits.n_variants
        B, P = run.tokens.shape
        group = fast.n_heads // fast.n_kv_heads
        touched = {kind: set(edits.touched((layer, kind))) if (layer, kind) in sites else set() for kind in "qkv"}
        fed = {h for g in touched["k"] | touched["v"] for h in range(g * group, (g + 1) * group)}  # a KV head's group
        heads = sorted(touched["q"] | fed)
        x = run.cache[hook_name("resid_pre", layer)].repeat(V, 1, 1)  # [V * B, pos, d_model]
        keys = run.cache[attention_key(layer, fast.rotary)]  # [B, pos, kv_head, d_head]: what attention uses
        values = run.cache[hook_name("v", layer)]

        def projected(kind: str, head: int) -> Tensor:
            own = edits.edit((layer, kind), head, x) if head in touched[kind] else x
            return fast.head_input_projection(layer, kind, head, own)

        def kv(kind: str, cached: Tensor, h: int) -> Tensor:
            g = h // group
            return projected(kind, g) if g in touched[kind] else cached[:, :, g].repeat(V, 1, 1)

        q = torch.stack([projected("q", h) for h in heads], 2)  # [V * B, pos, n, d_head]
        k = torch.stack([kv("k", keys, h) for h in heads], 2)
        v = torch.stack([kv("v", values, h) for h in heads], 2)
        ready = torch.tensor([h // group not in touched["k"] for h in heads], device=q.device)
        z_new = fast.heads_z(layer, q, k, v, k_ready=ready)  # [V * B, pos, n, d_head]
        z_own = run.cache[hook_name("z", layer)]  # [B, pos, head, d_head]
        if any(at == layer for at, _ in edits.observed()):
            z = z_own.repeat(V, 1, 1, 1)
            z[:, :, heads] = z_new
            edits.observe(layer, "z", z)
        # the positions that change (from the first edited one) and that a read can see
        seen = _reaching_reads(reads, B, P, last=layer == n - 1).repeat(V, 1)  # [V * B, pos]
        where = seen & (torch.arange(P, device=seen.device) >= active_from.to(seen.device).unsqueeze(-1))
        rows, cols = (t.to(z_new.device) for t in where.nonzero(as_tuple=True))  # the (row, position) pairs that change
        own_rows = rows % B  # the same prompt in the unpatched run

        def own(name: str) -> Tensor:
            return run.cache[name][own_rows, cols]  # [m, ...]

        z_sel = z_new[rows, cols]  # [m, n, d_head]
        if fast.head_output_is_linear(layer):  # the changed heads' shares of W_O
            delta = z_sel.new_zeros(z_sel.shape[0], *z_own.shape[2:])  # [m, head, d_head]
            delta[:, heads] = z_sel - z_own[own_rows, cols][:, heads]
            changed = torch.zeros(z_own.shape[2], dtype=torch.bool, device=z_sel.device)
            changed[heads] = True
            attn_out = own(hook_name("attn_out", layer)) + fast.head_output_delta(
                layer, delta, changed.expand(delta.shape[0], -1))
        else:
            z_rows = z_own[own_rows, cols].clone()  # [m, head, d_head]
            z_rows[:, heads] = z_sel
            attn_out = fast.attention_output(layer, z_rows)
        resid = run.cache[resid_entering(layer + 1, n)].repeat(V, 1, 1)  # [V * B, pos, d_model], next block's device
        finished = fast.resume_block(layer, "hook_attn_out", own(hook_name("resid_pre", layer)), attn_out)
        resid[rows.to(resid.device), cols.to(resid.device)] = to_device(finished, resid.device)
        return resid

    def _edit_hooks(self, edits: Any, after: int = -1) -> dict[str, Any]:
        """FastForward hooks applying ``edits`` in blocks after ``after``: per edited layer,
        the block input is kept at ``hook_resid_pre`` and the edited heads' q/k/v replaced
        right after the projections; an MLP's input at ``hook_mlp_in`` (the final residual
        stream is edited by ``final_edit``)."""
        fast = self.fast
        hooks: dict[str, Any] = {}
        kept: dict[int, Tensor] = {}
        for site in edits.sites():
            layer, kind = site
            heads = edits.touched(site)
            if not heads or layer <= after:
                continue
            if kind in ("q", "k", "v"):
                hooks[hook_name("resid_pre", layer)] = partial(_keep_input, kept, layer)
                hooks[hook_name(kind, layer)] = partial(_edit_heads, fast, edits, site, heads, kept)
            elif kind == "mlp":
                hooks[hook_name("mlp_in", layer)] = partial(_edit_whole, edits, site)
        return hooks

    def _cache(
        self, runs: Mapping[str, Int[Tensor, "batch pos"]], metric: Metric, names: list[str]
    ) -> dict[str, CachedRun]:
        """All runs in one forward from the embeddings, keeping ``names`` and stopping at the
        unembedding's input at the metric's reads (a linear metric reads it through its
        residual directions, never forming the ``d_vocab``-wide logits)."""
        fast = self.fast
        tokens = torch.cat(list(runs.values()))  # [n_runs * batch, pos]
        B = next(iter(runs.values())).shape[0]
        reads = metric.reads.to(tokens.device).repeat(len(runs), 1)  # [n_runs * batch, n_read]
        store: dict[str, Tensor] = {}
        with torch.no_grad():
            resid = fast.embed(tokens)
            first = hook_name("resid_pre", 0)
            hooks = {n: partial(_keep, store) for n in names if n != first}
            final = fast.run(resid, 0, hooks=hooks, read_pos=reads, unembed=False)  # [n_runs * batch, n_read, d_model]
            store[first] = resid.detach()
            out = {}
            for i, (run, run_tokens) in enumerate(runs.items()):
                rows = slice(i * B, (i + 1) * B)
                cache = {name: act[rows] for name, act in store.items()}
                out[run] = CachedRun(run_tokens, cache, metric.from_read_inputs(final[rows], self.model, fast.unembed))
        return out


def _keep_input(kept: dict[int, Tensor], layer: int, act: Tensor, hook: Any) -> None:
    """Keep block ``layer``'s input (``hook_resid_pre``) for the edited heads' projections."""
    kept[layer] = act


def _edit_heads(
    fast: FastForward, edits: Any, site: tuple[int, str], heads: list[int], kept: dict[int, Tensor],
    act: Tensor, hook: Any,
) -> Tensor:
    """``attn.hook_q``/``hook_k``/``hook_v`` (``[rows, pos, head, d_head]``) with each edited
    head's entry recomputed from its own edited input (once for heads whose edits are equal)."""
    layer, kind = site
    x = kept[layer]  # [rows, pos, d_model]
    out = act.clone()
    for group in edits.groups(site, heads):  # heads whose inputs get the same edit share one projection
        out[:, :, group] = fast.head_input_projection(layer, kind, group, edits.edit(site, group[0], x))
    return out


def _edit_whole(edits: Any, site: tuple[int, str], act: Tensor, hook: Any) -> Tensor:
    """An MLP's input (``[rows, pos, d_model]``), edited."""
    return edits.edit(site, 0, act)


def _edit_final(
    edits: Any, site: tuple[int, str], reads: Int[Tensor, "rows n_read"], n_pos: int,
    x: Float[Tensor, "rows n_read d_model"],
) -> Float[Tensor, "rows n_read d_model"]:
    """The final residual stream at the reads, edited: the edits work on the position grid,
    so the reads are placed in it (the other positions are never read)."""
    grid = x.new_zeros(x.shape[0], n_pos, x.shape[-1])
    index = reads.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1])
    grid.scatter_(1, index, x)
    return edits.edit(site, 0, grid).gather(1, index)


def _observe(
    edits: Any, layer: int, point: str, own: Tensor, row_start: Int[Tensor, " rows"],
    active_from: Int[Tensor, " rows"], act: Tensor, hook: Any,
) -> None:
    """Hand this forward's activation to the edits, with the run's own value (``own``,
    ``[batch, pos, ...]``) where a row is not computed (it joins later, or the position is
    before its first computed one)."""
    V = act.shape[0] // own.shape[0]
    columns = torch.arange(act.shape[1], device=act.device)
    row_start, active_from = row_start.to(act.device), active_from.to(act.device)
    computed = (row_start <= layer).unsqueeze(-1) & (columns >= active_from.unsqueeze(-1))  # [rows, pos]
    computed = computed.view(*computed.shape, *([1] * (act.ndim - 2)))
    own = to_device(own, act.device)
    edits.observe(layer, point, torch.where(computed, act, own.repeat(V, *([1] * (own.ndim - 1)))))


def _reaching_reads(
    reads: Int[Tensor, "batch n_read"], batch: int, n_pos: int, last: bool
) -> Bool[Tensor, "batch pos"]:
    """Per prompt, the positions whose residual stream can change the metric: at or before its
    last read (``last=False``: attention is causal), or the reads themselves (``last=True``:
    after the last block every position is read on its own)."""
    columns = torch.arange(n_pos, device=reads.device)  # [pos]
    if last:
        return (columns.view(1, 1, -1) == reads.unsqueeze(-1)).any(1).expand(batch, -1)
    return (columns <= reads.max(-1, keepdim=True).values).expand(batch, -1)


def _after(layer: int, n_layers: int) -> str:
    """The residual stream entering the block after ``layer`` (the final one after the last)."""
    return resid_entering(layer + 1, n_layers)


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
    got = got.to(reference.device)
    diff = float((got - reference).abs().max()) if got.shape == reference.shape else float("inf")
    if diff <= tol:
        return None
    name = getattr(cfg, "model_name", None) or type(model).__name__
    return (
        f"on a {n}-token probe the fast path's logits differ from the bridge's by up to {diff:.3g} "
        f"(tolerance {tol:.3g}) for model {name!r}"
    )
