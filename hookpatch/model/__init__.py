"""Loading models, their facts as data, and checked tokenization.

- :func:`load_model` — a TransformerBridge in compatibility mode from an alias, a hub id, a
  local checkpoint or ``"organism"``;
- :func:`model_facts` — sizes and, per component, hook name, axes, head axis and the config
  flag its hook needs; :func:`hook_name` builds any hook name from the component table, and
  :func:`hook_flags` turns on the flags of gated hooks (``result``, ``q_input``, ``mlp_in``)
  for a ``with`` block;
- :func:`tiny_model` — small random bridges of six families (``"gpt2"``, ``"llama"``,
  ``"qwen2"``, ``"qwen3"``, ``"gemma2"``, ``"mistral"``), built offline
  (:func:`write_tiny_checkpoint` writes one as a HuggingFace checkpoint);
- :func:`load_spec` — how a model was loaded (:class:`LoadSpec`), to load it again elsewhere;
- :func:`encode`, :func:`to_single_token` — tokenization that refuses unknown words and
  multi-token answers instead of silently splitting them.
"""

from hookpatch.model._facts import (
    COMPONENTS,
    Component,
    ModelFacts,
    component_info,
    hook_flags,
    hook_name,
    model_facts,
)
from hookpatch.model._loading import LoadSpec, load_model, load_spec
from hookpatch.model._tiny import FAMILIES, byte_bpe_tokenizer, tiny_model, write_tiny_checkpoint
from hookpatch.model._tokens import encode, to_single_token

__all__ = [
    "COMPONENTS", "FAMILIES", "Component", "LoadSpec", "ModelFacts", "byte_bpe_tokenizer", "component_info", "encode",
    "hook_flags", "hook_name", "load_model", "load_spec", "model_facts", "tiny_model", "to_single_token",
    "write_tiny_checkpoint",
]
