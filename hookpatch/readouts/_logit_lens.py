"""The logit lens: the metric read from the residual stream accumulated up to each layer.

Points are labelled as TransformerLens labels them (``"0_pre"``, ``"0_mid"``, …,
``"final_post"``); each point's residual at every prompt's END goes through the final
LayerNorm (``convention``, see :mod:`hookpatch.readouts._final`) and the unembedding, and
the metric reads the logits. Cost: one forward with cache plus ``n_points × batch`` unembeds.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from hookpatch._checks import IntLike, as_int, as_metric
from hookpatch._provenance import Provenance, run_facts
from hookpatch.metrics._base import Metric
from hookpatch.model._loading import require_eval
from hookpatch.readouts._final import apply_final_ln, at_end, gathered, unembed
from hookpatch.results import SweepResult
from hookpatch.tasks._promptset import PromptSet


@torch.no_grad()
def logit_lens(
    model: Any,
    prompts: PromptSet,
    metric: Metric,
    *,
    convention: str = "final_scale",
    incl_mid: bool = True,
    tokens: Int[Tensor, "batch pos"] | None = None,
) -> SweepResult:
    """The metric at every layer point, per prompt: ``values[point, batch]``.

    Example:
        >>> lens = logit_lens(model, prompts, LogitDiff(prompts))              # final_scale, as DLA
        >>> true = logit_lens(model, prompts, metric, convention="renormalized")

    Args:
        model: a TransformerBridge in eval mode.
        prompts: the prompt set (END per prompt).
        metric: any metric (it reads the lens' logits).
        convention: ``"final_scale"`` or ``"renormalized"``.
        incl_mid: include the points between attention and MLP.
        tokens: which run to read (default: the clean prompts).
    """
    require_eval(model)
    metric = as_metric(metric, prompts)  # a plain callable: refused below as not linear
    tokens = prompts.clean_tokens if tokens is None else tokens
    logits, cache = model.run_with_cache(tokens)
    cache = gathered(model, cache)  # one device for the stack (a no-op unless the model is split)
    stack, labels = cache.accumulated_resid(layer=None, incl_mid=incl_mid, return_labels=True)
    x = apply_final_ln(model, cache, at_end(stack, prompts.end), prompts.end, convention)
    values = metric.from_final(unembed(model, x))  # [point, batch]
    return SweepResult(
        values=values.float().cpu(),
        axes=("point",),
        labels={"point": tuple(labels)},
        clean=metric(logits).float().cpu(),
        provenance=Provenance(kind="readout", method="logit_lens", convention=convention,
                              **run_facts(model, prompts, metric)),
    )


@torch.no_grad()
def logit_lens_top_tokens(
    model: Any, prompts: PromptSet, *, prompt: IntLike = 0, k: IntLike = 5, convention: str = "renormalized"
) -> Any:
    """Top-``k`` predicted tokens at every layer point for one prompt, as a DataFrame."""
    import pandas as pd

    require_eval(model)
    k = as_int(k, "k", minimum=1, hint=": how many top tokens per layer point")
    one = prompts.select([as_int(prompt, "prompt")])
    _, cache = model.run_with_cache(one.clean_tokens)
    cache = gathered(model, cache)
    stack, labels = cache.accumulated_resid(layer=None, incl_mid=True, return_labels=True)
    x = apply_final_ln(model, cache, at_end(stack, one.end), one.end, convention)
    logits = unembed(model, x)[:, 0]  # [point, d_vocab]
    probs = logits.softmax(-1)
    top = logits.topk(k, dim=-1)
    rows = []
    for i, label in enumerate(labels):
        for rank, (value, token) in enumerate(zip(top.values[i].tolist(), top.indices[i].tolist(), strict=True)):
            rows.append({"point": label, "rank": rank, "token": model.tokenizer.decode([token]),
                         "token_id": token, "logit": value, "prob": float(probs[i, token])})
    return pd.DataFrame(rows)
