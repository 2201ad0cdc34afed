"""Slow, independent reference implementations of exact edge patching and IOI path patching.

These exist to test hookpatch's optimised circuits engine against something written
separately and simply: plain hook loops on a TransformerBridge, one forward per step, no
caching tricks and nothing imported from hookpatch (only its model builders are used by
the tests). The semantics (labels, sender differences Δ, the edge and path procedures)
follow the shared circuits spec:

- sender Δ_s = (s's output in the source run S) - (s's output in the target run T), both
  cached, unpatched runs; a head's output is the block's attention output with only that
  head's ``z`` swapped, passed through the post-attention norm where one exists (Gemma 2:
  ``blocks[l].ln1_post``), so on Gemma 2 head Δs of one layer do not sum to the layer's
  attention-output change;
- exact edge patching: one forward of T, each receiver's input (its own pre-``ln1`` copy
  for a head's q/k/v, ``hook_mlp_in`` for an MLP, the last ``hook_resid_post`` for the
  logits) gets the cached Δs of its patched incoming edges added;
- IOI path patching (Wang et al. 2022, appendix B): run 1 sets the senders to S and freezes
  every other head (and optionally every MLP) to T, recording the receivers' inputs; run 2
  replaces only the receivers' inputs with the recorded ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

Metric = Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, " batch"]]

_SENDER = re.compile(r"^(?:(?P<input>input)|L(?P<hl>\d+)H(?P<hh>\d+)|MLP(?P<ml>\d+))$")
_RECEIVER = re.compile(
    r"^(?:L(?P<hl>\d+)H(?P<hh>\d+)\.(?P<hc>[qkv])|L(?P<gl>\d+)KV(?P<gg>\d+)\.(?P<gc>[kv])"
    r"|MLP(?P<ml>\d+)|(?P<logits>logits))$"
)


@dataclass(frozen=True)
class Sender:
    """A parsed sender: ``kind`` is ``"input"``, ``"head"`` or ``"mlp"``."""

    label: str
    kind: str
    layer: int = -1  # input: -1 (before every block)
    head: int = -1


@dataclass(frozen=True)
class Receiver:
    """A parsed receiver: ``kind`` is ``"q"``, ``"k"``, ``"v"``, ``"mlp"`` or ``"logits"``.

    ``index`` is the slot of the per-head input copy: the query head for ``q`` (and for
    ``k``/``v`` without grouped-query attention), the KV head under grouped-query attention.
    """

    label: str
    kind: str
    layer: int
    index: int = -1

    @property
    def hook(self) -> str:
        """The hook whose tensor is this receiver's input."""
        if self.kind in ("q", "k", "v"):
            return f"blocks.{self.layer}.hook_{self.kind}_input"
        if self.kind == "mlp":
            return f"blocks.{self.layer}.hook_mlp_in"
        return f"blocks.{self.layer}.hook_resid_post"


def _n_kv(model: Any) -> int:
    return int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)


def parse_sender(model: Any, label: str) -> Sender:
    """Parse ``"input"``, ``"L{l}H{h}"`` or ``"MLP{l}"``; ValueError if malformed or out of range."""
    m = _SENDER.match(label)
    if m is None:
        raise ValueError(f"sender {label!r}: expected 'input', 'L{{l}}H{{h}}' or 'MLP{{l}}'")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if m["input"]:
        return Sender(label, "input")
    if m["hl"] is not None:
        layer, head = int(m["hl"]), int(m["hh"])
        if not (layer < n_layers and head < n_heads):
            raise ValueError(f"sender {label!r}: layer < {n_layers} and head < {n_heads} expected")
        return Sender(label, "head", layer, head)
    layer = int(m["ml"])
    if layer >= n_layers:
        raise ValueError(f"sender {label!r}: layer < {n_layers} expected")
    return Sender(label, "mlp", layer)


def parse_receiver(model: Any, label: str) -> Receiver:
    """Parse a receiver label, enforcing the H-vs-KV spelling of k/v inputs (GQA or not)."""
    m = _RECEIVER.match(label)
    if m is None:
        raise ValueError(
            f"receiver {label!r}: expected 'L{{l}}H{{h}}.q|k|v', 'L{{l}}KV{{g}}.k|v', 'MLP{{l}}' or 'logits'"
        )
    n_layers, n_heads, n_kv = model.cfg.n_layers, model.cfg.n_heads, _n_kv(model)
    gqa = n_kv != n_heads
    if m["logits"]:
        return Receiver(label, "logits", n_layers - 1)
    if m["ml"] is not None:
        layer = int(m["ml"])
        if layer >= n_layers:
            raise ValueError(f"receiver {label!r}: layer < {n_layers} expected")
        return Receiver(label, "mlp", layer)
    if m["hl"] is not None:
        layer, head, kind = int(m["hl"]), int(m["hh"]), m["hc"]
        if gqa and kind in "kv":
            raise ValueError(f"receiver {label!r}: grouped-query attention, spell it 'L{layer}KV{{g}}.{kind}'")
        if not (layer < n_layers and head < n_heads):
            raise ValueError(f"receiver {label!r}: layer < {n_layers} and head < {n_heads} expected")
        return Receiver(label, kind, layer, head)
    layer, group, kind = int(m["gl"]), int(m["gg"]), m["gc"]
    if not gqa:
        raise ValueError(f"receiver {label!r}: no grouped-query attention, spell it 'L{layer}H{{h}}.{kind}'")
    if not (layer < n_layers and group < n_kv):
        raise ValueError(f"receiver {label!r}: layer < {n_layers} and KV head < {n_kv} expected")
    return Receiver(label, kind, layer, group)


def edge_is_valid(s: Sender, r: Receiver) -> bool:
    """The spec's valid edges: input -> anything; head l -> heads > l, MLPs >= l, logits;
    MLP l -> heads > l, MLPs > l, logits."""
    if s.kind == "input" or r.kind == "logits":
        return True
    if r.kind == "mlp":
        return r.layer >= s.layer if s.kind == "head" else r.layer > s.layer
    return r.layer > s.layer


def parse_edge(model: Any, label: str) -> tuple[Sender, Receiver]:
    """Parse ``"{sender}->{receiver}"`` and check that the edge is valid."""
    parts = label.split("->")
    if len(parts) != 2:
        raise ValueError(f"edge {label!r}: expected '{{sender}}->{{receiver}}'")
    s, r = parse_sender(model, parts[0]), parse_receiver(model, parts[1])
    if not edge_is_valid(s, r):
        raise ValueError(f"edge {label!r}: the receiver is not downstream of the sender")
    return s, r


def all_edges(model: Any) -> list[str]:
    """Every valid edge of the model's graph, in spec spelling."""
    n_layers, n_heads, n_kv = model.cfg.n_layers, model.cfg.n_heads, _n_kv(model)
    gqa = n_kv != n_heads
    senders = ["input"] + [f"L{i}H{h}" for i in range(n_layers) for h in range(n_heads)]
    senders += [f"MLP{i}" for i in range(n_layers)]
    receivers = ["logits"] + [f"MLP{i}" for i in range(n_layers)]
    for i in range(n_layers):
        receivers += [f"L{i}H{h}.q" for h in range(n_heads)]
        if gqa:
            receivers += [f"L{i}KV{g}.{c}" for g in range(n_kv) for c in "kv"]
        else:
            receivers += [f"L{i}H{h}.{c}" for h in range(n_heads) for c in "kv"]
    return [
        f"{s}->{r}" for s in senders for r in receivers
        if edge_is_valid(parse_sender(model, s), parse_receiver(model, r))
    ]


@contextmanager
def split_inputs(model: Any) -> Iterator[None]:
    """Turn on the per-head q/k/v input copies and ``hook_mlp_in``; restore all flags after."""
    cfg = model.cfg
    saved = {k: bool(getattr(cfg, k, False)) for k in ("use_split_qkv_input", "use_hook_mlp_in", "use_attn_in")}
    try:
        if saved["use_attn_in"]:
            model.set_use_attn_in(False)  # exclusive with the split q/k/v fork
        model.set_use_split_qkv_input(True)
        model.set_use_hook_mlp_in(True)
        yield
    finally:
        model.set_use_split_qkv_input(saved["use_split_qkv_input"])
        model.set_use_hook_mlp_in(saved["use_hook_mlp_in"])
        if saved["use_attn_in"]:
            model.set_use_attn_in(True)


def position_mask(
    positions: Int[Tensor, "batch n"] | None, batch: int, n_pos: int, device: Any
) -> Float[Tensor, "batch pos 1"]:
    """1.0 at the chosen columns of each prompt (all columns for ``None``), else 0.0."""
    if positions is None:
        return torch.ones(batch, n_pos, 1, device=device)
    mask = torch.zeros(batch, n_pos, 1, device=device)
    for b in range(batch):
        for p in positions[b].tolist():
            mask[b, p, 0] = 1.0
    return mask


def _cache(model: Any, tokens: Tensor) -> Any:
    """An unpatched run's activations (flags as the caller left them)."""
    keep = ("hook_resid_pre", "attn.hook_z", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(keep))
    return cache


def _head_output(
    model: Any, layer: int, z: Float[Tensor, "batch pos head d_head"]
) -> Float[Tensor, "batch pos d_model"]:
    """The block's attention output for per-head values ``z``: the model's own output
    projection, then its post-attention norm where the block has one (Gemma 2: ``ln1_post``)."""
    block = model.blocks[layer]
    out = block.attn.o(z.flatten(-2))
    post = getattr(block, "ln1_post", None)
    return post(out) if post is not None else out


@torch.no_grad()
def ref_sender_deltas(
    model: Any,
    target_tokens: Int[Tensor, "batch pos"],
    source_tokens: Int[Tensor, "batch pos"],
    senders: list[str],
) -> dict[str, Float[Tensor, "batch pos d_model"]]:
    """Δ_s = (s's output in the source run) - (s's output in the target run), per sender label."""
    parsed = [parse_sender(model, s) for s in senders]
    cache_t, cache_s = _cache(model, target_tokens), _cache(model, source_tokens)
    deltas = {}
    for s in parsed:
        if s.kind == "input":
            name = "blocks.0.hook_resid_pre"
            deltas[s.label] = cache_s[name] - cache_t[name]
        elif s.kind == "mlp":
            name = f"blocks.{s.layer}.hook_mlp_out"
            deltas[s.label] = cache_s[name] - cache_t[name]
        else:
            z = cache_t[f"blocks.{s.layer}.attn.hook_z"].clone()
            z[:, :, s.head] = cache_s[f"blocks.{s.layer}.attn.hook_z"][:, :, s.head]
            deltas[s.label] = _head_output(model, s.layer, z) - cache_t[f"blocks.{s.layer}.hook_attn_out"]
    return deltas


def _add_hook(slot: int, labels: list[str], deltas: dict[str, Tensor], mask: Tensor) -> Callable[..., Tensor]:
    """Add the summed ``deltas[label]`` (looked up when the hook fires) times ``mask`` to the
    input: to copy ``slot`` of a per-head input, or (``slot`` -1) to the whole tensor."""

    def hook(x: Tensor, hook: Any) -> Tensor:
        delta = sum(deltas[label] for label in labels) * mask
        out = x.clone()  # never in place: hook_mlp_in's tensor is also the residual skip
        if slot >= 0:
            out[:, :, slot] += delta
        else:
            out += delta
        return out

    return hook


@torch.no_grad()
def ref_edge_patch(
    model: Any,
    target_tokens: Int[Tensor, "batch pos"],
    source_tokens: Int[Tensor, "batch pos"],
    edges: list[str],
    metric_fn: Metric,
    positions: Int[Tensor, "batch n"] | None = None,
    *,
    recompute_senders: bool = False,
) -> Float[Tensor, " batch"]:
    """The metric of one target forward in which each receiver's input gets the summed
    Δs of its patched incoming edges (at ``positions``, default every position).

    By default (the spec) each Δ_s is cached: source run minus unpatched target run, so a
    sender whose own inputs are patched upstream has that change reach its receivers twice
    (once through the residual stream, once as Δ_s) and the complete edge set is *not* the
    source run. With ``recompute_senders`` Δ_s is instead (source output) - (s's output in
    THIS forward), the edge-by-edge substitution of ACDC/auto-circuit, under which patching
    every edge gives exactly the source run.
    """
    parsed = [parse_edge(model, e) for e in edges]
    batch, n_pos = target_tokens.shape
    mask = position_mask(positions, batch, n_pos, target_tokens.device)
    incoming: dict[Receiver, list[str]] = {}
    for s, r in parsed:
        incoming.setdefault(r, []).append(s.label)
    deltas: dict[str, Tensor] = {}  # filled before the forward, or (recompute) during it
    hooks: list[tuple[str, Callable[..., Any]]] = []
    if recompute_senders:
        senders = {s.label: s for s, _ in parsed}
        cache_t, cache_s = _cache(model, target_tokens), _cache(model, source_tokens)
        if "input" in senders:
            deltas["input"] = cache_s["blocks.0.hook_resid_pre"] - cache_t["blocks.0.hook_resid_pre"]
        for s in senders.values():
            if s.kind == "head":
                hooks.append((f"blocks.{s.layer}.attn.hook_z", _current_head_delta(model, s, cache_s, deltas)))
            elif s.kind == "mlp":
                hooks.append((f"blocks.{s.layer}.hook_mlp_out", _current_mlp_delta(s, cache_s, deltas)))
    else:
        deltas = ref_sender_deltas(model, target_tokens, source_tokens, sorted({s.label for s, _ in parsed}))
    for r, labels in incoming.items():
        hooks.append((r.hook, _add_hook(r.index if r.kind in ("q", "k", "v") else -1, labels, deltas, mask)))
    with split_inputs(model):
        logits = model.run_with_hooks(target_tokens, fwd_hooks=hooks)
    return metric_fn(logits)


def _head_output_w(
    model: Any, layer: int, z: Float[Tensor, "batch pos head d_head"]
) -> Float[Tensor, "batch pos d_model"]:
    """:func:`_head_output` from ``W_O``/``b_O`` (calling ``attn.o`` inside a forward would
    re-fire ``hook_z``, its alias)."""
    attn = model.blocks[layer].attn
    out = torch.einsum("bphd,hdm->bpm", z, attn.W_O)
    if attn.b_O is not None:
        out = out + attn.b_O
    post = getattr(model.blocks[layer], "ln1_post", None)
    return post(out) if post is not None else out


def _current_head_delta(model: Any, s: Sender, cache_s: Any, deltas: dict[str, Tensor]) -> Callable[..., None]:
    """Record Δ = attn_out(this forward's z, head swapped to the source's) - attn_out(this z)."""

    def hook(z: Tensor, hook: Any) -> None:
        swapped = z.clone()
        swapped[:, :, s.head] = cache_s[f"blocks.{s.layer}.attn.hook_z"][:, :, s.head]
        deltas[s.label] = _head_output_w(model, s.layer, swapped) - _head_output_w(model, s.layer, z)

    return hook


def _current_mlp_delta(s: Sender, cache_s: Any, deltas: dict[str, Tensor]) -> Callable[..., None]:
    """Record Δ = source mlp_out - this forward's mlp_out."""

    def hook(x: Tensor, hook: Any) -> None:
        deltas[s.label] = cache_s[f"blocks.{s.layer}.hook_mlp_out"] - x

    return hook


def _set_hook(mask: Tensor, new: Tensor, slot: int = -1) -> Callable[..., Tensor]:
    """Replace the hooked tensor by ``new`` where ``mask`` (broadcastable, 1 = replace) is set;
    with ``slot``, only that copy of a per-head input ``[batch, pos, copy, d_model]``."""

    def hook(x: Tensor, hook: Any) -> Tensor:
        out = x.clone()
        if slot >= 0:
            out[:, :, slot] = torch.where(mask.bool(), new[:, :, slot], x[:, :, slot])
        else:
            out = torch.where(mask.bool(), new, x)
        return out

    return hook


def _record_hook(store: dict[str, Tensor], key: str) -> Callable[..., None]:
    """Store the hooked tensor under ``key`` (``hook.name`` may be an alias's canonical name)."""

    def hook(x: Tensor, hook: Any) -> None:
        store[key] = x.detach().clone()

    return hook


@torch.no_grad()
def ref_path_patch(
    model: Any,
    target_tokens: Int[Tensor, "batch pos"],
    source_tokens: Int[Tensor, "batch pos"],
    senders: list[str],
    receivers: list[str],
    metric_fn: Metric,
    freeze_mlps: bool = False,
    sender_positions: Int[Tensor, "batch n"] | None = None,
    receiver_positions: Int[Tensor, "batch n"] | None = None,
) -> Float[Tensor, " batch"]:
    """IOI-paper path patching from ``senders`` (together) to ``receivers``.

    Run 1 (target tokens): the senders take their source-run values at ``sender_positions``
    (a head its ``z``, an MLP its ``mlp_out``, ``input`` the embeddings), every other head's
    ``z`` is frozen to the target run's, MLPs are recomputed or (``freeze_mlps``) frozen to
    the target's ``mlp_out``; the receivers' inputs are recorded. Run 2 (target tokens):
    only the receivers' inputs are replaced by the recorded ones, at ``receiver_positions``.
    """
    s_parsed = [parse_sender(model, s) for s in senders]
    r_parsed = [parse_receiver(model, r) for r in receivers]
    cache_t, cache_s = _cache(model, target_tokens), _cache(model, source_tokens)
    batch, n_pos = target_tokens.shape
    dev = target_tokens.device
    s_mask = position_mask(sender_positions, batch, n_pos, dev)  # [batch, pos, 1]
    r_mask = position_mask(receiver_positions, batch, n_pos, dev)

    n_layers = model.cfg.n_layers
    hooks: list[tuple[str, Callable[..., Any]]] = []
    for layer in range(n_layers):
        name = f"blocks.{layer}.attn.hook_z"
        z = cache_t[name].clone()  # every head frozen to the target run ...
        for s in s_parsed:  # ... but the sender heads, which take the source run's z at sender positions
            if s.kind == "head" and s.layer == layer:
                z[:, :, s.head] = torch.where(s_mask.bool(), cache_s[name][:, :, s.head], z[:, :, s.head])
        hooks.append((name, _set_hook(torch.ones(batch, n_pos, 1, 1, device=dev), z)))
        name = f"blocks.{layer}.hook_mlp_out"
        mlp_senders = [s for s in s_parsed if s.kind == "mlp" and s.layer == layer]
        if freeze_mlps:
            new = torch.where(s_mask.bool(), cache_s[name], cache_t[name]) if mlp_senders else cache_t[name]
            hooks.append((name, _set_hook(torch.ones(batch, n_pos, 1, device=dev), new)))
        elif mlp_senders:
            hooks.append((name, _set_hook(s_mask, cache_s[name])))
    if any(s.kind == "input" for s in s_parsed):
        hooks.append(("blocks.0.hook_resid_pre", _set_hook(s_mask, cache_s["blocks.0.hook_resid_pre"])))

    recorded: dict[str, Tensor] = {}
    with split_inputs(model):
        model.run_with_hooks(
            target_tokens, fwd_hooks=hooks + [(h, _record_hook(recorded, h)) for h in {r.hook for r in r_parsed}]
        )
        hooks2 = []
        for r in r_parsed:
            slot = r.index if r.kind in ("q", "k", "v") else -1
            hooks2.append((r.hook, _set_hook(r_mask, recorded[r.hook], slot)))
        logits = model.run_with_hooks(target_tokens, fwd_hooks=hooks2)
    return metric_fn(logits)
