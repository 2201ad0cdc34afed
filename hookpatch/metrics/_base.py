"""The metric protocol: logits in, one value per prompt out; reduction happens outside.

Every metric says which positions it reads, per prompt (:attr:`Metric.reads`, ``[batch,
n_read]``; the built-in ones read each prompt's ``END``, tracked per prompt, never assumed to
be the last column), and computes its value from the logits there (:meth:`Metric.from_reads`),
accepting any leading axes, so a sweep can hand it a stack of patched runs ``[variant, batch,
...]`` at once. A runner therefore computes logits only where a metric reads. Linear metrics
(logit difference and its normalized form) also give their residual-stream direction and
bias, so DLA, the logit lens and the sweeps' shortcut (reading the residual stream through
the directions, never forming logits) use the very same object.

A plain callable ``logits[..., batch, pos, vocab] -> [..., batch]`` is wrapped once, at the
public entry points, into a :class:`CallableMetric` that reads every position; past that point
every metric is a :class:`Metric` and nothing downstream asks which kind it is.
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
from hookpatch.tasks._promptset import PromptSet


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

    @property
    def reads(self) -> Int[Tensor, "batch n_read"]:
        """Per prompt, the positions whose logits the metric reads, in the order
        :meth:`from_reads` takes them (by default one: :attr:`read_positions`)."""
        return self.read_positions.unsqueeze(-1)

    @abstractmethod
    def from_final(self, logits: Float[Tensor, "*lead batch d_vocab"]) -> Float[Tensor, "*lead batch"]:
        """The metric from the logits at each prompt's read position."""

    def from_reads(self, logits: Float[Tensor, "*lead batch n_read d_vocab"]) -> Float[Tensor, "*lead batch"]:
        """The metric from the logits at :attr:`reads` (one read: :meth:`from_final`)."""
        return self.from_final(logits.squeeze(-2))

    def __call__(self, logits: Float[Tensor, "*lead batch pos d_vocab"]) -> Float[Tensor, "*lead batch"]:
        """The metric from full logits: reads each prompt's :attr:`reads` positions."""
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
        reads = self.reads.to(logits.device)  # [batch, n_read]
        index = reads.unsqueeze(-1).expand(*logits.shape[:-3], *reads.shape, logits.shape[-1])
        return self.from_reads(logits.gather(-2, index))

    def from_read_inputs(
        self,
        final: Float[Tensor, "*lead batch n_read d_model"],
        model: Any,
        unembed: Callable[[Tensor], Tensor] | None = None,
    ) -> Float[Tensor, "*lead batch"]:
        """The metric from the unembedding's input (after the final norm) at :attr:`reads`.

        A linear metric reads it through its directions, never forming the logits, unless the
        model soft-caps its final logits (``cap * tanh(logits / cap)``, Gemma 2), which makes
        every metric non-linear in the residual stream; otherwise the input is unembedded with
        ``unembed`` (which must give the model's final logits, cap included) or with ``W_U``,
        ``b_U`` and the cap. Runs that stop before the unembedding (fast sweeps, attribution)
        score themselves with this.
        """
        cap = final_softcap(model)
        if self.linear and cap is None:
            one = final.squeeze(-2)  # [*lead, batch, d_model]: a linear metric reads one position
            return (one * self.directions(model).to(one)).sum(-1) + self.bias(model).to(one)
        if unembed is not None:
            logits = unembed(final)
        else:
            logits = final @ model.W_U + model.b_U
            if cap is not None:
                logits = cap * torch.tanh(logits / cap)
        return self.from_reads(logits)

    def from_unembed_input(
        self,
        final: Float[Tensor, "*lead batch d_model"],
        model: Any,
        unembed: Callable[[Tensor], Tensor] | None = None,
    ) -> Float[Tensor, "*lead batch"]:
        """:meth:`from_read_inputs` for a metric that reads one position per prompt."""
        return self.from_read_inputs(final.unsqueeze(-2), model, unembed)

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


def final_softcap(model: Any) -> float | None:
    """The model's final-logit soft cap (``logits = cap * tanh(logits / cap)``), or None."""
    cap = getattr(getattr(model, "cfg", None), "output_logits_soft_cap", None)
    return float(cap) if cap is not None and cap > 0 else None


@dataclass(frozen=True, repr=False)
class CallableMetric(Metric):
    """A plain callable ``logits[..., batch, pos, vocab] -> [..., batch]`` as a :class:`Metric`.

    It may read any position, so it reads them all: a runner hands it the logits of every
    position, in order, exactly as the model returns them. It is not linear and has no
    directions. :func:`as_metric` builds one; pass a :class:`Metric` to let runners skip the
    positions it does not read.

    Example:
        >>> metric = as_metric(lambda logits: logits[..., -1, 0], prompts)
    """

    fn: Callable[[Tensor], Tensor]
    prompts: PromptSet

    @property
    def name(self) -> str:  # type: ignore[override]
        return str(getattr(self.fn, "__name__", None) or type(self.fn).__name__)

    @property
    def reads(self) -> Int[Tensor, "batch n_read"]:
        batch, n_pos = self.prompts.clean_tokens.shape
        return torch.arange(n_pos).expand(batch, n_pos)

    def from_final(self, logits: Float[Tensor, "*lead batch d_vocab"]) -> Float[Tensor, "*lead batch"]:
        raise HookpatchError(
            f"the metric {self.name} is a plain callable of the logits at every position; call it "
            "on full logits [..., batch, pos, d_vocab], or wrap the one-position logic in a Metric."
        )

    def from_reads(self, logits: Float[Tensor, "*lead batch n_read d_vocab"]) -> Float[Tensor, "*lead batch"]:
        return self(logits)  # it reads every position, in order: the full logits

    def __call__(self, logits: Float[Tensor, "*lead batch pos d_vocab"]) -> Float[Tensor, "*lead batch"]:
        """The callable on the logits, checked to give one value per prompt."""
        from hookpatch._checks import require_metric_values

        return require_metric_values(self.fn(logits), tuple(logits.shape[:-2]))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "linear": False}


def as_metric(metric: Metric | Callable[[Tensor], Tensor], prompts: PromptSet) -> Metric:
    """``metric`` itself if it is a :class:`Metric`, else the callable wrapped in a
    :class:`CallableMetric` over ``prompts`` (check it first with
    :func:`hookpatch._checks.require_metric`; :func:`hookpatch._checks.as_metric` does both)."""
    return metric if isinstance(metric, Metric) else CallableMetric(metric, prompts)


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
        """Percentile bootstrap interval of the mean over prompts (:func:`hookpatch._stats.mean_ci`).

        This is the interval of the values themselves. For the change an intervention made,
        bootstrap the per-prompt differences instead (``SweepResult.effects``): a per-prompt
        difference varies far less than the values do when prompts differ in their baseline.
        """
        from hookpatch._stats import mean_ci

        return mean_ci(self.values, level, n_resamples, seed)


@torch.no_grad()
def evaluate(model: Any, metric: Metric, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
    """Run ``model`` on ``tokens`` and return the metric per prompt."""
    from hookpatch.model._loading import require_eval

    require_eval(model)
    return metric(model(tokens))
