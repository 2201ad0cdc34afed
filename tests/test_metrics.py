"""Each metric against a hand computation on fixed logits; normalization; directions."""

from __future__ import annotations

import math

import pytest
import torch

from hookpatch.errors import HookpatchError
from hookpatch.metrics import AnswerLoss, AnswerProbability, KLToClean, LogitDiff, Normalized, PerPrompt, evaluate
from hookpatch.tasks import make_prompt_set, pronoun_prompts


@pytest.fixture(scope="module")
def padded(gpt2_model):
    """Two prompts of different lengths: END is 5 for the first and 6 for the second."""
    return make_prompt_set(
        gpt2_model,
        ["John went to the store", "John went to the great store"],
        ["Mary went to the store", "Mary went to the great store"],
        [(" she", " he"), (" he", " she")],
        pad=True,
    )


def fixed_logits(prompts, d_vocab):
    """Logits that are zero except at each prompt's END, where they are hand-chosen."""
    logits = torch.zeros(len(prompts), prompts.n_pos, d_vocab)
    she, he = prompts.answer_tokens[0].tolist()
    logits[0, 5, she], logits[0, 5, he] = 3.0, 1.0   # prompt 0: correct she, incorrect he
    logits[1, 6, he], logits[1, 6, she] = 0.5, 2.0   # prompt 1: correct he, incorrect she
    logits[0, 6, she] = 100.0                        # a pad column: must be ignored
    logits[1, 5, he] = 100.0                         # not END for prompt 1: must be ignored
    return logits, she, he


def test_logit_diff_probability_loss_by_hand(gpt2_model, padded):
    V = gpt2_model.cfg.d_vocab
    logits, she, he = fixed_logits(padded, V)
    assert LogitDiff(padded)(logits).tolist() == pytest.approx([2.0, -1.5])
    z0 = math.exp(3) + math.exp(1) + (V - 2)
    z1 = math.exp(0.5) + math.exp(2) + (V - 2)
    p = [math.exp(3) / z0, math.exp(0.5) / z1]
    assert AnswerProbability(padded)(logits).tolist() == pytest.approx(p, rel=1e-5)
    assert AnswerLoss(padded)(logits).tolist() == pytest.approx([-math.log(x) for x in p], rel=1e-5)


def test_kl_by_hand(gpt2_model, padded):
    V = gpt2_model.cfg.d_vocab
    logits, she, he = fixed_logits(padded, V)
    clean = torch.zeros(2, V)  # a uniform clean distribution
    metric = KLToClean(padded, clean.log_softmax(-1))
    q = logits[[0, 1], [5, 6]].log_softmax(-1)
    expected = (torch.full((V,), 1 / V) * (math.log(1 / V) - q)).sum(-1)
    assert metric(logits).tolist() == pytest.approx(expected.tolist(), rel=1e-5)
    assert metric(torch.zeros_like(logits)).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_metrics_accept_leading_axes(gpt2_model, padded):
    logits, _, _ = fixed_logits(padded, gpt2_model.cfg.d_vocab)
    stacked = torch.stack([logits, 2 * logits, -logits])  # [variant, batch, pos, vocab]
    expected = torch.tensor([[2.0, -1.5], [4.0, -3.0], [-2.0, 1.5]])
    assert torch.allclose(LogitDiff(padded)(stacked), expected)


def test_normalized_maps_clean_to_one_and_corrupted_to_zero(model):
    prompts = pronoun_prompts(model)
    metric = Normalized.from_model(model, LogitDiff(prompts))
    clean = evaluate(model, metric, prompts.clean_tokens)
    corrupted = evaluate(model, metric, prompts.corrupted_tokens)
    assert clean.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert corrupted.mean().item() == pytest.approx(0.0, abs=1e-5)
    info = metric.describe()
    assert "clean run = 1, corrupted run = 0" in info["normalization"]
    base = evaluate(model, LogitDiff(prompts), prompts.clean_tokens)
    assert info["clean"] == pytest.approx(base.mean().item(), abs=1e-5)
    assert torch.allclose(metric.normalize(base), clean, atol=1e-5)


def test_normalized_refuses_equal_baselines(gpt2_model):
    prompts = pronoun_prompts(gpt2_model)
    equal = r"clean baseline \(2\) and the corrupted baseline \(2\) are equal.*Choose a corruption"
    with pytest.raises(HookpatchError, match=equal):
        Normalized(LogitDiff(prompts), 2.0, 2.0)


def test_linear_metric_direction_and_bias_reproduce_the_metric(model):
    """dir · ln_final(resid) + bias == metric: the object DLA and the logit lens will use."""
    prompts = pronoun_prompts(model)
    logits, cache = model.run_with_cache(prompts.clean_tokens)
    rows = torch.arange(len(prompts))
    final = cache["ln_final.hook_normalized"][rows, prompts.end]
    for metric in (LogitDiff(prompts), Normalized.from_model(model, LogitDiff(prompts))):
        via_direction = (final * metric.directions(model)).sum(-1) + metric.bias(model)
        assert torch.allclose(via_direction, metric(logits), atol=1e-4)


def test_every_metric_from_the_unembedding_input_equals_it_from_the_logits(model):
    """from_unembed_input (what runs stopping before the unembedding use) == the metric, linear
    metrics through their directions, the others through W_U or a given unembedding."""
    prompts = pronoun_prompts(model)
    logits, cache = model.run_with_cache(prompts.clean_tokens)
    rows = torch.arange(len(prompts))
    final = cache["unembed.hook_in"][rows, prompts.end]  # [batch, d_model]
    metrics = (
        LogitDiff(prompts), Normalized.from_model(model, LogitDiff(prompts)), AnswerProbability(prompts),
        AnswerLoss(prompts), KLToClean.from_model(model, prompts),
    )
    for metric in metrics:
        assert torch.allclose(metric.from_unembed_input(final, model), metric(logits), atol=1e-4), metric.name
        stacked = metric.from_unembed_input(final.expand(3, -1, -1), model, lambda x: x @ model.W_U + model.b_U)
        assert stacked.shape == (3, len(prompts))
        assert torch.allclose(stacked, metric(logits).expand(3, -1), atol=1e-4), metric.name


def test_nonlinear_metric_has_no_direction(gpt2_model):
    with pytest.raises(HookpatchError, match="probability is not linear.*use a logit-difference metric"):
        AnswerProbability(pronoun_prompts(gpt2_model)).directions(gpt2_model)


def test_metric_rejects_logits_of_another_batch(gpt2_model):
    prompts = pronoun_prompts(gpt2_model)
    shaped = r"expects logits shaped \[\.\.\., batch=20, pos, d_vocab\]; got \(3, 10, "
    with pytest.raises(HookpatchError, match=shaped):
        LogitDiff(prompts)(torch.zeros(3, 10, gpt2_model.cfg.d_vocab))


def test_per_prompt_mean_and_bootstrap_ci():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    stats = PerPrompt(values)
    assert stats.mean().tolist() == [2.5, 5.0]
    low, high = stats.ci(n_resamples=2000)
    assert low.shape == (2,) and 1.0 <= low[0] < 2.5 < high[0] <= 4.0
    assert low[1] == high[1] == 5.0
