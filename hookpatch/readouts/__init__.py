"""Readouts: what the model predicts and which components write it."""

from hookpatch.readouts._bias import unembed_bias
from hookpatch.readouts._dla import dla_by_component, dla_by_head, dla_by_neuron, top_neurons
from hookpatch.readouts._heads import rank_heads
from hookpatch.readouts._logit_lens import logit_lens, logit_lens_top_tokens
from hookpatch.readouts._predictions import predictions

__all__ = [
    "dla_by_component",
    "dla_by_head",
    "dla_by_neuron",
    "logit_lens",
    "logit_lens_top_tokens",
    "predictions",
    "rank_heads",
    "top_neurons",
    "unembed_bias",
]
