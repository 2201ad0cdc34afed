"""At the prompt, prompt sets, metrics, results and comparisons print a one-screen summary."""

from __future__ import annotations

import pytest
import torch

import hookpatch as hp


def _short(text: str) -> str:
    assert len(text) < 1000, f"{len(text)} characters:\n{text[:2000]}"
    assert len(text.splitlines()) < 20, text
    return text


@pytest.fixture(scope="module")
def prompts(gpt2_model):
    return hp.ioi_prompts(gpt2_model, 16)


@pytest.fixture(scope="module")
def metric(gpt2_model, prompts):
    return hp.Normalized.from_model(gpt2_model, hp.LogitDiff(prompts))


def test_prompt_set(prompts):
    text = _short(repr(prompts))
    assert text.startswith("PromptSet(task='ioi', 16 prompts") and f"n_pos={prompts.n_pos}" in text
    assert "positions: IO, S1, S1+1, S2, END" in text
    assert repr(prompts.clean_prompts[0]) in text and repr(prompts.corrupted_prompts[0]) in text
    assert repr(prompts.answers[0][0]) in text and repr(prompts.answers[0][1]) in text
    assert "padded" in text and "corruption='s2'" in text


def test_metrics(gpt2_model, prompts, metric):
    headline = prompts.headline()
    assert headline == f"PromptSet(task='ioi', 16 prompts, n_pos={prompts.n_pos}, padded)"
    for m in (hp.LogitDiff(prompts), hp.AnswerProbability(prompts), hp.AnswerLoss(prompts),
              hp.KLToClean.from_model(gpt2_model, prompts), metric):
        text = _short(repr(m))
        assert text.startswith(f"{type(m).__name__}({m.name}")
        assert text.endswith(f"prompts={headline})") and "\n" not in text
    assert f"clean={metric.clean:.4g}, corrupted={metric.corrupted:.4g}" in repr(metric)


def test_sweep_result(gpt2_model, prompts, metric):
    result = hp.patch_sweep(gpt2_model, prompts, metric, "resid_pre", progress=False)
    text = _short(repr(result))
    assert text.startswith("SweepResult(patch resid_pre denoising, metric normalized_logit_diff, 16 prompts")
    assert "axes: layer 2 (0, 1) × pos 5 (IO, S1, S1+1, S2, END)" in text
    assert f"clean {float(result.clean.mean()):.4g}, corrupted {float(result.corrupted.mean()):.4g}" in text
    mean = result.mean()
    layer, pos = divmod(int(mean.argmax()), mean.shape[1])
    assert f"max {float(mean.max()):.4g} at L{layer} @ {result.labels['pos'][pos]}" in text

    ablated = hp.ablation_sweep(gpt2_model, prompts, hp.AnswerLoss(prompts), "z", how="mean", progress=False)
    text = _short(repr(ablated))
    assert text.startswith("SweepResult(mean ablation z, metric loss, 16 prompts")
    assert "axes: layer 2 (0, 1) × head 4 (H0, H1, H2, H3)" in text


def test_comparison(gpt2_model, prompts, metric):
    cmp = hp.compare(gpt2_model, prompts, metric, "z", by=("layer", "head"), progress=False)
    text = _short(repr(cmp))
    assert text.startswith("Comparison(patch vs attribution z denoising, metric normalized_logit_diff, 16 prompts")
    assert "axes: layer 2 (0, 1) × head 4 (H0, H1, H2, H3)" in text
    for name in ("pearson", "spearman", "top_k_overlap", "sign_agreement"):
        assert f"{name} {getattr(cmp, name)!r}" in text
    gap = (cmp.attribution.mean() - cmp.activation_effect.mean(-1)).abs()
    layer, head = divmod(int(gap.argmax()), gap.shape[1])
    assert f"largest disagreement: L{layer}H{head} (|attribution − activation| = {float(gap.max()):.4g})" in text
    assert torch.isfinite(gap).all()
