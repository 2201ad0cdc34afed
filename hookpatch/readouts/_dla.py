"""Direct logit attribution: how much each component writes along the metric's direction.

With the final LayerNorm's scale frozen at its value on the real run (the DLA convention),
the metric of a linear metric is ``Σ_parts dir · ln(part) + bias``, so the parts — the
embeddings, each layer's attention and MLP output, or each head and the attention biases, or
each neuron and the MLP biases — add up to the metric exactly. A non-linear metric has no
such decomposition and is refused.

On a model split over devices, the layers' parts are stacked on the unembedding's device
(:func:`~hookpatch.readouts._final.gathered`); a neuron's DLA is computed on its layer's device.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hookpatch._checks import IntLike, as_metric
from hookpatch._provenance import Provenance, run_facts
from hookpatch.errors import HookpatchError
from hookpatch.metrics._base import Metric
from hookpatch.model._facts import hook_name, model_facts
from hookpatch.model._loading import require_eval
from hookpatch.readouts._final import apply_final_ln, at_end, center, gathered
from hookpatch.results import SweepResult
from hookpatch.tasks._promptset import PromptSet


def _linear(metric: Metric, model: Any) -> tuple[Tensor, Tensor]:
    if not metric.linear:
        raise HookpatchError(
            f"DLA needs a metric linear in the residual stream; {metric.name} is not. Use "
            "LogitDiff or Normalized(LogitDiff)."
        )
    return metric.directions(model), metric.bias(model)


def _project(model, cache, parts: Float[Tensor, "n batch pos d_model"], prompts, dirs) -> Float[Tensor, "n batch"]:
    x = apply_final_ln(model, cache, at_end(parts, prompts.end), prompts.end, "final_scale")
    return (x * dirs.to(x.device)).sum(-1)


def _result(values, axes, labels, model, prompts, metric, logits, method: str, terms: dict[str, Tensor],
            layer: int | None = None) -> SweepResult:
    return SweepResult(
        values=values.float().cpu(), axes=axes, labels=labels, clean=metric(logits).float().cpu(),
        provenance=Provenance(kind="effect", method=method, layer=layer, **run_facts(model, prompts, metric)),
        terms={name: term.float().cpu() for name, term in terms.items()},
    )


@torch.no_grad()
def dla_by_component(model: Any, prompts: PromptSet, metric: Metric) -> SweepResult:
    """DLA of the embeddings and each layer's ``attn_out`` and ``mlp_out``: ``values[part, batch]``.

    ``terms["bias"]`` ``[batch]`` holds the metric's constant term per prompt; parts + bias = metric.
    """
    require_eval(model)
    metric = as_metric(metric, prompts)  # a plain callable: refused below as not linear
    dirs, bias = _linear(metric, model)
    logits, cache = model.run_with_cache(prompts.clean_tokens)
    cache = gathered(model, cache)  # one device for the stack (a no-op unless the model is split)
    parts, labels = cache.decompose_resid(layer=None, mode="all", return_labels=True)
    values = _project(model, cache, parts, prompts, dirs)
    return _result(values, ("component",), {"component": tuple(labels)}, model, prompts, metric, logits,
                   "dla", {"bias": bias})


@torch.no_grad()
def dla_by_head(model: Any, prompts: PromptSet, metric: Metric) -> SweepResult:
    """DLA of every attention head: ``values[layer, head, batch]`` (labels ``L9H7``).

    ``terms["attn_bias"]`` holds each layer's attention output bias DLA ``[layer, batch]``:
    the heads of a layer plus its bias equal that layer's ``attn_out`` DLA.
    """
    require_eval(model)
    metric = as_metric(metric, prompts)  # a plain callable: refused below as not linear
    dirs, _ = _linear(metric, model)
    facts = model_facts(model)
    logits, cache = model.run_with_cache(prompts.clean_tokens)
    cache = gathered(model, cache, head_results=True)
    heads = cache.stack_head_results(layer=-1)  # [layer * head, batch, pos, d_model]
    values = _project(model, cache, heads, prompts, dirs).reshape(facts.n_layers, facts.n_heads, -1)
    b_O = torch.stack([
        _bias_vector(model.blocks[layer].attn, "b_O", facts.d_model).to(heads.device) for layer in range(facts.n_layers)
    ])
    b_O = b_O[:, None, None, :].expand(-1, len(prompts), prompts.n_pos, -1)
    attn_bias = _project(model, cache, b_O, prompts, dirs)  # [layer, batch]
    return _result(
        values, ("layer", "head"),
        {
            "layer": tuple(str(layer) for layer in range(facts.n_layers)),
            "head": tuple(f"H{h}" for h in range(facts.n_heads)),
        },
        model, prompts, metric, logits, "dla_heads", {"attn_bias": attn_bias},
    )


@torch.no_grad()
def dla_by_neuron(model: Any, prompts: PromptSet, metric: Metric, layer: IntLike) -> SweepResult:
    """DLA of every MLP neuron of ``layer``: ``values[neuron, batch]``.

    A neuron writes ``post[n] * W_out[n]``; with the MLP's output bias (``terms["mlp_bias"]``, ``[batch]``)
    the neurons add up to the layer's ``mlp_out`` DLA. Rank with :func:`top_neurons`.
    """
    require_eval(model)
    metric = as_metric(metric, prompts)  # a plain callable: refused below as not linear
    dirs, _ = _linear(metric, model)
    facts = model_facts(model)
    layer = facts.check_layer(layer)
    logits, cache = model.run_with_cache(prompts.clean_tokens)
    rows = torch.arange(len(prompts))
    end = prompts.end.cpu()
    post = cache[hook_name("mlp_post", layer)][rows, end]  # [batch, d_mlp]
    mlp = model.blocks[layer].mlp
    W_out = center(model, mlp.W_out)  # [d_mlp, d_model]
    scale = cache[hook_name("ln_final_scale")][rows, end].to(W_out.device)  # [batch, 1]
    dirs = dirs.to(W_out.device)  # the layer's device (the unembedding's may differ)
    per_unit = (dirs @ W_out.T) / scale  # [batch, d_mlp]
    values = (post.to(W_out.device) * per_unit).T  # [neuron, batch]
    b_out = center(model, _bias_vector(mlp, "b_out", facts.d_model, W_out.device))
    mlp_bias = (dirs @ b_out) / scale[:, 0]
    return _result(
        values, ("neuron",), {"neuron": tuple(f"L{layer}N{n}" for n in range(values.shape[0]))},
        model, prompts, metric, logits, "dla_neurons", {"mlp_bias": mlp_bias}, layer=layer,
    )


def top_neurons(result: SweepResult, k: int = 10) -> Any:
    """The ``k`` neurons with the largest mean |DLA|, as a DataFrame (label, mean, rank)."""
    import pandas as pd

    mean = result.mean()
    order = mean.abs().argsort(descending=True)[:k]
    return pd.DataFrame(
        [{"rank": r, "neuron": int(i), "label": result.labels["neuron"][int(i)], "mean": float(mean[i])}
         for r, i in enumerate(order)]
    )


def _bias_vector(module: Any, name: str, d_model: int, device: Any = None) -> Float[Tensor, " d_model"]:
    """The module's bias ``name``, or zeros (on ``device``) where it has none."""
    b = getattr(module, name, None)
    if b is None:
        return torch.zeros(d_model, device=device)
    return b.detach()
