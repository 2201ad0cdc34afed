"""One metric layer for every experiment: logits → one value per prompt."""

from hookpatch.metrics._base import CallableMetric, Metric, PerPrompt, evaluate
from hookpatch.metrics._kl import KLToClean
from hookpatch.metrics._logit_diff import LogitDiff
from hookpatch.metrics._normalized import Normalized
from hookpatch.metrics._probability import AnswerLoss, AnswerProbability

__all__ = [
    "AnswerLoss",
    "AnswerProbability",
    "CallableMetric",
    "KLToClean",
    "LogitDiff",
    "Metric",
    "Normalized",
    "PerPrompt",
    "evaluate",
]
