"""Effects: per-prompt change against a baseline run, paired CI, sign-flip p-value, correction.

References: TransformerLens 4.3's ``PatchingResult`` (``effect``, ``bootstrap_ci(of_effect=True)``,
``permutation_pvalue``) on the same per-prompt numbers, TransformerLens' own head-patching
sweep, hand-written Holm and Benjamini–Hochberg loops (and statsmodels where installed).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformer_lens import patching
from transformer_lens.patching import PatchingResult

from hookpatch import _stats as stats
from hookpatch.errors import HookpatchError
from hookpatch.metrics import LogitDiff, Normalized
from hookpatch.readouts import dla_by_head, rank_heads
from hookpatch.results import Provenance, SweepResult
from hookpatch.sweeps import ablation_sweep, patch_sweep
from hookpatch.tasks import pronoun_prompts

HEADS = {"layer": ("0", "1"), "head": ("H0", "H1", "H2")}


def hand_result(values, clean, corrupted, **provenance) -> SweepResult:
    return SweepResult(values=values, axes=("layer", "head"), labels=HEADS, clean=clean, corrupted=corrupted,
                       provenance=Provenance(kind="patched_metric", **provenance))


def tl_result(values, baseline) -> PatchingResult:
    index = pd.DataFrame({"layer": [0, 0, 0, 1, 1, 1], "head": [0, 1, 2, 0, 1, 2]})
    return PatchingResult(values=values, axis_names=["layer", "head"], index_df=index, metric_names=["metric"],
                          reduced=False, baseline=baseline)


def random_runs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(batch, generator=g) * 2 + 3
    corrupted = torch.randn(batch, generator=g) * 2 - 3
    shift = torch.tensor([[0.0, 0.05, -0.05], [1.0, 0.0, 0.3]])[..., None]
    values = corrupted + shift + torch.randn(2, 3, batch, generator=g) * 0.1
    return values, clean, corrupted


@pytest.mark.parametrize("batch", [8, 20])  # exact sign-flip test (<= 12 prompts) and Monte Carlo
@pytest.mark.parametrize("direction, run", [("denoising", "corrupted"), ("noising", "clean")])
def test_effects_equal_transformer_lens_patching_result(batch, direction, run):
    values, clean, corrupted = random_runs(batch)
    result = hand_result(values, clean, corrupted, method="patch", direction=direction)
    baseline = {"clean": clean, "corrupted": corrupted}[run]
    tl = tl_result(values, baseline)
    for seed in (0, 7):
        eff = result.effects(n_resamples=500, n_permutations=300, seed=seed, correction=None)
        assert eff.baseline == run
        assert torch.equal(eff.per_prompt, tl.effect()) and torch.equal(result.effect(), tl.effect())
        low, high = tl.bootstrap_ci(n_resamples=500, seed=seed, of_effect=True)
        assert torch.equal(eff.ci_low, low) and torch.equal(eff.ci_high, high)
        assert torch.equal(eff.p, tl.permutation_pvalue(n_permutations=300, seed=seed))
        assert torch.equal(eff.p_adjusted, eff.p)
    greater = result.effects(alternative="greater", n_permutations=300, seed=3).p
    assert torch.equal(greater, tl.permutation_pvalue(n_permutations=300, seed=3, alternative="greater"))
    # the interval of the values is TransformerLens' interval of the values
    low, high = result.ci(n_resamples=500, seed=2)
    tl_low, tl_high = tl.bootstrap_ci(n_resamples=500, seed=2)
    assert torch.equal(low, tl_low) and torch.equal(high, tl_high)


def test_effects_of_a_head_sweep_equal_transformer_lens_sweep(gpt2_model):
    """hookpatch's head-patching sweep vs TransformerLens' own sweep with reduce='none', baseline=True."""
    prompts = pronoun_prompts(gpt2_model, n=6)
    metric = LogitDiff(prompts)
    result = patch_sweep(gpt2_model, prompts, metric, "z", by=("layer", "head"), progress=False)
    with torch.no_grad():
        _, cache = gpt2_model.run_with_cache(prompts.clean_tokens)
        tl = patching.get_act_patch_attn_head_out_all_pos(
            gpt2_model, prompts.corrupted_tokens, cache, metric, reduce="none", baseline=True
        )
    eff = result.effects(n_resamples=400, seed=1, correction=None)
    assert eff.baseline == "corrupted"
    assert torch.allclose(eff.per_prompt, tl.effect(), atol=1e-4)
    low, high = tl.bootstrap_ci(n_resamples=400, seed=1, of_effect=True)
    assert torch.allclose(eff.ci_low, low, atol=1e-4) and torch.allclose(eff.ci_high, high, atol=1e-4)
    clear = tl.effect().mean(-1).abs() > 1e-3  # away from ties, the exact 2**6-pattern test agrees
    assert clear.any() and torch.equal(eff.p[clear], tl.permutation_pvalue(seed=1)[clear])


def test_symptom_tiny_effects_get_tiny_intervals_and_a_clear_negative_excludes_zero():
    """Prompts differ widely in their corrupted metric; the paired interval sees only the change."""
    batch = 16
    g = torch.Generator().manual_seed(4)
    corrupted = torch.randn(batch, generator=g) * 0.25  # per-prompt spread of the baseline run
    corrupted -= corrupted.mean()
    clean = corrupted + 2.0
    effects = torch.zeros(2, 3, batch)
    effects[0, 0] = torch.rand(batch, generator=g) * 0.006  # largest per-prompt effect 0.006
    effects[1, 2] = -0.05 + torch.rand(batch, generator=g) * 0.03  # every prompt in -0.05..-0.02
    result = hand_result(corrupted + effects, clean, corrupted, method="patch", direction="denoising")

    eff = result.effects(seed=0)
    value_low, value_high = result.ci(seed=0)
    assert float(eff.ci_high[0, 0] - eff.ci_low[0, 0]) <= 0.006 < float(value_high[0, 0] - value_low[0, 0])
    assert 0.0 <= float(eff.ci_low[0, 0]) and float(eff.ci_high[0, 0]) <= 0.006
    assert -0.05 <= float(eff.ci_low[1, 2]) and float(eff.ci_high[1, 2]) < 0  # excludes 0 ...
    assert float(value_low[1, 2]) < 0 < float(value_high[1, 2])  # ... where the value interval does not
    assert float(eff.p[1, 2]) < 0.01 and float(eff.p_adjusted[1, 2]) < 0.01
    assert float(eff.p[0, 1]) == 1.0  # no change at all


def test_rank_heads_on_ablation_ranks_by_change_from_clean():
    """The heads whose ablation changes the metric most lead; an untouched head is not listed."""
    batch = 10
    clean = torch.linspace(2.0, 4.0, batch)
    change = torch.tensor([[-1.0, -0.01, 0.0], [-0.5, 0.2, -2.0]])[..., None] + torch.linspace(-0.01, 0.01, batch)
    change[0, 2] = 0.0
    result = hand_result(clean + change, clean, None, method="ablation", ablation="zero")
    table = rank_heads(result, k=5)
    assert table.attrs["baseline"] == "clean" and set(table["baseline"]) == {"clean"}
    negative = table[table["sign"] == "negative"]
    assert negative["label"].tolist() == ["L1H2", "L0H0", "L1H0", "L0H1"]
    assert table[table["sign"] == "positive"]["label"].tolist() == ["L1H1"]
    assert "L0H2" not in table["label"].tolist()
    cells = ((1, 2), (0, 0), (1, 0), (0, 1))
    assert negative["effect_mean"].tolist() == pytest.approx([float(change[c].mean()) for c in cells], abs=1e-6)
    expected = [float((clean + change)[c].mean()) for c in cells]
    assert negative["value_mean"].tolist() == pytest.approx(expected, abs=1e-6)
    assert (negative["effect_ci_high"] < 0).all()
    eff = result.effects()
    assert negative["p_adjusted"].tolist() == pytest.approx([float(eff.p_adjusted[c]) for c in cells])


def holm_reference(p: list[float]) -> list[float]:
    """Holm's step-down adjustment written out as a loop over the sorted p-values."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def bh_reference(p: list[float]) -> list[float]:
    """Benjamini–Hochberg's step-up adjustment, from the largest p-value down."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i], reverse=True)
    out, running = [0.0] * m, 1.0
    for k, i in enumerate(order):
        rank = m - k
        running = min(running, p[i] * m / rank)
        out[i] = min(1.0, running)
    return out


def test_holm_and_bh_equal_hand_written_references():
    p = torch.tensor([[0.01, 0.04, 0.03], [0.005, 0.5, 0.04]], dtype=torch.float64)
    holm = stats.adjust_pvalues(p, "holm")
    bh = stats.adjust_pvalues(p, "bh")
    assert holm.flatten().tolist() == pytest.approx(holm_reference(p.flatten().tolist()))
    assert bh.flatten().tolist() == pytest.approx(bh_reference(p.flatten().tolist()))
    assert holm.flatten().tolist() == pytest.approx([0.05, 0.12, 0.12, 0.03, 0.5, 0.12])
    assert bh.flatten().tolist() == pytest.approx([0.03, 0.048, 0.048, 0.03, 0.5, 0.048])
    rand = torch.rand(200, generator=torch.Generator().manual_seed(0)).double() ** 3
    assert stats.adjust_pvalues(rand, "holm").tolist() == pytest.approx(holm_reference(rand.tolist()))
    assert stats.adjust_pvalues(rand, "bh").tolist() == pytest.approx(bh_reference(rand.tolist()))
    assert torch.equal(stats.adjust_pvalues(p, None), p)
    values, clean, corrupted = random_runs(8)
    result = hand_result(values, clean, corrupted, method="patch", direction="denoising")
    eff = result.effects(correction="bh")
    assert eff.p_adjusted.flatten().tolist() == pytest.approx(bh_reference(eff.p.flatten().tolist()))


def test_holm_and_bh_equal_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = torch.rand(50, generator=torch.Generator().manual_seed(1)).double() ** 2
    for ours, theirs in (("holm", "holm"), ("bh", "fdr_bh")):
        expected = multitest.multipletests(p.numpy(), method=theirs)[1]
        assert stats.adjust_pvalues(p, ours).tolist() == pytest.approx(expected.tolist())


def test_exact_test_in_blocks_equals_one_call(monkeypatch):
    from transformer_lens.utilities.statistics import derive_generator, sign_flip_permutation_pvalue

    effects = torch.randn(40, 10, generator=torch.Generator().manual_seed(2)) + 0.3
    monkeypatch.setattr(stats, "EXACT_BLOCK", 2**10 * 10 * 3)  # three cells per block
    ours = stats.sign_flip_pvalue(effects, seed=5)
    theirs = sign_flip_permutation_pvalue(effects, generator=derive_generator(5, "permutation"))
    assert torch.equal(ours, theirs)


def test_default_baselines_follow_the_method(gpt2_model):
    prompts = pronoun_prompts(gpt2_model, n=4)
    metric = LogitDiff(prompts)
    noising = patch_sweep(gpt2_model, prompts, metric, "z", by=("layer", "head"), direction="noising", progress=False)
    assert torch.equal(noising.effect(), noising.values - noising.clean)
    ablated = ablation_sweep(gpt2_model, prompts, metric, "z", how="mean", progress=False)
    assert torch.equal(ablated.effect(), ablated.values - ablated.clean)
    assert ablated.to_dataframe(ci=False).attrs["baseline"] == "clean"
    dla = dla_by_head(gpt2_model, prompts, metric)
    assert dla.effects().baseline == "none" and torch.equal(dla.effect(), dla.values)
    eff, (low, high) = dla.effects(correction=None), dla.ci()
    assert torch.equal(eff.ci_low, low) and torch.equal(eff.ci_high, high)  # a contribution is its own effect


def test_normalized_effect_is_the_normalized_change(gpt2_model):
    """With a normalized metric, the effect is the raw effect over the clean − corrupted gap."""
    prompts = pronoun_prompts(gpt2_model, n=4)
    base = LogitDiff(prompts)
    metric = Normalized.from_model(gpt2_model, base)
    raw = patch_sweep(gpt2_model, prompts, base, "resid_pre", progress=False)
    norm = patch_sweep(gpt2_model, prompts, metric, "resid_pre", progress=False)
    assert torch.allclose(norm.effect(), (raw.values - raw.corrupted) / metric.gap, atol=1e-4)
    # patching layer 0 where the prompts differ (the name) restores the clean run: effect = 1 − 0
    (name,) = (prompts.clean_tokens != prompts.corrupted_tokens).any(0).nonzero()[:, 0].tolist()
    assert float(norm.effects().mean[0, name]) == pytest.approx(1.0, abs=1e-4)


def test_bad_baselines_and_settings_are_refused(gpt2_model):
    values, clean, corrupted = random_runs(8)
    patched = hand_result(values, clean, corrupted, method="patch", direction="denoising")
    with pytest.raises(HookpatchError, match=r"baseline='both': expected one of \('corrupted', 'clean', 'none'\)"):
        patched.effect("both")
    with pytest.raises(HookpatchError, match="baseline='corrupted': this result has no corrupted run"):
        hand_result(values, clean, None, method="ablation", ablation="zero").effects("corrupted")
    prompts = pronoun_prompts(gpt2_model, n=4)
    dla = dla_by_head(gpt2_model, prompts, LogitDiff(prompts))
    with pytest.raises(HookpatchError, match="baseline='clean': the values of a dla_heads result are already"):
        rank_heads(dla, baseline="clean")
    with pytest.raises(HookpatchError, match="correction='bonferroni': expected one of"):
        patched.effects(correction="bonferroni")
    with pytest.raises(HookpatchError, match="alternative='two_sided': expected one of"):
        patched.effects(alternative="two_sided")
    with pytest.raises(HookpatchError, match=r"level=1.5 must be in \(0, 1\)"):
        patched.to_dataframe(level=1.5)
    with pytest.raises(HookpatchError, match="n_permutations=0 must be a positive integer"):
        patched.effects(n_permutations=0)
    with pytest.raises(HookpatchError, match=r"k=0 must be a positive integer: how many heads"):
        rank_heads(patched, k=0)
