"""Probability of, and loss at, the correct answer at each prompt's END."""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from hookpatch.metrics._base import Metric, gather_answers
from hookpatch.tasks._promptset import PromptSet


@dataclass(frozen=True, repr=False)
class AnswerProbability(Metric):
    """Softmax probability of the correct answer."""

    prompts: PromptSet
    name: str = "probability"

    def from_final(self, logits: Float[Tensor, "*lead batch d_vocab"]) -> Float[Tensor, "*lead batch"]:
        return gather_answers(logits.float().softmax(-1), self.prompts.correct_tokens)


@dataclass(frozen=True, repr=False)
class AnswerLoss(Metric):
    """Cross-entropy loss of the correct answer: ``-log p(correct)``."""

    prompts: PromptSet
    name: str = "loss"

    def from_final(self, logits: Float[Tensor, "*lead batch d_vocab"]) -> Float[Tensor, "*lead batch"]:
        return -gather_answers(logits.float().log_softmax(-1), self.prompts.correct_tokens)
