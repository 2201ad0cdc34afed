"""FastForward: a compatibility-mode bridge's forward from any block, on its own weights.

See :mod:`hookpatch.runners.fast` for what it is for and what it costs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from hookpatch.errors import HookpatchError
from hookpatch.hooks._devices import parameter_device, to_device
from hookpatch.model._facts import attention_key, block_point, hook_name
from hookpatch.runners.fast import _block
from hookpatch.runners.fast import _checks as checks
from hookpatch.runners.fast import _layout as lay
from hookpatch.runners.fast import _ops as ops
from hookpatch.runners.fast._layout import NO_HOOKS, Bound, FastHook, HookFn, Layout
from hookpatch.runners.fast._ops import soft_cap
from hookpatch.runners.fast._variants import variant_of
from hookpatch.runners.fast._weights import ModelWeights, rope_table

BLOCK_POINTS = (
    "hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores",
    "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre",
    "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
)
ROTARY_POINTS = ("attn.hook_rot_q", "attn.hook_rot_k")
GATED_POINTS = ("mlp.hook_pre_linear",)
QK_NORM_POINTS = ("attn.hook_q_normed", "attn.hook_k_normed")
# Points the bridge fires only with a config flag set (use_split_qkv_input, use_attn_result,
# use_hook_mlp_in); the fast path fires them whenever something is bound to them.
FLAG_POINTS = ("hook_q_input", "hook_k_input", "hook_v_input", "attn.hook_result", "hook_mlp_in")
# Hooks that see all positions even when the last layer runs only the read rows.
ALL_ROW_POINTS = frozenset({
    "hook_resid_pre", "attn.hook_k", "attn.hook_v", "attn.hook_rot_k", "attn.hook_k_normed",
    "hook_k_input", "hook_v_input",
})
# Points after attention, from where :meth:`FastForward.resume_block` finishes a block.
RESUME_POINTS = ("attn.hook_z", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")


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
        """True for bridges in compatibility mode of a family the fast path has a variant for."""
        return variant_of(model)[0] is not None

    def __init__(self, model: Any):
        variant, reason = variant_of(model)
        if variant is None:
            raise HookpatchError(
                f"FastForward cannot run this model: {reason}. Use the bridge's own hooks "
                "(model.run_with_hooks) for it instead."
            )
        cfg = model.cfg
        self.variant: str = variant.name
        self.n_layers: int = cfg.n_layers
        self.n_heads: int = cfg.n_heads
        self.n_kv_heads: int = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        self.d_head: int = cfg.d_head
        self.d_model: int = cfg.d_model
        self._model = model
        self._weights: ModelWeights = variant.extract(model)
        self.rotary: bool = self._weights.rotary
        # Where each block's weights live (a device_map split puts blocks on several devices):
        # a block's input, layout, frozen keys/values and hooks' tensors are moved there.
        self.block_devices: tuple[torch.device, ...] = tuple(w.o.weight.device for w in self._weights.layers)
        self.unembed_device: torch.device = self._weights.unembed.weight.device
        self.norm_device: torch.device = parameter_device(model.ln_final, default=self.unembed_device)
        # Final-logit soft cap (Gemma 2): logits = cap * tanh(unembedded / cap), not linear in
        # the residual stream, so a metric's residual directions do not apply when it is set.
        self.final_softcap: float | None = self._weights.final_softcap
        # rotary table name -> (cos, sin) at positions 0..n-1, [n, d_head] each
        self._tables: dict[str | None, tuple[Tensor, Tensor]] = {}
        if self.rotary:
            for table in dict.fromkeys(w.rope_table for w in self._weights.layers):
                self._tables[table] = rope_table(model, max(int(cfg.n_ctx), 1), table)
        layer0 = self._weights.layers[0]
        points = BLOCK_POINTS + FLAG_POINTS + (ROTARY_POINTS if self.rotary else ())
        points += GATED_POINTS if layer0.gate is not None else ()
        points += QK_NORM_POINTS if layer0.q_norm is not None else ()
        self.hook_points: tuple[str, ...] = points
        self._hook_index: dict[str, tuple[int, str]] = {
            block_point(layer, point): (layer, point) for layer in range(self.n_layers) for point in points
        }

    @property
    def _heads(self) -> tuple[int, int, int]:
        return self.n_heads, self.n_kv_heads, self.d_head

    # ----------------------------------------------------------------------------- run

    def embed(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        """``blocks.0.hook_resid_pre``: token embeddings (scaled where the variant scales
        them), plus learned positions where used."""
        model = self._model
        W_E = model.W_E
        resid = W_E[to_device(tokens, W_E.device)]
        if self._weights.embed_scale is not None:
            resid = resid * torch.tensor(self._weights.embed_scale, dtype=resid.dtype)
        if not self.rotary:
            resid = resid + to_device(model.W_pos[: tokens.shape[1]], resid.device)
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
            first = hook_name("resid_pre", 0)
            hooks = {n: keep for n in names if n != first}
            logits = self.run(resid, 0, hooks=hooks, read_pos=read_pos)
            store[first] = resid.detach()
        return logits, store

    def final_norm(self, resid: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_model"]:
        """``ln_final.hook_normalized``: the final residual stream through the final norm (on
        the norm's device)."""
        return self._weights.ln_final(to_device(resid, self.norm_device))

    def unembed(self, normalized: Float[Tensor, "*rows d_model"]) -> Float[Tensor, "*rows d_vocab"]:
        """Logits from :meth:`final_norm`'s output (soft-capped where :attr:`final_softcap` is
        set), on the unembedding's device."""
        logits = _block.linear(to_device(normalized, self.unembed_device), self._weights.unembed)
        return logits if self.final_softcap is None else soft_cap(logits, self.final_softcap)

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
        * ``hook_resid_mid`` (``act`` is the MLP's input and the residual's): ``resid`` unused;
        * ``hook_mlp_out``: ``resid`` is the unedited ``hook_resid_mid``;
        * ``hook_resid_post``: ``act`` is the answer (``resid`` unused).

        Same operations as :meth:`run`'s block; no hooks fire. Computed (and returned) on block
        ``layer``'s device.
        """
        if point not in RESUME_POINTS:
            raise HookpatchError(f"resume_block: point {point!r} is not one of {RESUME_POINTS}.")
        device = self.block_devices[layer]
        act = to_device(act, device)
        resid = None if resid is None else to_device(resid, device)
        if point in ("hook_resid_post", "hook_resid_mid"):
            w = self._weights.layers[layer]
            return act if point == "hook_resid_post" else act + _block.mlp(act, w, {}, None)
        if resid is None:
            raise HookpatchError(f"resume_block at {point!r} needs resid (see the docstring).")
        w = self._weights.layers[layer]
        if point == "hook_mlp_out":
            return resid + act
        if point == "attn.hook_z":
            act = _block.attn_output(act, w, {}, None)  # [n, d_model]
        return _block.finish(resid, act, w, {}, None)

    def head_input_projection(
        self, layer: int, kind: str, head: int | Sequence[int], x: Float[Tensor, "*rows d_model"]
    ) -> Float[Tensor, "*rows d_head"] | Float[Tensor, "*rows n d_head"]:
        """What head ``head``'s ``kind`` projection (``"q"``, ``"k"`` or ``"v"``; a KV head for
        k/v) makes of its own input ``x`` in block ``layer``: ``ln1(x)`` through that head's
        rows of the projection, as ``attn.hook_q``/``hook_k``/``hook_v`` hold it (before q/k
        norms and rotary). Lets a runner give one head its own input without materialising a
        per-head copy of the residual stream for every head. With a list of heads sharing the
        input, ``[..., n, d_head]`` for them all (one ``ln1`` and one matmul)."""
        w = self._weights.layers[layer]
        proj = getattr(w, kind)
        d = self.d_head
        heads = [head] if isinstance(head, int) else list(head)
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads]).to(proj.weight.device)
        bias = None if proj.bias is None else proj.bias[rows]
        out = torch.nn.functional.linear(w.ln1(to_device(x, proj.weight.device)), proj.weight[rows], bias)
        return out if isinstance(head, int) else out.unflatten(-1, (len(heads), d))

    def heads_z(
        self,
        layer: int,
        q: Float[Tensor, "rows pos head d_head"],
        k: Float[Tensor, "rows pos head d_head"],
        v: Float[Tensor, "rows pos head d_head"],
        *,
        k_ready: Bool[Tensor, " head"] | None = None,
    ) -> Float[Tensor, "rows pos head d_head"]:
        """z of some heads of block ``layer`` over positions ``0..pos-1`` (causal, with the
        layer's window, scale and soft cap), from their queries and their own copies of keys
        and values: ``q`` and ``k`` as ``attn.hook_q``/``hook_k`` hold them (before q/k norms
        and rotary), except the heads marked in ``k_ready``, whose keys are already what
        attention uses (``attention_key``: normed and rotated). For a sweep that changes only a
        few heads' inputs in its first block, instead of the whole block's attention."""
        w = self._weights.layers[layer]
        if w.qk_norm_flat:
            raise HookpatchError("heads_z: this variant normalizes all heads' queries together; run the block.")
        device = self.block_devices[layer]
        q, k, v = (to_device(t, device) for t in (q, k, v))
        rows, n_pos, n, d = q.shape
        positions = torch.arange(n_pos, device=q.device).repeat(rows)  # [rows * pos]
        k_raw = k
        if w.q_norm is not None and w.k_norm is not None:
            q, k_raw = w.q_norm(q), w.k_norm(k_raw)
        rope = self._rope(positions)
        if rope is not None:
            cos, sin = (to_device(t, device) for t in rope[w.rope_table])
            q = ops.apply_rotary(q.reshape(-1, n, d), cos, sin).view(rows, n_pos, n, d)
            k_raw = ops.apply_rotary(k_raw.reshape(-1, n, d), cos, sin).view(rows, n_pos, n, d)
        if k_ready is not None:
            k_raw = torch.where(to_device(k_ready, device).view(1, 1, -1, 1), k, k_raw)
        mask = ops.causal_mask(torch.arange(n_pos, device=q.device), n_pos, w.window)
        scores = ops.attention_scores(q, k_raw, mask, w.scale, w.softcap)  # [rows, head, pos, key_pos]
        pattern = ops.attention_pattern(scores, float32_softmax=w.float32_softmax)
        return ops.mix_values(pattern, v)

    def heads_z_supported(self, layer: int) -> bool:
        """Whether :meth:`heads_z` can run some of block ``layer``'s heads alone (not where
        queries and keys are normalized across all heads together)."""
        return not self._weights.layers[layer].qk_norm_flat

    def attention_output(self, layer: int, z: Float[Tensor, "*rows head d_head"]) -> Float[Tensor, "*rows d_model"]:
        """Block ``layer``'s ``hook_attn_out`` from the z of every head (output projection,
        then the post-attention norm where the variant has one), on the block's device."""
        return _block.attn_output(to_device(z, self.block_devices[layer]), self._weights.layers[layer], {}, None)

    def head_output_is_linear(self, layer: int) -> bool:
        """True where block ``layer``'s ``hook_attn_out`` is the output projection of z itself
        (no post-attention norm after it), so a change of some heads' z moves it by those
        heads' share of ``W_O`` alone (:meth:`head_output_delta`)."""
        return self._weights.layers[layer].post_attn is None

    def head_output_delta(
        self,
        layer: int,
        delta: Float[Tensor, "n head d_head"],
        heads: Bool[Tensor, "n head"],
    ) -> Float[Tensor, "n d_model"]:
        """How much ``hook_attn_out`` of block ``layer`` moves when z moves by ``delta`` at the
        ``heads`` of each row (``delta`` is zero elsewhere): ``sum_h delta[:, h] @ W_O[h]``, one
        ``[rows_h, d_head] x [d_head, d_model]`` matmul per head over just the rows that change
        it, instead of the whole output projection (a sweep patching one head of ``n_heads``
        spends ``1 / n_heads`` of it). Only where :meth:`head_output_is_linear`."""
        weight = self._weights.layers[layer].o.weight  # [d_model, head * d_head]
        delta, heads = to_device(delta, weight.device), to_device(heads, weight.device)
        d_head = self.d_head
        out = delta.new_zeros(delta.shape[0], weight.shape[0])  # [n, d_model]
        for h in heads.any(0).nonzero().flatten().tolist():
            rows = heads[:, h].nonzero().flatten()  # [rows_h]
            w_h = weight[:, h * d_head : (h + 1) * d_head]  # [d_model, d_head], a strided view (no copy)
            out.index_add_(0, rows, delta[rows, h] @ w_h.T)
        return out

    def run(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        start: int | Int[Tensor, " batch"],
        *,
        hooks: Mapping[str, HookFn] = NO_HOOKS,
        read_pos: Int[Tensor, " batch"] | Int[Tensor, "batch n_read"] | None = None,
        active_from: Int[Tensor, " batch"] | None = None,
        frozen_kv: Sequence[tuple[Tensor, Tensor]] | None = None,
        unembed: bool = True,
        final_edit: Callable[[Tensor], Tensor] | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch n_read d_vocab"]:
        """Logits from running blocks ``start..`` on ``resid``.

        Args:
            resid: the residual stream at ``blocks.{start}.hook_resid_pre`` for every position
                (``start == n_layers``: the final one). With ``active_from``, only row ``r``'s
                positions ``>= active_from[r]`` are read.
            start: first block to run; with ``active_from`` also one per row (``[batch]``):
                row ``r`` joins at block ``start[r]`` (``resid[r]`` is the residual there), so
                rows patched at different layers share one forward.
            hooks: TransformerLens hook name -> ``fn(activation, hook)`` returning the new
                activation (or None to keep it); ``hook`` has ``.name`` and ``.layer()``.
                Shapes are the bridge's. With ``active_from``, entries at a row's frozen
                positions (before ``active_from``, or every position in blocks before the row's
                ``start``) hold no meaningful values and edits to them are ignored: those keep
                the unpatched run's values.
            read_pos: positions whose logits to return, one (``[batch]``) or several
                (``[batch, n_read]``) per row; None returns every position.
            active_from: per row, the first position to compute; the positions before it are
                frozen at the unpatched run (which ``frozen_kv`` comes from), so an edit must
                only touch a row's positions ``>= active_from``. Needs ``read_pos`` (each
                ``>= active_from`` of its row) and ``frozen_kv``. Positions after a row's last
                read are not computed either (nothing at a read depends on them).
            frozen_kv: for each block ``l >= min(start)``, the unpatched run's ``(k, v)`` at
                every position, ``[b, pos, kv_head, d_head]`` with ``b`` 1, ``batch`` or a
                divisor of it (row ``r`` reads ``r % b``: variants stacked over ``b`` prompts
                share them). ``k`` is the key attention uses: after rotary
                (``attn.hook_rot_k``) for rotary models, ``attn.hook_k`` otherwise. See
                :func:`frozen_kv_from_cache`.
            unembed: False returns :meth:`final_norm`'s output (``d_model`` wide) instead of
                the logits, for a metric that reads the residual stream through directions
                (apply :meth:`unembed` to get logits, soft cap included).
            final_edit: applied to the final residual stream at ``read_pos``
                (``[batch, n_read, d_model]`` in, the same out) before the final norm, for rows
                joining after the last block too (needs ``read_pos``).

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
            checks.check_start(start, self.n_layers)
            layout = lay.dense_layout(batch, n_pos, resid.device, self._rope)
            x: Tensor = resid.reshape(batch * n_pos, d_model)  # [n, d_model]
            return self._run_blocks(x, layout, start, {}, None, hooks, read_pos, None, unembed, final_edit)
        starts = checks.check_starts(start, batch, self.n_layers).to(resid.device)
        active_from = checks.check_active(active_from, read_pos, batch, n_pos).to(resid.device)
        first = int(starts.min())
        checks.check_frozen(frozen_kv, first, batch, n_pos, self.n_layers, self.n_kv_heads, self.d_head)
        assert read_pos is not None  # check_active needs it
        # positions after a row's last read never reach it (attention is causal): not computed
        active_to = checks.read_index(read_pos.to(resid.device), n_pos, batch).max(-1).values  # [batch]
        joins = {  # block -> the layout once the rows starting there have joined
            int(layer): lay.packed_layout(active_from, n_pos, starts <= layer, self._rope, active_to)
            for layer in starts.unique().tolist()
        }
        return self._run_blocks(None, None, first, joins, resid, hooks, read_pos, frozen_kv, unembed, final_edit)

    def _run_blocks(
        self,
        x: Float[Tensor, "n d_model"] | None,
        layout: Layout | None,
        first: int,
        joins: dict[int, Layout],
        resid: Float[Tensor, "batch pos d_model"] | None,
        hooks: Mapping[str, HookFn],
        read_pos: Tensor | None,
        known: Sequence[tuple[Tensor, Tensor]] | None,
        unembed: bool = True,
        final_edit: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Blocks ``first..`` then the final norm and (``unembed``) the unembedding, on ``x``
        packed by ``layout``; in per-row mode both start None and rows join from ``resid`` at
        the blocks ``joins`` names (rows joining at ``n_layers`` skip every block).

        Each block runs on its weights' device: the rows, their layout, the reads and the
        frozen keys and values move there first (nothing moves on a single-device model)."""
        bound = self._bind(hooks, first)
        last_block_join = max((layer for layer in joins if layer < self.n_layers), default=first)
        reads = read_rows = None
        at_reads = False  # x holds just the read rows of every row
        for layer in range(first, self.n_layers + 1):
            device = self.block_devices[layer] if layer < self.n_layers else self.norm_device
            if x is not None and x.device != device:  # the previous block was on another device
                assert layout is not None
                x, layout = x.to(device), layout.to(device)
                if read_rows is not None:  # the reads themselves stay put: they index rope tables and resid
                    read_rows = read_rows.to(device)
            if layer in joins and not at_reads:
                assert resid is not None
                resid = to_device(resid, device)
                joined = joins[layer].to(device)
                x, layout = lay.join(x, layout, joined, resid), joined
                reads = None  # the packed rows changed
            assert x is not None and layout is not None
            if reads is None and read_pos is not None and not at_reads and last_block_join <= layer:
                reads = checks.read_index(read_pos, layout.n_pos, layout.batch)  # on read_pos's device
                read_rows = lay.packed_rows(layout, to_device(reads, x.device))  # [batch, n_read]
            if layer == self.n_layers:
                break
            lh = bound[layer - first]
            kv = None if known is None or layout.index is None else known[layer - first]
            kv = None if kv is None else (to_device(kv[0], device), to_device(kv[1], device))
            if reads is not None and layer == self.n_layers - 1 and lh.keys() <= ALL_ROW_POINTS:
                assert read_rows is not None
                x = self._last_block_at_reads(x, lh, layout, reads, read_rows, kv, resid)
                at_reads, reads = True, None
            else:
                x = _block.block(x, self._weights.layers[layer], lh, layout, layout, None, kv, self._heads)
        assert x is not None and layout is not None
        if reads is not None:
            assert read_rows is not None
            x = x[read_rows.flatten()]  # [batch * n_read, d_model]
        if final_edit is not None:
            if read_pos is None:
                raise HookpatchError("final_edit needs read_pos.")
            x = final_edit(x.view(layout.batch, -1, x.shape[-1])).flatten(0, 1)
        out = self.final_norm(x)
        if unembed:
            out = self.unembed(out)
        return out.view(layout.batch, -1, out.shape[-1])

    def _last_block_at_reads(
        self,
        x: Float[Tensor, "n d_model"],
        lh: Bound,
        layout: Layout,
        reads: Int[Tensor, "batch n_read"],
        read_rows: Int[Tensor, "batch n_read"],
        kv: tuple[Tensor, Tensor] | None,
        resid: Float[Tensor, "batch pos d_model"] | None,
    ) -> Float[Tensor, "batch_n_read d_model"]:
        """The last block with only the read positions as queries: ``[batch * n_read, d_model]``.

        Rows that have not started (in per-row mode, those joining after the last block) take
        their residual at the reads from ``resid``, where it is final already. ``reads`` may be
        on another device than ``x`` (``read_rows`` is on its)."""
        w = self._weights.layers[-1]
        started = layout.rows  # None: every row
        if started is None:
            queries = lay.read_layout(reads, self._rope).to(x.device)
            return _block.block(x, w, lh, layout, queries, read_rows.flatten(), kv, self._heads)
        assert resid is not None
        queries = lay.read_layout(reads[to_device(started, reads.device)], self._rope).to(x.device)
        computed = _block.block(x, w, lh, layout, queries, read_rows[started].flatten(), kv, self._heads)
        resid = to_device(resid, x.device)
        index = to_device(reads, x.device).unsqueeze(-1).expand(-1, -1, resid.shape[-1])
        out = resid.gather(1, index)  # [batch, n_read, d_model]
        out[started] = computed.view(started.shape[0], -1, out.shape[-1])
        return out.flatten(0, 1)

    # ------------------------------------------------------------------------ helpers

    def _rope(self, positions: Int[Tensor, " n"]) -> dict[str | None, tuple[Tensor, Tensor]] | None:
        """Per rotary table, cos/sin at ``positions``, growing the tables as needed (on the
        tables' device: a layout moves them to its block's)."""
        if not self._tables:
            return None
        positions = to_device(positions, next(iter(self._tables.values()))[0].device)
        n_keys = int(positions.max()) + 1 if positions.numel() else 0
        out = {}
        for table, (cos, sin) in self._tables.items():
            if n_keys > cos.shape[0]:
                cos, sin = self._tables[table] = rope_table(self._model, max(n_keys, 2 * cos.shape[0]), table)
            out[table] = (cos[positions], sin[positions])
        return out

    def _bind(self, hooks: Mapping[str, HookFn], start: int) -> list[Bound]:
        """Per block from ``start``: hook point -> (callback, FastHook); unknown names raise."""
        bound: list[Bound] = [{} for _ in range(self.n_layers - start)]
        for name, fn in hooks.items():
            where = self._hook_index.get(name)
            if where is None:
                raise HookpatchError(
                    f"hooks: {name!r} is not a hook point FastForward fires. It fires "
                    f"blocks.<layer>.<point> for point in {sorted(self.hook_points)}."
                )
            layer, point = where
            if layer < start:
                raise HookpatchError(
                    f"hooks: {name!r} is in block {layer}, before start={start}, so it would never "
                    "fire; patch the residual stream passed in instead."
                )
            bound[layer - start][point] = (fn, FastHook(name, layer))
        return bound


def frozen_kv_from_cache(
    cache: Mapping[str, Tensor] | Any, start: int, model: Any
) -> list[tuple[Tensor, Tensor]]:
    """``(k, v)`` at every position for blocks ``start..``, from the unpatched run's cache: the
    ``frozen_kv`` of :meth:`FastForward.run` (no copies).

    ``k`` is ``blocks.{l}.attn.hook_rot_k`` (after rotary) for rotary models and
    ``blocks.{l}.attn.hook_k`` otherwise; ``v`` is ``blocks.{l}.attn.hook_v``.
    """
    rotary = model.cfg.positional_embedding_type == "rotary"
    key = "attn.hook_rot_k" if rotary else "attn.hook_k"
    out = []
    for layer in range(start, model.cfg.n_layers):
        names = (attention_key(layer, rotary), hook_name("v", layer))
        try:
            k, v = (cache[name] for name in names)
        except KeyError as err:
            raise HookpatchError(
                f"the cache lacks {err.args[0]!r}; run with a names_filter that keeps "
                f"'{key}' and 'attn.hook_v' for blocks {start}.."
            ) from None
        out.append((k, v))
    return out
