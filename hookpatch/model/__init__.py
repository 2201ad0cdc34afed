"""Loading models, their facts as data, and checked tokenization.

- :func:`load_model` — a TransformerBridge in compatibility mode from an alias, a hub id, a
  local checkpoint or ``"organism"``;
- :func:`model_facts` — sizes and, per component, hook name, axes and head axis;
- :func:`tiny_model` — small random bridges (``"gpt2"``, ``"llama"``), built offline.
"""

from hookpatch.model.facts import Component, ModelFacts, component_info, model_facts
from hookpatch.model.loading import load_model
from hookpatch.model.tiny import tiny_model

__all__ = ["Component", "ModelFacts", "component_info", "load_model", "model_facts", "tiny_model"]
