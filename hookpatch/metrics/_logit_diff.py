"""Logit difference between the correct and incorrect answer at each prompt's END."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor

from hookpatch.metrics._base import Metric, gather_answers
from hookpatch.tasks._promptset import PromptSet


@dataclass(frozen=True, repr=False)
class LogitDiff(Metric):
    """``logit[correct] - logit[incorrect]`` per prompt; linear in the final residual.

    Example:
        >>> metric = LogitDiff(prompts)
        >>> metric(model(prompts.clean_tokens))     # [batch]
    """

    prompts: PromptSet
    name: str = "logit_diff"

    @property
    def linear(self) -> bool:
        return True

    def from_final(self, logits: Float[Tensor, "*lead batch d_vocab"]) -> Float[Tensor, "*lead batch"]:
        return gather_answers(logits, self.prompts.correct_tokens) - gather_answers(
            logits, self.prompts.incorrect_tokens
        )

    def directions(self, model: Any) -> Float[Tensor, "batch d_model"]:
        """``W_U[:, correct] - W_U[:, incorrect]`` per prompt (the unembed difference)."""
        W_U = model.W_U
        correct, incorrect = (t.to(W_U.device) for t in (self.prompts.correct_tokens, self.prompts.incorrect_tokens))
        return (W_U[:, correct] - W_U[:, incorrect]).T

    def bias(self, model: Any) -> Float[Tensor, " batch"]:
        """``b_U[correct] - b_U[incorrect]``: the part of the metric no component writes."""
        b_U = model.b_U
        correct, incorrect = (t.to(b_U.device) for t in (self.prompts.correct_tokens, self.prompts.incorrect_tokens))
        return b_U[correct] - b_U[incorrect]
