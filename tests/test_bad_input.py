"""Bad input, as a new user would type it: a clear HookpatchError, and nothing left behind.

Every case runs through :func:`refused`, which asserts the error type and a message naming
the argument, and then that the call left no trace: no hook on any hook point or module, no
``.grad`` on a parameter, every module's train/eval mode and every parameter's
``requires_grad`` as before, the config flags of gated hooks (``use_attn_result``,
``use_split_qkv_input``, ``use_hook_mlp_in``, wherever the bridge reads them) as before, and
the prompt tensors and any cache passed in bit-identical.
Faults in the middle of a run (a metric that raises on its second call, a
KeyboardInterrupt) are held to the same standard, with their own exception type.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from types import SimpleNamespace

import jaxtyping
import numpy as np
import pytest
import torch
from test_components import flag_state

import hookpatch as hp
from hookpatch.attribution import compare_results
from hookpatch.cli import main as cli_main
from hookpatch.errors import HookpatchError
from hookpatch.hooks import ablate_hook, patch_hook
from hookpatch.metrics import KLToClean
from hookpatch.model import model_facts
from hookpatch.readouts import dla_by_neuron, logit_lens_top_tokens, unembed_bias
from hookpatch.report import check_arguments, run_report

CLEAN = ["Mary went to the store", "John went to the park", "Amy went to the shops", "Dan went to the bank"]
CORRUPTED = ["John went to the store", "Mary went to the park", "Dan went to the shops", "Amy went to the bank"]
ANSWERS = [(" she", " he"), (" he", " she"), (" she", " he"), (" he", " she")]
QUIET = {"progress": False}


# ---------------------------------------------------------------------------- the harness


def _hook_count(model) -> int:
    """Hooks on the model's hook points (the bridge itself keeps none there)."""
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in model.hook_dict.values())


def _module_hooks(model) -> set:
    """Every PyTorch hook on every module (the bridge keeps a few of its own after a first forward)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return {(name, kind, key) for name, m in model.named_modules() for kind in kinds for key in getattr(m, kind)}


def _state(model) -> dict:
    return {
        "hooks": _hook_count(model),
        "module_hooks": _module_hooks(model),
        "modes": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "flags": flag_state(model),
    }


def _tensors(prompts) -> list[torch.Tensor]:
    return [prompts.clean_tokens, prompts.corrupted_tokens, prompts.answer_tokens, prompts.lengths,
            *prompts.positions.values()]


def refused(models, call, match, *tensors, error=HookpatchError):
    """``call()`` raises ``error`` matching ``match`` and leaves ``models`` (one or a list) and
    ``tensors`` as they were."""
    models = models if isinstance(models, list) else [models]
    before = [_state(m) for m in models]
    copies = [t.clone() for t in tensors]
    with pytest.raises(error, match=match):
        call()
    for model, old in zip(models, before, strict=True):
        new = _state(model)
        assert new["hooks"] == old["hooks"] == 0, "a hook was left on a hook point"
        assert new["module_hooks"] == old["module_hooks"], "a hook was left on a module"
        assert new["modes"] == old["modes"], "a module's train/eval mode changed"
        assert new["requires_grad"] == old["requires_grad"], "a parameter's requires_grad changed"
        assert all(p.grad is None for p in model.parameters()), "a .grad was left on a parameter"
        assert new["flags"] == old["flags"], "a hook flag (use_attn_result, ...) was left changed"
    for original, copy in zip(tensors, copies, strict=True):
        assert torch.equal(original, copy), "an input tensor was modified"


@pytest.fixture(scope="module")
def ctx(gpt2_model, llama_model):
    """The tiny GPT-2 model, its prompts, a metric, a clean cache; the Llama model and its cache."""
    prompts = hp.make_prompt_set(gpt2_model, CLEAN, CORRUPTED, ANSWERS)
    _, cache = gpt2_model.run_with_cache(prompts.clean_tokens)
    llama_prompts = hp.make_prompt_set(llama_model, CLEAN, CORRUPTED, ANSWERS)
    _, llama_cache = llama_model.run_with_cache(llama_prompts.clean_tokens)
    return SimpleNamespace(
        model=gpt2_model, prompts=prompts, metric=hp.LogitDiff(prompts), cache=cache,
        llama=llama_model, llama_prompts=llama_prompts, llama_cache=llama_cache,
    )


def _nan_when_patched(prompts):
    """A metric that is finite on the unpatched runs but NaN on every patched one."""
    base = hp.LogitDiff(prompts)

    def metric(logits):
        value = base(logits)
        return value * math.nan if logits.ndim == 4 else value

    return metric


def _in_train_mode(module, call):
    """Run ``call`` with ``module`` (one sub-module) in train mode, restoring eval mode after."""
    def run():
        module.train()
        try:
            call()
        finally:
            module.eval()
    return run


# ---------------------------------------------------------------------------- the cases
# Each case: (function of ctx that makes the bad call, regex the message must match).

CASES = {
    # A model name where the model belongs.
    "patch_sweep_name": (lambda c: hp.patch_sweep("gpt2", c.prompts, c.metric, **QUIET), r"model= got the name 'gpt2'.*load_model\('gpt2'\)"),
    "ablation_sweep_name": (lambda c: hp.ablation_sweep("gpt2", c.prompts, c.metric, **QUIET), r"model= got the name 'gpt2'"),
    "attribution_name": (lambda c: hp.attribution_sweep("gpt2", c.prompts, c.metric, **QUIET), r"model= got the name"),
    "compare_name": (lambda c: hp.compare("gpt2", c.prompts, c.metric, **QUIET), r"model= got the name"),
    "dla_by_head_name": (lambda c: hp.dla_by_head("gpt2", c.prompts, c.metric), r"model= got the name"),
    "dla_by_component_object": (lambda c: hp.dla_by_component(object(), c.prompts, c.metric), r"model= must be a TransformerBridge.*got object"),
    "logit_lens_name": (lambda c: hp.logit_lens("gpt2", c.prompts, c.metric), r"model= got the name"),
    "predictions_name": (lambda c: hp.predictions("gpt2", "Mary went to the"), r"model= got the name"),
    "normalized_name": (lambda c: hp.Normalized.from_model("gpt2", c.metric), r"model= got the name"),
    "model_facts_name": (lambda c: model_facts("gpt2"), r"model= got the name"),
    "make_prompt_set_name": (lambda c: hp.make_prompt_set("gpt2", CLEAN, CORRUPTED, ANSWERS), r"model= got the name"),
    "kl_name": (lambda c: KLToClean.from_model("gpt2", c.prompts), r"model= got the name"),
    "patch_hook_name": (lambda c: patch_hook("gpt2", "resid_pre", 0, c.cache["blocks.0.hook_resid_pre"]), r"model= got the name"),
    # A metric built on another prompt set, or not a metric instance.
    "metric_other_order": (lambda c: hp.patch_sweep(c.model, c.prompts, hp.LogitDiff(c.prompts.select([1, 0, 2, 3])), **QUIET), r"metric= was built on another prompt set"),
    "metric_other_size": (lambda c: hp.patch_sweep(c.model, c.prompts, hp.LogitDiff(c.prompts.select([0, 1])), **QUIET), r"metric= was built on another prompt set \(2 prompts\)"),
    "metric_other_attribution": (lambda c: hp.attribution_sweep(c.model, c.prompts, hp.LogitDiff(c.prompts.select([3, 2, 1, 0])), **QUIET), r"metric= was built on another prompt set"),
    "metric_other_ablation": (lambda c: hp.ablation_sweep(c.model, c.prompts, hp.AnswerLoss(c.prompts.select([0, 1])), **QUIET), r"metric= was built on another"),
    "metric_other_dla": (lambda c: hp.dla_by_head(c.model, c.prompts, hp.LogitDiff(c.prompts.select([1, 0, 2, 3]))), r"metric= was built on another"),
    "metric_other_lens": (lambda c: hp.logit_lens(c.model, c.prompts, hp.LogitDiff(c.prompts.select([0]))), r"metric= was built on another"),
    "metric_class": (lambda c: hp.patch_sweep(c.model, c.prompts, hp.LogitDiff, **QUIET), r"metric= got the class LogitDiff.*LogitDiff\(prompts\)"),
    "metric_scalar": (lambda c: hp.patch_sweep(c.model, c.prompts, lambda logits: c.metric(logits).mean(), **QUIET), r"the metric returned \(\) .*one value per prompt"),
    "metric_wrong_batch_logits": (lambda c: c.metric(torch.zeros(2, 6, c.model.cfg.d_vocab)), r"logit_diff expects logits shaped \[..., batch=4"),
    # NaN and inf.
    "metric_nan_baseline": (lambda c: hp.patch_sweep(c.model, c.prompts, lambda logits: c.metric(logits) * math.nan, **QUIET), r"metric <lambda> on the unpatched clean run is NaN or inf at prompt 0, prompt 1, prompt 2 and 1 more"),
    "metric_nan_patched_bridge": (lambda c: hp.patch_sweep(c.model, c.prompts, _nan_when_patched(c.prompts), fast=False, **QUIET), r"metric metric after patching is NaN or inf at L0 @ 0: .*, prompt 0"),
    "metric_nan_patched_fast": (lambda c: hp.patch_sweep(c.model, c.prompts, _nan_when_patched(c.prompts), fast=True, **QUIET), r"after patching is NaN or inf at L0 @ 0"),
    "metric_inf_attribution": (lambda c: hp.attribution_sweep(c.model, c.prompts, lambda logits: c.metric(logits) / 0.0, **QUIET), r"on the unpatched (clean|corrupted) run is NaN or inf"),
    "normalized_nan_clean": (lambda c: hp.Normalized(c.metric, math.nan, 0.0), r"clean baseline clean=nan is not a finite number"),
    "normalized_inf_corrupted": (lambda c: hp.Normalized(c.metric, 1.0, -math.inf), r"corrupted baseline corrupted=-inf"),
    "normalized_equal_baselines": (lambda c: hp.Normalized(c.metric, 1.0, 1.0), r"baselines? .*are equal"),
    # Empty input.
    "empty_select": (lambda c: c.prompts.select([]), r"index=\[\] selects no prompts"),
    "empty_prompt_list": (lambda c: hp.make_prompt_set(c.model, [], [], []), r"no prompts given"),
    "mean_ablation_empty_reference": (lambda c: ablate_hook(c.model, "z", 0, c.cache["blocks.0.attn.hook_z"][:0], how="mean"), r"mean ablation needs reference activations of at least one prompt"),
    "resample_one_prompt": (lambda c: ablate_hook(c.model, "z", 0, c.cache["blocks.0.attn.hook_z"][:1], how="resample"), r"resample ablation needs at least two prompts"),
    "empty_layers": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, layers=[], **QUIET), r"layers=\[\] selects nothing"),
    "empty_heads": (lambda c: hp.attribution_sweep(c.model, c.prompts, c.metric, "z", by=("layer", "head"), heads=[], **QUIET), r"heads=\[\] selects nothing"),
    # Floats where integers belong.
    "float_named_positions": (lambda c: hp.make_prompt_set(c.model, CLEAN, CORRUPTED, ANSWERS, positions={"S": [1.5, 1, 1, 1]}), r"positions\['S'\]= must hold integers; got 1.5"),
    "float_hook_positions": (lambda c: patch_hook(c.model, "resid_pre", 1, c.cache["blocks.1.hook_resid_pre"], positions=torch.tensor([1.0, 2.0, 1.0, 1.0])), r"positions= as a tensor must hold integer columns"),
    "float_layers": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, layers=[0.5], **QUIET), r"layers= must hold integers; got 0.5"),
    "float_layer_array": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, layers=np.array([0.0, 1.0]), **QUIET), r"layers= must be one integer or a 1-d integer array; got a 1-d array of float64"),
    "float_heads": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, "z", by=("layer", "head"), heads=[1.0], **QUIET), r"heads= must hold integers"),
    "float_positions": (lambda c: hp.attribution_sweep(c.model, c.prompts, c.metric, positions=[2.5], **QUIET), r"positions= must hold integers; got 2.5"),
    "bool_layers": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, layers=True, **QUIET), r"layers=True must be an integer"),
    "float_layer_hook": (lambda c: patch_hook(c.model, "resid_pre", 1.0, c.cache["blocks.1.hook_resid_pre"]), r"layer 1.0 must be an integer from 0 to 1"),
    "float_seed": (lambda c: hp.ablation_sweep(c.model, c.prompts, c.metric, how="resample", seed=0.5, **QUIET), r"seed=0.5 must be an integer"),
    # Out of range, unknown names.
    "layer_out_of_range": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, layers=[5], **QUIET), r"layer 5 is out of range: this model has 2 layers"),
    "negative_layer": (lambda c: hp.attribution_sweep(c.model, c.prompts, c.metric, layers=-1, **QUIET), r"layer -1 is out of range"),
    "head_out_of_range": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, "z", by=("layer", "head"), heads=[9], **QUIET), r"head 9 is out of range for 'z'"),
    "kv_head_out_of_range": (lambda c: hp.patch_sweep(c.llama, c.llama_prompts, hp.LogitDiff(c.llama_prompts), "k", by=("layer", "head"), heads=[3], **QUIET), r"head 3 is out of range for 'k': this model has 2 KV heads"),
    "position_out_of_range": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, positions=[99], **QUIET), r"position 99 is out of range"),
    "unknown_position_name": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, positions=["S2"], **QUIET), r"unknown position name 'S2'"),
    "unknown_component": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, "resid", **QUIET), r"unknown component 'resid'"),
    "unknown_component_hook": (lambda c: ablate_hook(c.model, "heads", 0, c.cache["blocks.0.attn.hook_z"]), r"unknown component 'heads'"),
    "unknown_by": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, by=("pos", "layer"), **QUIET), r"unknown grid by=\('pos', 'layer'\)"),
    "by_head_without_heads": (lambda c: hp.attribution_sweep(c.model, c.prompts, c.metric, "resid_pre", by=("layer", "head"), **QUIET), r"has no heads"),
    "heads_without_head_axis": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, "z", heads=[0], **QUIET), r"heads= restricts a grid by head"),
    "unknown_direction": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, direction="forward", **QUIET), r"unknown direction 'forward'"),
    "unknown_direction_attr": (lambda c: hp.attribution_sweep(c.model, c.prompts, c.metric, direction="backward", **QUIET), r"unknown direction 'backward'"),
    "unknown_ablation": (lambda c: hp.ablation_sweep(c.model, c.prompts, c.metric, how="noise", **QUIET), r"unknown ablation 'noise'"),
    "unknown_ablation_hook": (lambda c: ablate_hook(c.model, "z", 0, c.cache["blocks.0.attn.hook_z"], how="noise"), r"unknown ablation 'noise'"),
    "unknown_convention": (lambda c: hp.logit_lens(c.model, c.prompts, c.metric, convention="true"), r"unknown convention 'true'"),
    "memory_budget_zero": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, memory_budget=0, **QUIET), r"memory_budget=0 must be an integer >= 1"),
    "memory_budget_negative": (lambda c: hp.ablation_sweep(c.model, c.prompts, c.metric, memory_budget=-5, **QUIET), r"memory_budget=-5 must be an integer >= 1"),
    "steps_zero": (lambda c: hp.attribution_sweep(c.model, c.prompts, c.metric, steps=0, **QUIET), r"steps=0 must be a positive integer"),
    "steps_per_pass_zero": (lambda c: hp.attribution_sweep(c.model, c.prompts, c.metric, steps=4, steps_per_pass=0, **QUIET), r"steps_per_pass=0 must be a positive integer"),
    "compare_k_zero": (lambda c: hp.compare(c.model, c.prompts, c.metric, "z", by=("layer", "head"), k=0, **QUIET), r"k=0 must be an integer >= 1"),
    "compare_k_too_big": (lambda c: hp.compare(c.model, c.prompts, c.metric, "z", by=("layer", "head"), k=9, **QUIET), r"k=9 must be an integer from 1 to the number of cells \(8\)"),
    "compare_level": (lambda c: hp.compare(c.model, c.prompts, c.metric, level=1.5, **QUIET), r"level=1.5 must be in \(0, 1\)"),
    "compare_level_nan": (lambda c: hp.compare(c.model, c.prompts, c.metric, level=math.nan, **QUIET), r"level=nan must be in \(0, 1\)"),
    "compare_n_resamples": (lambda c: hp.compare(c.model, c.prompts, c.metric, n_resamples=0, **QUIET), r"n_resamples=0 must be a positive integer"),
    "compare_sign_tol": (lambda c: hp.compare(c.model, c.prompts, c.metric, sign_tol=-1.0, **QUIET), r"sign_tol=-1.0 must be >= 0"),
    "predictions_k": (lambda c: hp.predictions(c.model, "Mary went to the", k=0), r"k=0 must be an integer >= 1"),
    "dla_neuron_layer": (lambda c: dla_by_neuron(c.model, c.prompts, c.metric, 7), r"layer 7 is out of range"),
    "dla_nonlinear": (lambda c: hp.dla_by_component(c.model, c.prompts, hp.AnswerLoss(c.prompts)), r"DLA needs a metric linear in the residual stream; loss is not"),
    # Answers, prompts and texts.
    "answer_not_single_token": (lambda c: hp.predictions(c.model, "Mary went to the", " store park"), r"answer ' store park' is not a single token"),
    "answers_count": (lambda c: hp.make_prompt_set(c.model, CLEAN, CORRUPTED, ANSWERS[:2]), r"got 4 clean prompts, 4 corrupted prompts and 2 answer pairs"),
    "prompt_as_string": (lambda c: hp.make_prompt_set(c.model, CLEAN[0], CORRUPTED[0], ANSWERS[:1]), r"clean= must be a list of prompts; got one string"),
    "select_out_of_range": (lambda c: c.prompts.select([0, 4]), r"prompt index 4 is out of range for 4 prompts"),
    "unknown_word": (lambda c: hp.make_prompt_set(c.model, ["Mary went to Zanzibar"], ["John went to Zanzibar"], ANSWERS[:1]), r"outside the model's vocabulary"),
    # The model in train mode, even one sub-module of it.
    "train_mode_block_bridge": (lambda c: _in_train_mode(c.model.blocks[0], lambda: hp.patch_sweep(c.model, c.prompts, c.metric, fast=False, **QUIET))(), r"model= is in train mode \('blocks.0'.*call model.eval\(\)"),
    "train_mode_block_attribution": (lambda c: _in_train_mode(c.model.blocks[1].attn, lambda: hp.attribution_sweep(c.model, c.prompts, c.metric, **QUIET))(), r"model= is in train mode \('blocks.1.attn'"),
    "train_mode_dla": (lambda c: _in_train_mode(c.model.blocks[0].mlp, lambda: hp.dla_by_head(c.model, c.prompts, c.metric))(), r"train mode"),
    # Hook sources of the wrong shape, or not one tensor.
    "hook_source_wrong_component": (lambda c: patch_hook(c.model, "z", 1, c.cache["blocks.1.hook_resid_pre"], heads=0), r"source= has shape \(4, 6, 64\) but 'z' activations .* \[batch, pos, head=4, d_head=16\]"),
    "hook_source_query_heads_for_k": (lambda c: patch_hook(c.llama, "k", 0, c.llama_cache["blocks.0.attn.hook_z"]), r"source= has shape \(4, 6, 4, 16\) but 'k' .* kv_head=2"),
    "hook_reference_wrong_shape": (lambda c: ablate_hook(c.model, "resid_pre", 0, c.cache["blocks.0.hook_resid_pre"][0], how="mean"), r"reference= has shape \(6, 64\)"),
    "hook_head_out_of_range": (lambda c: patch_hook(c.model, "z", 0, c.cache["blocks.0.attn.hook_z"], heads=[4]), r"head 4 is out of range for 'z'"),
    "hook_heads_on_resid": (lambda c: patch_hook(c.model, "resid_pre", 0, c.cache["blocks.0.hook_resid_pre"], heads=0), r"has no heads; drop heads="),
    "hook_position_name_without_prompts": (lambda c: patch_hook(c.model, "resid_pre", 0, c.cache["blocks.0.hook_resid_pre"], positions="END"), r"position name 'END' needs the prompt set; pass prompts="),
    "lens_top_k": (lambda c: logit_lens_top_tokens(c.model, c.prompts, k=0), r"k=0 must be an integer >= 1"),
    "lens_top_prompt": (lambda c: logit_lens_top_tokens(c.model, c.prompts, prompt=5), r"prompt index 5 is out of range for 4 prompts"),
    "unembed_bias_unknown_word": (lambda c: unembed_bias(c.model, " she", " zzzqq"), r"outside the model's vocabulary: \[' zzzqq'\]"),
    # Task builders and models.
    "ioi_corruption": (lambda c: hp.ioi_prompts(c.model, 4, corruption="nope"), r"unknown corruption 'nope'"),
    "ioi_no_prompts": (lambda c: hp.ioi_prompts(c.model, 0), r"n=0: ask for at least one prompt"),
    "pronoun_too_many": (lambda c: hp.pronoun_prompts(c.model, n=1000), r"n=1000 but there are 20 distinct prompts"),
    "tiny_family": (lambda c: hp.tiny_model("gpt3"), r"unknown family 'gpt3'"),
    "load_missing_directory": (lambda c: hp.load_model("/nonexistent/dir/x"), r"no checkpoint directory at '/nonexistent/dir/x'"),
    # Devices and the command line's up-front checks.
    "device_unknown": (lambda c: hp.load_model("organism", device="gpu"), r"device='gpu' is not a torch device"),
    "report_task": (lambda c: check_arguments("pronouns", None), r"unknown task 'pronouns'"),
    "report_n_prompts": (lambda c: check_arguments("ioi", 0), r"--n-prompts 0: ask for at least one prompt"),
    "report_out_directory": (lambda c: check_arguments("ioi", None, "/"), r"cannot write the report to /"),
    "report_device": (lambda c: check_arguments("ioi", None, None, "gpu"), r"--device='gpu' is not a torch device"),
}


# Wrong types that the test-time type checker (jaxtyping + beartype on hookpatch's annotations)
# would stop first; a user has no such checker, so these run without it, as the user sees them.
USER_CASES = {
    "float_tokens_promptset": (lambda c: dataclasses.replace(c.prompts, clean_tokens=c.prompts.clean_tokens.float()), r"clean_tokens= must be a tensor of integer token ids; got torch.float32"),
    "answers_not_pairs": (lambda c: hp.make_prompt_set(c.model, CLEAN[:1], CORRUPTED[:1], [(" she", " he", " it")]), r"must be a \(correct, incorrect\) pair"),
    "hook_source_whole_cache": (lambda c: patch_hook(c.model, "resid_pre", 1, c.cache), r"source= must be one activation tensor shaped \[batch, pos, d_model=64\].*got ActivationCache"),
    "hook_source_int": (lambda c: patch_hook(c.model, "resid_pre", 0, c.cache["blocks.0.hook_resid_pre"].long()), r"source= holds torch.int64"),
    "prompts_as_list": (lambda c: hp.patch_sweep(c.model, CLEAN, c.metric, **QUIET), r"prompts= must be a PromptSet .*got list"),
    "metric_as_string": (lambda c: hp.attribution_sweep(c.model, c.prompts, "logit_diff", **QUIET), r"metric= must be a Metric such as LogitDiff\(prompts\).*got str"),
    "logits_not_tensor": (lambda c: c.metric([[0.0] * 8] * 4), r"logit_diff expects logits= as a float tensor .*got list"),
    "normalized_base_not_metric": (lambda c: hp.Normalized.from_model(c.model, "logit_diff"), r"base= must be a Metric .*got str"),
    "predictions_prompt_list": (lambda c: hp.predictions(c.model, ["Mary went to the"]), r"prompt= must be the prompt text \(a str\); got list"),
    "compare_steps_zero": (lambda c: hp.compare(c.model, c.prompts, c.metric, "z", by=("layer", "head"), steps=0, **QUIET), r"steps=0 must be a positive integer"),
    "normalized_base_not_a_metric": (lambda c: hp.Normalized(lambda logits: logits[..., 0, 0], 1.0, 0.0), r"base= must be a hookpatch Metric"),
    "compare_results_ablation": (lambda c: compare_results(hp.ablation_sweep(c.model, c.prompts, c.metric, "z", **QUIET),
                                                           hp.attribution_sweep(c.model, c.prompts, c.metric, "z", by=("layer", "head"), **QUIET)),
                                 r"activation= must be an activation-patching result \(patch_sweep\); got a 'zero ablation' result"),
    "steps_float": (lambda c: hp.attribution_sweep(c.model, c.prompts, c.metric, steps=1.5, **QUIET), r"steps=1.5 must be a positive integer"),
    "compare_k_float": (lambda c: hp.compare(c.model, c.prompts, c.metric, k=2.5, **QUIET), r"k=2.5 must be an integer >= 1"),
    "compare_level_string": (lambda c: hp.compare(c.model, c.prompts, c.metric, level="high", **QUIET), r"level='high' must be in \(0, 1\)"),
    "layer_string": (lambda c: dla_by_neuron(c.model, c.prompts, c.metric, "1"), r"layer '1' must be an integer from 0 to 1"),
    "memory_budget_float": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, memory_budget=1e9, **QUIET), r"memory_budget=1000000000.0 must be an integer"),
    "by_not_axes": (lambda c: hp.patch_sweep(c.model, c.prompts, c.metric, by=3, **QUIET), r"by=3 must name grid axes"),
    "load_model_of_a_model": (lambda c: hp.load_model(c.model), r"name_or_path= must be a model name or a checkpoint directory; got TransformerBridge"),
}


@contextlib.contextmanager
def without_type_checker():
    """Switch the test-time jaxtyping/beartype checks off, as they are for every user."""
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)


@pytest.mark.parametrize("case", list(CASES) + list(USER_CASES))
def test_bad_input_is_refused_cleanly(ctx, case):
    call, match = CASES[case] if case in CASES else USER_CASES[case]
    with without_type_checker() if case in USER_CASES else contextlib.nullcontext():
        refused([ctx.model, ctx.llama], lambda: call(ctx), match, *_tensors(ctx.prompts),
                *_tensors(ctx.llama_prompts), *ctx.cache.values(), *ctx.llama_cache.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line_and_status_2(ctx, tmp_path, capsys):
    refused(ctx.model, lambda: hp.load_model("organism", device="cuda"), r"device='cuda' but this machine has no CUDA GPU")
    out = tmp_path / "r.html"
    assert cli_main(["report", "pronoun", "--device", "cuda", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err and "Traceback" not in err and not out.exists()


def test_report_checks_everything_before_loading(monkeypatch, tmp_path):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("hookpatch.model._loading.load_model", no_load)
    for kwargs, match in [
        ({"task": "nope"}, "unknown task"),
        ({"n_prompts": 0}, "at least one prompt"),
        ({"out": tmp_path / "missing" / "r.html"}, "cannot write the report"),
        ({"device": "gpu"}, "not a torch device"),
    ]:
        args = {"task": "pronoun", "model_name": "organism", "out": tmp_path / "r.html", **kwargs}
        with pytest.raises(HookpatchError, match=match):
            run_report(**args)


# ---------------------------------------------------------------------------- saved results


def test_load_refuses_truncated_and_pickled_results(ctx, tmp_path):
    result = hp.patch_sweep(ctx.model, ctx.prompts, ctx.metric, layers=[1], positions=[1, 2], **QUIET)
    good = tmp_path / "good.pt"
    result.save(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pickled = tmp_path / "pickled.pt"
    torch.save(result, pickled)
    other = tmp_path / "other.pt"
    torch.save({"values": torch.zeros(2)}, other)
    for path in (truncated, pickled, other, tmp_path / "missing.pt"):
        refused(ctx.model, functools.partial(hp.SweepResult.load, path), rf"path='{path}'.*result\.save\(path\)")
    assert torch.equal(hp.SweepResult.load(good).values, result.values)


# ---------------------------------------------------------------------------- faults mid-run


def _fails_on_call(n, error, prompts):
    """A metric that works until its ``n``-th call, then raises ``error``."""
    base, calls = hp.LogitDiff(prompts), {"n": 0}

    def metric(logits):
        calls["n"] += 1
        if calls["n"] >= n:
            raise error
        return base(logits)

    return metric


FAULTS = {  # a run, and the metric call that fails: the first one after the unpatched baselines
    "patch_bridge": (3, lambda c, m: hp.patch_sweep(c.model, c.prompts, m, fast=False, memory_budget=1, **QUIET)),
    "patch_fast": (3, lambda c, m: hp.patch_sweep(c.model, c.prompts, m, "z", by=("layer", "head"), fast=True, memory_budget=1, **QUIET)),
    "ablation": (3, lambda c, m: hp.ablation_sweep(c.model, c.prompts, m, how="mean", memory_budget=1, **QUIET)),
    "attribution": (2, lambda c, m: hp.attribution_sweep(c.model, c.prompts, m, "z", by=("layer", "head"), **QUIET)),
    "integrated_gradients": (4, lambda c, m: hp.attribution_sweep(c.model, c.prompts, m, steps=4, steps_per_pass=2, **QUIET)),
    # components whose hooks need a config flag: the sweep turns it on, so a fault must turn it off
    "patch_result_bridge": (3, lambda c, m: hp.patch_sweep(c.model, c.prompts, m, "result", fast=False, memory_budget=1, **QUIET)),
    "patch_q_input_fast": (3, lambda c, m: hp.patch_sweep(c.model, c.prompts, m, "q_input", by=("layer", "head"), fast=True, memory_budget=1, **QUIET)),
    "ablation_mlp_in": (3, lambda c, m: hp.ablation_sweep(c.model, c.prompts, m, "mlp_in", by=("layer",), how="mean", memory_budget=1, **QUIET)),
    "attribution_k_input": (2, lambda c, m: hp.attribution_sweep(c.model, c.prompts, m, "k_input", by=("layer", "head"), **QUIET)),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("error", [RuntimeError("metric failed midway"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_fault_mid_run_propagates_and_leaves_nothing_behind(ctx, fault, error):
    n, run = FAULTS[fault]
    metric = _fails_on_call(n, error, ctx.prompts)
    refused(ctx.model, lambda: run(ctx, metric), "midway" if isinstance(error, RuntimeError) else None,
            *_tensors(ctx.prompts), error=type(error))


def test_an_interrupt_in_a_user_hook_leaves_no_hook(ctx):
    name, hook = patch_hook(ctx.model, "resid_pre", 1, ctx.cache["blocks.1.hook_resid_pre"], positions=2)

    def interrupt(act, hook):
        raise KeyboardInterrupt

    refused(ctx.model, lambda: ctx.model.run_with_hooks(
        ctx.prompts.corrupted_tokens, fwd_hooks=[(name, hook), ("blocks.1.hook_resid_post", interrupt)]),
        None, *_tensors(ctx.prompts), *ctx.cache.values(), error=KeyboardInterrupt)


# ---------------------------------------------------------------------------- what is accepted


def test_integers_of_any_kind_are_integers(ctx):
    c = ctx
    base = hp.patch_sweep(c.model, c.prompts, c.metric, "z", by=("layer", "pos", "head"), layers=[1], positions=[1, 2], heads=[0, 3], **QUIET)
    for layers, positions, heads in [
        (1, [1, 2], [0, 3]),  # one int is one layer
        (np.int64(1), np.array([1, 2]), np.array([0, 3])),
        (torch.tensor([1]), torch.tensor([1, 2]), (np.int32(0), np.int64(3))),
        (range(1, 2), (1, np.int64(2)), torch.tensor([0, 3])),
    ]:
        again = hp.patch_sweep(c.model, c.prompts, c.metric, "z", by=("layer", "pos", "head"), layers=layers,
                               positions=positions, heads=heads, **QUIET)
        assert torch.equal(again.values, base.values) and again.labels == base.labels
    everything = hp.patch_sweep(c.model, c.prompts, c.metric, layers=np.arange(2), **QUIET)
    assert torch.equal(everything.values, hp.patch_sweep(c.model, c.prompts, c.metric, **QUIET).values)
    seeded = hp.ablation_sweep(c.model, c.prompts, c.metric, how="resample", seed=np.int64(3), **QUIET)
    assert torch.equal(seeded.values, hp.ablation_sweep(c.model, c.prompts, c.metric, how="resample", seed=3, **QUIET).values)
    assert seeded.provenance.seed == 3 and type(seeded.provenance.seed) is int
    assert model_facts(c.model).check_layer(np.int64(1)) == 1 and model_facts(c.model).check_head("z", torch.tensor(2)) == 2
    name, hook = patch_hook(c.model, "z", np.int64(1), c.cache["blocks.1.attn.hook_z"], heads=np.int64(2), positions=np.int64(3))
    assert name == "blocks.1.attn.hook_z" and hook.keywords["mask"][0, :, :, 0].nonzero().tolist() == [[3, 2]]
    assert c.prompts.select(np.array([2, 0])).clean_prompts == (CLEAN[2], CLEAN[0])
    assert hp.predictions(c.model, "Mary went to the", k=np.int64(3)).top[2].rank == 2
    ig = hp.attribution_sweep(c.model, c.prompts, c.metric, "z", by=("layer", "head"), steps=np.int64(3),
                              steps_per_pass=torch.tensor(2), **QUIET)
    assert ig.provenance.steps == 3 and type(ig.provenance.steps) is int
    assert torch.equal(ig.values, hp.attribution_sweep(c.model, c.prompts, c.metric, "z", by=("layer", "head"),
                                                       steps=3, steps_per_pass=2, **QUIET).values)


def test_compare_default_k_fits_a_small_grid(ctx):
    c = ctx
    cmp = hp.compare(c.model, c.prompts, c.metric, "z", by=("layer", "head"), n_resamples=20, **QUIET)  # 8 heads
    assert cmp.k == 8 and cmp.top_k_overlap.value == 1.0
    again = compare_results(cmp.activation, cmp.attribution, k=np.int64(3), n_resamples=np.int64(20), seed=np.int64(0))
    assert again.k == 3 and type(again.k) is int


def test_position_names_in_any_iterable_are_accepted(ctx):
    c = ctx
    base = hp.patch_sweep(c.model, c.prompts, c.metric, positions=["END", 1], **QUIET)
    for positions in ({"END": 0, 1: 0}.keys(), (p for p in ("END", 1)), ("END", np.int64(1)), np.array(["END"])):
        again = hp.patch_sweep(c.model, c.prompts, c.metric, positions=positions, **QUIET)
        n = again.values.shape[1]
        assert torch.equal(again.values, base.values[:, :n]) and again.labels["pos"] == base.labels["pos"][:n]
    heads = hp.patch_sweep(c.model, c.prompts, c.metric, "z", by=("layer", "head"), **QUIET)
    assert hp.rank_heads(heads, k=np.int64(2)).equals(hp.rank_heads(heads, k=2))
    assert torch.equal(heads.effects(n_resamples=np.int64(50), seed=np.int64(1)).ci_low,
                       heads.effects(n_resamples=50, seed=1).ci_low)


def test_a_metric_on_an_equal_prompt_set_is_accepted(ctx):
    copy = hp.make_prompt_set(ctx.model, CLEAN, CORRUPTED, ANSWERS)  # equal tokens and answers, another object
    result = hp.patch_sweep(ctx.model, ctx.prompts, hp.LogitDiff(copy), layers=[1], **QUIET)
    assert torch.equal(result.values, hp.patch_sweep(ctx.model, ctx.prompts, ctx.metric, layers=[1], **QUIET).values)
