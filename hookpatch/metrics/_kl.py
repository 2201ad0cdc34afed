"""KL divergence from the clean next-token distribution at each prompt's END."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hookpatch.errors import HookpatchError
from hookpatch.metrics._base import Metric
from hookpatch.tasks._promptset import PromptSet


@dataclass(frozen=True, repr=False)
class KLToClean(Metric):
    """``KL(p_clean || p_run)`` per prompt: 0 on the clean run, growing as a patch breaks it.

    Build it with :meth:`from_model`, which runs the clean prompts once.
    """

    prompts: PromptSet
    clean_log_probs: Float[Tensor, "batch d_vocab"]
    name: str = "kl_to_clean"

    @classmethod
    @torch.no_grad()
    def from_model(cls, model: Any, prompts: PromptSet) -> KLToClean:
        from hookpatch.model._loading import require_eval

        require_eval(model)
        logits = model(prompts.clean_tokens)
        end = prompts.end.to(logits.device)
        final = logits[torch.arange(len(prompts), device=logits.device), end]
        return cls(prompts, final.float().log_softmax(-1))

    def from_final(self, logits: Float[Tensor, "*lead batch d_vocab"]) -> Float[Tensor, "*lead batch"]:
        if logits.shape[-1] != self.clean_log_probs.shape[-1]:
            raise HookpatchError(
                f"logits have {logits.shape[-1]} vocabulary entries but the clean run had "
                f"{self.clean_log_probs.shape[-1]}; use the same model."
            )
        clean = self.clean_log_probs.to(logits.device)
        run = logits.float().log_softmax(-1)
        return (clean.exp() * (clean - run)).sum(-1)
