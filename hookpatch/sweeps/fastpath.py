"""Fast path for sweeps: a compatibility-mode TransformerBridge's blocks, run directly in torch.

``model.run_with_hooks`` always runs every block from the embeddings and pays the bridge's
per-module hook machinery. :class:`FastForward` re-implements the same compatibility-mode
forward on the model's own (processed, folded) weights, so a sweep can

* start at any layer from a given residual stream (``blocks.{start}.hook_resid_pre``),
* skip a prefix of positions whose keys and values are already known (``prefix_kv``),
* compute the unembedding only at the positions it reads (``read_pos``; at the last layer
  only those query rows go through attention and the MLP as well),

while firing TransformerLens-named hook callbacks with the bridge's shapes. Cost: one
``F.linear`` per projection, two batched matmuls per attention layer (grouped-query heads
share K/V through a reshape, never a copy), no per-call weight re-layout, and no hook work
for names not asked for. Setup extracts weights once as views (no copies) and, for rotary
models, a cos/sin table. It agrees with the bridge to float rounding (~1e-6 in float32);
``tests/test_fastpath.py`` checks logits and every hook point against ``run_with_cache``.

Two bridge semantics are reproduced on purpose:

* ``hook_resid_mid`` is the bridge's alias of ``ln2.hook_in``: an edit reaches the MLP but
  not the residual sum (``resid_post = unedited resid_mid + mlp_out``). HookedTransformer
  instead carries the edit into the residual; pass ``resid_mid_edits_residual=True`` for that.
* ``hook_k`` is the key before rotary; the rotated key is ``attn.hook_rot_k``.

Inputs are unpadded (or right-padded) token rows at positions ``0..``, as the bridge runs a
token tensor; left padding (attention masks, shifted positions) is not modelled.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from hookpatch.errors import HookpatchError
from hookpatch.sweeps import _fast_ops as ops
from hookpatch.sweeps._fast_weights import (
    LayerWeights,
    Proj,
    extract_layers,
    norm_fn,
    rope_table,
    unsupported_reason,
)

HookFn = Callable[[Tensor, Any], Tensor | None]
BLOCK_POINTS = (
    "hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores",
    "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre",
    "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
)
ROTARY_POINTS = ("attn.hook_rot_q", "attn.hook_rot_k")
GATED_POINTS = ("mlp.hook_pre_linear",)
# Hooks that see all positions even when the last layer runs only the read rows.
ALL_ROW_POINTS = frozenset({"hook_resid_pre", "attn.hook_k", "attn.hook_v", "attn.hook_rot_k"})
NO_HOOKS: Mapping[str, HookFn] = types.MappingProxyType({})


class FastHook:
    """The ``hook`` argument handed to callbacks, shaped like TransformerLens's HookPoint."""

    __slots__ = ("name", "pos_offset", "_layer")

    def __init__(self, name: str, layer: int, pos_offset: int):
        self.name = name
        self.pos_offset = pos_offset  # absolute position of the activation's first row
        self._layer = layer

    def layer(self) -> int:
        """The block index, as ``HookPoint.layer()``."""
        return self._layer

    def __repr__(self) -> str:
        return f"FastHook({self.name!r}, pos_offset={self.pos_offset})"


def _fire(bound: dict[str, tuple[HookFn, FastHook]], point: str, x: Tensor) -> Tensor:
    """Run the callback bound to ``point`` (if any); None from it keeps ``x``."""
    entry = bound.get(point)
    if entry is None:
        return x
    fn, hook = entry
    out = fn(x, hook)
    if out is None:
        return x
    if out.shape != x.shape:
        raise HookpatchError(
            f"hook {hook.name!r} returned shape {tuple(out.shape)} for an activation of shape "
            f"{tuple(x.shape)}; return a tensor of the same shape (or None to keep it)."
        )
    return out


def _linear(x: Tensor, proj: Proj) -> Tensor:
    return F.linear(x, proj.weight, proj.bias)


class FastForward:
    """Runs blocks of a compatibility-mode TransformerBridge directly on its processed weights.

    Example:
        >>> fast = FastForward(model)
        >>> logits = fast.run(cache["blocks.3.hook_resid_pre"], 3, read_pos=last_pos)
    """

    @staticmethod
    def supports(model: Any) -> bool:
        """True for GPT-2-style and Llama/Qwen2-style bridges in compatibility mode."""
        return unsupported_reason(model) is None

    def __init__(self, model: Any, *, resid_mid_edits_residual: bool = False):
        reason = unsupported_reason(model)
        if reason is not None:
            raise HookpatchError(
                f"FastForward cannot run this model: {reason}. Use the bridge's own hooks "
                "(model.run_with_hooks) for it instead."
            )
        cfg = model.cfg
        self.n_layers: int = cfg.n_layers
        self.n_heads: int = cfg.n_heads
        self.n_kv_heads: int = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        self.d_head: int = cfg.d_head
        self.d_model: int = cfg.d_model
        self.rotary: bool = cfg.positional_embedding_type == "rotary"
        self.resid_mid_edits_residual = resid_mid_edits_residual
        self._model = model
        self._layers: list[LayerWeights] = extract_layers(model)
        self._ln_final = norm_fn(model.ln_final, cfg)
        unembed = model.unembed.original_component
        bias = getattr(unembed, "bias", None)
        self._unembed = Proj(
            unembed.weight.detach(), None if bias is None or not bool(bias.any()) else bias.detach()
        )
        self._cos, self._sin = (None, None)
        if self.rotary:
            self._cos, self._sin = rope_table(model, max(int(cfg.n_ctx), 1))  # [n_ctx, d_head]
        points = BLOCK_POINTS + (ROTARY_POINTS if self.rotary else ())
        points += GATED_POINTS if self._layers and self._layers[0].gate is not None else ()
        self._hook_index: dict[str, tuple[int, str]] = {
            f"blocks.{layer}.{point}": (layer, point)
            for layer in range(self.n_layers)
            for point in points
        }

    # ----------------------------------------------------------------------------- run

    def run(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        start: int,
        *,
        hooks: Mapping[str, HookFn] = NO_HOOKS,
        read_pos: Int[Tensor, "batch"] | Int[Tensor, "batch n_read"] | None = None,
        offset: int = 0,
        prefix_kv: Sequence[tuple[Tensor, Tensor]] | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch n_read d_vocab"]:
        """Logits from running blocks ``start..`` on ``resid`` (positions ``offset..``).

        Args:
            resid: the residual stream at ``blocks.{start}.hook_resid_pre`` for absolute
                positions ``[offset, offset + pos)`` (``start == n_layers``: the final one).
            start: first block to run.
            hooks: TransformerLens hook name -> ``fn(activation, hook)`` returning the new
                activation (or None to keep it); ``hook`` has ``.name``, ``.layer()`` and
                ``.pos_offset`` (= ``offset``). Shapes are the bridge's, over the computed
                positions; ``attn.hook_pattern`` is ``[batch, head, pos, offset + pos]``.
            read_pos: absolute positions whose logits to return, one (``[batch]``) or several
                (``[batch, n_read]``) per row; None returns every position.
            offset: absolute position of ``resid[:, 0]``; positions before it come from
                ``prefix_kv``.
            prefix_kv: for each block ``l >= start``, ``(k, v)`` of positions ``0..offset-1``,
                each ``[batch or 1, offset, kv_head, d_head]``. ``k`` is the key the
                attention uses: AFTER rotary for rotary models (``attn.hook_rot_k``), the
                plain ``attn.hook_k`` otherwise. See :func:`prefix_kv_from_cache`.

        Returns:
            ``[batch, pos, d_vocab]`` logits, or ``[batch, n_read, d_vocab]`` with ``read_pos``.
        """
        batch, n_new, d_model = resid.shape
        if not 0 <= start <= self.n_layers:
            raise HookpatchError(f"start={start} is not a block index 0..{self.n_layers}.")
        if d_model != self.d_model:
            raise HookpatchError(f"resid has d_model={d_model}; the model has {self.d_model}.")
        self._check_prefix(prefix_kv, start, offset, batch)
        bound = self._bind(hooks, start, offset)
        reads = None if read_pos is None else self._read_index(read_pos, offset, n_new, batch)
        n_keys = offset + n_new
        query_pos = torch.arange(offset, n_keys, device=resid.device)  # [pos]
        mask = ops.causal_mask(query_pos, n_keys)  # [1, pos, key_pos]
        rope_new = self._rope(n_keys, slice(offset, n_keys))
        x = resid
        for layer in range(start, self.n_layers):
            lh = bound[layer - start]
            kv = None if prefix_kv is None else prefix_kv[layer - start]
            if reads is not None and layer == self.n_layers - 1 and lh.keys() <= ALL_ROW_POINTS:
                read_abs = reads + offset  # [batch, n_read]
                read_mask = ops.causal_mask(read_abs, n_keys)  # [batch, 1, n_read, key_pos]
                rope_read = self._rope(n_keys, read_abs)
                x = self._block(x, layer, lh, read_mask, rope_read, rope_new, kv, reads)
                reads = None  # the block returned just the read rows
            else:
                x = self._block(x, layer, lh, mask, rope_new, rope_new, kv, None)
        if reads is not None:
            x = ops.gather_rows(x, reads)  # [batch, n_read, d_model]
        return _linear(self._ln_final(x), self._unembed)

    def _block(
        self,
        x: Float[Tensor, "batch pos d_model"],
        layer: int,
        lh: dict[str, tuple[HookFn, FastHook]],
        mask: Tensor,
        rope_q: tuple[Tensor, Tensor] | None,
        rope_k: tuple[Tensor, Tensor] | None,
        kv: tuple[Tensor, Tensor] | None,
        reads: Int[Tensor, "batch n_read"] | None,
    ) -> Float[Tensor, "batch _ d_model"]:
        """One block; with ``reads`` only those query rows are computed and returned."""
        w = self._layers[layer]
        x = _fire(lh, "hook_resid_pre", x)
        h = w.ln1(x)  # [batch, pos, d_model]
        hq, xq = (h, x)  # the query rows
        if reads is not None:
            hq, xq = ops.gather_rows(h, reads), ops.gather_rows(x, reads)
        q = _fire(lh, "attn.hook_q", _linear(hq, w.q).unflatten(-1, (self.n_heads, self.d_head)))
        k = _fire(lh, "attn.hook_k", _linear(h, w.k).unflatten(-1, (self.n_kv_heads, self.d_head)))
        v = _fire(lh, "attn.hook_v", _linear(h, w.v).unflatten(-1, (self.n_kv_heads, self.d_head)))
        if rope_q is not None and rope_k is not None:
            q = _fire(lh, "attn.hook_rot_q", ops.apply_rotary(q, *rope_q))
            k = _fire(lh, "attn.hook_rot_k", ops.apply_rotary(k, *rope_k))
        if kv is not None:  # prepend the known prefix: [batch, offset + pos, kv_head, d_head]
            k = torch.cat((kv[0].expand(x.shape[0], -1, -1, -1), k), dim=1)
            v = torch.cat((kv[1].expand(x.shape[0], -1, -1, -1), v), dim=1)
        scores = _fire(lh, "attn.hook_attn_scores", ops.attention_scores(q, k, mask, w.scale))
        pattern = ops.attention_pattern(scores, float32_softmax=w.float32_softmax)
        pattern = _fire(lh, "attn.hook_pattern", pattern)  # [batch, head, pos, key_pos]
        z = _fire(lh, "attn.hook_z", ops.mix_values(pattern, v))  # [batch, pos, head, d_head]
        attn_out = _fire(lh, "hook_attn_out", _linear(z.flatten(-2), w.o))
        mid = xq + attn_out  # [batch, pos, d_model]
        mlp_in = _fire(lh, "hook_resid_mid", mid)
        if self.resid_mid_edits_residual:
            mid = mlp_in
        mlp_out = _fire(lh, "hook_mlp_out", self._mlp(w.ln2(mlp_in), w, lh))
        return _fire(lh, "hook_resid_post", mid + mlp_out)

    @staticmethod
    def _mlp(
        h: Float[Tensor, "batch pos d_model"],
        w: LayerWeights,
        lh: dict[str, tuple[HookFn, FastHook]],
    ) -> Float[Tensor, "batch pos d_model"]:
        """``act(h W_in) W_out``, or ``(act(h W_gate) * h W_in) W_out`` when gated."""
        if w.gate is None:
            post = w.act(_fire(lh, "mlp.hook_pre", _linear(h, w.mlp_in)))  # [batch, pos, d_mlp]
        else:
            pre = _fire(lh, "mlp.hook_pre", _linear(h, w.gate))
            post = w.act(pre) * _fire(lh, "mlp.hook_pre_linear", _linear(h, w.mlp_in))
        return _linear(_fire(lh, "mlp.hook_post", post), w.mlp_out)

    # ------------------------------------------------------------------------ helpers

    def _rope(self, n_keys: int, positions: Tensor | slice) -> tuple[Tensor, Tensor] | None:
        """cos/sin at ``positions`` (an index tensor or a slice), growing the table as needed."""
        if self._cos is None or self._sin is None:
            return None
        if n_keys > self._cos.shape[0]:
            self._cos, self._sin = rope_table(self._model, max(n_keys, 2 * self._cos.shape[0]))
        return self._cos[positions], self._sin[positions]

    def _bind(
        self, hooks: Mapping[str, HookFn], start: int, offset: int
    ) -> list[dict[str, tuple[HookFn, FastHook]]]:
        """Per block from ``start``: hook point -> (callback, FastHook); unknown names raise."""
        bound: list[dict[str, tuple[HookFn, FastHook]]] = [{} for _ in range(self.n_layers - start)]
        for name, fn in hooks.items():
            where = self._hook_index.get(name)
            if where is None:
                points = sorted({p for _, p in self._hook_index.values()})
                raise HookpatchError(
                    f"hooks: {name!r} is not a hook point FastForward fires. It fires "
                    f"blocks.{{layer}}.<point> for point in {points}."
                )
            layer, point = where
            if layer < start:
                raise HookpatchError(
                    f"hooks: {name!r} is in block {layer}, before start={start}, so it would never "
                    "fire; patch the residual stream passed in instead."
                )
            bound[layer - start][point] = (fn, FastHook(name, layer, offset))
        return bound

    def _check_prefix(
        self,
        prefix_kv: Sequence[tuple[Tensor, Tensor]] | None,
        start: int,
        offset: int,
        batch: int,
    ) -> None:
        """``prefix_kv`` has one ``[1 or batch, offset, kv_head, d_head]`` pair per block run."""
        if offset < 0:
            raise HookpatchError(f"offset={offset} must be >= 0.")
        if prefix_kv is None:
            if offset:
                raise HookpatchError(
                    f"offset={offset} needs prefix_kv, the keys and values of the first {offset} "
                    "positions (see prefix_kv_from_cache)."
                )
            return
        if len(prefix_kv) != self.n_layers - start:
            raise HookpatchError(
                f"prefix_kv has {len(prefix_kv)} entries; expected one (k, v) per block "
                f"{start}..{self.n_layers - 1} ({self.n_layers - start})."
            )
        expected = (offset, self.n_kv_heads, self.d_head)
        for i, (k, v) in enumerate(prefix_kv):
            for name, t in (("k", k), ("v", v)):
                if t.ndim != 4 or tuple(t.shape[1:]) != expected or t.shape[0] not in (1, batch):
                    raise HookpatchError(
                        f"prefix_kv[{i}] {name} has shape {tuple(t.shape)}; expected "
                        f"[1 or {batch}, {offset}, {self.n_kv_heads}, {self.d_head}]."
                    )

    @staticmethod
    def _read_index(
        read_pos: Tensor, offset: int, n_new: int, batch: int
    ) -> Int[Tensor, "batch n_read"]:
        """Absolute read positions -> row indices into the computed positions, bounds-checked."""
        rel = (read_pos - offset).long()
        if rel.shape[0] != batch:
            raise HookpatchError(f"read_pos has {rel.shape[0]} rows; resid has {batch}.")
        rel = rel.unsqueeze(-1) if rel.ndim == 1 else rel  # [batch, n_read]
        if bool(((rel < 0) | (rel >= n_new)).any()):
            raise HookpatchError(
                f"read_pos must lie in the computed positions [{offset}, {offset + n_new}); "
                f"got {read_pos.tolist()}."
            )
        return rel


def prefix_kv_from_cache(
    cache: Mapping[str, Tensor] | Any, start: int, offset: int, model: Any
) -> list[tuple[Tensor, Tensor]]:
    """``(k, v)`` of positions ``0..offset-1`` for blocks ``start..``, from a full run's cache.

    ``k`` is ``blocks.{l}.attn.hook_rot_k`` (after rotary) for rotary models and
    ``blocks.{l}.attn.hook_k`` otherwise; ``v`` is ``blocks.{l}.attn.hook_v``. Slices are views.
    """
    key = "attn.hook_rot_k" if model.cfg.positional_embedding_type == "rotary" else "attn.hook_k"
    out = []
    for layer in range(start, model.cfg.n_layers):
        names = (f"blocks.{layer}.{key}", f"blocks.{layer}.attn.hook_v")
        try:
            k, v = (cache[name] for name in names)
        except KeyError as err:
            raise HookpatchError(
                f"the cache lacks {err.args[0]!r}; run with a names_filter that keeps "
                f"'{key}' and 'attn.hook_v' for blocks {start}.."
            ) from None
        out.append((k[:, :offset], v[:, :offset]))
    return out
