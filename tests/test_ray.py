"""The Ray executor on a local 2-CPU cluster: results equal the in-process executor's bit for
bit (at one torch thread, as the workers run), a worker killed mid-run changes nothing, and a
job that fails raises the in-process error once."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from hookpatch import ablation_sweep, patch_sweep
from hookpatch.attribution import attribution_sweep
from hookpatch.circuits import compare_edges, edge_attribution, edge_patch, faithfulness_curve, graph, path_patch_sweep
from hookpatch.errors import HookpatchError
from hookpatch.metrics import LogitDiff
from hookpatch.model import load_spec, tiny_model

ray = pytest.importorskip("ray")

from hookpatch.runners import RayExecutor  # noqa: E402

BUDGET = 300_000  # small, so each call is several jobs spread over both workers


@pytest.fixture(scope="module")
def executor():
    started = not ray.is_initialized()
    ex = RayExecutor(workers=2, init_kwargs={"num_cpus": 2, "object_store_memory": 100 * 1024**2})
    yield ex
    ex.shutdown()
    if started and ray.is_initialized():
        ray.shutdown()


@contextmanager
def one_thread():
    """The driver at the workers' thread count, so reductions split the same way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def both(executor, fn):
    """``fn(executor)`` on the cluster and ``fn(None)`` in process."""
    with one_thread():
        local = fn(None)
    return fn(executor), local


def test_sweeps_equal_in_process(executor, model, small_prompts):
    """GPT-2 and Llama (grouped-query: v heads are KV heads), query and KV head grids."""
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    for component, by in (("z", ("layer", "pos", "head")), ("resid_pre", ("layer", "pos")), ("v", ("layer", "head"))):
        remote, local = both(executor, lambda ex, c=component, b=by: patch_sweep(
            model, prompts, metric, c, by=b, memory_budget=BUDGET, executor=ex, progress=False))
        assert torch.equal(remote.values, local.values), component
        assert remote.labels == local.labels and remote.provenance == local.provenance
    remote, local = both(executor, lambda ex: ablation_sweep(
        model, prompts, metric, "z", how="mean", by=("layer", "head"), memory_budget=BUDGET, executor=ex,
        progress=False))
    assert torch.equal(remote.values, local.values)


def test_circuit_calls_equal_in_process(executor, gpt2_model, small_prompts):
    model, prompts = gpt2_model, small_prompts[id(gpt2_model)]
    metric = LogitDiff(prompts)
    g = graph(model)
    sets = [[g.edges[i]] for i in range(0, len(g.edges), 5)]
    for ablation in (None, "mean"):
        remote, local = both(executor, lambda ex, a=ablation: edge_patch(
            model, prompts, metric, edge_sets=sets, ablation=a, memory_budget=BUDGET, executor=ex, progress=False))
        assert torch.equal(remote.values, local.values), ablation
    remote, local = both(executor, lambda ex: path_patch_sweep(
        model, prompts, metric, receivers=["L1H0.q", "L1H2.v"], semantics="ioi", memory_budget=BUDGET, executor=ex,
        progress=False))
    assert torch.equal(remote.values, local.values)
    remote, local = both(executor, lambda ex: compare_edges(
        model, prompts, metric, n_top=4, n_random=4, executor=ex, progress=False, memory_budget=BUDGET))
    assert torch.equal(remote.activation.values, local.activation.values)
    scores = torch.linspace(-1, 1, len(g.edges))
    remote, local = both(executor, lambda ex: faithfulness_curve(
        model, prompts, metric, scores, budgets=(0.1, 0.5), executor=ex, progress=False, memory_budget=BUDGET))
    assert torch.equal(remote.values, local.values)


def test_killed_worker_is_retried(executor, gpt2_model, small_prompts, tmp_path):
    """The first worker to evaluate the metric kills its own process; Ray restarts the actor
    (loading the model again) and retries the job: the result is complete and unchanged."""
    model, prompts = gpt2_model, small_prompts[id(gpt2_model)]
    metric = LogitDiff(prompts)
    marker, driver = str(tmp_path / "died"), os.getpid()

    def dies_once_on_a_worker(logits):
        if os.getpid() != driver and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process dies mid-job
        return metric(logits)

    def run(ex):
        return patch_sweep(model, prompts, dies_once_on_a_worker, "z", by=("layer", "head"),
                           memory_budget=BUDGET, executor=ex, progress=False)

    remote, local = both(executor, run)
    assert os.path.exists(marker), "no worker died: the test did not test a retry"
    assert torch.equal(remote.values, local.values)
    # the pool is still whole afterwards
    again = patch_sweep(model, prompts, metric, "z", by=("layer", "head"), executor=executor, progress=False)
    assert again.values.shape == remote.values.shape


def test_failing_job_raises_the_in_process_error_once(executor, gpt2_model, small_prompts):
    """A metric that breaks only on stacked variants fails inside the jobs, not before them."""
    model, prompts = gpt2_model, small_prompts[id(gpt2_model)]
    metric = LogitDiff(prompts)

    def breaks_on_variants(logits):
        if logits.ndim > 3:
            raise HookpatchError("breaks_on_variants: no stacked variants, please (test failure)")
        return metric(logits)

    errors = []
    for ex in (None, executor):
        with pytest.raises(HookpatchError) as info:
            patch_sweep(model, prompts, breaks_on_variants, "z", by=("layer", "head"), memory_budget=BUDGET,
                        executor=ex, progress=False)
        errors.append(info.value)
    assert type(errors[0]) is type(errors[1]) and str(errors[0]) == str(errors[1])
    assert "stacked variants" in str(errors[1])


def test_changed_weights_are_refused(executor, small_prompts):
    """A worker loads the model from its load arguments; a model changed since is not it."""
    model = tiny_model("gpt2", n_layers=2, d_model=64, n_heads=4, d_mlp=128, norm_std=0.0)
    prompts = small_prompts[next(iter(small_prompts))]
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param.mul_(2.0)
    with pytest.raises(HookpatchError, match="not the caller's model"):
        patch_sweep(model, prompts, LogitDiff(prompts), "resid_pre", executor=executor, progress=False)


def test_model_without_load_record_is_refused_before_starting(gpt2_model, small_prompts):
    model, prompts = gpt2_model, small_prompts[id(gpt2_model)]
    spec = load_spec(model)
    ex = RayExecutor(workers=1)
    try:
        del model.hookpatch_load_spec
        with pytest.raises(HookpatchError, match="load_model or tiny_model"):
            patch_sweep(model, prompts, LogitDiff(prompts), "resid_pre", executor=ex, progress=False)
        assert ex._actors == []  # nothing was started
    finally:
        model.hookpatch_load_spec = spec


@pytest.mark.parametrize("kwargs, word", [({"workers": 0}, "workers"), ({"cpus_per_worker": 0}, "cpus_per_worker"),
                                          ({"gpus_per_worker": -1}, "gpus_per_worker")])
def test_bad_arguments(kwargs, word):
    with pytest.raises(HookpatchError, match=word):
        RayExecutor(**kwargs)


def test_more_workers_than_the_cluster_has(executor, gpt2_model, small_prompts):
    executor._start()  # the shared cluster is up
    model, prompts = gpt2_model, small_prompts[id(gpt2_model)]
    big = RayExecutor(workers=5)
    with pytest.raises(HookpatchError, match="has 2 CPUs"):
        patch_sweep(model, prompts, LogitDiff(prompts), "resid_pre", executor=big, progress=False)


def test_integrated_gradients_equal_in_process(executor, model, small_prompts):
    """Integrated gradients' per-site jobs on the workers; plain AtP stays in process."""
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    for component, by in (("resid_mid", ("layer", "pos")), ("result", ("layer", "head"))):
        remote, local = both(executor, lambda ex, c=component, b=by: attribution_sweep(
            model, prompts, metric, c, by=b, steps=4, steps_per_pass=3, executor=ex, progress=False))
        assert torch.equal(remote.values, local.values), component
        assert remote.provenance == local.provenance


def test_eap_ig_jobs_equal_in_process(executor, model, small_prompts):
    """EAP-IG's points after the first, one job each, on the workers."""
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    for per_position in (False, True):
        remote, local = both(executor, lambda ex, p=per_position: edge_attribution(
            model, prompts, metric, method="eap-ig", steps=4, steps_per_job=1, per_position=p, executor=ex,
            progress=False))
        assert torch.equal(remote.values, local.values), per_position


@pytest.mark.parametrize("numel", [1, 2, 15, 16, 17, 38597376, 2**31 + 7])
def test_weight_sample_indices_stay_inside(numel):
    """Evenly spaced, first and last included, never past the end (a float32 linspace is, at
    GPT-2's embedding size)."""
    from hookpatch.runners._ray import sample_index

    idx = sample_index(numel)
    assert idx.dtype == torch.long and len(idx) == min(16, numel)
    assert int(idx[0]) == 0 and int(idx[-1]) == numel - 1 and bool((idx[1:] > idx[:-1]).all())
