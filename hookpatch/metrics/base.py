"""The metric protocol: logits in, one value per prompt out; reduction happens outside.

Every metric reads the logits at each prompt's ``END`` position (tracked per prompt, never
assumed to be the last column) and accepts any leading axes, so a sweep can hand it a stack
of patched runs ``[variant, batch, ...]`` at once. Linear metrics (logit difference and its
normalized form) also give their residual-stream direction and bias, so DLA and the logit
lens use the very same object.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hookpatch.errors import HookpatchError
from hookpatch.tasks.promptset import PromptSet


class Metric(ABC):
    """Maps logits to one value per prompt of its :class:`PromptSet`."""

    name: str = "metric"
    prompts: PromptSet

    @property
    def linear(self) -> bool:
        """Whether the metric is an affine function of the final residual (after LN)."""
        return False

    @property
    def read_positions(self) -> Int[Tensor, " batch"]:
        """The position whose logits the metric reads, per prompt (``END``)."""
        return self.prompts.end

    @abstractmethod
    def from_final(self, logits: Float[Tensor, "*lead batch d_vocab"]) -> Float[Tensor, "*lead batch"]:
        """The metric from the logits at each prompt's read position."""

    def __call__(self, logits: Float[Tensor, "*lead batch pos d_vocab"]) -> Float[Tensor, "*lead batch"]:
        """The metric from full logits: reads each prompt's ``END`` position."""
        batch = len(self.prompts)
        if not isinstance(logits, Tensor) or not logits.is_floating_point():
            kind = logits.dtype if isinstance(logits, Tensor) else type(logits).__name__
            raise HookpatchError(
                f"{self.name} expects logits= as a float tensor [..., batch={batch}, pos, d_vocab], "
                f"the model's output; got {kind}."
            )
        if logits.ndim < 3 or logits.shape[-3] != batch:
            raise HookpatchError(
                f"{self.name} expects logits shaped [..., batch={batch}, pos, d_vocab]; got "
                f"{tuple(logits.shape)}. Run the model on this metric's prompt set."
            )
        pos = self.read_positions.to(logits.device)
        index = pos.view(batch, 1, 1).expand(*logits.shape[:-2], 1, logits.shape[-1])
        return self.from_final(logits.gather(-2, index).squeeze(-2))

    def from_unembed_input(
        self,
        final: Float[Tensor, "*lead batch d_model"],
        model: Any,
        unembed: Callable[[Tensor], Tensor] | None = None,
    ) -> Float[Tensor, "*lead batch"]:
        """The metric from the unembedding's input at each prompt's read position.

        A linear metric reads it through its directions (never forming the logits); any other
        unembeds it, with ``unembed`` or ``final @ W_U + b_U``. Runs that stop before the
        unembedding (fast sweeps, attribution) score themselves with this.
        """
        if self.linear:
            return (final * self.directions(model).to(final)).sum(-1) + self.bias(model).to(final)
        logits = unembed(final) if unembed is not None else final @ model.W_U + model.b_U
        return self.from_final(logits)

    def directions(self, model: Any) -> Float[Tensor, "batch d_model"]:
        """Residual-stream direction per prompt (only for linear metrics)."""
        raise HookpatchError(
            f"{self.name} is not linear in the residual stream, so it has no direction; use a "
            "logit-difference metric (LogitDiff, or Normalized(LogitDiff)) for DLA and the logit lens."
        )

    def bias(self, model: Any) -> Float[Tensor, " batch"]:
        """Constant term per prompt (only for linear metrics): value = dir · ln(resid) + bias."""
        self.directions(model)
        raise NotImplementedError  # pragma: no cover - linear metrics override

    def describe(self) -> dict[str, Any]:
        """What the metric measures, for results and reports."""
        return {"name": self.name, "linear": self.linear}

    def __repr__(self) -> str:
        """One line: the metric's name, its numbers (baselines) and its prompt set's headline.

        Metric dataclasses are declared with ``repr=False`` so this replaces the generated
        repr, which would print the whole prompt set.
        """
        numbers = "".join(f", {k}={v:.4g}" for k, v in self.describe().items() if isinstance(v, float))
        return f"{type(self).__name__}({self.name}{numbers}, prompts={self.prompts.headline()})"


def gather_answers(
    logits: Float[Tensor, "*lead batch d_vocab"], tokens: Int[Tensor, " batch"]
) -> Float[Tensor, "*lead batch"]:
    """``logits[..., b, tokens[b]]`` for every prompt ``b``."""
    index = tokens.to(logits.device).expand(*logits.shape[:-1]).unsqueeze(-1)
    return logits.gather(-1, index).squeeze(-1)


@dataclass(frozen=True)
class PerPrompt:
    """Per-prompt values of a metric over any leading cell axes, with derived statistics."""

    values: Float[Tensor, "*cells batch"]

    def mean(self) -> Float[Tensor, "*cells"]:
        return self.values.mean(-1)

    def ci(
        self, level: float = 0.95, n_resamples: Any = 1000, seed: Any = 0
    ) -> tuple[Float[Tensor, "*cells"], Float[Tensor, "*cells"]]:
        """Percentile bootstrap interval of the mean over prompts (:func:`hookpatch.stats.mean_ci`).

        This is the interval of the values themselves. For the change an intervention made,
        bootstrap the per-prompt differences instead (``SweepResult.effects``): a per-prompt
        difference varies far less than the values do when prompts differ in their baseline.
        """
        from hookpatch.stats import mean_ci

        return mean_ci(self.values, level, n_resamples, seed)


@torch.no_grad()
def evaluate(model: Any, metric: Metric, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
    """Run ``model`` on ``tokens`` and return the metric per prompt."""
    from hookpatch.model.loading import require_eval

    require_eval(model)
    return metric(model(tokens))
