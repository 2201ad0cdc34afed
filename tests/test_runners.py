"""The engine's seams: runners (and the fast runner's probe), the one metric protocol,
picklable jobs and executors. Numbers are checked against a hand-written loop of single
run_with_hooks patches on the bridge."""

from __future__ import annotations

import pickle
import weakref

import pytest
import torch

import hookpatch.runners._fast_runner as fast_runner
from hookpatch.errors import HookpatchError
from hookpatch.hooks import ablate_hook
from hookpatch.metrics import LogitDiff
from hookpatch.metrics._base import CallableMetric, as_metric
from hookpatch.model import COMPONENTS, component_info, hook_flags, model_facts
from hookpatch.runners import BridgeRunner, FastRunner, InProcessExecutor, runner_for
from hookpatch.runners._bridge import _activation_bytes
from hookpatch.runners.fast import FastForward
from hookpatch.sweeps._engine import Source, plan_jobs, run_cells
from hookpatch.sweeps._patching import _Context, ablation_sweep, patch_sweep
from hookpatch.tasks import make_prompt_set

QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def prompts(gpt2_model, llama_model):
    def build(m):
        return make_prompt_set(
            m,
            ["Mary went to the store", "John went to the park", "Amy went to the shops"],
            ["John went to the store", "Mary went to the park", "Dan went to the shops"],
            [(" she", " he"), (" he", " she"), (" she", " he")],
        )
    return {id(m): build(m) for m in (gpt2_model, llama_model)}


def head_loop(model, prompts, metric, direction="denoising"):
    """One run_with_hooks per (layer, head) of z, overwriting that head with the other run's."""
    _, clean = model.run_with_cache(prompts.clean_tokens)
    _, corrupted = model.run_with_cache(prompts.corrupted_tokens)
    tokens, source = (
        (prompts.corrupted_tokens, clean) if direction == "denoising" else (prompts.clean_tokens, corrupted)
    )
    out = []
    for layer in range(model.cfg.n_layers):
        name = COMPONENTS["z"].hook_name(layer)
        for head in range(model.cfg.n_heads):
            def hook(act, hook, h=head, src=source[name]):
                act = act.clone()
                act[:, :, h] = src[:, :, h]
                return act
            with torch.no_grad():
                out.append(metric(model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])))
    return torch.stack(out).reshape(model.cfg.n_layers, model.cfg.n_heads, -1)


class ReverseExecutor:
    """Runs the jobs last to first (and returns the results in the jobs' order)."""

    def __init__(self):
        self.calls = 0

    def run(self, jobs, context, *, progress=True, desc="jobs"):
        self.calls += 1
        results = [job.run(context) for job in reversed(jobs)]
        return results[::-1]


def _sweep_jobs(model, prompts, metric, component, by, target, source):
    """A sweep cut into small jobs (a tiny memory budget): the context and the jobs."""
    ctx = _Context.build(model, prompts, metric, component, by, None, None, None, None, 1)
    return ctx, plan_jobs(ctx.work, component, ctx.cells, target, source, memory_budget=1)


@pytest.mark.parametrize("kind", ["patch", "resample"])
def test_jobs_pickle_and_unpickled_jobs_give_bit_identical_results(model, prompts, kind):
    prompts = prompts[id(model)]
    metric = LogitDiff(prompts)
    if kind == "patch":
        ctx, jobs = _sweep_jobs(model, prompts, metric, "z", ("layer", "head"), "corrupted", Source("clean"))
        reference = patch_sweep(model, prompts, metric, "z", by=("layer", "head"), memory_budget=1, **QUIET)
    else:
        ctx, jobs = _sweep_jobs(model, prompts, metric, "z", ("layer", "head"), "clean", Source("clean", "resample", 3))
        reference = ablation_sweep(model, prompts, metric, "z", how="resample", seed=3, memory_budget=1, **QUIET)
    assert len(jobs) == model.cfg.n_layers * model.cfg.n_heads  # one cell per job at this budget
    copies = [pickle.loads(pickle.dumps(job)) for job in jobs]
    assert copies == jobs and all(copy is not job for copy, job in zip(copies, jobs, strict=True))
    values = run_cells(ctx.work, copies, InProcessExecutor(), progress=False)
    assert torch.equal(values.reshape(reference.values.shape), reference.values)
    if kind == "patch":  # and the numbers are right
        assert torch.allclose(reference.values, head_loop(model, prompts, metric), atol=1e-4)
    else:
        loop = []
        _, cache = model.run_with_cache(prompts.clean_tokens)
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):
                name = COMPONENTS["z"].hook_name(layer)
                hook = ablate_hook(model, "z", layer, cache[name], how="resample", seed=3, heads=head)
                with torch.no_grad():
                    loop.append(metric(model.run_with_hooks(prompts.clean_tokens, fwd_hooks=[hook])))
        assert torch.allclose(reference.values.flatten(0, 1), torch.stack(loop), atol=1e-4)


@pytest.mark.parametrize("fast", [False, None])
def test_a_custom_executor_running_jobs_in_reverse_gives_identical_results(model, prompts, fast):
    prompts = prompts[id(model)]
    metric = LogitDiff(prompts)
    executor = ReverseExecutor()
    kw = dict(by=("layer", "head"), fast=fast, memory_budget=1, **QUIET)
    reverse = patch_sweep(model, prompts, metric, "z", executor=executor, **kw)
    default = patch_sweep(model, prompts, metric, "z", **kw)
    assert executor.calls == 1
    assert torch.equal(reverse.values, default.values)
    assert torch.allclose(reverse.values, head_loop(model, prompts, metric), atol=1e-4)


def test_a_bad_executor_is_refused(gpt2_model, prompts):
    p = prompts[id(gpt2_model)]
    with pytest.raises(HookpatchError, match=r"executor= must be an executor instance .*InProcessExecutor\(\)"):
        patch_sweep(gpt2_model, p, LogitDiff(p), executor=InProcessExecutor, **QUIET)
    with pytest.raises(HookpatchError, match=r"executor= must be an executor instance"):
        patch_sweep(gpt2_model, p, LogitDiff(p), executor=object(), **QUIET)


@pytest.mark.filterwarnings("ignore:run_with_cache. skipped .* gated-off hook")  # the other flags' hooks
@pytest.mark.parametrize("component", ["z", "result", "q_input", "mlp_in"])
def test_the_memory_estimate_covers_a_block_with_the_components_flag_on(model, prompts, component):
    """The planner's estimate of one forward's activations is at least what one block really
    materializes (distinct tensors of its cached hooks) with the swept component's flag on:
    the per-head copies of q_input/k_input/v_input and result outweigh the rest of a block."""
    p = prompts[id(model)]
    facts = model_facts(model)
    tokens = p.clean_tokens
    with torch.no_grad(), hook_flags(model, [component]):
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.startswith("blocks.0."))
    assert component_info(component).hook_name(0) in cache
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in cache.values()}
    assert _activation_bytes(facts, *tokens.shape, component) >= sum(storages.values())
    for runner in (BridgeRunner(model), FastRunner(model)):  # both plan with the swept component's hooks
        before = runner.bytes_per_variant(facts, LogitDiff(p), "resid_pre", *tokens.shape)
        extra = runner.bytes_per_variant(facts, LogitDiff(p), component, *tokens.shape) - before
        assert extra == 4 * tokens.numel() * facts.flagged_elements(component)


def test_runner_choice(gpt2_model):
    assert isinstance(runner_for(gpt2_model, None), FastRunner)
    assert isinstance(runner_for(gpt2_model, True), FastRunner)
    assert isinstance(runner_for(gpt2_model, False), BridgeRunner)


@pytest.fixture
def wrong_fast_path(monkeypatch):
    """The fast path's logits off by 1e-2, and no probe verdict cached yet."""
    monkeypatch.setattr(fast_runner, "_VERDICTS", weakref.WeakKeyDictionary())
    run = FastForward.run

    def off(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        return out + 1e-2 if kwargs.get("unembed", True) else out

    monkeypatch.setattr(FastForward, "run", off)


def test_a_fast_path_that_fails_the_probe_falls_back_to_the_bridge(model, prompts, wrong_fast_path):
    prompts = prompts[id(model)]
    metric = LogitDiff(prompts)
    reason = r"bridge's hooks instead of the fast path: .*differ from the bridge's by up to 0\.01"
    with pytest.warns(UserWarning, match=reason):
        result = patch_sweep(model, prompts, metric, "z", by=("layer", "head"), **QUIET)
    assert result.provenance.runner == "bridge"
    assert torch.allclose(result.values, head_loop(model, prompts, metric), atol=1e-4)
    with pytest.raises(HookpatchError, match=r"fast=True but on a 8-token probe the fast path's logits differ"):
        patch_sweep(model, prompts, metric, "z", by=("layer", "head"), fast=True, **QUIET)


def test_the_probe_runs_once_per_model_and_again_after_a_weight_edit(gpt2_model, monkeypatch):
    monkeypatch.setattr(fast_runner, "_VERDICTS", weakref.WeakKeyDictionary())
    calls = []
    compare = fast_runner._compare_logits
    monkeypatch.setattr(fast_runner, "_compare_logits", lambda m: calls.append(1) or compare(m))
    assert fast_runner.probe(gpt2_model) is None and fast_runner.probe(gpt2_model) is None
    assert len(calls) == 1
    weight = next(iter(gpt2_model.parameters()))
    with torch.no_grad():
        weight.add_(0.0)  # an in-place edit (same values): the verdict is checked again
    assert fast_runner.probe(gpt2_model) is None and len(calls) == 2


def test_a_plain_callable_is_wrapped_once_and_reads_every_position(model, prompts):
    prompts = prompts[id(model)]
    base = LogitDiff(prompts)

    def last_logit_diff(logits):
        return base(logits)

    metric = as_metric(last_logit_diff, prompts)
    assert isinstance(metric, CallableMetric) and as_metric(metric, prompts) is metric
    assert metric.name == "last_logit_diff" and not metric.linear
    assert metric.reads.tolist() == [list(range(prompts.n_pos))] * len(prompts)
    logits = model(prompts.clean_tokens)
    assert torch.equal(metric(logits), base(logits))
    for fast in (False, None):  # the callable through both runners equals the loop
        result = patch_sweep(model, prompts, last_logit_diff, "z", by=("layer", "head"), fast=fast, **QUIET)
        assert torch.allclose(result.values, head_loop(model, prompts, base), atol=1e-4)


def test_a_linear_metric_under_a_final_soft_cap_reads_the_capped_logits(gemma2_model):
    prompts = make_prompt_set(gemma2_model, ["Mary went to the store"], ["John went to the store"], [(" she", " he")])
    metric = LogitDiff(prompts)
    with torch.no_grad():
        logits = gemma2_model(prompts.clean_tokens)
        _, cache = gemma2_model.run_with_cache(prompts.clean_tokens, names_filter=["unembed.hook_in"])
    final = cache["unembed.hook_in"][torch.arange(1), prompts.end]  # [batch, d_model]
    uncapped = (final * metric.directions(gemma2_model)).sum(-1) + metric.bias(gemma2_model)
    assert not torch.allclose(uncapped, metric(logits), atol=1e-3)  # the cap bends these logits
    assert torch.allclose(metric.from_unembed_input(final, gemma2_model), metric(logits), atol=1e-4)
