"""Edge attribution (EAP, EAP-IG) against finite differences of exact edge patching and a plain
autograd loop, on GPT-2, Llama (grouped-query attention), Qwen3 and Gemma 2.

EAP's score of an edge is the derivative at 0 of the metric under exact edge patching with
that edge scaled by a weight, so the central finite difference of real (weighted) edge
patching is its reference. The models run in float64 here, so the finite difference is
accurate (HuggingFace's RMSNorm still computes in float32, which bounds the step from below).
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from conftest import VARIANT_ARGS

from hookpatch import LogitDiff, load_model, pronoun_prompts
from hookpatch.circuits import graph
from hookpatch.circuits._attribution import edge_attribution
from hookpatch.circuits._edits import AddEdits
from hookpatch.circuits._engine import PathVariant, _add_edits
from hookpatch.circuits._patching import _Context
from hookpatch.errors import HookpatchError
from hookpatch.model._tiny import write_tiny_checkpoint

FAMILIES = ("gpt2", "llama", "qwen3", "gemma2")
_MODELS: dict[str, object] = {}


def float64_model(family: str):
    """The variant matrix's checkpoint of ``family``, loaded in float64 (built once)."""
    if family not in _MODELS:
        with tempfile.TemporaryDirectory(prefix="hookpatch-f64-") as tmp:
            write_tiny_checkpoint(tmp, family, **VARIANT_ARGS[family])
            _MODELS[family] = load_model(tmp, dtype=torch.float64)
    return _MODELS[family]


def weighted_edge_patch(model, prompts, metric, edge_indices, weights, direction="denoising"):
    """The metric under exact edge patching of single edges scaled by ``weights``, one variant
    each: ``[len(edge_indices), batch]``."""
    ctx = _Context.build(model, prompts, metric, None, False, direction)
    target, source = ("corrupted", "clean") if direction == "denoising" else ("clean", "corrupted")
    T, S = ctx.work.runs[target], ctx.work.runs[source]
    variants = [PathVariant(edges=(i,)) for i in edge_indices]
    mask = torch.ones(len(variants), len(prompts), prompts.n_pos, dtype=torch.bool)
    base = _add_edits(ctx.work, variants, T, S, mask)
    scale = torch.as_tensor(weights, dtype=torch.float64).view(-1, 1, 1)
    edits = AddEdits(model, base.senders, S.cache, T.cache,
                     {site: w.double() * scale for site, w in base.weights.items()}, base.pos_mask)
    return ctx.runner.run_edits(T, edits, ctx.metric).double()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_eap_is_the_derivative_of_exact_edge_patching(family, direction):
    model = float64_model(family)
    prompts = pronoun_prompts(model, n=3, seed=0)
    metric = LogitDiff(prompts)
    eap = edge_attribution(model, prompts, metric, direction=direction, progress=False)
    g = graph(model)
    assert eap.values.shape == (g.n_edges, len(prompts)) and eap.labels["edge"][0] == g.edges[0].label
    # edges of every receiver class (q, k, v, MLP, logits) and sender class
    picked = {}
    for i, e in enumerate(g.edges):
        picked.setdefault((e.sender.kind, e.receiver.input), []).append(i)
    index = [i for group in picked.values() for i in group[:: max(1, len(group) // 3)]]
    eps = 3e-3
    values = weighted_edge_patch(model, prompts, metric, index + index, [eps] * len(index) + [-eps] * len(index),
                                 direction)
    fd = (values[: len(index)] - values[len(index):]) / (2 * eps)  # [edge, batch]
    est = eap.values[index].double()
    scale = est.abs().max()
    assert scale > 1e-2
    torch.testing.assert_close(est, fd, atol=1e-3 * float(scale), rtol=1e-3)


def plain_gradient(model, tokens, shift, alpha, hook, head, metric):
    """d metric / d (one receiver's input) at input embeddings ``tokens' + alpha · shift``: a
    plain loop with ``retain_grad`` on the hooked tensor and the metric on the full logits."""
    kept = {}

    def interpolate(act, hook):
        return act + alpha * shift

    def keep(act, hook):
        act = act.clone()
        act.retain_grad()
        kept["x"] = act
        return act

    flags = {"hook_q_input": "use_split_qkv_input", "hook_k_input": "use_split_qkv_input",
             "hook_v_input": "use_split_qkv_input", "hook_mlp_in": "use_hook_mlp_in"}
    flag = next((f for suffix, f in flags.items() if hook.endswith(suffix)), None)
    if flag:
        getattr(model, f"set_{flag}")(True)
    try:
        with torch.enable_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", interpolate), (hook, keep)])
            metric(logits).sum().backward()
    finally:
        if flag:
            getattr(model, f"set_{flag}")(False)
        model.zero_grad(set_to_none=True)
    grad = kept["x"].grad
    return grad if head is None else grad[:, :, head]


def attention_out(model, layer, z):
    """A block's hook_attn_out from every head's z: W_O, b_O, then Gemma's post-attention norm."""
    block = model.blocks[layer]
    out = torch.einsum("bphd,hdm->bpm", z, block.attn.W_O)
    out = out if block.attn.b_O is None else out + block.attn.b_O
    post = getattr(block, "ln1_post", None)
    return out if post is None else post(out)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_eap_ig_equals_a_plain_autograd_loop(family):
    model = float64_model(family)
    prompts = pronoun_prompts(model, n=3, seed=0)
    metric = LogitDiff(prompts)
    steps = 3
    ig = edge_attribution(model, prompts, metric, method="eap-ig", steps=steps, progress=False)
    one = edge_attribution(model, prompts, metric, method="eap-ig", steps=1, progress=False)
    eap = edge_attribution(model, prompts, metric, progress=False)
    assert torch.equal(one.values, eap.values) and ig.provenance.method == "eap_ig" and ig.provenance.steps == 3
    g = graph(model)
    _, clean = model.run_with_cache(prompts.clean_tokens)
    _, corrupted = model.run_with_cache(prompts.corrupted_tokens)
    shift = clean["blocks.0.hook_resid_pre"] - corrupted["blocks.0.hook_resid_pre"]
    kv = "KV" if g.facts.grouped_query else "H"
    n = g.facts.n_layers
    checks = {  # receiver -> (hook, head index in the hooked tensor)
        "L1H2.q": ("blocks.1.hook_q_input", 2), f"L1{kv}1.k": ("blocks.1.hook_k_input", 1),
        f"L1{kv}0.v": ("blocks.1.hook_v_input", 0), "MLP1": ("blocks.1.hook_mlp_in", None),
        "logits": (f"blocks.{n - 1}.hook_resid_post", None),
    }
    for receiver, (hook, head) in checks.items():
        grad = sum(plain_gradient(model, prompts.corrupted_tokens, shift, k / steps, hook, head, metric)
                   for k in range(steps)) / steps  # [batch, pos, d_model]
        for e in g.edges_into(receiver):
            if e.sender.kind == "head":
                z = f"blocks.{e.sender.layer}.attn.hook_z"
                swapped = corrupted[z].clone()
                swapped[:, :, e.sender.head] = clean[z][:, :, e.sender.head]
                layer = e.sender.layer
                delta = attention_out(model, layer, swapped) - attention_out(model, layer, corrupted[z])
            elif e.sender.kind == "mlp":
                name = f"blocks.{e.sender.layer}.hook_mlp_out"
                delta = clean[name] - corrupted[name]
            else:
                delta = shift
            expected = (delta * grad).sum((-1, -2))  # [batch]
            got = ig.values[g.index(e)].double()
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=e.label)


def test_per_position_scores_sum_to_the_totals_and_identical_runs_give_zero(llama_model, small_prompts):
    prompts = small_prompts[id(llama_model)]
    metric = LogitDiff(prompts)
    total = edge_attribution(llama_model, prompts, metric, progress=False)
    by_pos = edge_attribution(llama_model, prompts, metric, per_position=True, progress=False)
    assert by_pos.axes == ("edge", "pos")
    torch.testing.assert_close(by_pos.values.sum(1), total.values, atol=1e-5, rtol=1e-5)
    same = prompts.select(list(range(len(prompts))))
    object.__setattr__(same, "corrupted_tokens", same.clean_tokens)
    zero = edge_attribution(llama_model, same, LogitDiff(same), method="eap-ig", steps=2, progress=False)
    assert torch.equal(zero.values, torch.zeros_like(zero.values))


def test_bad_input_and_nothing_left_behind(gpt2_model, small_prompts):
    prompts = small_prompts[id(gpt2_model)]
    with pytest.raises(HookpatchError, match="method"):
        edge_attribution(gpt2_model, prompts, LogitDiff(prompts), method="acdc", progress=False)
    with pytest.raises(HookpatchError, match="steps"):
        edge_attribution(gpt2_model, prompts, LogitDiff(prompts), method="eap-ig", steps=0, progress=False)
    with pytest.raises(HookpatchError, match="steps_per_job"):
        edge_attribution(gpt2_model, prompts, LogitDiff(prompts), method="eap-ig", steps_per_job=0, progress=False)
    with pytest.raises(HookpatchError, match="executor"):
        edge_attribution(gpt2_model, prompts, LogitDiff(prompts), method="eap-ig", executor=object, progress=False)
    gpt2_model.train()
    try:
        with pytest.raises(HookpatchError, match="eval"):
            edge_attribution(gpt2_model, prompts, LogitDiff(prompts), progress=False)
    finally:
        gpt2_model.eval()
    with pytest.raises(HookpatchError, match="differentiable"):
        edge_attribution(gpt2_model, prompts, lambda logits: logits[..., -1, :].argmax(-1).float(), progress=False)
    assert not gpt2_model.cfg.use_split_qkv_input and not gpt2_model.cfg.use_hook_mlp_in
    assert all(p.grad is None for p in gpt2_model.parameters())
