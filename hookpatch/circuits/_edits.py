"""Edits of receiver inputs, described as data, for a runner to apply in one stacked forward.

Every edge or path intervention comes down to changing what some receivers read, per variant
of the run: ``V`` variants of a ``B``-prompt run are stacked along the batch axis (``V * B``
rows), and each receiver *site* — a layer's query, key or value inputs, its MLP input, or the
final residual stream — gets a new input for some of its heads. Two kinds:

* :class:`AddEdits` (exact edge patching): the input computed in this very forward, plus, for
  each patched edge into the receiver, the sender's output in the source run minus its output
  in this forward (``sum_s weight[v, s] * Δ_s``, at the variant's positions);
* :class:`SetEdits` (the second run of IOI path patching): the input replaced by a value
  recorded in another run, at the receiver positions.

A runner asks :meth:`touched` which heads of a site change and :meth:`edit` for a head's new
input given the site's current input ``x`` (the residual stream there, ``[V * B, pos,
d_model]``); it never needs to know which kind of edit it applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor

from hookpatch.circuits._graph import Node, Site
from hookpatch.circuits._senders import head_delta
from hookpatch.model._facts import hook_name


class ReceiverEdits(Protocol):
    """What a runner needs to apply receiver edits (see the module docstring)."""

    n_variants: int

    def sites(self) -> list[Site]:
        """Every site some variant edits, in forward order."""
        ...

    def observed(self) -> list[tuple[int, str]]:
        """Activations of the forward itself the edits depend on: ``(layer, "z")`` or
        ``(layer, "mlp_out")``, to be passed to :meth:`observe` as they are computed."""
        ...

    def observe(self, layer: int, point: str, act: Tensor) -> None:
        """This forward's activation at ``point`` of block ``layer``, ``[V * batch, pos, ...]``
        (values of the target run wherever a runner did not compute it)."""
        ...

    def touched(self, site: Site) -> list[int]:
        """The heads (query heads for q, KV heads for k/v; ``[0]`` for mlp/logits) edited at ``site``."""
        ...

    def edit(self, site: Site, head: int, x: Float[Tensor, "rows pos d_model"]) -> Float[Tensor, "rows pos d_model"]:
        """Head ``head``'s new input at ``site`` given the current input ``x`` there."""
        ...

    def groups(self, site: Site, heads: list[int]) -> list[list[int]]:
        """``heads`` grouped so that the heads of a group get the same edit at ``site``."""
        ...

    def start_layers(self, n_layers: int) -> Int[Tensor, " variant"]:
        """Per variant, the first layer whose input it edits (``n_layers`` for the logits alone)."""
        ...

    def first_positions(self) -> Int[Tensor, "variant batch"]:
        """Per variant and prompt, the first position any edit touches (``pos`` if none)."""
        ...


def _first_true(mask: Bool[Tensor, "variant batch pos"]) -> Int[Tensor, "variant batch"]:
    n_pos = mask.shape[-1]
    return torch.where(mask.any(-1), mask.int().argmax(-1), n_pos)


def _start_layers(weights: Mapping[Site, Tensor], n_variants: int, n_layers: int) -> Int[Tensor, " variant"]:
    start = torch.full((n_variants,), n_layers, dtype=torch.long)
    for (layer, _), w in weights.items():
        used = w.reshape(n_variants, -1).ne(0).any(-1)  # [V]
        start = torch.where(used, torch.minimum(start, torch.tensor(layer)), start)
    return start


@dataclass(frozen=True)
class AddEdits:
    """Exact edge patching of ``V`` edge sets.

    Each receiver's input is its input in this very forward plus, for each patched edge into
    it, the sender's output in the source run minus its output in this forward (``Δ_s``): with
    every edge patched, every node reads what it read in the source run. A sender's output in
    this forward is what the runner reports through :meth:`observe` (its z or MLP output, at
    the points :meth:`observed` names) before any receiver after it is edited; the input's
    never changes, so its difference is the two cached runs'.

    Attributes:
        model: the TransformerBridge (its ``W_O`` and post-attention norms make a head's output).
        senders: the senders the weights index.
        source, target: the cached source and target runs (hook name → ``[batch, ...]``).
        weights: per site, ``[V, sender, head]``: 1 where the variant patches the edge from that
            sender into that head's input (0 elsewhere; any real weight scales the edge).
        pos_mask: ``[V, batch, pos]``, where each variant's edges are patched.
    """

    model: Any
    senders: tuple[Node, ...]
    source: Any  # a cache: hook name -> [batch, ...] (a dict or an ActivationCache)
    target: Any
    weights: Mapping[Site, Float[Tensor, "variant sender head"]]
    pos_mask: Bool[Tensor, "variant batch pos"]
    # "used": [V, sender] which variants patch an edge from each sender; "seen": [sender] whose
    # Δ_s this forward has produced so far; "sum": [V, batch, pos, d_model] each variant's sum of
    # them; "pairs": [n, batch, pos, d_model] Δ_s of each used (sender, variant) pair, at row
    # "slot"[sender, variant]
    _state: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, s in enumerate(self.senders):
            if s.kind == "input":
                name = hook_name("resid_pre", 0)
                self._store(i, (self.source[name] - self.target[name]).unsqueeze(0))

    @property
    def n_variants(self) -> int:
        return int(self.pos_mask.shape[0])

    def sites(self) -> list[Site]:
        return sorted(self.weights, key=_site_order)

    def observed(self) -> list[tuple[int, str]]:
        """The activations of this forward the senders' outputs are made of: ``(layer, "z")``
        for heads, ``(layer, "mlp_out")`` for MLPs, in forward order."""
        points = {(s.layer, "z" if s.kind == "head" else "mlp_out") for s in self.senders if s.kind != "input"}
        return sorted(points, key=lambda p: (p[0], p[1] == "mlp_out"))

    def observe(self, layer: int, point: str, act: Tensor) -> None:
        """This forward's activation at ``point`` of block ``layer`` (``[V * batch, pos, ...]``):
        the outputs of the senders there, as differences from the source run."""
        V = self.n_variants
        grid = act.reshape(V, -1, *act.shape[1:])  # [V, B, pos, ...]
        for i, s in enumerate(self.senders):
            if s.layer != layer or (s.kind == "head") != (point == "z") or s.kind == "input":
                continue
            rows = self._users(i)
            current = grid[rows]
            if s.kind == "mlp":
                delta = self.source[hook_name("mlp_out", layer)].unsqueeze(0) - current
            else:
                assert s.head is not None
                delta = head_delta(self.model, layer, current, self.source[hook_name("z", layer)], s.head)
            self._store(i, delta, rows)

    def _users(self, i: int) -> Int[Tensor, " n"]:
        """The variants that patch some edge from sender ``i``."""
        return self._users_mask()[:, i].nonzero().flatten()

    def _store(self, i: int, delta: Tensor, rows: Tensor | None = None) -> None:
        """Add ``Δ_s`` of sender ``i`` (masked to each variant's positions) to the running sum
        over senders so far of the variants ``rows`` using it, and keep it for the variants
        whose edits will read it one by one (see :meth:`_coefficients`). Memory: one
        ``[batch, pos, d_model]`` per such (sender, variant) pair — for a circuit's complement,
        only the few edges the circuit keeps."""
        rows = self._users(i) if rows is None else rows
        mask = self.pos_mask[rows].unsqueeze(-1).to(delta.device, delta.dtype)  # [n, B, pos, 1]
        delta = delta * mask
        total = self._state.get("sum")
        if total is None:
            total = self._state["sum"] = delta.new_zeros(self.n_variants, *delta.shape[1:])
            # Δ_s of every (sender, variant) pair some edit reads, one row each, for gathering many at once
            read = self._read_pairs().T  # [sender, V]
            slot = torch.full(read.shape, -1, dtype=torch.long)
            slot[read] = torch.arange(int(read.sum()))
            self._state["slot"] = slot
            # every row is written when its sender is seen, before any edit reads it
            self._state["pairs"] = delta.new_empty(int(read.sum()), *delta.shape[1:])
            self._state["seen"] = torch.zeros(len(self.senders), dtype=torch.bool)
        self._state["seen"][i] = True
        total.index_add_(0, rows.to(total.device), delta)
        slot = self._state["slot"][i, rows.cpu()]
        keep = slot >= 0
        if bool(keep.any()):
            self._state["pairs"][slot[keep].to(delta.device)] = delta[keep.to(delta.device)]

    def _seen_at(self, site: Site) -> Bool[Tensor, " sender"]:
        """The senders a forward has produced when it reaches ``site``: the input, every block
        before the site's layer, and for an MLP input its own block's heads."""
        layer, kind = site
        return torch.tensor([s.kind == "input" or s.layer < layer or (kind == "mlp" and s.kind == "head"
                                                                      and s.layer == layer) for s in self.senders])

    def _coefficients(self, site: Site, head: int) -> tuple[Bool[Tensor, " variant"], Float[Tensor, "variant sender"]]:
        """How head ``head``'s edit at ``site`` is summed, per variant: ``complement[v]`` (the
        running sum of every seen sender's ``Δ_s`` is added) and the coefficients of the
        senders' own ``Δ_s`` added on top. Per variant the shorter way: the patched edges'
        ``Δ_s`` (weights), or, where the weights are 0/1 and most seen senders are patched (a
        circuit's complement), the running sum minus the unpatched ones."""
        w = self.weights[site][:, :, head]  # [V, sender]
        seen = self._seen_at(site)
        used = self._users_mask() & seen  # [V, sender]: in the running sum
        weights = torch.where(seen, w, torch.zeros_like(w))  # unseen senders have no edge here
        binary = ((weights == 0) | (weights == 1)).all(-1)  # [V]
        skipped = used & (weights == 0)
        complement = binary & (skipped.sum(-1) < weights.ne(0).sum(-1))  # [V]
        coef = torch.where(complement.unsqueeze(-1), -skipped.to(w.dtype), weights)  # [V, sender]
        return complement, coef

    def _read_pairs(self) -> Bool[Tensor, "variant sender"]:
        """Which (variant, sender) ``Δ_s`` some edit reads one by one."""
        read = torch.zeros(self.n_variants, len(self.senders), dtype=torch.bool)
        for site in self.weights:
            for group in self.groups(site, self.touched(site)):
                read |= self._coefficients(site, group[0])[1].ne(0)
        return read

    def _users_mask(self) -> Bool[Tensor, "variant sender"]:
        """Which variants patch some edge from each sender, ``[V, sender]``."""
        if "used" not in self._state:
            used = torch.zeros(self.n_variants, len(self.senders), dtype=torch.bool)
            for w in self.weights.values():
                used |= w.ne(0).any(-1)
            self._state["used"] = used
        return self._state["used"]

    def touched(self, site: Site) -> list[int]:
        w = self.weights.get(site)
        return [] if w is None else w.ne(0).any(0).any(0).nonzero().flatten().tolist()

    def groups(self, site: Site, heads: list[int]) -> list[list[int]]:
        return _equal_columns(self.weights[site], heads)

    def edit(self, site: Site, head: int, x: Float[Tensor, "rows pos d_model"]) -> Float[Tensor, "rows pos d_model"]:
        """``x`` plus the weighted ``Δ_s`` of the edges into this head's input. Where the
        weights are 0/1 and most of the senders seen so far are patched (a circuit's
        complement), the sum runs the other way: every seen sender's ``Δ_s`` (kept as a running
        sum) minus those of the unpatched edges."""
        grid = x.reshape(self.n_variants, -1, *x.shape[1:])  # [V, B, pos, d_model]
        if "pairs" not in self._state:  # nothing seen yet: no edge into this input has a sender before it
            return x.clone()
        complement, coef = self._coefficients(site, head)
        assert torch.equal(self._state["seen"], self._seen_at(site)), "senders observed out of forward order"
        if bool(complement.any()):  # x + the running sum, for the complement variants only
            weight = complement.to(grid.device, grid.dtype).view(-1, *([1] * (grid.ndim - 1)))
            out = torch.addcmul(grid, self._state["sum"].to(grid.device, grid.dtype), weight)
        else:
            out = grid.clone()
        v, s = coef.nonzero(as_tuple=True)
        if v.numel():
            store = self._state["pairs"]
            pairs = store[self._state["slot"][s, v].to(store.device)]  # [pairs, B, pos, d_model]
            scale = coef[v, s].to(out.device, out.dtype).view(-1, *([1] * (pairs.ndim - 1)))
            out.index_add_(0, v.to(out.device), (scale * pairs.to(out.device, out.dtype)))
        return out.flatten(0, 1)

    def start_layers(self, n_layers: int) -> Int[Tensor, " variant"]:
        return _start_layers(self.weights, self.n_variants, n_layers)

    def first_positions(self) -> Int[Tensor, "variant batch"]:
        return _first_true(self.pos_mask)


@dataclass(frozen=True)
class SetEdits:
    """Receiver inputs replaced by recorded values (the second run of IOI path patching).

    Attributes:
        values: per site, ``[V * batch, pos, d_model]``: the value each variant's receivers at
            that site read instead (the residual stream recorded there in the first run).
        heads: per site, ``[V, head]``: which heads' inputs are replaced.
        pos_mask: ``[V, batch, pos]``, the receiver positions replaced.
    """

    values: Mapping[Site, Float[Tensor, "rows pos d_model"]]
    heads: Mapping[Site, Bool[Tensor, "variant head"]]
    pos_mask: Bool[Tensor, "variant batch pos"]

    @property
    def n_variants(self) -> int:
        return int(self.pos_mask.shape[0])

    def sites(self) -> list[Site]:
        return sorted(self.heads, key=_site_order)

    def observed(self) -> list[tuple[int, str]]:
        return []

    def observe(self, layer: int, point: str, act: Tensor) -> None:
        raise AssertionError("SetEdits observe nothing")

    def groups(self, site: Site, heads: list[int]) -> list[list[int]]:
        return _equal_columns(self.heads[site].unsqueeze(1), heads)

    def touched(self, site: Site) -> list[int]:
        h = self.heads.get(site)
        return [] if h is None else h.any(0).nonzero().flatten().tolist()

    def edit(self, site: Site, head: int, x: Float[Tensor, "rows pos d_model"]) -> Float[Tensor, "rows pos d_model"]:
        B = self.pos_mask.shape[1]
        where = self.pos_mask & self.heads[site][:, head].view(-1, 1, 1)  # [V, B, pos]
        where = where.flatten(0, 1).unsqueeze(-1).to(x.device)  # [V * B, pos, 1]
        value = self.values[site].to(x.device, x.dtype)
        assert value.shape[0] == self.n_variants * B
        return torch.where(where, value, x)

    def start_layers(self, n_layers: int) -> Int[Tensor, " variant"]:
        return _start_layers(self.heads, self.n_variants, n_layers)

    def first_positions(self) -> Int[Tensor, "variant batch"]:
        return _first_true(self.pos_mask)


def _equal_columns(weights: Shaped[Tensor, "variant sender head"], heads: list[int]) -> list[list[int]]:
    """``heads`` grouped by equal weight columns ``weights[:, :, h]`` (in first-seen order)."""
    groups: list[tuple[Tensor, list[int]]] = []
    for h in heads:
        column = weights[:, :, h]
        for key, members in groups:
            if torch.equal(key, column):
                members.append(h)
                break
        else:
            groups.append((column, [h]))
    return [members for _, members in groups]


_KIND_ORDER = {"q": 0, "k": 1, "v": 2, "mlp": 3, "logits": 4}


def _site_order(site: Site) -> tuple[int, int]:
    return site[0], _KIND_ORDER[site[1]]
