"""The fast path: a compatibility-mode TransformerBridge's blocks, run directly in torch.

``model.run_with_hooks`` always runs every block from the embeddings and pays the bridge's
per-module hook machinery. :class:`FastForward` re-implements the same compatibility-mode
forward on the model's own (processed, folded) weights, so a sweep can

* start at any layer from a given residual stream (``blocks.{start}.hook_resid_pre``),
* skip positions whose keys and values are already known: each row may have a frozen prefix
  of its own (``active_from`` + ``frozen_kv``), so rows patched at different positions (and,
  with a start per row, different layers) share one forward,
* compute the unembedding only at the positions it reads (``read_pos``; at the last layer
  only those query rows go through attention and the MLP as well), or stop at the final norm
  (``unembed=False``) for a metric that reads the residual stream through directions,
* finish a block from an activation after its attention (:meth:`FastForward.resume_block`):
  from there a block is position-wise, so a patch of z, attn_out, resid_mid, mlp_out or
  resid_post needs the rest of its block only at the patched positions,

while firing TransformerLens-named hook callbacks with the bridge's shapes. Cost: one
``F.linear`` per projection, two batched matmuls per attention layer (one fused kernel when
no hook reads the scores or pattern; grouped-query heads share K/V through a reshape, never a
copy), a gather/scatter of the packed rows around attention and bound hooks, and no hook work
for names not asked for. Setup extracts weights once as views (no copies) and, for rotary
models, a cos/sin table. It agrees with the bridge to float rounding (~1e-6 in float32).

One shared block runner (``_block``, ``_layout``) reads a per-model description
(``_weights.ModelWeights``) that one module per architecture variant builds: GPT-2
(``_gpt2``); Llama, Mistral and Qwen2, sliding windows included (``_llama``); Qwen3 and
OLMo-2, with q/k norms (``_qwen3``); Gemma 2 and 3 (``_gemma2``). A new family is one module
and a row in ``_variants.VARIANTS``. :func:`unsupported_reason` says why a bridge has no
variant. Semantics reproduced on purpose:

* an edit at ``hook_resid_mid`` reaches the MLP and the residual sum (the bridge's
  ``hook_resid_mid`` is ``ln2.hook_in``; an in-place edit there reaches both, as
  TransformerLens's patching makes it);
* ``hook_k`` is the key before rotary (and before a q/k norm); the key attention uses is
  ``attn.hook_rot_k``;
* ``hook_q_input``/``hook_k_input``/``hook_v_input``, ``attn.hook_result`` and
  ``hook_mlp_in``, which the bridge fires only with ``use_split_qkv_input``,
  ``use_attn_result`` or ``use_hook_mlp_in`` set, fire here whenever bound, free otherwise.
* Gemma's final-logit soft cap is applied by :meth:`FastForward.unembed`;
  :attr:`FastForward.final_softcap` is set then, and logits are not linear in the residual.

On a model split over devices (``load_model(..., n_devices=N)``) each block runs on its own
weights' device: the rows, their layout (indices, rotary tables) and the frozen keys and values
move there as they enter it, and the final norm's output comes back on the unembedding's.

Inputs are unpadded (or right-padded) token rows at positions ``0..``, as the bridge runs a
token tensor; left padding (attention masks, shifted positions) is not modelled.
"""

from hookpatch.runners.fast._forward import (
    ALL_ROW_POINTS as ALL_ROW_POINTS,
)
from hookpatch.runners.fast._forward import (
    BLOCK_POINTS as BLOCK_POINTS,
)
from hookpatch.runners.fast._forward import (
    FLAG_POINTS as FLAG_POINTS,
)
from hookpatch.runners.fast._forward import (
    GATED_POINTS as GATED_POINTS,
)
from hookpatch.runners.fast._forward import (
    QK_NORM_POINTS as QK_NORM_POINTS,
)
from hookpatch.runners.fast._forward import (
    RESUME_POINTS as RESUME_POINTS,
)
from hookpatch.runners.fast._forward import (
    ROTARY_POINTS as ROTARY_POINTS,
)
from hookpatch.runners.fast._forward import (
    FastForward as FastForward,
)
from hookpatch.runners.fast._forward import (
    frozen_kv_from_cache as frozen_kv_from_cache,
)
from hookpatch.runners.fast._layout import FastHook as FastHook
from hookpatch.runners.fast._layout import HookFn as HookFn
from hookpatch.runners.fast._variants import unsupported_reason as unsupported_reason

__all__ = [
    "ALL_ROW_POINTS", "BLOCK_POINTS", "FLAG_POINTS", "GATED_POINTS", "QK_NORM_POINTS", "RESUME_POINTS",
    "ROTARY_POINTS", "FastForward", "FastHook", "HookFn", "frozen_kv_from_cache", "unsupported_reason",
]
