"""The grid of a sweep: which layers, positions and heads, with their labels.

Activation patching, ablation and attribution patching share one grid vocabulary: ``by`` is
``("layer", "pos")``, ``("layer", "head")``, ``("layer", "pos", "head")`` or ``("layer",)``;
positions are columns or names of the prompt set; heads are query heads for z/q/pattern and
KV heads for k/v. Building a grid checks every index, so bad input fails before any run.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from hookpatch.errors import HookpatchError
from hookpatch.hooks.selection import per_prompt_positions
from hookpatch.model.facts import ModelFacts, component_info, model_facts
from hookpatch.tasks.promptset import PromptSet

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
        axes = [self.layers] + ([self.positions] if "pos" in self.by else []) + ([self.heads] if "head" in self.by else [])
        out = []
        for combo in itertools.product(*axes):
            parts = dict(zip(self.by, combo))
            out.append((parts["layer"], parts.get("pos"), parts.get("head")))
        return out

    def columns(self, prompts: PromptSet) -> Int[Tensor, "n_pos batch"]:
        """The column each grid position selects in each prompt (names resolved per prompt)."""
        cols = [
            prompts.position(p).cpu() if isinstance(p, str) else torch.full((len(prompts),), p)
            for p in self.positions or ()
        ]
        return torch.stack(cols).long() if cols else torch.zeros(0, len(prompts), dtype=torch.long)

    def info(self) -> dict[str, Any]:
        """Facts a result should carry: for grouped-query k/v, which query heads each KV head feeds."""
        if self.facts.grouped_query and self.component in ("k", "v"):
            return {
                "kv_head_feeds": {
                    f"KV{k}": [f"H{h}" for h in self.facts.query_heads_of_kv_head(k)]
                    for k in range(self.facts.n_kv_heads)
                }
            }
        return {}

    @classmethod
    def build(
        cls,
        model: Any,
        prompts: PromptSet,
        component: str,
        by: Sequence[str],
        layers: Sequence[int] | None = None,
        positions: Sequence[int | str] | None = None,
        heads: Sequence[int] | None = None,
    ) -> "Grid":
        """Check the axes against the model and the prompt set and label them."""
        facts = model_facts(model)
        info = component_info(component)
        by = tuple(by)
        if by not in GRIDS:
            raise HookpatchError(f"unknown grid by={by}; expected one of {GRIDS}.")
        if "head" in by and info.head_axis is None:
            raise HookpatchError(
                f"component {component!r} has no heads; a grid by head needs z, q, k, v or pattern."
            )
        layer_list = tuple(facts.check_layer(l) for l in (range(facts.n_layers) if layers is None else layers))
        labels = {"layer": tuple(str(l) for l in layer_list)}
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
            pos_list = tuple(range(prompts.n_pos)) if positions is None else tuple(positions)
            for p in pos_list:  # raises on out-of-range, padding and unknown names
                per_prompt_positions(p, len(prompts), prompts.n_pos, prompts)
            all_labels = prompts.position_labels()
            labels["pos"] = tuple(p if isinstance(p, str) else all_labels[p] for p in pos_list)
        elif positions is not None:
            raise HookpatchError(f"positions= restricts a grid by pos; by={by} has no pos axis.")
        return cls(facts, component, by, layer_list, pos_list, head_list, labels)
