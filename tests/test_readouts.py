"""Logit lens, DLA, head ranking and the unembed-bias check against TransformerLens'
ActivationCache routes and exact sums."""

from __future__ import annotations

import math

import pytest
import torch

from hookpatch.errors import HookpatchError
from hookpatch.metrics import AnswerProbability, LogitDiff, Normalized
from hookpatch.model import load_model, write_tiny_checkpoint
from hookpatch.readouts import (
    dla_by_component,
    dla_by_head,
    dla_by_neuron,
    logit_lens,
    logit_lens_top_tokens,
    rank_heads,
    top_neurons,
    unembed_bias,
)
from hookpatch.tasks import ioi_prompts, pronoun_prompts

ATOL = 1e-4


@pytest.mark.parametrize("convention", ["final_scale", "renormalized"])
def test_logit_lens_at_the_final_layer_equals_the_metric(model, convention):
    prompts = ioi_prompts(model, 6, seed=1)  # padded: END differs per prompt
    for metric in (LogitDiff(prompts), AnswerProbability(prompts)):
        lens = logit_lens(model, prompts, metric, convention=convention)
        assert lens.labels["point"][-1] == "final_post" and lens.labels["point"][:2] == ("0_pre", "0_mid")
        assert lens.values.shape == (2 * model.cfg.n_layers + 1, len(prompts))
        assert torch.allclose(lens.values[-1], lens.clean, atol=ATOL)


def test_logit_lens_matches_the_notebook_route_and_recomputed_ln(model):
    """final_scale = cache.apply_ln_to_stack(layer=-1) (TransformerLens' pronoun notebook); renormalized
    = apply_ln_to_stack(recompute_ln=True), each point with its own scale."""
    prompts = pronoun_prompts(model)
    metric = LogitDiff(prompts)
    _, cache = model.run_with_cache(prompts.clean_tokens)
    stack = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1)
    dirs = metric.directions(model)
    for convention, recompute in (("final_scale", False), ("renormalized", True)):
        scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1, recompute_ln=recompute)
        reference = (scaled * dirs).sum(-1) + metric.bias(model)
        lens = logit_lens(model, prompts, metric, convention=convention)
        assert torch.allclose(lens.values, reference, atol=ATOL)
    early = logit_lens(model, prompts, metric, convention="final_scale").values[0]
    true = logit_lens(model, prompts, metric, convention="renormalized").values[0]
    assert not torch.allclose(early, true, atol=1e-3)  # the two conventions really differ


def test_logit_lens_top_tokens(gpt2_model):
    prompts = pronoun_prompts(gpt2_model)
    table = logit_lens_top_tokens(gpt2_model, prompts, k=3)
    assert len(table) == 3 * (2 * gpt2_model.cfg.n_layers + 1)
    last = table[table["point"] == "final_post"]
    logits = gpt2_model(prompts.clean_tokens[:1])[0, -1]
    assert last["token_id"].tolist() == logits.topk(3).indices.tolist()


def test_dla_parts_sum_to_the_metric(model):
    prompts = ioi_prompts(model, 6, seed=2)
    for metric in (LogitDiff(prompts), Normalized.from_model(model, LogitDiff(prompts))):
        dla = dla_by_component(model, prompts, metric)
        labels = dla.labels["component"]
        assert labels[0] == "embed" and labels[-1] == f"{model.cfg.n_layers - 1}_mlp_out"
        total = dla.values.sum(0) + dla.terms["bias"]
        assert torch.allclose(total, dla.clean, atol=ATOL)


def test_head_dla_equals_transformerlens_stack_head_results(model):
    prompts = pronoun_prompts(model)
    metric = LogitDiff(prompts)
    heads = dla_by_head(model, prompts, metric)
    _, cache = model.run_with_cache(prompts.clean_tokens)
    stack = cache.stack_head_results(layer=-1, pos_slice=-1)
    scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
    reference = (scaled * metric.directions(model)).sum(-1)  # [layer * head, batch]
    assert torch.allclose(heads.values.reshape(-1, len(prompts)), reference, atol=ATOL)
    assert heads.cell_label((1, 2)) == "L1H2"
    # heads of a layer plus its attention bias give that layer's attn_out DLA
    parts = dla_by_component(model, prompts, metric)
    for layer in range(model.cfg.n_layers):
        attn = parts.values[parts.labels["component"].index(f"{layer}_attn_out")]
        total = heads.values[layer].sum(0) + heads.terms["attn_bias"][layer]
        assert torch.allclose(total, attn, atol=ATOL)


def test_neuron_dla_sums_to_the_mlp_output(model):
    prompts = ioi_prompts(model, 4, seed=3)
    metric = LogitDiff(prompts)
    parts = dla_by_component(model, prompts, metric)
    for layer in range(model.cfg.n_layers):
        neurons = dla_by_neuron(model, prompts, metric, layer)
        assert neurons.values.shape == (model.blocks[layer].mlp.W_out.shape[0], len(prompts))
        mlp = parts.values[parts.labels["component"].index(f"{layer}_mlp_out")]
        assert torch.allclose(neurons.values.sum(0) + neurons.terms["mlp_bias"], mlp, atol=ATOL)
    table = top_neurons(neurons, 3)
    means = neurons.mean()
    assert table["mean"].abs().tolist() == pytest.approx(means.abs().topk(3).values.tolist())
    assert table["label"][0] == f"L{layer}N{int(table['neuron'][0])}"


def test_rank_heads_orders_by_mean(gpt2_model):
    prompts = pronoun_prompts(gpt2_model)
    heads = dla_by_head(gpt2_model, prompts, LogitDiff(prompts))
    table = rank_heads(heads, k=2)
    flat = heads.mean().flatten()
    pos = table[table["sign"] == "positive"]
    neg = table[table["sign"] == "negative"]
    positives = sorted((v for v in flat.tolist() if v > 0), reverse=True)[:2]
    negatives = sorted(v for v in flat.tolist() if v < 0)[:2]
    assert pos["effect_mean"].tolist() == pytest.approx(positives) and len(positives) >= 1
    assert neg["effect_mean"].tolist() == pytest.approx(negatives) and len(negatives) >= 1
    assert (table["baseline"] == "none").all() and table.attrs["baseline"] == "none"  # DLA is a contribution
    layer, head = divmod(int(flat.argmax()), gpt2_model.cfg.n_heads)
    assert pos["label"].iloc[0] == f"L{layer}H{head}"
    with pytest.raises(HookpatchError, match=r"needs a result over \(layer, head\)"):
        rank_heads(dla_by_component(gpt2_model, prompts, LogitDiff(prompts)))


def test_unembed_bias_check_by_hand(tmp_path):
    import transformers

    write_tiny_checkpoint(tmp_path, "gpt2", seed=5)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    with torch.no_grad():
        hf.transformer.ln_f.bias.normal_(0, 1.0)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu")
    he, she = model.to_single_token(" he"), model.to_single_token(" she")
    folded = (hf.lm_head.weight @ hf.transformer.ln_f.bias).detach()  # the bias fold_ln moves into b_U
    check = unembed_bias(model)
    assert check.difference == pytest.approx(float(folded[he] - folded[she]), abs=1e-4)
    assert check.ratio == pytest.approx(math.exp(check.difference))
    assert "' he'" in str(check) and "x as likely" in str(check)


def test_readout_bad_inputs(gpt2_model):
    prompts = pronoun_prompts(gpt2_model)
    with pytest.raises(HookpatchError, match="DLA needs a metric linear.*probability is not"):
        dla_by_component(gpt2_model, prompts, AnswerProbability(prompts))
    with pytest.raises(HookpatchError, match="unknown convention 'true'"):
        logit_lens(gpt2_model, prompts, LogitDiff(prompts), convention="true")
    with pytest.raises(HookpatchError, match="layer 7 is out of range"):
        dla_by_neuron(gpt2_model, prompts, LogitDiff(prompts), 7)
    with pytest.raises(HookpatchError, match="not a single token"):
        unembed_bias(gpt2_model, " he she", " she")


def test_rank_heads_by_ablation_effect(gpt2_model):
    from hookpatch.sweeps import ablation_sweep

    prompts = pronoun_prompts(gpt2_model, n=6)
    ablated = ablation_sweep(gpt2_model, prompts, LogitDiff(prompts), "z", progress=False)
    table = rank_heads(ablated, k=1, baseline="clean")
    effect = (ablated.values - ablated.clean).mean(-1).flatten()
    assert table[table["sign"] == "negative"]["effect_mean"].iloc[0] == pytest.approx(float(effect.min()), abs=1e-5)
    with pytest.raises(HookpatchError, match="baseline='both'"):
        rank_heads(ablated, baseline="both")
