"""The grid of a sweep: which layers, positions and heads, with their labels.

Activation patching, ablation and attribution patching share one grid vocabulary: ``by`` is
``("layer", "pos")``, ``("layer", "head")``, ``("layer", "pos", "head")`` or ``("layer",)``;
positions are columns or names of the prompt set (default: every column, or for padded
prompts of different lengths the prompt set's named positions, see :func:`default_positions`);
heads are the component's head axis in the component table: query heads for
z/q/pattern/result/q_input, KV heads for k/v/k_input/v_input (labelled ``KV0`` under
grouped-query attention, ``H0`` otherwise). Building a grid checks every index, so bad input
fails before any run.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from hookpatch._checks import IntsLike, as_int, as_ints, is_int, require_prompts
from hookpatch.errors import HookpatchError
from hookpatch.hooks._selection import per_prompt_positions
from hookpatch.model._facts import COMPONENTS, ModelFacts, component_info, model_facts
from hookpatch.tasks._promptset import END, PromptSet

GRIDS = (("layer", "pos"), ("layer", "head"), ("layer", "pos", "head"), ("layer",))


@dataclass(frozen=True)
class Grid:
    """Checked grid axes of a sweep over ``component`` and their labels."""

    facts: ModelFacts
    component: str
    by: tuple[str, ...]
    layers: tuple[int, ...]
    positions: tuple[int | str, ...] | None
    heads: tuple[int, ...] | None
    labels: dict[str, tuple[str, ...]]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(self.labels[a]) for a in self.by)

    def cells(self) -> list[tuple[int, int | str | None, int | None]]:
        """Every ``(layer, position, head)`` of the grid in ``values`` order (None: all)."""
        positions: Sequence[int | str | None] = [None]
        if "pos" in self.by and self.positions is not None:
            positions = self.positions
        heads: Sequence[int | None] = self.heads if "head" in self.by and self.heads is not None else [None]
        return list(itertools.product(self.layers, positions, heads))

    def columns(self, prompts: PromptSet) -> Int[Tensor, "n_pos batch"]:
        """The column each grid position selects in each prompt (names resolved per prompt)."""
        cols = [
            prompts.position(p).cpu() if isinstance(p, str) else torch.full((len(prompts),), p)
            for p in self.positions or ()
        ]
        return torch.stack(cols).long() if cols else torch.zeros(0, len(prompts), dtype=torch.long)

    def kv_head_feeds(self) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
        """For a component on KV heads under grouped-query attention (k, v, k_input, v_input),
        each KV head's label with the labels of the query heads it feeds
        (``(("KV0", ("H0", "H1")), ...)``); None otherwise."""
        if not (self.facts.grouped_query and component_info(self.component).head_axis == "kv_head"):
            return None
        return tuple(
            (f"KV{k}", tuple(f"H{h}" for h in self.facts.query_heads_of_kv_head(k)))
            for k in range(self.facts.n_kv_heads)
        )

    @classmethod
    def build(
        cls,
        model: Any,
        prompts: PromptSet,
        component: str,
        by: Sequence[str],
        layers: IntsLike = None,
        positions: Any = None,
        heads: IntsLike = None,
    ) -> Grid:
        """Check the axes against the model and the prompt set and label them.

        ``layers``, ``heads`` and ``positions`` may be one entry or several, of any integer
        type (``layers=1``, ``layers=np.arange(2)``); positions may also be names ("S2").
        """
        facts = model_facts(model)
        require_prompts(prompts)
        info = component_info(component)
        if not isinstance(by, (str, list, tuple)):
            raise HookpatchError(f"by={by!r} must name grid axes, one of {GRIDS}.")
        by = (by,) if isinstance(by, str) else tuple(by)
        layers, heads, positions = as_ints(layers, "layers"), as_ints(heads, "heads"), _positions(positions)
        for arg, value in (("layers", layers), ("heads", heads), ("positions", positions)):
            if value is not None and not value:
                raise HookpatchError(f"{arg}=[] selects nothing; pass None for all, or at least one entry.")
        if by not in GRIDS:
            raise HookpatchError(f"unknown grid by={by}; expected one of {GRIDS}.")
        if "head" in by and info.head_axis is None:
            with_heads = ", ".join(c.name for c in COMPONENTS.values() if c.head_axis is not None)
            raise HookpatchError(
                f"component {component!r} has no heads; a grid by head needs one of {with_heads}."
            )
        layer_list = tuple(facts.check_layer(layer) for layer in (range(facts.n_layers) if layers is None else layers))
        labels = {"layer": tuple(str(layer) for layer in layer_list)}
        head_list = None
        if "head" in by:
            all_heads = range(facts.n_heads_of(component))
            head_list = tuple(facts.check_head(component, h) for h in (all_heads if heads is None else heads))
            prefix = "KV" if info.head_axis == "kv_head" and facts.grouped_query else "H"
            labels["head"] = tuple(f"{prefix}{h}" for h in head_list)
        elif heads is not None:
            raise HookpatchError(f"heads= restricts a grid by head; by={by} has no head axis.")
        pos_list = None
        if "pos" in by:
            pos_list = default_positions(prompts) if positions is None else tuple(positions)
            for p in pos_list:  # raises on out-of-range, padding and unknown names
                per_prompt_positions(p, len(prompts), prompts.n_pos, prompts)
            all_labels = prompts.position_labels()
            labels["pos"] = tuple(p if isinstance(p, str) else all_labels[p] for p in pos_list)
        elif positions is not None:
            raise HookpatchError(f"positions= restricts a grid by pos; by={by} has no pos axis.")
        return cls(facts, component, by, layer_list, pos_list, head_list, labels)


def default_positions(prompts: PromptSet) -> tuple[int | str, ...]:
    """The pos axis when ``positions=`` is not given: every column, or the named positions.

    Prompts of one length give every column. Padded prompts (different lengths) have no
    column that means the same token in every prompt, and a patch at a pad is meaningless, so
    the grid uses the prompt set's named positions (``IO, S1, S1+1, S2, END`` for IOI), each
    resolved per prompt. A padded set with no name but ``END`` raises, saying what to pass.
    """
    if not prompts.padded:
        return tuple(range(prompts.n_pos))
    names = tuple(prompts.positions)
    if names == (END,):
        shortest = int(prompts.lengths.min())
        raise HookpatchError(
            f"positions= is needed: these {len(prompts)} prompts have different lengths "
            f"({shortest} to {prompts.n_pos} tokens), so a column past {shortest - 1} is padding in "
            f"some prompt, and the prompt set names no position but {END!r}. Pass "
            f"positions=[0, ..., {shortest - 1}, {END!r}] (columns every prompt has, and names), or "
            "name positions when building it: make_prompt_set(..., positions={'S2': [...]})."
        )
    return names


def _positions(value: Any) -> Sequence[int | str] | None:
    """Grid positions as a list: one or several columns (any integer type) or position names."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if getattr(getattr(value, "dtype", None), "kind", "") in ("U", "S", "O"):  # a numpy array of names
        value = value.tolist()
    if not isinstance(value, Tensor) and type(value).__module__ != "numpy" and not is_int(value):
        try:
            value = list(value)  # any iterable: a tuple, dict keys, a generator, ...
        except TypeError:
            pass
    if isinstance(value, list) and any(isinstance(p, str) for p in value):
        return [p if isinstance(p, str) else as_int(p, "positions") for p in value]
    return as_ints(value, "positions")
