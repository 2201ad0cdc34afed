"""Model facts as data: sizes and, for each patchable component, its hook name and axes.

One table (:data:`COMPONENTS`: component → hook template, axes, head axis, the config flag
its hook needs, how a patch edits it) makes grouped-query attention or a gated hook a column
rather than a branch in every function: ``k``, ``v``, ``k_input`` and ``v_input`` have a
``kv_head`` axis of ``n_kv_heads`` entries, ``q``/``z``/``pattern``/``result``/``q_input`` a
``head`` axis of ``n_heads``. Nothing downstream hard-codes GPT-2 shapes or hook names; it
asks :func:`model_facts`, :func:`component_info` or :func:`hook_name`.

Some hooks fire only when a config flag is on (``result`` needs ``use_attn_result``,
``q_input``/``k_input``/``v_input`` need ``use_split_qkv_input``, ``mlp_in`` needs
``use_hook_mlp_in``): they cost memory and compute, so the model leaves them off.
:func:`hook_flags` turns on what a set of components needs for the length of a ``with``
block and restores the previous values afterwards, also on error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch

from hookpatch._checks import IntLike, is_int, require_model
from hookpatch.errors import HookpatchError

HeadAxis = Literal["head", "kv_head"] | None
POS_AXES = ("pos", "query_pos")  # the axis a position selection indexes (query positions for a pattern)


@dataclass(frozen=True)
class Component:
    """One patchable activation: where its hook lives and what its axes mean.

    ``axes`` names the dimensions of the hooked tensor (batch first), ``head_axis`` says
    whether a head dimension indexes query heads (``"head"``), KV heads (``"kv_head"``) or
    is absent (``None``). ``flag`` is the model-config flag (``model.set_<flag>(True)``)
    without which the hook never fires, or ``None``. ``in_place`` says how a patch edits the
    activation: in place (so every reader of the tensor sees the edit; at ``hook_resid_mid``,
    an alias of ``ln2.hook_in``, that includes the residual skip), or, where the hooked tensor
    *is* a tensor other readers use (``hook_mlp_in`` receives ``resid_mid`` itself, not a
    copy), by returning a new tensor, so only the branch behind the hook sees it.
    """

    name: str
    hook_template: str
    axes: tuple[str, ...]
    head_axis: HeadAxis
    flag: str | None = None
    in_place: bool = True
    # Where a block resumes after a patch of this component (the fast path finishes the patched
    # block from there): the hook point inside the block, and the residual stream the rest of
    # the block adds to (None: the patched activation is the block's output). None: not resumable.
    resume_point: str | None = None
    resume_base: str | None = None

    def hook_name(self, layer: int) -> str:
        """The TransformerLens hook name of this component at ``layer``."""
        return self.hook_template.format(layer=layer)

    @property
    def pos_dim(self) -> int:
        """The dimension a position selection indexes (``query_pos`` for a pattern)."""
        return next(i for i, a in enumerate(self.axes) if a in POS_AXES)

    @property
    def head_dim(self) -> int | None:
        """The dimension of the head axis, or ``None``."""
        return None if self.head_axis is None else self.axes.index(self.head_axis)

    @property
    def square(self) -> bool:
        """Whether two axes are the same positions (a pattern's query and key positions)."""
        return "query_pos" in self.axes and "key_pos" in self.axes

    def per_position(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` (shaped like this component's activation) over everything but
        batch, position and head: ``[batch, pos]``, or ``[batch, pos, head]`` with a head axis."""
        keep = [0, self.pos_dim] + ([] if self.head_dim is None else [self.head_dim])
        summed = values.sum([d for d in range(values.ndim) if d not in keep])  # dims in axis order
        if self.head_dim is not None and self.head_dim < self.pos_dim:
            summed = summed.transpose(1, 2)  # [batch, head, pos] → [batch, pos, head]
        return summed


_RESID = ("batch", "pos", "d_model")
_HEADS = ("batch", "pos", "head", "d_head")
_KV_HEADS = ("batch", "pos", "kv_head", "d_head")

COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("resid_pre", "blocks.{layer}.hook_resid_pre", _RESID, None),
        Component("resid_mid", "blocks.{layer}.hook_resid_mid", _RESID, None, resume_point="hook_resid_mid"),
        Component("resid_post", "blocks.{layer}.hook_resid_post", _RESID, None, resume_point="hook_resid_post"),
        Component("attn_out", "blocks.{layer}.hook_attn_out", _RESID, None,
                  resume_point="hook_attn_out", resume_base="hook_resid_pre"),
        Component("mlp_out", "blocks.{layer}.hook_mlp_out", _RESID, None,
                  resume_point="hook_mlp_out", resume_base="hook_resid_mid"),
        Component("z", "blocks.{layer}.attn.hook_z", _HEADS, "head",
                  resume_point="attn.hook_z", resume_base="hook_resid_pre"),
        Component("q", "blocks.{layer}.attn.hook_q", _HEADS, "head"),
        Component("k", "blocks.{layer}.attn.hook_k", _KV_HEADS, "kv_head"),
        Component("v", "blocks.{layer}.attn.hook_v", _KV_HEADS, "kv_head"),
        Component(
            "pattern",
            "blocks.{layer}.attn.hook_pattern",
            ("batch", "head", "query_pos", "key_pos"),
            "head",
        ),
        # Each head's output, z_h @ W_O[h], before the sum over heads (attn_out = sum + b_O).
        Component(
            "result", "blocks.{layer}.attn.hook_result", ("batch", "pos", "head", "d_model"), "head",
            flag="use_attn_result",
        ),
        # Per-head copies of the residual stream entering the block, before ln1 (which is
        # applied to each copy after the hook): patching head h's copy changes only head h's
        # queries; under grouped-query attention keys and values have one copy per KV head.
        Component(
            "q_input", "blocks.{layer}.hook_q_input", ("batch", "pos", "head", "d_model"), "head",
            flag="use_split_qkv_input",
        ),
        Component(
            "k_input", "blocks.{layer}.hook_k_input", ("batch", "pos", "kv_head", "d_model"), "kv_head",
            flag="use_split_qkv_input",
        ),
        Component(
            "v_input", "blocks.{layer}.hook_v_input", ("batch", "pos", "kv_head", "d_model"), "kv_head",
            flag="use_split_qkv_input",
        ),
        # The MLP branch's input (resid_mid before ln2): unlike resid_mid, a patch here does
        # not reach the residual skip, so it edits a new tensor (in_place=False).
        Component("mlp_in", "blocks.{layer}.hook_mlp_in", _RESID, None, flag="use_hook_mlp_in", in_place=False),
    )
}

# Hook points that are not patchable components but that sweeps, readouts and runners read.
POINTS: dict[str, str] = {
    "rot_q": "blocks.{layer}.attn.hook_rot_q",  # queries after rotary (rotary models only)
    "rot_k": "blocks.{layer}.attn.hook_rot_k",  # keys after rotary: what attention really uses
    "attn_scores": "blocks.{layer}.attn.hook_attn_scores",
    "mlp_pre": "blocks.{layer}.mlp.hook_pre",
    "mlp_post": "blocks.{layer}.mlp.hook_post",  # the neurons' activations
    "ln_final_scale": "ln_final.hook_scale",
    "unembed_in": "unembed.hook_in",
}


def hook_name(point: str, layer: IntLike | None = None) -> str:
    """The TransformerLens hook name of a component (``"z"``) or another hook point
    (``"rot_k"``, ``"mlp_post"``, ``"ln_final_scale"``, see :data:`POINTS`) at ``layer``.

    Example:
        >>> hook_name("z", 3), hook_name("mlp_post", 0), hook_name("ln_final_scale")
        ('blocks.3.attn.hook_z', 'blocks.0.mlp.hook_post', 'ln_final.hook_scale')
    """
    template = COMPONENTS[point].hook_template if point in COMPONENTS else POINTS.get(point)
    if template is None:
        raise HookpatchError(
            f"unknown hook point {point!r}; expected a component ({sorted(COMPONENTS)}) or one of "
            f"{sorted(POINTS)}."
        )
    if "{layer}" in template and not is_int(layer):
        raise HookpatchError(f"hook point {point!r} is per block; pass layer= (an integer), got {layer!r}.")
    return template.format(layer=int(layer)) if "{layer}" in template else template  # type: ignore[arg-type]


def block_point(layer: int, point: str) -> str:
    """The hook name of ``point``, a hook path inside a block (``"attn.hook_z"``, a
    component's ``resume_point``/``resume_base``), in block ``layer``: for runners that keep
    per-block tables of relative hook points."""
    return f"blocks.{layer}.{point}"


def resid_entering(layer: int, n_layers: int) -> str:
    """The hook of the residual stream entering block ``layer``; ``layer == n_layers`` is the
    final residual stream (the last block's ``hook_resid_post``), what the unembedding reads."""
    return hook_name("resid_pre", layer) if layer < n_layers else hook_name("resid_post", n_layers - 1)


def attention_key(layer: int, rotary: bool) -> str:
    """The hook of the keys attention really uses at ``layer``: after rotary (``rot_k``) for
    rotary models, ``hook_k`` otherwise."""
    return hook_name("rot_k" if rotary else "k", layer)


@lru_cache(maxsize=4096)
def component_of_hook(name: str) -> Component | None:
    """The component whose hook ``name`` is (``"blocks.3.hook_mlp_in"`` → mlp_in), or None."""
    for c in COMPONENTS.values():
        if re.fullmatch(re.escape(c.hook_template).replace(r"\{layer\}", r"\d+"), name):
            return c
    return None


def edits_in_place(name: str) -> bool:
    """Whether a patch at hook ``name`` edits the activation in place (see :class:`Component`);
    True for hook points outside the table."""
    c = component_of_hook(name)
    return True if c is None else c.in_place


def flags_of(components: Iterable[str]) -> list[str]:
    """The config flags the hooks of ``components`` need, in table order, without repeats."""
    names = [components] if isinstance(components, str) else list(components)
    needed = {component_info(c).flag for c in names}
    return [f for f in dict.fromkeys(c.flag for c in COMPONENTS.values()) if f is not None and f in needed]


@contextmanager
def hook_flags(model: Any, components: Iterable[str]) -> Iterator[None]:
    """Turn on the config flags the hooks of ``components`` need, for the ``with`` block.

    Each flag is set through the bridge's own setter (``model.set_use_attn_result(True)``,
    which also reaches per-block config copies) and put back to its previous value on exit,
    also when the block raises. Components that need no flag cost nothing. Outputs do not
    change; the flagged paths compute the same logits (a per-head split adds some
    floating-point reordering, ~1e-6).

    Example:
        >>> with hook_flags(model, ["result"]):
        ...     _, cache = model.run_with_cache(tokens)      # has blocks.L.attn.hook_result
    """
    flags = flags_of(components)
    if not flags:
        yield
        return
    require_model(model)
    previous = {flag: bool(getattr(model.cfg, flag, False)) for flag in flags}
    changed: list[str] = []
    try:
        for flag in flags:
            if not previous[flag]:
                _set_flag(model, flag, True)
                changed.append(flag)
        yield
    finally:
        for flag in reversed(changed):
            _set_flag(model, flag, previous[flag])


def _set_flag(model: Any, flag: str, value: bool) -> None:
    setter = getattr(model, f"set_{flag}", None)
    if setter is None:
        raise HookpatchError(
            f"this model has no set_{flag}(), so the hooks that need {flag} never fire; patch a "
            "component that needs no flag (z, attn_out, resid_mid, ...) or load a TransformerBridge."
        )
    try:
        setter(value)
    except (ValueError, NotImplementedError, RuntimeError) as err:
        users = sorted(c.name for c in COMPONENTS.values() if c.flag == flag)
        raise HookpatchError(
            f"cannot turn on {flag} (needed by {', '.join(users)}) on this model: {err} Patch a "
            "component that needs no flag instead, or turn off the conflicting setting first."
        ) from err


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
        """How many entries the head axis of ``component`` has (KV heads for k, v, k_input, v_input)."""
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
        """One row per component: name, hook name at layer 0, axes with sizes, head axis, the
        config flag its hook needs."""
        sizes = self.axis_sizes()
        return [
            {
                "component": c.name,
                "hook_name": c.hook_name(0),
                "axes": c.axes,
                "shape": tuple(sizes.get(a, a) for a in c.axes),
                "head_axis": c.head_axis,
                "n_heads": None if c.head_axis is None else sizes[c.head_axis],
                "flag": c.flag,
            }
            for c in COMPONENTS.values()
        ]

    def flagged_elements(self, component: str) -> int:
        """Elements per (row, position) that the hooks gated by ``component``'s config flag add
        to a forward: every component sharing the flag, since the flag turns all of them on
        (``q_input``: the per-head copies for queries, keys and values together; ``result``:
        ``n_heads × d_model``). 0 for a component whose hook needs no flag."""
        flag = component_info(component).flag
        if flag is None:
            return 0
        sizes = self.axis_sizes()
        return sum(
            math.prod(sizes[a] for a in c.axes if a in sizes) for c in COMPONENTS.values() if c.flag == flag
        )

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
        square = not info.square or (len(shape) == 4 and shape[-1] == shape[-2])
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
