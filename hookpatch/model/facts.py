"""Model facts as data: sizes and, for each patchable component, its hook name and axes.

One table (component → hook template, axes, head axis) makes grouped-query attention a
column rather than a branch in every function: ``k`` and ``v`` have a ``kv_head`` axis of
``n_kv_heads`` entries, ``q``/``z``/``pattern`` a ``head`` axis of ``n_heads``. Nothing
downstream hard-codes GPT-2 shapes; it asks :func:`model_facts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from hookpatch.checks import IntLike, is_int, require_model
from hookpatch.errors import HookpatchError

HeadAxis = Literal["head", "kv_head"] | None


@dataclass(frozen=True)
class Component:
    """One patchable activation: where its hook lives and what its axes mean.

    ``axes`` names the dimensions of the hooked tensor (batch first), ``head_axis`` says
    whether a head dimension indexes query heads (``"head"``), KV heads (``"kv_head"``) or
    is absent (``None``).
    """

    name: str
    hook_template: str
    axes: tuple[str, ...]
    head_axis: HeadAxis

    def hook_name(self, layer: int) -> str:
        """The TransformerLens hook name of this component at ``layer``."""
        return self.hook_template.format(layer=layer)


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("resid_pre", "blocks.{layer}.hook_resid_pre", ("batch", "pos", "d_model"), None),
        Component("resid_mid", "blocks.{layer}.hook_resid_mid", ("batch", "pos", "d_model"), None),
        Component("resid_post", "blocks.{layer}.hook_resid_post", ("batch", "pos", "d_model"), None),
        Component("attn_out", "blocks.{layer}.hook_attn_out", ("batch", "pos", "d_model"), None),
        Component("mlp_out", "blocks.{layer}.hook_mlp_out", ("batch", "pos", "d_model"), None),
        Component("z", "blocks.{layer}.attn.hook_z", ("batch", "pos", "head", "d_head"), "head"),
        Component("q", "blocks.{layer}.attn.hook_q", ("batch", "pos", "head", "d_head"), "head"),
        Component("k", "blocks.{layer}.attn.hook_k", ("batch", "pos", "kv_head", "d_head"), "kv_head"),
        Component("v", "blocks.{layer}.attn.hook_v", ("batch", "pos", "kv_head", "d_head"), "kv_head"),
        Component(
            "pattern",
            "blocks.{layer}.attn.hook_pattern",
            ("batch", "head", "query_pos", "key_pos"),
            "head",
        ),
    )
}


@dataclass(frozen=True)
class ModelFacts:
    """Sizes of a loaded model, read from its config once."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    n_ctx: int
    d_mlp: int | None
    normalization: str | None
    positional_embedding: str | None

    @property
    def grouped_query(self) -> bool:
        """Whether several query heads share one KV head."""
        return self.n_kv_heads < self.n_heads

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def n_heads_of(self, component: str) -> int:
        """How many entries the head axis of ``component`` has (KV heads for k/v)."""
        axis = component_info(component).head_axis
        if axis is None:
            raise HookpatchError(f"component {component!r} has no head axis.")
        return self.n_kv_heads if axis == "kv_head" else self.n_heads

    def query_heads_of_kv_head(self, kv_head: int) -> list[int]:
        """The query heads fed by KV head ``kv_head`` (TransformerLens' repeat_interleave order)."""
        g = self.group_size
        return list(range(kv_head * g, (kv_head + 1) * g))

    def kv_head_of_query_head(self, head: int) -> int:
        """The KV head that query head ``head`` reads keys and values from."""
        return head // self.group_size

    def table(self) -> list[dict[str, Any]]:
        """One row per component: name, hook name at layer 0, axes with sizes, head axis."""
        sizes = self.axis_sizes()
        return [
            {
                "component": c.name,
                "hook_name": c.hook_name(0),
                "axes": c.axes,
                "shape": tuple(sizes.get(a, a) for a in c.axes),
                "head_axis": c.head_axis,
                "n_heads": None if c.head_axis is None else sizes[c.head_axis],
            }
            for c in COMPONENTS.values()
        ]

    def axis_sizes(self) -> dict[str, int]:
        """The fixed sizes of the named feature axes (batch and positions vary per run)."""
        return {"d_model": self.d_model, "d_head": self.d_head, "head": self.n_heads, "kv_head": self.n_kv_heads}

    def check_activation(self, component: str, activation: Any, arg: str) -> None:
        """Raise unless ``activation`` is one float tensor shaped like ``component``'s hook.

        Batch and positions are free (a source may broadcast over prompts); the feature axes
        (``d_model``, or heads and ``d_head``) must match this model, and a pattern is square.
        """
        info = component_info(component)
        sizes = self.axis_sizes()
        expected = "[" + ", ".join(f"{a}={sizes[a]}" if a in sizes else a for a in info.axes) + "]"
        if not isinstance(activation, torch.Tensor):
            raise HookpatchError(
                f"{arg}= must be one activation tensor shaped {expected} for {component!r}, such as "
                f"cache[{info.hook_name(0)!r}]; got {type(activation).__name__}. Index the cache "
                "with the hook name of the layer you patch."
            )
        shape = tuple(activation.shape)
        fixed = [(i, sizes[a]) for i, a in enumerate(info.axes) if a in sizes]
        square = component != "pattern" or (len(shape) == 4 and shape[-1] == shape[-2])
        if len(shape) != len(info.axes) or any(shape[i] != n for i, n in fixed) or not square:
            raise HookpatchError(
                f"{arg}= has shape {shape} but {component!r} activations of this model are shaped "
                f"{expected}; pass the cached activation of {component!r} from this model."
            )
        if not activation.is_floating_point():
            raise HookpatchError(f"{arg}= holds {activation.dtype}; activations are floating-point tensors.")

    def check_layer(self, layer: IntLike) -> int:
        """``layer`` (any integer type) as an int if it exists, else a clear error."""
        if not is_int(layer):
            raise HookpatchError(
                f"layer {layer!r} must be an integer from 0 to {self.n_layers - 1} (this model has "
                f"{self.n_layers} layers); got {type(layer).__name__}."
            )
        if not 0 <= int(layer) < self.n_layers:
            raise HookpatchError(
                f"layer {layer!r} is out of range: this model has {self.n_layers} layers "
                f"(0..{self.n_layers - 1})."
            )
        return int(layer)

    def check_head(self, component: str, head: IntLike) -> int:
        """``head`` (any integer type) as an int if it exists on ``component``'s head axis."""
        n = self.n_heads_of(component)
        if not is_int(head):
            raise HookpatchError(f"head {head!r} must be an integer from 0 to {n - 1}; got {type(head).__name__}.")
        if not 0 <= int(head) < n:
            kind = "KV heads" if component_info(component).head_axis == "kv_head" else "heads"
            raise HookpatchError(
                f"head {head!r} is out of range for {component!r}: this model has {n} {kind} "
                f"(0..{n - 1})."
            )
        return int(head)


def component_info(name: str) -> Component:
    """The :class:`Component` called ``name``, or an error listing the known ones."""
    try:
        return COMPONENTS[name]
    except (KeyError, TypeError):
        raise HookpatchError(
            f"unknown component {name!r}; expected one of {sorted(COMPONENTS)}."
        ) from None


def model_facts(model: Any) -> ModelFacts:
    """Read the sizes of ``model`` (a TransformerBridge) from its config."""
    require_model(model)
    cfg = model.cfg
    n_heads = int(cfg.n_heads)
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    return ModelFacts(
        n_layers=int(cfg.n_layers),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        d_head=int(cfg.d_head),
        d_model=int(cfg.d_model),
        d_vocab=int(cfg.d_vocab),
        n_ctx=int(cfg.n_ctx),
        d_mlp=None if getattr(cfg, "d_mlp", None) is None else int(cfg.d_mlp),
        normalization=getattr(cfg, "normalization_type", None),
        positional_embedding=getattr(cfg, "positional_embedding_type", None),
    )
