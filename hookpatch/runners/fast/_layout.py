"""Which (row, position) pairs a fast forward computes, and how hooks see them.

Position-wise work (norms, projections, MLP) runs on the computed (row, position) pairs packed
into the rows of one 2-D matrix, so its FLOPs are the minimal ones however ragged the rows
are; attention and hook callbacks see the ``[batch, pos, ...]`` grid. A :class:`Layout` says
where each packed row sits in that grid, and converts between the two (a reshape when every
position is computed, a gather or scatter otherwise).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hookpatch.errors import HookpatchError

HookFn = Callable[[Tensor, Any], Tensor | None]
NO_HOOKS: Mapping[str, HookFn] = types.MappingProxyType({})


class FastHook:
    """The ``hook`` argument handed to callbacks, shaped like TransformerLens's HookPoint."""

    __slots__ = ("name", "_layer")

    def __init__(self, name: str, layer: int):
        self.name = name
        self._layer = layer

    def layer(self) -> int:
        """The block index, as ``HookPoint.layer()``."""
        return self._layer

    def __repr__(self) -> str:
        return f"FastHook({self.name!r})"


Bound = dict[str, tuple[HookFn, FastHook]]  # one block's hook point -> (callback, its FastHook)


def fire(bound: Bound, point: str, x: Tensor) -> Tensor:
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


# Shapes such as " n *rest" start with a space so that linters do not read them as the Python
# expression ``n * rest``; jaxtyping ignores the space.
def to_grid(
    t: Float[Tensor, " n *rest"], batch: int, n_pos: int, index: Int[Tensor, " n"] | None
) -> Float[Tensor, "batch n_pos *rest"]:
    """Packed rows into a ``[batch, n_pos, ...]`` grid at flat ``index`` (None: all, in order)."""
    if index is None:
        return t.reshape(batch, n_pos, *t.shape[1:])
    out = t.new_zeros(batch * n_pos, *t.shape[1:])
    out.index_copy_(0, index, t)
    return out.view(batch, n_pos, *t.shape[1:])


def from_grid(t: Float[Tensor, "batch n_pos *rest"], index: Int[Tensor, " n"] | None) -> Float[Tensor, " n *rest"]:
    """The inverse of :func:`to_grid`."""
    flat = t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])
    return flat if index is None else flat.index_select(0, index)


@dataclass(frozen=True)
class Layout:
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
    query_pos: Int[Tensor, "*#lead n_query"]  # the attention grid's query positions, for masks
    rope: Mapping[str | None, tuple[Tensor, Tensor]] | None  # rotary table -> cos, sin at ``pos``, [n, d_head]
    causal: bool  # queries are positions 0..n_pos-1 of every row: plain causal attention
    rows: Int[Tensor, " n_rows"] | None = None  # None: every row
    attn_index: Int[Tensor, " n"] | None = None  # into the attention grid; ``index`` when rows is None

    def full(self, t: Float[Tensor, " n *rest"]) -> Float[Tensor, "batch n_pos *rest"]:
        """``[n, ...]`` -> ``[batch, n_pos, ...]`` (a view when nothing is skipped)."""
        return to_grid(t, self.batch, self.n_pos, self.index)

    def pack(self, t: Float[Tensor, "batch n_pos *rest"]) -> Float[Tensor, " n *rest"]:
        """``[batch, n_pos, ...]`` -> ``[n, ...]``, the inverse of :meth:`full`."""
        return from_grid(t, self.index)

    def attn_full(self, t: Float[Tensor, " n *rest"]) -> Float[Tensor, "n_rows n_pos *rest"]:
        """``[n, ...]`` -> ``[n_rows, n_pos, ...]``, the grid attention runs on."""
        if self.rows is None:
            return self.full(t)
        return to_grid(t, self.rows.shape[0], self.n_pos, self.attn_index)

    def attn_pack(self, t: Float[Tensor, "n_rows n_pos *rest"]) -> Float[Tensor, " n *rest"]:
        """The inverse of :meth:`attn_full`."""
        return self.pack(t) if self.rows is None else from_grid(t, self.attn_index)

    def widen(self, t: Float[Tensor, " n_rows *rest"]) -> Float[Tensor, " batch *rest"]:
        """Attention rows -> all rows (zeros in the others), for a hook."""
        if self.rows is None:
            return t
        return t.new_zeros(self.batch, *t.shape[1:]).index_copy_(0, self.rows, t)

    def narrow(self, t: Float[Tensor, " batch *rest"]) -> Float[Tensor, " n_rows *rest"]:
        """All rows -> attention rows, the inverse of :meth:`widen`."""
        return t if self.rows is None else t.index_select(0, self.rows)

    @property
    def device(self) -> torch.device:
        """Where the layout's index tensors live (the block it serves must be there too)."""
        return self.pos.device

    def to(self, device: torch.device) -> Layout:
        """This layout with every tensor on ``device`` (itself when they are there already):
        a block on another device of a split model needs its indices and rotary tables there."""
        tables = [t for pair in (self.rope or {}).values() for t in pair]  # may lie on the tables' device
        if self.pos.device == device and all(t.device == device for t in tables):
            return self

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        rope = None if self.rope is None else {k: (c.to(device), s.to(device)) for k, (c, s) in self.rope.items()}
        return replace(
            self, index=move(self.index), pos=self.pos.to(device), query_pos=self.query_pos.to(device), rope=rope,
            rows=move(self.rows), attn_index=move(self.attn_index),
        )


def fire_packed(bound: Bound, point: str, x: Tensor, layout: Layout | None) -> Tensor:
    """:func:`fire` for a packed activation: the callback sees (and returns) the full layout."""
    if point not in bound:
        return x
    if layout is None:
        raise AssertionError("a bound hook needs the layout")
    return layout.pack(fire(bound, point, layout.full(x)))


def fire_rows(bound: Bound, point: str, x: Tensor, layout: Layout) -> Tensor:
    """:func:`fire` for an activation over the attention rows: the callback sees all rows."""
    if point not in bound:
        return x
    return layout.narrow(fire(bound, point, layout.widen(x)))


RopeAt = Callable[[Tensor], "Mapping[str | None, tuple[Tensor, Tensor]] | None"]  # positions -> cos, sin


def dense_layout(batch: int, n_pos: int, device: torch.device, rope: RopeAt) -> Layout:
    """Every row computes positions ``0..n_pos - 1``."""
    query_pos = torch.arange(n_pos, device=device)  # [n_pos]
    pos = query_pos.repeat(batch)  # [batch * n_pos]
    return Layout(batch, n_pos, None, pos, query_pos, rope(pos), causal=True)


def packed_layout(
    active_from: Int[Tensor, " batch"],
    n_pos: int,
    started: Bool[Tensor, " batch"],
    rope: RopeAt,
    active_to: Int[Tensor, " batch"] | None = None,
) -> Layout:
    """Started row ``r`` computes positions ``active_from[r]..active_to[r]`` (default: to the
    last), the others none (a plain reshape when every position is computed)."""
    columns = torch.arange(n_pos, device=active_from.device)  # [n_pos]
    active = (columns >= active_from.unsqueeze(-1)) & started.unsqueeze(-1)  # [batch, n_pos]
    if active_to is not None:
        active &= columns <= active_to.unsqueeze(-1)
    if bool(active.all()):
        pos = columns.repeat(active.shape[0])
        return Layout(active.shape[0], n_pos, None, pos, columns, rope(pos), causal=True)
    index = active.flatten().nonzero().squeeze(-1)  # [n]
    pos = index % n_pos
    rows = attn_index = None
    if not bool(started.all()):
        rows = started.nonzero().squeeze(-1)  # [n_rows]
        attn_index = active[rows].flatten().nonzero().squeeze(-1)  # [n]
    return Layout(active.shape[0], n_pos, index, pos, columns, rope(pos), True, rows, attn_index)


def read_layout(read_abs: Int[Tensor, "batch n_read"], rope: RopeAt) -> Layout:
    """The read positions as the only queries of the last block (``[batch, n_read]``)."""
    pos = read_abs.flatten()
    return Layout(read_abs.shape[0], read_abs.shape[1], None, pos, read_abs, rope(pos), causal=False)


def packed_rows(layout: Layout, reads: Int[Tensor, "batch n_read"]) -> Int[Tensor, "batch n_read"]:
    """The packed row of each read (column ``reads[r, j]`` of row ``r``)."""
    rows = torch.arange(layout.batch, device=reads.device).unsqueeze(-1)  # [batch, 1]
    flat = rows * layout.n_pos + reads
    if layout.index is None:
        return flat
    slot = torch.full((layout.batch * layout.n_pos,), -1, dtype=torch.long, device=reads.device)
    slot[layout.index] = torch.arange(layout.index.shape[0], device=reads.device)
    return slot[flat]


def all_keys(
    new: Float[Tensor, "n kv_head d_head"],
    layout: Layout,
    known: Float[Tensor, "known_batch known_pos kv_head d_head"] | None,
) -> Float[Tensor, "n_rows key_pos kv_head d_head"]:
    """Every key (or value) the attention rows attend: the computed ones plus the known ones.

    A dense layout (every position computed) needs nothing known. A packed layout's ``known``
    covers every position of row ``r % known_batch``; the computed rows overwrite a per-row
    copy of it (one gather).
    """
    if layout.index is None:
        return new.view(layout.batch, layout.n_pos, *new.shape[1:])
    if known is None:
        raise AssertionError("a packed layout needs the frozen keys and values")
    rows = torch.arange(layout.batch, device=new.device) if layout.rows is None else layout.rows
    out = known[rows % known.shape[0]]  # [n_rows, pos, kv_head, d_head], a fresh tensor
    index = layout.index if layout.rows is None else layout.attn_index
    if index is None:
        raise AssertionError("a layout restricted to rows needs attn_index")
    out.view(-1, *new.shape[1:]).index_copy_(0, index, new.to(out.dtype))
    return out


def join(
    x: Float[Tensor, "n_old d_model"] | None,
    old: Layout | None,
    new: Layout,
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
