"""The circuit graph, exact edge patching and path patching, against independent references.

References: TransformerLens 4.3's direct path patching (``get_act_patch_direct_path``) where it
supports the case, and the hand-written hook loops of ``tests/_circuit_refs.py`` (plain
``run_with_hooks`` on the bridge, written without hookpatch) everywhere else: grouped-query
key/value receivers, MLP and logit receivers, Qwen3 and Gemma 2, IOI-semantics path patching.
Every comparison runs on both runners (the fast path and the bridge's hooks).
"""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from _circuit_refs import ref_edge_patch, ref_path_patch
from transformer_lens import patching as tl_patching

from hookpatch import LogitDiff, Normalized
from hookpatch.circuits import Edge, Graph, edge_patch, graph, path_patch_sweep
from hookpatch.circuits._engine import CircuitJob, PathVariant
from hookpatch.circuits._graph import sends_to
from hookpatch.errors import HookpatchError
from hookpatch.tasks import pronoun_prompts

FAMILIES = ("gpt2", "llama", "qwen3", "gemma2")
TOL = 1e-4
_PROMPTS: dict[int, object] = {}


@pytest.fixture(params=FAMILIES)
def circuit_model(request):
    """GPT-2, Llama (grouped-query attention), Qwen3 and Gemma 2 with random norm weights."""
    name = request.param
    return request.getfixturevalue(f"{name}_variant_model" if name in ("gpt2", "llama") else f"{name}_model")


def prompts_for(model):
    if id(model) not in _PROMPTS:
        _PROMPTS[id(model)] = pronoun_prompts(model, n=3, seed=0)
    return _PROMPTS[id(model)]


def random_edges(g: Graph, n: int, seed: int) -> list[Edge]:
    """``n`` edges drawn from every receiver class (q, k, v, MLP, logits) and sender class."""
    rng = random.Random(seed)
    by_kind: dict[str, list[Edge]] = {}
    for e in g.edges:
        by_kind.setdefault(e.receiver.input, []).append(e)
    picked = [rng.choice(edges) for edges in by_kind.values()]
    picked += rng.sample(list(g.edges), n - len(picked))
    return list(dict.fromkeys(picked))


# --------------------------------------------------------------------------- the graph


def test_graph_of_gpt2_and_gqa(gpt2_model, llama_model):
    g = graph(gpt2_model)  # 2 layers x 4 heads, MLPs
    assert len(g.senders) == 1 + 2 * (4 + 1) and len(g.receivers) == 2 * (3 * 4 + 1) + 1
    assert g.edge("L0H1->L1H3.k").label == "L0H1->L1H3.k"
    assert "L0H1->MLP0" in g and "MLP0->MLP0" not in g and "L1H0->L1H1.q" not in g
    n_into = {r.label: len(g.edges_into(r)) for r in g.receivers}
    assert n_into["L0H0.q"] == 1 and n_into["MLP0"] == 1 + 4 and n_into["L1H0.v"] == 1 + 4 + 1
    assert n_into["logits"] == len(g.senders)
    gq = graph(llama_model)  # 4 query heads, 2 KV heads
    assert {r.label for r in gq.receivers if r.layer == 1 and r.input in "kv"} == {
        "L1KV0.k", "L1KV1.k", "L1KV0.v", "L1KV1.v"}
    assert gq.query_heads("L1KV1.k") == (2, 3) and gq.query_heads("L1H2.q") == (2,)
    assert [r.label for r in gq.receivers_of("L1H3")] == ["L1H3.q", "L1KV1.k", "L1KV1.v"]
    assert pickle.loads(pickle.dumps(gq)).edges == gq.edges
    assert gq.n_edges == len(gq.edges)
    assert all(gq.edge_at(i) == e and gq.index(e) == i for i, e in enumerate(gq.edges))
    receivers, senders = gq.edge_ends(torch.arange(gq.n_edges))
    assert [(gq.senders[s], gq.receivers[r]) for s, r in zip(senders.tolist(), receivers.tolist(), strict=True)] == [
        (e.sender, e.receiver) for e in gq.edges]
    assert all(sends_to(e.sender, e.receiver) for e in gq.edges)
    assert len(gq.edges) == sum(sends_to(s, r) for s in gq.senders for r in gq.receivers)


@pytest.mark.parametrize(
    "edge, match",
    [
        ("L1H0->L0H2.q", "cannot read L1H0"),
        ("L1H0->L1H2.q", "cannot read L1H0"),
        ("MLP1->MLP1", "cannot read MLP1"),
        ("L0H0->L1H2.k", "KV heads"),
        ("L0H0->L1KV0.q", "query head"),
        ("L0H0->L7H0.q", "layers 0..1"),
        ("logits->MLP1", "not a node label|only receive"),
        ("L0H0", "not an edge"),
    ],
)
def test_bad_edges_are_refused(llama_model, edge, match):
    with pytest.raises(HookpatchError, match=match):
        graph(llama_model).edge(edge)


def test_parallel_blocks_are_refused(gpt2_model):
    cfg = gpt2_model.cfg
    before = getattr(cfg, "parallel_attn_mlp", False)
    cfg.parallel_attn_mlp = True
    try:
        with pytest.raises(HookpatchError, match="parallel"):
            graph(gpt2_model)
    finally:
        cfg.parallel_attn_mlp = before


# --------------------------------------------------------------------------- edge patching


@pytest.mark.parametrize("fast", [True, False])
def test_edge_patching_equals_a_hook_loop(circuit_model, fast):
    """Random edge sets over every receiver class, on all positions and on named ones, in
    both directions, against the hand-written loop (senders' outputs in the patched forward)."""
    model, prompts = circuit_model, prompts_for(circuit_model)
    metric = LogitDiff(prompts)
    g = graph(model)
    sets = [random_edges(g, 12, seed) for seed in range(3)] + [list(g.edges)]
    for direction, (target, source) in {"denoising": (prompts.corrupted_tokens, prompts.clean_tokens),
                                        "noising": (prompts.clean_tokens, prompts.corrupted_tokens)}.items():
        res = edge_patch(model, prompts, metric, edge_sets=sets, direction=direction, fast=fast)
        for values, edges in zip(res.values, sets, strict=True):
            ref = ref_edge_patch(model, target, source, [e.label for e in edges], metric, recompute_senders=True)
            torch.testing.assert_close(values, ref, atol=TOL, rtol=0)
    # every edge patched gives the source run exactly; positions restrict where edges act
    torch.testing.assert_close(res.values[-1], res.corrupted, atol=TOL, rtol=0)  # noising: the source is corrupted
    name = prompts.position("NAME")
    at = edge_patch(model, prompts, metric, sets[0], positions=["NAME", 1], fast=fast)
    ref = ref_edge_patch(model, prompts.corrupted_tokens, prompts.clean_tokens, [e.label for e in sets[0]], metric,
                         positions=torch.stack([name, torch.ones_like(name)], -1), recompute_senders=True)
    torch.testing.assert_close(at.values[0], ref, atol=TOL, rtol=0)


def test_edge_patching_changes_the_metric(gpt2_variant_model):
    """The comparisons above are not between unchanged runs: single edges move the metric."""
    prompts = prompts_for(gpt2_variant_model)
    g = graph(gpt2_variant_model)
    res = edge_patch(gpt2_variant_model, prompts, LogitDiff(prompts), edge_sets=[[e] for e in g.edges_into("logits")])
    assert (res.values - res.corrupted).abs().max() > 1e-2


def test_sweeps_starting_with_head_inputs_equal_a_hook_loop(circuit_model):
    """Every variant's first edits are q/k/v inputs of one block (the fast path then runs only
    the edited heads' attention there): key and value inputs of KV heads, at named positions."""
    model, prompts = circuit_model, prompts_for(circuit_model)
    metric = LogitDiff(prompts)
    g = graph(model)
    kv = "KV" if g.facts.grouped_query else "H"
    receivers = [f"L1{kv}1.k", f"L1{kv}0.v", "L1H2.q"]
    res = path_patch_sweep(model, prompts, metric, receivers, by=("sender",), receiver_positions=["NAME", "END"],
                           progress=False)
    columns = torch.stack([prompts.position("NAME"), prompts.position("END")], -1)
    for sender, values in zip(res.labels["sender"], res.values, strict=True):
        edges = [f"{sender}->{r}" for r in receivers]
        ref = ref_edge_patch(model, prompts.corrupted_tokens, prompts.clean_tokens, edges, metric,
                             positions=columns, recompute_senders=True)
        torch.testing.assert_close(values, ref, atol=TOL, rtol=0, msg=sender)


@pytest.mark.parametrize("component", ["q", "k", "v"])
@pytest.mark.parametrize("fast", [True, False])
def test_direct_path_sweep_equals_transformerlens(gpt2_variant_model, component, fast):
    """Every sender head into one receiver head's q, k or v: TransformerLens 4.3's direct path
    patching (one forward per pair; its metric is the batch mean)."""
    model = gpt2_variant_model
    prompts = prompts_for(model)
    metric = LogitDiff(prompts)
    _, clean_cache = model.run_with_cache(prompts.clean_tokens)
    _, corrupted_cache = model.run_with_cache(prompts.corrupted_tokens)
    expected = tl_patching.get_act_patch_direct_path_all_sources(
        model, prompts.corrupted_tokens, clean_cache, corrupted_cache, lambda logits: metric(logits).mean(),
        component=component, verbose=False,
    )  # [src_layer, src_head, dst_layer, dst_head]
    res = path_patch_sweep(model, prompts, metric, f"L1H2.{component}", fast=fast, progress=False)
    assert res.axes == ("layer", "head") and res.labels["layer"] == ("0",)
    torch.testing.assert_close(res.values.mean(-1)[0], expected[0, :, 1, 2], atol=TOL, rtol=0)


# --------------------------------------------------------------------------- path patching


@pytest.mark.parametrize("fast", [True, False])
def test_ioi_path_patching_equals_three_runs(circuit_model, fast):
    """IOI-semantics path patching (senders patched, other heads frozen, MLPs recomputed or
    frozen; receivers' inputs recorded, then patched) equals a plain three-run loop, for head,
    MLP and logit receivers, with sender and receiver positions."""
    model, prompts = circuit_model, prompts_for(circuit_model)
    metric = LogitDiff(prompts)
    g = graph(model)
    kv = "L1KV0" if g.facts.grouped_query else "L1H0"
    receivers = ["L1H1.q", f"{kv}.k", f"{kv}.v", "MLP1", "logits"]
    for freeze in (False, True):
        res = path_patch_sweep(model, prompts, metric, receivers, by=("sender",), semantics="ioi",
                               freeze_mlps=freeze, receiver_positions="END", fast=fast, progress=False)
        end = prompts.position("END").unsqueeze(-1)
        for sender, values in zip(res.labels["sender"], res.values, strict=True):
            reached = [r for r in receivers if f"{sender}->{r}" in g]
            ref = ref_path_patch(model, prompts.corrupted_tokens, prompts.clean_tokens, [sender], reached, metric,
                                 freeze_mlps=freeze, receiver_positions=end)
            torch.testing.assert_close(values, ref, atol=TOL, rtol=0, msg=f"{sender} freeze_mlps={freeze}")
    by_pos = path_patch_sweep(model, prompts, metric, "L1H1", receiver_input="q", by=("layer", "pos", "head"),
                              semantics="ioi", positions=["NAME", 0], fast=fast, progress=False)
    name = prompts.position("NAME").unsqueeze(-1)
    for h in range(g.facts.n_heads):
        ref = ref_path_patch(model, prompts.corrupted_tokens, prompts.clean_tokens, [f"L0H{h}"], ["L1H1.q"], metric,
                             sender_positions=name)
        torch.testing.assert_close(by_pos.values[0, 0, h], ref, atol=TOL, rtol=0)


def test_path_sweep_grids_agree(llama_variant_model):
    """A sweep by (layer, pos, head) with direct semantics equals edge patching of the same
    edges at each position; by (sender, receiver) equals single edges; noising works."""
    model = llama_variant_model
    prompts = prompts_for(model)
    metric = Normalized.from_model(model, LogitDiff(prompts))
    res = path_patch_sweep(model, prompts, metric, ["L1H0", "L1H3"], receiver_input="k",
                           by=("layer", "pos", "head"), positions=["NAME", 2], direction="noising", progress=False)
    assert res.labels["pos"] == ("NAME", res.labels["pos"][1]) and res.provenance.receivers == ("L1KV0.k", "L1KV1.k")
    for i, pos in enumerate(["NAME", 2]):
        for h in range(4):
            edges = [f"L0H{h}->L1KV0.k", f"L0H{h}->L1KV1.k"]
            one = edge_patch(model, prompts, metric, edges, positions=pos, direction="noising")
            torch.testing.assert_close(res.values[0, i, h], one.values[0], atol=TOL, rtol=0)
    pairs = path_patch_sweep(model, prompts, metric, ["MLP1", "logits"], by=("sender", "receiver"), progress=False)
    for s, sender in enumerate(pairs.labels["sender"]):
        for r, receiver in enumerate(pairs.labels["receiver"]):
            edge = f"{sender}->{receiver}"
            expected = edge_patch(model, prompts, metric, edge).values[0] if edge in graph(model) else pairs.corrupted
            torch.testing.assert_close(pairs.values[s, r], expected, atol=TOL, rtol=0)
    effects = res.effects()  # paired per-prompt changes against the clean run (noising)
    assert effects.baseline == "clean"


# --------------------------------------------------------------------------- the seams


def test_jobs_pickle_and_any_executor_order_gives_the_same(gpt2_model, small_prompts):
    prompts = small_prompts[id(gpt2_model)]
    metric = LogitDiff(prompts)

    class Reversed:
        def run(self, jobs, context, *, progress=True, desc=""):
            for job in jobs:
                assert pickle.loads(pickle.dumps(job)) == job
            return [job.run(context) for job in reversed(jobs)][::-1]

    kw = dict(by=("sender",), semantics="ioi", memory_budget=1, progress=False)
    a = path_patch_sweep(gpt2_model, prompts, metric, "L1H0", receiver_input="q", **kw)
    b = path_patch_sweep(gpt2_model, prompts, metric, "L1H0", receiver_input="q", executor=Reversed(), **kw)
    assert torch.equal(a.values, b.values) and a.provenance.semantics == "ioi"
    job = CircuitJob("direct", "corrupted", "clean", (PathVariant(edges=(0, 1)),), (0,))
    assert pickle.loads(pickle.dumps(job)) == job


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(receivers="L0H1", receiver_input="q"), "no sender"),
        (dict(receivers="L1H1", receiver_input="q", layers=[1]), "at or after every receiver"),
        (dict(receivers="L1H1.k"), "KV heads"),
        (dict(receivers="L1H1", receiver_input="z"), "receiver_input"),
        (dict(receivers="L1H1.q", semantics="nope"), "semantics"),
        (dict(receivers="L1H1.q", freeze_mlps=True), "only applies"),
        (dict(receivers="L1H1.q", by=("pos",)), "by="),
        (dict(receivers="L1H1.q", receiver_positions="XYZ"), "XYZ"),
        (dict(receivers=None), "receivers= is needed"),
        (dict(receivers="MLP1", receiver_input="q"), "MLP"),
    ],
)
def test_bad_sweep_input_is_refused(llama_model, small_prompts, kwargs, match):
    prompts = small_prompts[id(llama_model)]
    receivers = kwargs.pop("receivers")
    with pytest.raises(HookpatchError, match=match):
        path_patch_sweep(llama_model, prompts, LogitDiff(prompts), receivers, progress=False, **kwargs)
    assert not llama_model.cfg.use_split_qkv_input and not llama_model.cfg.use_hook_mlp_in


def test_edge_patch_input_checks(gpt2_model, small_prompts):
    prompts = small_prompts[id(gpt2_model)]
    with pytest.raises(HookpatchError, match="exactly one"):
        edge_patch(gpt2_model, prompts, LogitDiff(prompts))
    with pytest.raises(HookpatchError, match="not in the graph"):
        edge_patch(gpt2_model, prompts, LogitDiff(prompts), ["L1H0->L0H0.q"])
    res = edge_patch(gpt2_model, prompts, LogitDiff(prompts), [], fast=False)  # nothing patched: the run itself
    torch.testing.assert_close(res.values[0], res.corrupted, atol=1e-5, rtol=0)
    assert not gpt2_model.cfg.use_split_qkv_input and not gpt2_model.cfg.use_hook_mlp_in


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_ablating_every_edge_equals_ablating_every_sender(model, small_prompts, ablation):
    """Every edge zero- or mean-ablated: each receiver reads only the ablated senders' outputs,
    which is the clean run with the embeddings, every head's z and every MLP's output replaced
    (a plain hook loop on the bridge)."""
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    g = graph(model)
    res = edge_patch(model, prompts, metric, list(g.edges), direction="noising", ablation=ablation)
    assert res.provenance.ablation == ablation
    _, cache = model.run_with_cache(prompts.corrupted_tokens)  # noising: the other run is corrupted
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{layer}.{point}" for layer in range(g.facts.n_layers)
                                            for point in ("attn.hook_z", "hook_mlp_out")]

    def replace(act, hook):
        value = cache[hook.name].mean(0, keepdim=True) if ablation == "mean" else torch.zeros_like(act[:1])
        return value.expand_as(act).clone()

    logits = model.run_with_hooks(prompts.clean_tokens, fwd_hooks=[(n, replace) for n in names])
    torch.testing.assert_close(res.values[0], metric(logits), atol=TOL, rtol=0)
    with pytest.raises(HookpatchError, match="ablation"):
        edge_patch(model, prompts, metric, list(g.edges)[:3], ablation="resample")
