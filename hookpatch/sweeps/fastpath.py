"""Fast path for sweeps: a compatibility-mode TransformerBridge's blocks, run directly in torch.

``model.run_with_hooks`` always runs every block from the embeddings and pays the bridge's
per-module hook machinery. :class:`FastForward` re-implements the same compatibility-mode
forward on the model's own (processed, folded) weights, so a sweep can

* start at any layer from a given residual stream (``blocks.{start}.hook_resid_pre``),
* skip positions whose keys and values are already known: a prefix shared by every row
  (``offset`` + ``prefix_kv``), or a frozen prefix of its own per row (``active_from`` +
  ``frozen_kv``), so rows patched at different positions share one forward,
* compute the unembedding only at the positions it reads (``read_pos``; at the last layer
  only those query rows go through attention and the MLP as well), or stop at the final norm
  (``unembed=False``) for a metric that reads the residual stream through directions,
* finish a block from an activation after its attention (:meth:`FastForward.resume_block`):
  from there a block is position-wise, so a patch of z, attn_out, resid_mid, mlp_out or
  resid_post needs the rest of its block only at the patched positions,

while firing TransformerLens-named hook callbacks with the bridge's shapes. Position-wise
work (norms, projections, MLP) runs on the computed (row, position) pairs packed into the
rows of one 2-D matrix, so its FLOPs are the minimal ones however ragged the rows are; only
attention (cheap at sweep lengths) and hooks see the ``[batch, pos, ...]`` layout. Cost: one
``F.linear`` per projection, two batched matmuls per attention layer (grouped-query heads
share K/V through a reshape, never a copy), a gather/scatter of the packed rows around
attention and bound hooks, no per-call weight re-layout, and no hook work for names not
asked for. Setup extracts weights once as views (no copies) and, for rotary models, a
cos/sin table. It agrees with the bridge to float rounding (~1e-6 in float32);
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
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
# Points after attention, from where :meth:`FastForward.resume_block` finishes a block.
RESUME_POINTS = ("attn.hook_z", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
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


# Shapes such as " n *rest" start with a space so that linters do not read them as the Python
# expression ``n * rest``; jaxtyping ignores the space.
def _to_grid(
    t: Float[Tensor, " n *rest"], batch: int, n_pos: int, index: Int[Tensor, " n"] | None
) -> Float[Tensor, "batch n_pos *rest"]:
    """Packed rows into a ``[batch, n_pos, ...]`` grid at flat ``index`` (None: all, in order)."""
    if index is None:
        return t.reshape(batch, n_pos, *t.shape[1:])
    out = t.new_zeros(batch * n_pos, *t.shape[1:])
    out.index_copy_(0, index, t)
    return out.view(batch, n_pos, *t.shape[1:])


def _from_grid(t: Float[Tensor, "batch n_pos *rest"], index: Int[Tensor, " n"] | None) -> Float[Tensor, " n *rest"]:
    """The inverse of :func:`_to_grid`."""
    flat = t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])
    return flat if index is None else flat.index_select(0, index)


@dataclass(frozen=True)
class _Layout:
    """Which (row, position) pairs a forward computes, packed as the rows of 2-D matrices.

    Packed tensors are ``[n, ...]``. Hooks see the ``[batch, n_pos, ...]`` grid (:meth:`full`,
    :meth:`pack`); attention runs on the grid of just the rows with a computed position,
    ``rows`` (:meth:`attn_full`, :meth:`attn_pack`; :meth:`widen` and :meth:`narrow` convert
    its row axis for hooks). ``index`` and ``attn_index`` are each packed row's flat index
    ``row * n_pos + column`` into those grids, None when the packed rows are the whole grid in
    order (the conversions are then reshapes); grid entries not computed are zeros.
    """

    batch: int
    n_pos: int
    index: Int[Tensor, " n"] | None
    pos: Int[Tensor, " n"]  # absolute position of each packed row
    mask: Bool[Tensor, "..."]  # the keys each query of the attention grid may attend
    rope: tuple[Tensor, Tensor] | None  # cos, sin at ``pos``: [n, d_head] each
    causal: bool  # queries and keys are positions 0..n_pos-1: ``mask`` is plain causal
    rows: Int[Tensor, " n_rows"] | None = None  # None: every row
    attn_index: Int[Tensor, " n"] | None = None  # into the attention grid; ``index`` when rows is None

    def full(self, t: Float[Tensor, " n *rest"]) -> Float[Tensor, "batch n_pos *rest"]:
        """``[n, ...]`` -> ``[batch, n_pos, ...]`` (a view when nothing is skipped)."""
        return _to_grid(t, self.batch, self.n_pos, self.index)

    def pack(self, t: Float[Tensor, "batch n_pos *rest"]) -> Float[Tensor, " n *rest"]:
        """``[batch, n_pos, ...]`` -> ``[n, ...]``, the inverse of :meth:`full`."""
        return _from_grid(t, self.index)

    def attn_full(self, t: Float[Tensor, " n *rest"]) -> Float[Tensor, "n_rows n_pos *rest"]:
        """``[n, ...]`` -> ``[n_rows, n_pos, ...]``, the grid attention runs on."""
        if self.rows is None:
            return self.full(t)
        return _to_grid(t, self.rows.shape[0], self.n_pos, self.attn_index)

    def attn_pack(self, t: Float[Tensor, "n_rows n_pos *rest"]) -> Float[Tensor, " n *rest"]:
        """The inverse of :meth:`attn_full`."""
        return self.pack(t) if self.rows is None else _from_grid(t, self.attn_index)

    def widen(self, t: Float[Tensor, " n_rows *rest"]) -> Float[Tensor, " batch *rest"]:
        """Attention rows -> all rows (zeros in the others), for a hook."""
        if self.rows is None:
            return t
        return t.new_zeros(self.batch, *t.shape[1:]).index_copy_(0, self.rows, t)

    def narrow(self, t: Float[Tensor, " batch *rest"]) -> Float[Tensor, " n_rows *rest"]:
        """All rows -> attention rows, the inverse of :meth:`widen`."""
        return t if self.rows is None else t.index_select(0, self.rows)


def _fire_packed(
    bound: dict[str, tuple[HookFn, FastHook]], point: str, x: Tensor, layout: _Layout | None
) -> Tensor:
    """:func:`_fire` for a packed activation: the callback sees (and returns) the full layout."""
    if point not in bound:
        return x
    assert layout is not None, "a bound hook needs the layout"
    return layout.pack(_fire(bound, point, layout.full(x)))


def _fire_rows(
    bound: dict[str, tuple[HookFn, FastHook]], point: str, x: Tensor, layout: _Layout
) -> Tensor:
    """:func:`_fire` for an activation over the attention rows: the callback sees all rows."""
    if point not in bound:
        return x
    return layout.narrow(_fire(bound, point, layout.widen(x)))


def _all_keys(
    new: Float[Tensor, "n kv_head d_head"],
    layout: _Layout,
    known: Float[Tensor, "known_batch known_pos kv_head d_head"] | None,
) -> Float[Tensor, "n_rows key_pos kv_head d_head"]:
    """Every key (or value) the attention rows attend: the computed ones plus the known ones.

    A dense layout's rows all start at the same position: ``known`` is the shared prefix before
    it (or None), prepended. A packed layout's ``known`` covers every position of row
    ``r % known_batch``; the computed rows overwrite a per-row copy of it (one gather).
    """
    if layout.index is None:
        new = new.view(layout.batch, layout.n_pos, *new.shape[1:])
        if known is None:
            return new
        return torch.cat((known.expand(layout.batch, -1, -1, -1), new), dim=1)
    if known is None:
        raise AssertionError("a packed layout needs the frozen keys and values")
    rows = torch.arange(layout.batch, device=new.device) if layout.rows is None else layout.rows
    out = known[rows % known.shape[0]]  # [n_rows, pos, kv_head, d_head], a fresh tensor
    index = layout.index if layout.rows is None else layout.attn_index
    if index is None:
        raise AssertionError("a layout restricted to rows needs attn_index")
    out.view(-1, *new.shape[1:]).index_copy_(0, index, new.to(out.dtype))
    return out


def _join(
    x: Float[Tensor, "n_old d_model"] | None,
    old: _Layout | None,
    new: _Layout,
    resid: Float[Tensor, "batch pos d_model"],
) -> Float[Tensor, "n d_model"]:
    """The packed rows of ``new`` (a superset of ``old``'s): ``x`` where ``old`` computed them,
    ``resid`` for the rows joining now (all of them when ``old`` is None)."""
    flat = resid.reshape(-1, resid.shape[-1])  # [batch * pos, d_model]
    if x is None or old is None:
        return flat if new.index is None else flat.index_select(0, new.index)
    if old.index is None:  # old already covered every position
        return x
    if new.index is None:
        out, where = flat.clone(), old.index
    else:
        out, where = flat.index_select(0, new.index), torch.searchsorted(new.index, old.index)
    out[where] = x
    return out


class FastForward:
    """Runs blocks of a compatibility-mode TransformerBridge directly on its processed weights.

    Example:
        >>> fast = FastForward(model)
        >>> logits = fast.run(cache["blocks.3.hook_resid_pre"], 3, read_pos=last_pos)
        >>> # rows patched from different positions: each computes only positions >= its own
        >>> logits = fast.run(resid, 3, read_pos=last_pos, active_from=first_patched,
        ...                   frozen_kv=frozen_kv_from_cache(cache, 3, model))
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

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """``blocks.0.hook_resid_pre``: token embeddings, plus learned positions where used."""
        model = self._model
        resid = model.W_E[tokens]
        if not self.rotary:
            resid = resid + model.W_pos[: tokens.shape[1]]
        return resid

    def run_with_cache(
        self,
        tokens: Int[Tensor, "batch pos"],
        names: Sequence[str],
        *,
        read_pos: Int[Tensor, " batch"] | None = None,
    ) -> tuple[Float[Tensor, "batch _ d_vocab"], dict[str, Tensor]]:
        """A full forward from the embeddings: logits and copies of the ``names`` activations.

        The fast counterpart of the bridge's ``run_with_cache`` for the activations a sweep
        reads (equal to it, as the tests check); ``names`` must be hook points this runner fires.
        Logits are ``[batch, pos, d_vocab]``, or ``[batch, 1, d_vocab]`` at ``read_pos`` only.
        """
        store: dict[str, Tensor] = {}

        def keep(act: Tensor, hook: Any) -> None:
            store[hook.name] = act.detach().clone()

        with torch.no_grad():
            resid = self.embed(tokens)
            hooks = {n: keep for n in names if n != "blocks.0.hook_resid_pre"}
            logits = self.run(resid, 0, hooks=hooks, read_pos=read_pos)
            store["blocks.0.hook_resid_pre"] = resid.detach()
        return logits, store

    def final_norm(self, resid: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_model"]:
        """``ln_final.hook_normalized``: the final residual stream through the final norm."""
        return self._ln_final(resid)

    def unembed(self, normalized: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_vocab"]:
        """Logits from :meth:`final_norm`'s output."""
        return _linear(normalized, self._unembed)

    def resume_block(
        self,
        layer: int,
        point: str,
        resid: Float[Tensor, "n d_model"] | None,
        act: Float[Tensor, " n *rest"],
    ) -> Float[Tensor, "n d_model"]:
        """``blocks.{layer}.hook_resid_post`` of packed (row, position) pairs whose block is known
        up to ``point``, where the activation is ``act`` (edited or not).

        After attention a block is position-wise, so a patch there changes only the rest of the
        block at the patched positions: a sweep finishes the block there and joins the run at
        the next one, skipping the patched block's attention. ``point`` and ``resid``:

        * ``attn.hook_z`` (``act`` ``[n, head, d_head]``) or ``hook_attn_out``: ``resid`` is
          ``hook_resid_pre``;
        * ``hook_resid_mid`` (``act`` is the MLP's input, and the residual's too when
          ``resid_mid_edits_residual``) or ``hook_mlp_out``: ``resid`` is the unedited
          ``hook_resid_mid``;
        * ``hook_resid_post``: ``act`` is the answer (``resid`` unused).

        Same operations as :meth:`run`'s block; no hooks fire.
        """
        if point not in RESUME_POINTS:
            raise HookpatchError(f"resume_block: point {point!r} is not one of {RESUME_POINTS}.")
        if point == "hook_resid_post":
            return act
        if resid is None:
            raise HookpatchError(f"resume_block at {point!r} needs resid (see the docstring).")
        w = self._layers[layer]
        if point == "hook_mlp_out":
            return resid + act
        if point == "attn.hook_z":
            act = _linear(act.flatten(-2), w.o)  # [n, d_model]
            point = "hook_attn_out"
        if point == "hook_attn_out":
            resid = act = resid + act  # resid_mid, unedited
        mid = act if self.resid_mid_edits_residual else resid
        return mid + self._mlp(w.ln2(act), w, {}, None)

    def run(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        start: int | Int[Tensor, " batch"],
        *,
        hooks: Mapping[str, HookFn] = NO_HOOKS,
        read_pos: Int[Tensor, " batch"] | Int[Tensor, "batch n_read"] | None = None,
        offset: int = 0,
        prefix_kv: Sequence[tuple[Tensor, Tensor]] | None = None,
        active_from: Int[Tensor, " batch"] | None = None,
        frozen_kv: Sequence[tuple[Tensor, Tensor]] | None = None,
        unembed: bool = True,
    ) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch n_read d_vocab"]:
        """Logits from running blocks ``start..`` on ``resid`` (positions ``offset..``).

        Args:
            resid: the residual stream at ``blocks.{start}.hook_resid_pre`` for absolute
                positions ``[offset, offset + pos)`` (``start == n_layers``: the final one).
                With ``active_from``, all positions; only row ``r``'s positions
                ``>= active_from[r]`` are read.
            start: first block to run; with ``active_from`` also one per row (``[batch]``):
                row ``r`` joins at block ``start[r]`` (``resid[r]`` is the residual there), so
                rows patched at different layers share one forward.
            hooks: TransformerLens hook name -> ``fn(activation, hook)`` returning the new
                activation (or None to keep it); ``hook`` has ``.name``, ``.layer()`` and
                ``.pos_offset`` (= ``offset``). Shapes are the bridge's, over the computed
                positions; ``attn.hook_pattern`` is ``[batch, head, pos, offset + pos]``.
                With ``active_from`` they cover all rows and positions (``pos_offset`` 0), but
                entries at a row's frozen positions (before ``active_from``, or every position
                in blocks before the row's ``start``) hold no meaningful values and edits to
                them are ignored: those keep the unpatched run's values.
            read_pos: absolute positions whose logits to return, one (``[batch]``) or several
                (``[batch, n_read]``) per row; None returns every position.
            offset: absolute position of ``resid[:, 0]``; positions before it come from
                ``prefix_kv``.
            prefix_kv: for each block ``l >= start``, ``(k, v)`` of positions ``0..offset-1``,
                each ``[batch or 1, offset, kv_head, d_head]``. ``k`` is the key the
                attention uses: AFTER rotary for rotary models (``attn.hook_rot_k``), the
                plain ``attn.hook_k`` otherwise. See :func:`prefix_kv_from_cache`.
            active_from: per row, the first position to compute; the positions before it are
                frozen at the unpatched run (which ``frozen_kv`` comes from), so an edit must
                only touch a row's positions ``>= active_from``. Needs ``read_pos`` (each
                ``>= active_from`` of its row) and ``frozen_kv``; excludes ``offset``.
            frozen_kv: for each block ``l >= min(start)``, the unpatched run's ``(k, v)`` at
                every position, ``[b, pos, kv_head, d_head]`` with ``b`` 1, ``batch`` or a
                divisor of it (row ``r`` reads ``r % b``: variants stacked over ``b`` prompts
                share them). ``k`` as in ``prefix_kv``. See :func:`frozen_kv_from_cache`.
            unembed: False returns :meth:`final_norm`'s output (``d_model`` wide) instead of
                the logits, for a metric that reads the residual stream through directions.

        Returns:
            ``[batch, pos, d_vocab]`` logits, or ``[batch, n_read, d_vocab]`` with ``read_pos``.
        """
        batch, n_pos, d_model = resid.shape
        if d_model != self.d_model:
            raise HookpatchError(f"resid has d_model={d_model}; the model has {self.d_model}.")
        if active_from is None:
            if not isinstance(start, int):
                raise HookpatchError("a start per row needs active_from (and frozen_kv).")
            if frozen_kv is not None:
                raise HookpatchError("frozen_kv is only read with active_from; pass both.")
            self._check_start(start)
            self._check_prefix(prefix_kv, start, offset, batch)
            layout = self._dense_layout(batch, n_pos, offset, resid.device)
            x: Tensor = resid.reshape(batch * n_pos, d_model)  # [n, d_model]
            return self._run_blocks(x, layout, start, {}, None, hooks, read_pos, offset, prefix_kv, unembed)
        if offset or prefix_kv is not None:
            raise HookpatchError(
                "active_from (a frozen prefix per row) and offset/prefix_kv (one shared "
                "prefix) are alternatives; pass one of them."
            )
        starts = self._check_starts(start, batch).to(resid.device)
        active_from = self._check_active(active_from, read_pos, batch, n_pos).to(resid.device)
        first = int(starts.min())
        self._check_frozen(frozen_kv, first, batch, n_pos)
        joins = {  # block -> the layout once the rows starting there have joined
            int(layer): self._packed_layout(active_from, n_pos, starts <= layer)
            for layer in starts.unique().tolist()
        }
        return self._run_blocks(None, None, first, joins, resid, hooks, read_pos, 0, frozen_kv, unembed)

    def _run_blocks(
        self,
        x: Float[Tensor, "n d_model"] | None,
        layout: _Layout | None,
        first: int,
        joins: dict[int, _Layout],
        resid: Float[Tensor, "batch pos d_model"] | None,
        hooks: Mapping[str, HookFn],
        read_pos: Tensor | None,
        offset: int,
        known: Sequence[tuple[Tensor, Tensor]] | None,
        unembed: bool = True,
    ) -> Tensor:
        """Blocks ``first..`` then the final norm and (``unembed``) the unembedding, on ``x``
        packed by ``layout``; in per-row mode both start None and rows join from ``resid`` at
        the blocks ``joins`` names (rows joining at ``n_layers`` skip every block)."""
        bound = self._bind(hooks, first, offset)
        last_block_join = max((layer for layer in joins if layer < self.n_layers), default=first)
        reads = None
        at_reads = False  # x holds just the read rows of every row
        for layer in range(first, self.n_layers + 1):
            if layer in joins and not at_reads:
                assert resid is not None
                x, layout = _join(x, layout, joins[layer], resid), joins[layer]
                reads = None  # the packed rows changed
            assert x is not None and layout is not None
            if reads is None and read_pos is not None and not at_reads and last_block_join <= layer:
                reads = self._read_index(read_pos.to(x.device), offset, layout.n_pos, layout.batch)
                read_rows = self._packed_rows(layout, reads)  # [batch, n_read]
            if layer == self.n_layers:
                break
            lh = bound[layer - first]
            kv = None if known is None or (joins and layout.index is None) else known[layer - first]
            if reads is not None and layer == self.n_layers - 1 and lh.keys() <= ALL_ROW_POINTS:
                x = self._last_block_at_reads(x, lh, layout, reads, read_rows, kv, offset, resid)
                at_reads, reads = True, None
            else:
                x = self._block(x, layer, lh, layout, layout, None, kv)
        assert x is not None and layout is not None
        if reads is not None:
            x = x[read_rows.flatten()]  # [batch * n_read, d_model]
        out = self._ln_final(x)
        if unembed:
            out = _linear(out, self._unembed)
        return out.view(layout.batch, -1, out.shape[-1])

    def _last_block_at_reads(
        self,
        x: Float[Tensor, "n d_model"],
        lh: dict[str, tuple[HookFn, FastHook]],
        layout: _Layout,
        reads: Int[Tensor, "batch n_read"],
        read_rows: Int[Tensor, "batch n_read"],
        kv: tuple[Tensor, Tensor] | None,
        offset: int,
        resid: Float[Tensor, "batch pos d_model"] | None,
    ) -> Float[Tensor, "batch_n_read d_model"]:
        """The last block with only the read positions as queries: ``[batch * n_read, d_model]``.

        Rows that have not started (in per-row mode, those joining after the last block) take
        their residual at the reads from ``resid``, where it is final already."""
        started = layout.rows  # None: every row
        if started is None:
            queries = self._read_layout(reads + offset, layout.n_pos + offset)
            return self._block(x, self.n_layers - 1, lh, layout, queries, read_rows.flatten(), kv)
        assert resid is not None
        queries = self._read_layout(reads[started] + offset, layout.n_pos + offset)
        computed = self._block(x, self.n_layers - 1, lh, layout, queries, read_rows[started].flatten(), kv)
        out = resid.gather(1, reads.unsqueeze(-1).expand(-1, -1, resid.shape[-1]))  # [batch, n_read, d_model]
        out[started] = computed.view(started.shape[0], -1, out.shape[-1])
        return out.flatten(0, 1)

    def _block(
        self,
        x: Float[Tensor, "n d_model"],
        layer: int,
        lh: dict[str, tuple[HookFn, FastHook]],
        keys: _Layout,
        queries: _Layout,
        query_rows: Int[Tensor, " n_query"] | None,
        kv: tuple[Tensor, Tensor] | None,
    ) -> Float[Tensor, "_ d_model"]:
        """One block on packed rows ``x`` (laid out by ``keys``); with ``query_rows`` only those
        rows (laid out by ``queries``) go past the keys and values, and are returned."""
        w = self._layers[layer]
        x = _fire_packed(lh, "hook_resid_pre", x, keys)
        h = w.ln1(x)  # [n, d_model]
        hq, xq = (h, x) if query_rows is None else (h[query_rows], x[query_rows])
        q = _linear(hq, w.q).unflatten(-1, (self.n_heads, self.d_head))  # [n_query, head, d_head]
        q = _fire_packed(lh, "attn.hook_q", q, queries)
        k = _linear(h, w.k).unflatten(-1, (self.n_kv_heads, self.d_head))  # [n, kv_head, d_head]
        k = _fire_packed(lh, "attn.hook_k", k, keys)
        v = _fire_packed(lh, "attn.hook_v", _linear(h, w.v).unflatten(-1, (self.n_kv_heads, self.d_head)), keys)
        if queries.rope is not None and keys.rope is not None:
            q = _fire_packed(lh, "attn.hook_rot_q", ops.apply_rotary(q, *queries.rope), queries)
            k = _fire_packed(lh, "attn.hook_rot_k", ops.apply_rotary(k, *keys.rope), keys)
        k_all = _all_keys(k, keys, None if kv is None else kv[0])  # [rows, key_pos, kv_head, d_head]
        v_all = _all_keys(v, keys, None if kv is None else kv[1])
        q_all = queries.attn_full(q)  # [rows, pos, head, d_head]
        fused = queries.causal and q.dtype == torch.float32
        if fused and "attn.hook_attn_scores" not in lh and "attn.hook_pattern" not in lh:
            z = ops.causal_attention(q_all, k_all, v_all, w.scale)
        else:
            scores = ops.attention_scores(q_all, k_all, queries.mask, w.scale)
            scores = _fire_rows(lh, "attn.hook_attn_scores", scores, queries)  # [rows, head, pos, key_pos]
            pattern = ops.attention_pattern(scores, float32_softmax=w.float32_softmax)
            pattern = _fire_rows(lh, "attn.hook_pattern", pattern, queries)
            z = ops.mix_values(pattern, v_all)
        z = _fire_rows(lh, "attn.hook_z", z, queries)  # [rows, pos, head, d_head]
        attn_out = _linear(queries.attn_pack(z).flatten(-2), w.o)  # [n_query, d_model]
        attn_out = _fire_packed(lh, "hook_attn_out", attn_out, queries)
        mid = xq + attn_out
        mlp_in = _fire_packed(lh, "hook_resid_mid", mid, queries)
        if self.resid_mid_edits_residual:
            mid = mlp_in
        mlp_out = _fire_packed(lh, "hook_mlp_out", self._mlp(w.ln2(mlp_in), w, lh, queries), queries)
        return _fire_packed(lh, "hook_resid_post", mid + mlp_out, queries)

    @staticmethod
    def _mlp(
        h: Float[Tensor, "n d_model"],
        w: LayerWeights,
        lh: dict[str, tuple[HookFn, FastHook]],
        layout: _Layout | None,
    ) -> Float[Tensor, "n d_model"]:
        """``act(h W_in) W_out``, or ``(act(h W_gate) * h W_in) W_out`` when gated."""
        if w.gate is None:
            pre = _fire_packed(lh, "mlp.hook_pre", _linear(h, w.mlp_in), layout)  # [n, d_mlp]
            post = w.act(pre)
        else:
            pre = _fire_packed(lh, "mlp.hook_pre", _linear(h, w.gate), layout)
            post = w.act(pre) * _fire_packed(lh, "mlp.hook_pre_linear", _linear(h, w.mlp_in), layout)
        return _linear(_fire_packed(lh, "mlp.hook_post", post, layout), w.mlp_out)

    # ------------------------------------------------------------------------ layouts

    def _dense_layout(self, batch: int, n_pos: int, offset: int, device: torch.device) -> _Layout:
        """Every row computes positions ``offset..offset + n_pos - 1``."""
        query_pos = torch.arange(offset, offset + n_pos, device=device)  # [n_pos]
        pos = query_pos.repeat(batch)  # [batch * n_pos]
        mask = ops.causal_mask(query_pos, offset + n_pos)  # [1, n_pos, key_pos]
        return _Layout(batch, n_pos, None, pos, mask, self._rope(pos), causal=offset == 0)

    def _packed_layout(
        self, active_from: Int[Tensor, " batch"], n_pos: int, started: Bool[Tensor, " batch"]
    ) -> _Layout:
        """Started row ``r`` computes positions ``active_from[r]..n_pos - 1``, the others none
        (a plain reshape when every position is computed)."""
        columns = torch.arange(n_pos, device=active_from.device)  # [n_pos]
        mask = ops.causal_mask(columns, n_pos)  # [1, n_pos, key_pos]
        active = (columns >= active_from.unsqueeze(-1)) & started.unsqueeze(-1)  # [batch, n_pos]
        if bool(active.all()):
            pos = columns.repeat(active.shape[0])
            return _Layout(active.shape[0], n_pos, None, pos, mask, self._rope(pos), causal=True)
        index = active.flatten().nonzero().squeeze(-1)  # [n]
        pos = index % n_pos
        rows = attn_index = None
        if not bool(started.all()):
            rows = started.nonzero().squeeze(-1)  # [n_rows]
            attn_index = active[rows].flatten().nonzero().squeeze(-1)  # [n]
        return _Layout(active.shape[0], n_pos, index, pos, mask, self._rope(pos), True, rows, attn_index)

    def _read_layout(self, read_abs: Int[Tensor, "batch n_read"], n_keys: int) -> _Layout:
        """The read positions as the only queries of the last block (``[batch, n_read]``)."""
        pos = read_abs.flatten()
        mask = ops.causal_mask(read_abs, n_keys)  # [batch, 1, n_read, key_pos]
        return _Layout(read_abs.shape[0], read_abs.shape[1], None, pos, mask, self._rope(pos), causal=False)

    @staticmethod
    def _packed_rows(layout: _Layout, reads: Int[Tensor, "batch n_read"]) -> Int[Tensor, "batch n_read"]:
        """The packed row of each read (column ``reads[r, j]`` of row ``r``)."""
        rows = torch.arange(layout.batch, device=reads.device).unsqueeze(-1)  # [batch, 1]
        flat = rows * layout.n_pos + reads
        if layout.index is None:
            return flat
        slot = torch.full((layout.batch * layout.n_pos,), -1, dtype=torch.long, device=reads.device)
        slot[layout.index] = torch.arange(layout.index.shape[0], device=reads.device)
        return slot[flat]

    # ------------------------------------------------------------------------ helpers

    def _rope(self, positions: Int[Tensor, " n"]) -> tuple[Tensor, Tensor] | None:
        """cos/sin at ``positions``, growing the table as needed."""
        if self._cos is None or self._sin is None:
            return None
        n_keys = int(positions.max()) + 1 if positions.numel() else 0
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

    def _check_kv(
        self,
        kv: Sequence[tuple[Tensor, Tensor]],
        what: str,
        start: int,
        n_pos: int,
        batch_ok: Callable[[int], bool],
        batch_text: str,
        note: str = "",
    ) -> None:
        """One ``[b, n_pos, kv_head, d_head]`` ``(k, v)`` pair per block run, ``batch_ok(b)``."""
        if len(kv) != self.n_layers - start:
            raise HookpatchError(
                f"{what} has {len(kv)} entries; expected one (k, v) per block "
                f"{start}..{self.n_layers - 1} ({self.n_layers - start})."
            )
        expected = (n_pos, self.n_kv_heads, self.d_head)
        for i, (k, v) in enumerate(kv):
            for name, t in (("k", k), ("v", v)):
                if t.ndim != 4 or tuple(t.shape[1:]) != expected or not batch_ok(t.shape[0]):
                    raise HookpatchError(
                        f"{what}[{i}] {name} has shape {tuple(t.shape)}; expected "
                        f"[{batch_text}, {n_pos}, {self.n_kv_heads}, {self.d_head}]{note}."
                    )

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
        self._check_kv(prefix_kv, "prefix_kv", start, offset, lambda b: b in (1, batch), f"1 or {batch}")

    def _check_frozen(
        self, frozen_kv: Sequence[tuple[Tensor, Tensor]] | None, start: int, batch: int, n_pos: int
    ) -> None:
        """``frozen_kv`` has one ``[b, n_pos, kv_head, d_head]`` pair per block run, ``b | batch``."""
        if frozen_kv is None:
            raise HookpatchError(
                "active_from needs frozen_kv, the unpatched run's keys and values at every position "
                "(see frozen_kv_from_cache)."
            )
        ok = lambda b: b > 0 and batch % b == 0  # noqa: E731
        note = f" with b dividing {batch} (row r reads r % b)"
        self._check_kv(frozen_kv, "frozen_kv", start, n_pos, ok, "b", note)

    def _check_start(self, start: int) -> None:
        if not 0 <= start <= self.n_layers:
            raise HookpatchError(f"start={start} is not a block index 0..{self.n_layers}.")

    def _check_starts(self, start: int | Tensor, batch: int) -> Int[Tensor, " batch"]:
        """``start`` as one block index per row, each in ``0..n_layers``."""
        if isinstance(start, int):
            self._check_start(start)
            return torch.full((batch,), start, dtype=torch.long)
        if tuple(start.shape) != (batch,):
            raise HookpatchError(f"start has shape {tuple(start.shape)}; expected an int or [{batch}].")
        start = start.long()
        if bool(((start < 0) | (start > self.n_layers)).any()):
            raise HookpatchError(f"start must lie in 0..{self.n_layers}; got {start.tolist()}.")
        return start

    @staticmethod
    def _check_active(
        active_from: Tensor, read_pos: Tensor | None, batch: int, n_pos: int
    ) -> Int[Tensor, " batch"]:
        """``active_from`` is ``[batch]`` in ``[0, n_pos)`` and no read lies before it."""
        if tuple(active_from.shape) != (batch,):
            raise HookpatchError(f"active_from has shape {tuple(active_from.shape)}; expected [{batch}].")
        active_from = active_from.long()
        if bool(((active_from < 0) | (active_from >= n_pos)).any()):
            raise HookpatchError(f"active_from must lie in [0, {n_pos}); got {active_from.tolist()}.")
        if read_pos is None:
            raise HookpatchError("active_from needs read_pos: a row's frozen positions have no logits.")
        first_read = read_pos if read_pos.ndim == 1 else read_pos.min(-1).values
        if first_read.shape[0] == batch and bool((first_read < active_from).any()):
            raise HookpatchError(
                f"read_pos {read_pos.tolist()} reads before active_from {active_from.tolist()}; a "
                "row's frozen positions have no logits (lower its active_from)."
            )
        return active_from

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


def _cached_kv(cache: Mapping[str, Tensor] | Any, start: int, model: Any) -> list[tuple[Tensor, Tensor]]:
    """``(k, v)`` at every position for blocks ``start..`` (``k`` after rotary where rotary)."""
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
        out.append((k, v))
    return out


def prefix_kv_from_cache(
    cache: Mapping[str, Tensor] | Any, start: int, offset: int, model: Any
) -> list[tuple[Tensor, Tensor]]:
    """``(k, v)`` of positions ``0..offset-1`` for blocks ``start..``, from a full run's cache.

    ``k`` is ``blocks.{l}.attn.hook_rot_k`` (after rotary) for rotary models and
    ``blocks.{l}.attn.hook_k`` otherwise; ``v`` is ``blocks.{l}.attn.hook_v``. Slices are views.
    """
    return [(k[:, :offset], v[:, :offset]) for k, v in _cached_kv(cache, start, model)]


def frozen_kv_from_cache(
    cache: Mapping[str, Tensor] | Any, start: int, model: Any
) -> list[tuple[Tensor, Tensor]]:
    """``(k, v)`` at every position for blocks ``start..``, from the unpatched run's cache: the
    ``frozen_kv`` of :meth:`FastForward.run` (keys as in :func:`prefix_kv_from_cache`; no copies)."""
    return _cached_kv(cache, start, model)
