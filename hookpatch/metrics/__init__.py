"""One metric layer for every experiment: logits → one value per prompt."""

from hookpatch.metrics.base import Metric, PerPrompt, evaluate
from hookpatch.metrics.kl import KLToClean
from hookpatch.metrics.logit_diff import LogitDiff
from hookpatch.metrics.normalized import Normalized
from hookpatch.metrics.probability import AnswerLoss, AnswerProbability

__all__ = [
    "AnswerLoss",
    "AnswerProbability",
    "KLToClean",
    "LogitDiff",
    "Metric",
    "Normalized",
    "PerPrompt",
    "evaluate",
]
