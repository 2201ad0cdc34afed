"""Argument checks of :meth:`FastForward.run`: each raises HookpatchError naming the argument,
what was expected and what came."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from hookpatch.errors import HookpatchError


def check_start(start: int, n_layers: int) -> None:
    """``start`` is a block index ``0..n_layers`` (``n_layers``: only the final norm)."""
    if not 0 <= start <= n_layers:
        raise HookpatchError(f"start={start} is not a block index 0..{n_layers}.")


def check_starts(start: int | Tensor, batch: int, n_layers: int) -> Int[Tensor, " batch"]:
    """``start`` as one block index per row, each in ``0..n_layers``."""
    if isinstance(start, int):
        check_start(start, n_layers)
        return torch.full((batch,), start, dtype=torch.long)
    if tuple(start.shape) != (batch,):
        raise HookpatchError(f"start has shape {tuple(start.shape)}; expected an int or [{batch}].")
    start = start.long()
    if bool(((start < 0) | (start > n_layers)).any()):
        raise HookpatchError(f"start must lie in 0..{n_layers}; got {start.tolist()}.")
    return start


def check_frozen(
    frozen_kv: Sequence[tuple[Tensor, Tensor]] | None,
    start: int,
    batch: int,
    n_pos: int,
    n_layers: int,
    n_kv_heads: int,
    d_head: int,
) -> None:
    """``frozen_kv`` has one ``[b, n_pos, kv_head, d_head]`` pair per block run, ``b | batch``."""
    if frozen_kv is None:
        raise HookpatchError(
            "active_from needs frozen_kv, the unpatched run's keys and values at every position "
            "(see frozen_kv_from_cache)."
        )
    if len(frozen_kv) != n_layers - start:
        raise HookpatchError(
            f"frozen_kv has {len(frozen_kv)} entries; expected one (k, v) per block "
            f"{start}..{n_layers - 1} ({n_layers - start})."
        )
    expected = (n_pos, n_kv_heads, d_head)
    for i, (k, v) in enumerate(frozen_kv):
        for name, t in (("k", k), ("v", v)):
            if t.ndim != 4 or tuple(t.shape[1:]) != expected or not (t.shape[0] > 0 and batch % t.shape[0] == 0):
                raise HookpatchError(
                    f"frozen_kv[{i}] {name} has shape {tuple(t.shape)}; expected "
                    f"[b, {n_pos}, {n_kv_heads}, {d_head}] with b dividing {batch} (row r reads r % b)."
                )


def check_active(
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


def read_index(read_pos: Tensor, n_pos: int, batch: int) -> Int[Tensor, "batch n_read"]:
    """``read_pos`` as ``[batch, n_read]`` positions, bounds-checked."""
    rel = read_pos.long()
    if rel.shape[0] != batch:
        raise HookpatchError(f"read_pos has {rel.shape[0]} rows; resid has {batch}.")
    rel = rel.unsqueeze(-1) if rel.ndim == 1 else rel  # [batch, n_read]
    if bool(((rel < 0) | (rel >= n_pos)).any()):
        raise HookpatchError(f"read_pos must lie in [0, {n_pos}); got {read_pos.tolist()}.")
    return rel
