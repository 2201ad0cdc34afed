"""The unembed bias left by LayerNorm folding, between two answer tokens.

Folding the final LayerNorm's bias into the unembedding leaves a per-token bias ``b_U``, a
prior the model applies before reading any context. For " he" vs " she" in GPT-2 small it is
4.5582 vs 3.6625: " he" starts out 2.449× as likely, which the pronoun circuit has to overcome
on prompts about women.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hookpatch.model._tokens import to_single_token


@dataclass(frozen=True)
class UnembedBias:
    """``b_U`` of two tokens, their difference and the probability ratio it implies."""

    token_a: str
    token_b: str
    bias_a: float
    bias_b: float

    @property
    def difference(self) -> float:
        return self.bias_a - self.bias_b

    @property
    def ratio(self) -> float:
        """``p(a) / p(b)`` from the biases alone: ``exp(bias_a - bias_b)``."""
        return math.exp(self.difference)

    def __str__(self) -> str:
        return (f"unembed bias {self.token_a!r} {self.bias_a:.4f} vs {self.token_b!r} {self.bias_b:.4f}: "
                f"{self.token_a!r} is {self.ratio:.3f}x as likely before any context")


def unembed_bias(model: Any, token_a: str = " he", token_b: str = " she") -> UnembedBias:
    """The unembed bias of two single-token answers (after LayerNorm folding)."""
    a, b = to_single_token(model, token_a), to_single_token(model, token_b)
    b_U = model.b_U.detach()
    return UnembedBias(token_a, token_b, float(b_U[a]), float(b_U[b]))
