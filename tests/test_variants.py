"""Every architecture variant (GPT-2, Llama, Qwen2, Qwen3, Gemma 2, Mistral) gives the raw
HuggingFace model's logits, and every sweep kind on it equals TransformerLens' own
``patching`` functions, a hand-written hook loop, and the bridge path.

The models are the session's random variant checkpoints (``variant_model`` in conftest):
norm weights and biases are random, Gemma 2 and Mistral have windows shorter than the
prompts, so a dropped bias, a wrong fold or an ignored window changes the numbers.
"""

from __future__ import annotations

import functools

import pandas as pd
import pytest
import torch
import transformers
from conftest import VARIANT_ARGS
from test_sweeps import TL_BY_COMPONENT, TL_HEADS_ALL_POS, TL_HEADS_BY_POS, tl_reference
from transformer_lens import patching

from hookpatch.errors import HookpatchError
from hookpatch.hooks._factory import ablation_source
from hookpatch.metrics import AnswerLoss, LogitDiff
from hookpatch.model import model_facts, write_tiny_checkpoint
from hookpatch.runners.fast import FastForward
from hookpatch.sweeps import ablation_sweep, patch_sweep
from hookpatch.tasks import pronoun_prompts

ATOL = 1e-4
HF_CLASSES = {
    "gpt2": transformers.GPT2LMHeadModel,
    "llama": transformers.LlamaForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
    "gemma2": transformers.Gemma2ForCausalLM,
    "mistral": transformers.MistralForCausalLM,
}
TL_BY_POS = dict(  # TransformerLens has no resid_post shortcut: its generic patcher is the reference
    TL_BY_COMPONENT,
    resid_pre=patching.get_act_patch_resid_pre,
    resid_post=functools.partial(
        patching.generic_activation_patch, patch_setter=patching.layer_pos_patch_setter,
        activation_name="resid_post", index_axis_names=("layer", "pos"),
    ),
)


def family(model):
    """The HuggingFace model type behind a bridge: "gpt2", "llama", "qwen3", ..."""
    return model.original_model.config.model_type


def runner(result):
    """Which runner produced a sweep result: "fast" or "bridge" (read from its provenance)."""
    return result.provenance.runner


_PROMPTS: dict[int, object] = {}


def prompts_for(model):
    """Three pronoun prompt pairs (9-10 tokens: longer than the variants' windows), built once per model."""
    if id(model) not in _PROMPTS:
        _PROMPTS[id(model)] = pronoun_prompts(model, n=3, seed=0)
    return _PROMPTS[id(model)]


def both_runners(model, sweep, *args, **kw):
    """The sweep through the default runner and, where that is the fast path, through the
    bridge's hooks too (equal to 1e-4), after checking each reports the runner asked for: the
    default takes the fast path wherever the fast path claims the model."""
    default = sweep(model, *args, progress=False, **kw)
    if not FastForward.supports(model):
        assert runner(default) == "bridge"  # the default is the bridge path already
        return [default]
    bridge = sweep(model, *args, fast=False, progress=False, **kw)
    assert runner(default) == "fast" and runner(bridge) == "bridge"
    assert torch.allclose(default.values, bridge.values, atol=ATOL)
    return [bridge, default]


def columns(prompts):
    """The two columns patched by position outside resid_pre's full grid: the name (where
    the runs differ) and END (where the metric reads). TransformerLens' reference costs a
    forward per cell, so the matrix keeps its grids small."""
    return [int(prompts.position("NAME")[0]), prompts.n_pos - 1]


def first_and_last(n):
    """Head indices 0 and n - 1 (under grouped-query attention they read different KV heads)."""
    return [0, n - 1]


def tl_cells(fn, model, prompts, metric, cells, direction="denoising"):
    """TransformerLens' sweep ``fn`` restricted to ``cells`` (rows of its own index axes)."""
    index_df = pd.DataFrame(cells, columns=list(fn.keywords["index_axis_names"]))
    restricted = functools.partial(fn, index_axis_names=None, index_df=index_df)
    return tl_reference(restricted, model, prompts, metric, direction)


def test_bridge_logits_equal_the_hf_model(variant_model, tmp_path):
    """The bridge in compatibility mode against the raw HF model from the same checkpoint
    (log-softmax: centering the unembedding moves logits by a constant per position)."""
    name = family(variant_model)
    write_tiny_checkpoint(tmp_path, name, **VARIANT_ARGS[name])
    hf = HF_CLASSES[name].from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = prompts_for(variant_model).clean_tokens
    window = VARIANT_ARGS[name].get("sliding_window")
    assert window is None or tokens.shape[1] > window + 2  # the window cuts off early tokens
    with torch.no_grad():
        ours = variant_model(tokens).log_softmax(-1)
        ref = hf(tokens).logits.log_softmax(-1)
    assert ref.std() > 0.5  # a sharp random model, not a flat one
    assert torch.allclose(ours, ref, atol=ATOL), float((ours - ref).abs().max())
    if window is not None:  # the window changes the numbers: with HF's default 4096 the logits move
        unwindowed = HF_CLASSES[name].from_pretrained(tmp_path, attn_implementation="eager", sliding_window=4096)
        with torch.no_grad():
            assert (unwindowed.eval()(tokens).logits.log_softmax(-1) - ref).abs().max() > 0.1


@pytest.mark.parametrize(
    ("family_name", "kwargs", "match"),
    [
        ("gpt3", {}, r"unknown family 'gpt3'; expected one of 'gpt2', 'llama'"),
        ("qwen2", {"tokenizer": "word"}, r"tokenizer='word' does not survive .* Use tokenizer='bpe'"),
        ("llama", {"head_dim": 32}, r"head_dim= is for the 'qwen3' and 'gemma2' families"),
        ("qwen3", {"sliding_window": 4}, r"sliding_window= is for the 'gemma2' and 'mistral' families"),
        ("mistral", {"n_kv_heads": 3}, r"n_heads=4 must be a multiple of n_kv_heads=3"),
        ("gemma2", {"tokenizer": "chars"}, r"unknown tokenizer kind 'chars'"),
    ],
)
def test_tiny_checkpoint_bad_arguments(tmp_path, family_name, kwargs, match):
    with pytest.raises(HookpatchError, match=match):
        write_tiny_checkpoint(tmp_path, family_name, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing written


def test_resid_pre_by_position_equals_transformerlens(variant_model):
    prompts = prompts_for(variant_model)
    metric = LogitDiff(prompts)
    tl = tl_reference(patching.get_act_patch_resid_pre, variant_model, prompts, metric, "denoising")
    assert tl.abs().max() > 1e-2
    for result in both_runners(variant_model, patch_sweep, prompts, metric, "resid_pre"):
        assert result.values.shape == (model_facts(variant_model).n_layers, prompts.n_pos, len(prompts))
        assert torch.allclose(result.mean(), tl, atol=ATOL)


@pytest.mark.parametrize("component", sorted(set(TL_BY_POS) - {"resid_pre"}))
def test_block_outputs_by_position_equal_transformerlens(variant_model, component):
    prompts = prompts_for(variant_model)
    metric = LogitDiff(prompts)
    pos = columns(prompts)
    cells = [(layer, p) for layer in range(model_facts(variant_model).n_layers) for p in pos]
    tl = tl_cells(TL_BY_POS[component], variant_model, prompts, metric, cells)
    assert tl.abs().max() > 1e-2
    for result in both_runners(variant_model, patch_sweep, prompts, metric, component, positions=pos):
        assert torch.allclose(result.mean().flatten(), tl, atol=ATOL)


def test_resid_pre_noising_equals_transformerlens(variant_model):
    prompts = prompts_for(variant_model)
    metric = LogitDiff(prompts)
    pos = columns(prompts)
    cells = [(layer, p) for layer in range(model_facts(variant_model).n_layers) for p in pos]
    tl = tl_cells(patching.get_act_patch_resid_pre, variant_model, prompts, metric, cells, "noising")
    assert tl.abs().max() > 1e-2
    for result in both_runners(variant_model, patch_sweep, prompts, metric, "resid_pre", direction="noising",
                               positions=pos):
        assert torch.allclose(result.mean().flatten(), tl, atol=ATOL)


@pytest.mark.parametrize("component", sorted(TL_HEADS_ALL_POS))
def test_heads_all_positions_equal_transformerlens(variant_model, component):
    prompts = prompts_for(variant_model)
    metric = LogitDiff(prompts)
    facts = model_facts(variant_model)
    heads = first_and_last(facts.n_heads_of(component))
    cells = [(layer, h) for layer in range(facts.n_layers) for h in heads]
    tl = tl_cells(TL_HEADS_ALL_POS[component], variant_model, prompts, metric, cells)
    assert tl.abs().max() > 1e-3
    for result in both_runners(variant_model, patch_sweep, prompts, metric, component, by=("layer", "head"),
                               heads=heads):
        assert torch.allclose(result.mean().flatten(), tl, atol=ATOL)


@pytest.mark.parametrize("component", sorted(TL_HEADS_BY_POS))
def test_heads_by_position_equal_transformerlens(variant_model, component):
    """Four cells of the layer × (name, END) × (first, last head) grid, one per layer and
    column, each with another head; the sweep computes the whole grid."""
    prompts = prompts_for(variant_model)
    metric = LogitDiff(prompts)
    facts = model_facts(variant_model)
    pos, heads = columns(prompts), first_and_last(facts.n_heads_of(component))
    grid = [(layer, j, (layer + j) % 2) for layer in range(facts.n_layers) for j in range(2)]  # (layer, pos, head)
    if component == "pattern":  # TransformerLens indexes this one layer, head, dest_pos
        cells = [(layer, heads[k], pos[j]) for layer, j, k in grid]
    else:
        cells = [(layer, pos[j], heads[k]) for layer, j, k in grid]
    tl = tl_cells(TL_HEADS_BY_POS[component], variant_model, prompts, metric, cells)
    assert tl.abs().max() > 1e-3
    for result in both_runners(variant_model, patch_sweep, prompts, metric, component, by=("layer", "pos", "head"),
                               positions=pos, heads=heads):
        mean = result.mean()
        assert torch.allclose(torch.stack([mean[cell] for cell in grid]), tl, atol=ATOL)


def _ablate_head(z, hook, head, source):
    """Hand-written ablation of one head at every position: write ``source``'s slice."""
    z = z.clone()
    z[:, :, head] = source[:, :, head] if source.ndim else 0.0
    return z


@pytest.mark.parametrize("how", ["zero", "mean", "resample"])
def test_ablations_equal_a_hand_written_loop(variant_model, how):
    prompts = prompts_for(variant_model)
    metric = AnswerLoss(prompts)
    _, clean = variant_model.run_with_cache(prompts.clean_tokens)
    results = both_runners(variant_model, ablation_sweep, prompts, metric, "z", how=how, seed=1)
    facts = model_facts(variant_model)
    for layer in range(facts.n_layers):
        z = clean[f"blocks.{layer}.attn.hook_z"]
        if how == "zero":
            source = torch.zeros(())
        elif how == "mean":
            source = z.mean(0, keepdim=True).expand_as(z)
        else:  # another prompt's activation for every prompt: a derangement of the clean rows
            drawn = ablation_source(z, how, seed=1)
            perm = [next(j for j in range(len(z)) if torch.equal(row, z[j])) for row in drawn]
            assert all(j != i for i, j in enumerate(perm))
            source = z[perm]
        for head in first_and_last(facts.n_heads):
            hook = functools.partial(_ablate_head, head=head, source=source)
            with torch.no_grad():
                logits = variant_model.run_with_hooks(
                    prompts.clean_tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)]
                )
            ref = metric(logits)
            for result in results:
                assert torch.allclose(result.values[layer, head], ref, atol=ATOL)


def test_every_variant_runs_on_the_fast_path(variant_model):
    """The default runner is the fast path on every supported architecture variant."""
    assert FastForward.supports(variant_model), f"{family(variant_model)} falls back to the bridge"
    prompts = prompts_for(variant_model)
    result = patch_sweep(variant_model, prompts, LogitDiff(prompts), "z", by=("layer", "head"), progress=False)
    assert runner(result) == "fast"


def test_fast_true_without_a_fast_path_raises(gpt2_variant_model, monkeypatch):
    """fast=True promises the fast path: a model it refuses is an error, not a silent fallback."""
    model = gpt2_variant_model
    prompts = prompts_for(model)
    metric = LogitDiff(prompts)
    hooks_before = sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in model.hook_dict.values())
    monkeypatch.setattr(model.cfg, "output_logits_soft_cap", 30.0)  # a feature the fast path refuses
    assert not FastForward.supports(model)
    with pytest.raises(HookpatchError, match="fast=True.*no fast path"):
        patch_sweep(model, prompts, metric, "resid_pre", fast=True, progress=False)
    with pytest.raises(HookpatchError, match="fast=True.*no fast path"):
        ablation_sweep(model, prompts, metric, "z", fast=True, progress=False)
    assert runner(patch_sweep(model, prompts, metric, "z", by=("layer", "head"), progress=False)) == "bridge"
    assert sum(len(h.fwd_hooks) + len(h.bwd_hooks) for h in model.hook_dict.values()) == hooks_before
