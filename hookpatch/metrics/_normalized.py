"""The normalized patching metric: clean run = 1, corrupted run = 0.

``(m - m_corrupted) / (m_clean - m_corrupted)`` with the baselines averaged over prompts,
so the mean of the per-prompt values is the normalized mean (it stays linear in the base
metric, and keeps its residual direction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor

from hookpatch.errors import HookpatchError
from hookpatch.metrics._base import Metric, evaluate
from hookpatch.tasks._promptset import PromptSet


@dataclass(frozen=True, repr=False)
class Normalized(Metric):
    """A base metric rescaled so the clean baseline maps to 1 and the corrupted one to 0.

    Example:
        >>> metric = Normalized.from_model(model, LogitDiff(prompts))
        >>> metric.describe()["clean"], metric.describe()["corrupted"]
    """

    base: Metric
    clean: float
    corrupted: float
    min_gap: float = 1e-4

    def __post_init__(self) -> None:
        if not isinstance(self.base, Metric):
            raise HookpatchError(
                f"base= must be a hookpatch Metric built on the prompt set (e.g. LogitDiff(prompts)); "
                f"got {type(self.base).__name__}. Normalized rescales that metric's values."
            )
        for arg in ("clean", "corrupted"):
            value = getattr(self, arg)
            if not math.isfinite(value):
                raise HookpatchError(
                    f"cannot normalize {self.base.name}: the {arg} baseline {arg}={value!r} is not a "
                    f"finite number (the base metric gave NaN or inf on the {arg} run); check the "
                    "base metric on that run."
                )
        if abs(self.clean - self.corrupted) < self.min_gap:
            raise HookpatchError(
                f"cannot normalize {self.base.name}: the clean baseline ({self.clean:.6g}) and the "
                f"corrupted baseline ({self.corrupted:.6g}) are equal within {self.min_gap:g}, so "
                "there is no effect to recover. Choose a corruption that changes the answer."
            )

    @classmethod
    def from_model(cls, model: Any, base: Metric, **kwargs: Any) -> Normalized:
        """Measure the clean and corrupted baselines (mean over prompts) on ``model``."""
        if not isinstance(base, Metric):
            raise HookpatchError(
                f"base= must be a Metric built on a prompt set, e.g. LogitDiff(prompts); got "
                f"{type(base).__name__}."
            )
        clean = evaluate(model, base, base.prompts.clean_tokens).mean().item()
        corrupted = evaluate(model, base, base.prompts.corrupted_tokens).mean().item()
        return cls(base, clean, corrupted, **kwargs)

    @property
    def prompts(self) -> PromptSet:  # type: ignore[override]
        return self.base.prompts

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"normalized_{self.base.name}"

    @property
    def linear(self) -> bool:
        return self.base.linear

    @property
    def gap(self) -> float:
        return self.clean - self.corrupted

    def from_final(self, logits: Float[Tensor, "*lead batch d_vocab"]) -> Float[Tensor, "*lead batch"]:
        return (self.base.from_final(logits) - self.corrupted) / self.gap

    def normalize(self, values: Tensor) -> Tensor:
        """Apply the normalization to values of the base metric."""
        return (values - self.corrupted) / self.gap

    def directions(self, model: Any) -> Float[Tensor, "batch d_model"]:
        return self.base.directions(model) / self.gap

    def bias(self, model: Any) -> Float[Tensor, " batch"]:
        return (self.base.bias(model) - self.corrupted) / self.gap

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "linear": self.linear,
            "base": self.base.name,
            "clean": self.clean,
            "corrupted": self.corrupted,
            "normalization": "(m - corrupted) / (clean - corrupted): clean run = 1, corrupted run = 0",
        }
