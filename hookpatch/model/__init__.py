"""Loading models, their facts as data, and checked tokenization.

- :func:`load_model` — a TransformerBridge in compatibility mode from an alias, a hub id, a
  local checkpoint or ``"organism"``;
- :func:`model_facts` — sizes and, per component, hook name, axes, head axis and the config
  flag its hook needs; :func:`hook_name` builds any hook name from the component table, and
  :func:`hook_flags` turns on the flags of gated hooks (``result``, ``q_input``, ``mlp_in``)
  for a ``with`` block;
- :func:`tiny_model` — small random bridges of six families (``"gpt2"``, ``"llama"``,
  ``"qwen2"``, ``"qwen3"``, ``"gemma2"``, ``"mistral"``), built offline.
"""

from hookpatch.model.facts import Component, ModelFacts, component_info, hook_flags, hook_name, model_facts
from hookpatch.model.loading import load_model
from hookpatch.model.tiny import tiny_model

__all__ = [
    "Component", "ModelFacts", "component_info", "hook_flags", "hook_name", "load_model", "model_facts", "tiny_model",
]
