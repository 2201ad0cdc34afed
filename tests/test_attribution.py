"""Attribution patching and integrated gradients equal TransformerLens' own attribution
patching and gradient cache; IG converges to activation patching; exact where the metric is
linear; no side effects; bad inputs; and the comparison harness' statistics by hand."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from transformer_lens.tools.analysis.attribution_patching import (
    Node,
    attribution_patch,
    cache_activation_and_gradient,
)

from hookpatch.attribution import (
    attribution_sweep,
    compare,
    compare_results,
    integrated_gradients_sweep,
    site_attributions,
)
from hookpatch.attribution._compare import average_ranks
from hookpatch.attribution._jobs import IGContext
from hookpatch.attribution._sites import atp_gradients, ig_gradients
from hookpatch.errors import HookpatchError
from hookpatch.metrics import AnswerLoss, LogitDiff, Normalized
from hookpatch.model import COMPONENTS, model_facts
from hookpatch.sweeps import patch_sweep
from hookpatch.tasks import ioi_prompts, make_prompt_set

ATOL = 1e-5
CLEAN = ["Mary went to the store", "John went to the park", "Amy went to the shops", "Dan went to the bank"]
CORRUPTED = ["John went to the store", "Mary went to the park", "Dan went to the shops", "Amy went to the bank"]
ANSWERS = [(" she", " he"), (" he", " she"), (" she", " he"), (" he", " she")]


@pytest.fixture(scope="module")
def small_prompts(gpt2_model, llama_model):
    """Four short prompt pairs (6 tokens) per model."""
    return {id(m): make_prompt_set(m, CLEAN, CORRUPTED, ANSWERS) for m in (gpt2_model, llama_model)}


def runs(prompts, direction):
    """(tokens whose gradient is taken, tokens the patch comes from)."""
    if direction == "denoising":
        return prompts.corrupted_tokens, prompts.clean_tokens
    return prompts.clean_tokens, prompts.corrupted_tokens


def hook_count(model):
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())


def graphs_left(model):
    """Tensors that modules kept from the last forward and that still hold an autograd graph."""
    return [(name, key) for name, module in model.named_modules() for key, value in vars(module).items()
            if isinstance(value, torch.Tensor) and value.grad_fn is not None]


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_heads_and_mlp_equal_transformerlens_attribution_patch(model, small_prompts, direction):
    """TL 4.3's node-granularity attribution_patch scores attn heads (hook_z) and mlp_out per
    (layer, pos[, head]) for one prompt pair at a time (denoising; noising = swapped pair)."""
    prompts = small_prompts[id(model)]
    z = attribution_sweep(
        model, prompts, LogitDiff(prompts), "z", by=("layer", "pos", "head"), direction=direction, progress=False
    )
    mlp = attribution_sweep(model, prompts, LogitDiff(prompts), "mlp_out", direction=direction, progress=False)
    grad_run, source = runs(prompts, direction)
    facts = model_facts(model)
    for i in range(len(prompts)):
        one = LogitDiff(prompts.select([i]))
        tl = attribution_patch(
            model, source[i : i + 1], grad_run[i : i + 1], lambda logits, one=one: one(logits)[0]
        ).node_scores
        for layer in range(facts.n_layers):
            for pos in range(prompts.n_pos):
                assert mlp.values[layer, pos, i].item() == pytest.approx(tl[Node("mlp_out", pos, layer)], abs=ATOL)
                for head in range(facts.n_heads):
                    ref = tl[Node("attn_head_out", pos, layer, head)]
                    assert z.values[layer, pos, head, i].item() == pytest.approx(ref, abs=ATOL)


METRICS = {  # linear (read through directions), non-linear (read positions unembedded), plain callable (full logits)
    "logit_diff": LogitDiff,
    "answer_loss": AnswerLoss,
    "callable": lambda p: (lambda logits: LogitDiff(p)(logits) * logits[..., 0, 3]),
}


@pytest.mark.parametrize("kind", sorted(METRICS))
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_all_components_equal_transformerlens_gradient_cache(model, small_prompts, direction, kind):
    """Every component and grid against gradient × difference from TL's
    cache_activation_and_gradient (its backward-hook gradient capture), batched.

    At resid_mid TL's capture sees only the MLP branch: the hook point is ``ln2.hook_in``,
    and the residual skip reads the tensor before the hook point's output. Since
    resid_post = resid_mid + mlp_out, the total gradient there is TL's resid_mid gradient
    plus its resid_post gradient (the skip's share); tests/test_attribution_fd.py checks
    every site against finite differences of real patching."""
    prompts = small_prompts[id(model)]
    metric = METRICS[kind](prompts)
    facts = model_facts(model)
    grad_run, source = runs(prompts, direction)
    plain = {n: c for n, c in COMPONENTS.items() if c.flag is None}  # flagged ones: tests/test_components.py
    names = [c.hook_name(layer) for c in plain.values() for layer in range(facts.n_layers)]
    summed = lambda logits: metric(logits).sum()  # noqa: E731 - prompts do not interact
    base = cache_activation_and_gradient(model, grad_run, summed, names_filter=names)
    target = cache_activation_and_gradient(model, source, summed, names_filter=names, compute_gradient=False)
    for component, info in plain.items():
        per_layer = []
        for layer in range(facts.n_layers):
            name = info.hook_name(layer)
            grad = base.gradients[name]
            if component == "resid_mid":
                grad = grad + base.gradients[COMPONENTS["resid_post"].hook_name(layer)]
            elementwise = grad * (target.activations[name] - base.activations[name])
            per_layer.append(elementwise.sum(-1).transpose(1, 2) if component == "pattern" else elementwise.sum(-1))
        ref = torch.stack(per_layer).movedim(1, -1)  # [layer, pos(, head), batch]
        sweep = functools.partial(
            attribution_sweep, model, prompts, metric, component, direction=direction, progress=False
        )
        by_layer = sweep(by=("layer",))
        assert torch.allclose(by_layer.values, ref.flatten(1, -2).sum(1), atol=ATOL), component
        if info.head_axis is None:
            res = sweep()
            assert torch.allclose(res.values, ref, atol=ATOL), component
            continue
        by_pos_head = sweep(by=("layer", "pos", "head"))
        by_head = sweep(by=("layer", "head"))
        by_pos = sweep(by=("layer", "pos"))
        assert by_pos_head.values.shape == (facts.n_layers, prompts.n_pos, facts.n_heads_of(component), len(prompts))
        assert torch.allclose(by_pos_head.values, ref, atol=ATOL), component
        assert torch.allclose(by_head.values, ref.sum(1), atol=ATOL), component
        assert torch.allclose(by_pos.values, ref.sum(2), atol=ATOL), component


def test_integrated_gradients_steps_one_is_attribution_and_more_steps_converge(model, small_prompts):
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"]
    _, acts, grads = atp_gradients(model, prompts.corrupted_tokens, names, metric)
    _, clean = model.run_with_cache(prompts.clean_tokens)
    diffs = {n: clean[n] - acts[n] for n in names}
    context = IGContext(model, prompts.corrupted_tokens, diffs, metric)
    ig = ig_gradients(context, steps=1, steps_per_pass=8, progress=False)
    assert all(torch.equal(ig[n], grads[n]) for n in names)  # alpha = 0 is the corrupted run itself

    atp = attribution_sweep(model, prompts, metric, "z", by=("layer", "head"), progress=False)
    one = attribution_sweep(model, prompts, metric, "z", by=("layer", "head"), steps=1, progress=False)
    assert torch.equal(atp.values, one.values) and one.provenance.method == "attribution"
    ig = {
        n: attribution_sweep(
            model, prompts, metric, "z", by=("layer", "head"), steps=n, steps_per_pass=32, progress=False
        )
        for n in (4, 16, 32)
    }
    assert ig[32].provenance.method == "integrated_gradients" and ig[32].provenance.steps == 32
    wrapper = integrated_gradients_sweep(model, prompts, metric, "z", by=("layer", "head"), steps=4, progress=False)
    assert torch.allclose(wrapper.values, ig[4].values, atol=1e-6)  # steps_per_pass only batches
    assert not torch.allclose(ig[4].values, atp.values, atol=1e-3)
    gap_16_32 = (ig[16].values - ig[32].values).abs().max()
    assert gap_16_32 < 0.5 * (ig[4].values - ig[32].values).abs().max()
    assert gap_16_32 < 0.05 * ig[32].values.abs().max()
    # Completeness: a layer's attributions summed over heads converge to patching the whole site.
    whole = patch_sweep(model, prompts, metric, "z", by=("layer",), progress=False)
    effect = whole.values - whole.corrupted
    err = {n: (ig[n].values.sum(1) - effect).abs().max() for n in (4, 32)}
    assert err[32] < err[4] and err[32] < 0.05 * effect.abs().max()


@pytest.mark.parametrize("base", ["logit_diff", "normalized"])
def test_exact_where_the_metric_is_linear_in_the_patched_activation(model, small_prompts, base):
    """``unembed.hook_in`` is the residual after the final LayerNorm, read only by the unembed:
    logits = x W_U + b_U, and LogitDiff (and its normalized form) is linear in the logits. So
    patching x at END changes the metric by exactly gradient · (x_clean − x_corrupted), and IG
    gives the same (the gradient is constant along the path)."""
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts) if base == "logit_diff" else Normalized.from_model(model, LogitDiff(prompts))
    name = "unembed.hook_in"
    end = prompts.end
    rows = torch.arange(len(prompts))
    _, clean = model.run_with_cache(prompts.clean_tokens)

    def patch_end(act, hook):
        act = act.clone()
        act[rows, end] = clean[name][rows, end].to(act.dtype)
        return act

    with torch.no_grad():
        patched = metric(model.run_with_hooks(prompts.corrupted_tokens, fwd_hooks=[(name, patch_end)]))
        effect = patched - metric(model(prompts.corrupted_tokens))
    for steps in (1, 4):
        sa = site_attributions(model, prompts, metric, [name], steps=steps, progress=False)
        estimate = sa.attributions[name].sum(-1)[rows, end]
        assert torch.allclose(estimate, effect, atol=1e-4), (steps, estimate, effect)
        assert sa.attributions[name].sum(-1)[rows, end - 1].abs().max() == 0  # metric reads END only


def test_identical_inputs_give_zero_and_nothing_is_left_behind(model):
    same = make_prompt_set(model, CLEAN, CLEAN, ANSWERS)
    metric = AnswerLoss(same)
    tokens = same.clean_tokens.clone(), same.corrupted_tokens.clone()
    grad_flags = [p.requires_grad for p in model.parameters()]
    for component, by, steps in (("resid_pre", ("layer", "pos"), 1), ("v", ("layer", "pos", "head"), 1),
                                 ("pattern", ("layer", "head"), 1), ("mlp_out", ("layer", "pos"), 3)):
        res = attribution_sweep(model, same, metric, component, by=by, steps=steps, progress=False)
        assert torch.all(res.values == 0), component
    assert not model.training and hook_count(model) == 0 and graphs_left(model) == []
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == grad_flags
    assert torch.equal(same.clean_tokens, tokens[0]) and torch.equal(same.corrupted_tokens, tokens[1])

    calls = {"n": 0}

    def explodes(logits):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("metric failed midway")
        return metric(logits)

    with pytest.raises(RuntimeError, match="midway"):
        attribution_sweep(model, same, explodes, "z", steps=2, progress=False)
    assert hook_count(model) == 0 and all(p.grad is None for p in model.parameters())
    assert graphs_left(model) == []


def test_grouped_query_labels_info_and_named_positions(llama_model, gpt2_model, small_prompts):
    prompts = small_prompts[id(llama_model)]
    metric = LogitDiff(prompts)
    k = attribution_sweep(llama_model, prompts, metric, "k", by=("layer", "head"), progress=False)
    assert k.values.shape == (2, 2, 4) and k.labels["head"] == ("KV0", "KV1")
    assert k.provenance.grid.kv_head_feeds == (("KV0", ("H0", "H1")), ("KV1", ("H2", "H3")))
    assert k.cell_label((1, 1)) == "L1KV1"
    z = attribution_sweep(llama_model, prompts, metric, "z", by=("layer", "head"), direction="noising", progress=False)
    assert z.labels["head"] == ("H0", "H1", "H2", "H3") and z.provenance.grid.kv_head_feeds is None
    assert z.kind == "attribution_estimate" and z.provenance.method == "attribution"
    assert z.provenance.steps == 1 and z.provenance.direction == "noising"
    assert z.provenance.component == "z" and z.provenance.metric.name == "logit_diff"
    assert torch.allclose(z.clean, metric(llama_model(prompts.clean_tokens)), atol=1e-5)

    ioi = ioi_prompts(gpt2_model, 6, seed=4)  # padded: END differs per prompt
    assert ioi.padded
    ld = LogitDiff(ioi)
    res = attribution_sweep(gpt2_model, ioi, ld, "resid_pre", positions=["IO", "S2", "END", 1], progress=False)
    assert res.labels["pos"][:3] == ("IO", "S2", "END")
    per_pos = site_attributions(gpt2_model, ioi, ld, ["blocks.1.hook_resid_pre"], progress=False).attributions
    full = per_pos["blocks.1.hook_resid_pre"].sum(-1)
    rows = torch.arange(len(ioi))
    for j, name in enumerate(["IO", "S2", "END"]):
        assert torch.allclose(res.values[1, j], full[rows, ioi.position(name)], atol=ATOL)
    assert torch.allclose(res.values[1, 3], full[:, 1], atol=ATOL)


def test_bad_inputs(model, small_prompts):
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    with pytest.raises(HookpatchError, match="unknown component 'resid'"):
        attribution_sweep(model, prompts, metric, "resid", progress=False)
    with pytest.raises(HookpatchError, match=r"layer 5 is out of range"):
        attribution_sweep(model, prompts, metric, layers=[5], progress=False)
    with pytest.raises(HookpatchError, match=r"head 9 is out of range for 'k'"):
        attribution_sweep(model, prompts, metric, "k", by=("layer", "head"), heads=[9], progress=False)
    with pytest.raises(HookpatchError, match="has no heads"):
        attribution_sweep(model, prompts, metric, "mlp_out", by=("layer", "head"), progress=False)
    with pytest.raises(HookpatchError, match=r"position 99 is out of range"):
        attribution_sweep(model, prompts, metric, positions=[99], progress=False)
    with pytest.raises(HookpatchError, match="unknown direction 'forward'"):
        attribution_sweep(model, prompts, metric, direction="forward", progress=False)
    with pytest.raises(HookpatchError, match="steps=0 must be a positive integer"):
        attribution_sweep(model, prompts, metric, steps=0, progress=False)
    argmax_right = lambda logits: (logits.argmax(-1) == 3).float()[..., -1]  # noqa: E731
    with pytest.raises(HookpatchError, match="metric is not differentiable"):
        attribution_sweep(model, prompts, argmax_right, progress=False)
    with pytest.raises(HookpatchError, match=r"the metric returned \(\) .*one value per prompt"):
        attribution_sweep(model, prompts, lambda logits: metric(logits).mean(), progress=False)
    with pytest.raises(HookpatchError, match="hook point 'blocks.0.hook_nothing' does not exist"):
        site_attributions(model, prompts, metric, ["blocks.0.hook_nothing"], progress=False)
    model.train()
    try:
        with pytest.raises(HookpatchError, match="train mode"):
            attribution_sweep(model, prompts, metric, progress=False)
    finally:
        model.eval()
    assert hook_count(model) == 0


def hand_ranks(x):
    """Average ranks (1-based) the way scipy.stats.rankdata does, by hand."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        ranks[x == v] = ranks[x == v].mean()
    return ranks


def test_comparison_statistics_equal_hand_computation(model, small_prompts):
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    cmp = compare(model, prompts, metric, "resid_pre", k=4, n_resamples=200, seed=3, progress=False)
    df = cmp.to_dataframe()
    act, att = df["activation"].to_numpy(), df["attribution"].to_numpy()
    assert len(df) == model_facts(model).n_layers * prompts.n_pos
    expected_act = (cmp.activation.values - cmp.activation.corrupted).mean(-1).flatten().numpy()
    assert np.allclose(act, expected_act, atol=1e-6)
    assert np.allclose(att, cmp.attribution.mean().flatten().numpy(), atol=1e-6)
    assert cmp.pearson.value == pytest.approx(np.corrcoef(act, att)[0, 1], abs=1e-6)
    assert cmp.spearman.value == pytest.approx(np.corrcoef(hand_ranks(act), hand_ranks(att))[0, 1], abs=1e-6)
    top = lambda x: set(np.argsort(-np.abs(x), kind="stable")[:4])  # noqa: E731
    assert cmp.top_k_overlap.value == pytest.approx(len(top(act) & top(att)) / 4)
    sign = lambda x: np.where(np.abs(x) <= 1e-6, 0, np.sign(x))  # noqa: E731
    assert cmp.sign_agreement.value == pytest.approx(np.mean(sign(act) == sign(att)))
    for name, stat in cmp.statistics().items():
        assert stat.ci_low - 1e-9 <= stat.value <= stat.ci_high + 1e-9, (name, stat)
    worst = cmp.disagreements(5)
    gaps = worst["difference"].abs().to_numpy()
    assert list(worst.columns[-3:]) == ["activation", "attribution", "difference"]
    assert np.all(np.diff(gaps) <= 0) and gaps[0] == pytest.approx(np.abs(att - act).max())
    again = compare_results(cmp.activation, cmp.attribution, k=4, n_resamples=200, seed=3)
    assert again.summary() == cmp.summary()
    assert average_ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0]])).tolist() == [[3.5, 1.0, 3.5, 2.0]]
    noising = compare(
        model, prompts, metric, "z", by=("layer", "head"), direction="noising", k=3, n_resamples=50, progress=False
    )
    expected = (noising.activation.values - noising.activation.clean).mean(-1).flatten().numpy()
    assert np.allclose(noising.to_dataframe()["activation"].to_numpy(), expected, atol=1e-6)
    assert noising.attribution.provenance.direction == "noising" and noising.k == 3
    with pytest.raises(HookpatchError, match="different grids"):
        heads = attribution_sweep(model, prompts, metric, "z", by=("layer", "head"), progress=False)
        compare_results(cmp.activation, heads)
    with pytest.raises(HookpatchError, match="k=0 must be an integer"):
        compare_results(cmp.activation, cmp.attribution, k=0)
