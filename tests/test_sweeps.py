"""Sweeps equal a hand-written loop of single run_with_hooks patches and TransformerLens'
own patching functions; budgets, pickling, no side effects, bad inputs."""

from __future__ import annotations

import pickle

import pytest
import torch
from transformer_lens import patching

from hookpatch.errors import HookpatchError
from hookpatch.hooks import ablate_hook, patch_hook
from hookpatch.metrics import AnswerLoss, AnswerProbability, KLToClean, LogitDiff, Normalized
from hookpatch.model import COMPONENTS, model_facts
from hookpatch.results import SweepResult
from hookpatch.sweeps import ablation_sweep, patch_sweep
from hookpatch.tasks import ioi_prompts, pronoun_prompts

ATOL = 1e-4
RUNNERS = [False, None]  # the bridge's hooks, and the default (fast path where supported)


def hand_patch(act, hook, pos, head, src):
    """A hand-written patching hook, as in TransformerLens' notebooks: overwrite one slice with the source's.

    In place at hook_resid_mid, as TransformerLens' own setters do: there the bridge passes a
    returned tensor on to the MLP only, not to the residual sum."""
    if not hook.name.endswith("hook_resid_mid"):
        act = act.clone()
    if head is None:
        act[:, pos] = src[:, pos]
    elif hook.name.endswith("hook_pattern"):
        index = (slice(None), head) if pos is None else (slice(None), head, pos)
        act[index] = src[index]
    else:
        index = (slice(None), slice(None), head) if pos is None else (slice(None), pos, head)
        act[index] = src[index]
    return act


def loop_reference(model, prompts, metric, component, cells, direction="denoising"):
    """One forward per cell, the way a hand-written notebook loop does it."""
    _, clean = model.run_with_cache(prompts.clean_tokens)
    _, corrupted = model.run_with_cache(prompts.corrupted_tokens)
    tokens, source = (
        (prompts.corrupted_tokens, clean) if direction == "denoising" else (prompts.clean_tokens, corrupted)
    )
    out = []
    for layer, pos, head in cells:
        name = COMPONENTS[component].hook_name(layer)
        fn = lambda a, hook, p=pos, h=head, src=source[name]: hand_patch(a, hook, p, h, src)  # noqa: E731
        with torch.no_grad():
            out.append(metric(model.run_with_hooks(tokens, fwd_hooks=[(name, fn)])))
    return torch.stack(out)


def tl_reference(fn, model, prompts, metric, direction):
    """TransformerLens' own sweep (a loop of single patches); noising swaps the two runs."""
    run, source = (
        (prompts.corrupted_tokens, prompts.clean_tokens) if direction == "denoising"
        else (prompts.clean_tokens, prompts.corrupted_tokens)
    )
    _, cache = model.run_with_cache(source)
    with torch.no_grad():
        return fn(model, run, cache, lambda logits: metric(logits).mean())


def both_runners(model, prompts, metric, component, **kw):
    """The sweep through the bridge's hooks and through the default runner (fast path)."""
    return [patch_sweep(model, prompts, metric, component, fast=f, progress=False, **kw) for f in RUNNERS]


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_resid_by_pos_equals_loop_and_transformerlens(model, small_prompts, direction):
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    facts = model_facts(model)
    tl = tl_reference(patching.get_act_patch_resid_pre, model, prompts, metric, direction)
    cells = [(layer, p, None) for layer in range(facts.n_layers) for p in range(prompts.n_pos)]
    loop = loop_reference(model, prompts, metric, "resid_pre", cells, direction)
    for result in both_runners(model, prompts, metric, "resid_pre", direction=direction):
        assert result.values.shape == (facts.n_layers, prompts.n_pos, len(prompts))
        assert torch.allclose(result.values.reshape(len(cells), -1), loop, atol=ATOL)
        assert torch.allclose(result.mean(), tl, atol=ATOL)


TL_BY_COMPONENT = {
    "resid_mid": patching.get_act_patch_resid_mid,
    "attn_out": patching.get_act_patch_attn_out,
    "mlp_out": patching.get_act_patch_mlp_out,
}
TL_HEADS_ALL_POS = {
    "z": patching.get_act_patch_attn_head_out_all_pos,
    "q": patching.get_act_patch_attn_head_q_all_pos,
    "k": patching.get_act_patch_attn_head_k_all_pos,
    "v": patching.get_act_patch_attn_head_v_all_pos,
    "pattern": patching.get_act_patch_attn_head_pattern_all_pos,
}
TL_HEADS_BY_POS = {
    "z": patching.get_act_patch_attn_head_out_by_pos,
    "q": patching.get_act_patch_attn_head_q_by_pos,
    "k": patching.get_act_patch_attn_head_k_by_pos,
    "v": patching.get_act_patch_attn_head_v_by_pos,
    "pattern": patching.get_act_patch_attn_head_pattern_by_pos,
}


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("component", sorted(TL_BY_COMPONENT))
def test_block_outputs_by_pos_equal_transformerlens(model, small_prompts, component, direction):
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    tl = tl_reference(TL_BY_COMPONENT[component], model, prompts, metric, direction)
    for result in both_runners(model, prompts, metric, component, direction=direction):
        assert torch.allclose(result.mean(), tl, atol=ATOL)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("component", sorted(TL_HEADS_ALL_POS))
def test_heads_all_positions_equal_transformerlens_and_loop(model, small_prompts, component, direction):
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    facts = model_facts(model)
    n_heads = facts.n_heads_of(component)
    tl = tl_reference(TL_HEADS_ALL_POS[component], model, prompts, metric, direction)
    cells = [(layer, None, h) for layer in range(facts.n_layers) for h in range(n_heads)]
    loop = loop_reference(model, prompts, metric, component, cells, direction)
    for result in both_runners(model, prompts, metric, component, by=("layer", "head"), direction=direction):
        assert result.values.shape == (facts.n_layers, n_heads, len(prompts))
        assert torch.allclose(result.mean(), tl, atol=ATOL)
        assert torch.allclose(result.values.reshape(len(cells), -1), loop, atol=ATOL)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("component", sorted(TL_HEADS_BY_POS))
def test_heads_by_position_equal_transformerlens(model, small_prompts, component, direction):
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    tl = tl_reference(TL_HEADS_BY_POS[component], model, prompts, metric, direction)
    if component == "pattern":  # TransformerLens orders this grid layer × head × dest_pos
        tl = tl.transpose(1, 2)
    for result in both_runners(model, prompts, metric, component, by=("layer", "pos", "head"), direction=direction):
        assert torch.allclose(result.mean(), tl, atol=ATOL)


METRIC_KINDS = {  # linear (read through directions), non-linear (through logits), a plain callable
    "logit_diff": lambda m, p: LogitDiff(p),
    "normalized": lambda m, p: Normalized.from_model(m, LogitDiff(p)),
    "probability": lambda m, p: AnswerProbability(p),
    "kl": lambda m, p: KLToClean.from_model(m, p),
    "callable": lambda m, p: (lambda logits: LogitDiff(p)(logits) * logits[..., 0, 3]),
}


@pytest.mark.parametrize("kind", sorted(METRIC_KINDS))
@pytest.mark.parametrize("component", ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "v"])
def test_every_component_and_metric_kind_equals_the_loop(model, small_prompts, component, kind):
    """Fast path (rows finishing the patched block where the patch is after attention; linear
    metrics read through their directions) and bridge path against one forward per cell."""
    prompts = small_prompts[id(model)]
    metric = METRIC_KINDS[kind](model, prompts)
    facts = model_facts(model)
    by = ("layer", "pos") if COMPONENTS[component].head_axis is None else ("layer", "pos", "head")
    positions = [0, 2, 5]
    heads = [1] if len(by) == 3 else None
    cells = [(layer, p, h) for layer in range(facts.n_layers) for p in positions for h in (heads or [None])]
    loop = loop_reference(model, prompts, metric, component, cells, "noising")
    for result in both_runners(model, prompts, metric, component, by=by, positions=positions,
                               heads=heads, direction="noising"):
        assert torch.allclose(result.values.reshape(len(cells), -1), loop, atol=ATOL)


def test_named_positions_on_padded_prompts_equal_the_loop(gpt2_model):
    """Rows whose patched position and END differ per prompt finish the block where each is."""
    prompts = ioi_prompts(gpt2_model, 6, seed=4)
    metric = AnswerLoss(prompts)
    facts = model_facts(gpt2_model)
    _, clean = gpt2_model.run_with_cache(prompts.clean_tokens)
    names = ["S1", "S2", "END"]
    for component, by in (("z", ("layer", "pos", "head")), ("mlp_out", ("layer", "pos"))):
        result = patch_sweep(gpt2_model, prompts, metric, component, by=by, positions=names, progress=False)
        for layer in range(facts.n_layers):
            for j, name in enumerate(names):
                for head in range(facts.n_heads) if component == "z" else [None]:
                    cache = clean[COMPONENTS[component].hook_name(layer)]
                    hook_name, hook = patch_hook(
                        gpt2_model, component, layer, cache, positions=name, prompts=prompts, heads=head
                    )
                    with torch.no_grad():
                        ref = metric(gpt2_model.run_with_hooks(prompts.corrupted_tokens, fwd_hooks=[(hook_name, hook)]))
                    got = result.values[layer, j] if head is None else result.values[layer, j, head]
                    assert torch.allclose(got, ref, atol=ATOL)


def test_grouped_query_kv_sweeps_run_over_kv_heads(llama_model, small_prompts):
    prompts = small_prompts[id(llama_model)]
    result = patch_sweep(llama_model, prompts, LogitDiff(prompts), "v", by=("layer", "head"), progress=False)
    assert result.labels["head"] == ("KV0", "KV1")
    assert result.provenance.grid.kv_head_feeds == (("KV0", ("H0", "H1")), ("KV1", ("H2", "H3")))
    assert result.cell_label((1, 1)) == "L1KV1"
    z = patch_sweep(llama_model, prompts, LogitDiff(prompts), "z", by=("layer", "head"), progress=False)
    assert z.labels["head"] == ("H0", "H1", "H2", "H3") and z.provenance.grid.kv_head_feeds is None


@pytest.mark.parametrize("how", ["zero", "mean", "resample"])
def test_ablation_sweep_equals_factory_hooks_in_a_loop(model, small_prompts, how):
    prompts = small_prompts[id(model)]
    metric = AnswerLoss(prompts)
    results = [ablation_sweep(model, prompts, metric, "z", how=how, seed=1, fast=f, progress=False) for f in RUNNERS]
    _, cache = model.run_with_cache(prompts.clean_tokens)
    facts = model_facts(model)
    for layer in range(facts.n_layers):
        for head in range(facts.n_heads):
            z = cache[f"blocks.{layer}.attn.hook_z"]
            name, hook = ablate_hook(model, "z", layer, z, how=how, heads=head, seed=1)
            with torch.no_grad():
                ref = metric(model.run_with_hooks(prompts.clean_tokens, fwd_hooks=[(name, hook)]))
            for result in results:
                assert torch.allclose(result.values[layer, head], ref, atol=ATOL)
    if how == "zero":  # zero-ablating a head by hand, as TransformerLens' pronoun notebook does
        def zero_head(v, hook, h):
            v = v.clone()
            v[:, :, h] = 0.0
            return v
        with torch.no_grad():
            hooks = [("blocks.1.attn.hook_z", lambda v, hook: zero_head(v, hook, 2))]
            ref = metric(model.run_with_hooks(prompts.clean_tokens, fwd_hooks=hooks))
        assert all(torch.allclose(r.values[1, 2], ref, atol=ATOL) for r in results)


def test_results_do_not_depend_on_the_memory_budget(model, small_prompts):
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    big = patch_sweep(model, prompts, metric, "z", by=("layer", "pos", "head"), progress=False)
    tiny = patch_sweep(model, prompts, metric, "z", by=("layer", "pos", "head"), memory_budget=1, progress=False)
    mid = patch_sweep(model, prompts, metric, "z", by=("layer", "pos", "head"), memory_budget=300_000, progress=False)
    assert torch.allclose(big.values, tiny.values, atol=1e-5) and torch.allclose(big.values, mid.values, atol=1e-5)


def test_named_positions_and_padded_prompts(gpt2_model):
    prompts = ioi_prompts(gpt2_model, 6, seed=4)  # padded: frames differ in length
    assert prompts.padded
    metric = Normalized.from_model(gpt2_model, LogitDiff(prompts))
    result = patch_sweep(gpt2_model, prompts, metric, "resid_pre", positions=["IO", "S1", "S2", "END"], progress=False)
    assert result.labels["pos"] == ("IO", "S1", "S2", "END")
    _, clean = gpt2_model.run_with_cache(prompts.clean_tokens)
    for j, name in enumerate(["IO", "S1", "S2", "END"]):
        hook_name, hook = patch_hook(
            gpt2_model, "resid_pre", 1, clean["blocks.1.hook_resid_pre"], positions=name, prompts=prompts
        )
        with torch.no_grad():
            ref = metric(gpt2_model.run_with_hooks(prompts.corrupted_tokens, fwd_hooks=[(hook_name, hook)]))
        assert torch.allclose(result.values[1, j], ref, atol=ATOL)
    assert result.mean()[0, 2].item() == pytest.approx(1.0, abs=1e-4)  # S2 is the only differing token


def test_result_labels_dataframe_and_save_load(gpt2_model, tmp_path):
    prompts = pronoun_prompts(gpt2_model, n=4, seed=0)
    result = patch_sweep(gpt2_model, prompts, LogitDiff(prompts), "z", by=("layer", "head"), progress=False)
    assert result.cell_label((1, 3)) == "L1H3"
    df = result.to_dataframe()
    assert len(df) == 8 and list(df["label"][:2]) == ["L0H0", "L0H1"]
    assert df["value_mean"].tolist() == pytest.approx(result.mean().flatten().tolist())
    effect = (result.values - result.corrupted).mean(-1).flatten()  # denoising: against the corrupted run
    assert df["effect_mean"].tolist() == pytest.approx(effect.tolist(), abs=1e-6)
    assert set(df["baseline"]) == {"corrupted"}
    assert (df["effect_ci_low"] <= df["effect_mean"] + 1e-6).all()
    assert (df["effect_mean"] <= df["effect_ci_high"] + 1e-6).all()
    path = tmp_path / "r.pt"
    result.save(path)
    back = SweepResult.load(path)
    assert torch.equal(back.values, result.values) and back.labels == result.labels
    assert back.provenance == result.provenance and back.kind == "patched_metric"
    pos = patch_sweep(gpt2_model, prompts, LogitDiff(prompts), "resid_pre", progress=False)
    assert pos.labels["pos"][1] == "1: " + prompts.clean_str_tokens[0][1] + " (NAME)"
    assert result.provenance.direction == "denoising" and result.provenance.metric.name == "logit_diff"
    assert torch.allclose(result.clean, LogitDiff(prompts)(gpt2_model(prompts.clean_tokens)))


def test_hooks_pickle_and_give_identical_output(gpt2_model):
    prompts = pronoun_prompts(gpt2_model, n=4)
    _, clean = gpt2_model.run_with_cache(prompts.clean_tokens)
    for name, hook in (
        patch_hook(gpt2_model, "z", 1, clean["blocks.1.attn.hook_z"], heads=[0, 2], positions="NAME", prompts=prompts),
        ablate_hook(gpt2_model, "resid_mid", 0, clean["blocks.0.hook_resid_mid"], how="resample", positions=[1, 2]),
    ):
        copy = pickle.loads(pickle.dumps(hook))
        with torch.no_grad():
            a = gpt2_model.run_with_hooks(prompts.corrupted_tokens, fwd_hooks=[(name, hook)])
            b = gpt2_model.run_with_hooks(prompts.corrupted_tokens, fwd_hooks=[(name, copy)])
        assert torch.equal(a, b)


def _hook_count(model):
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())


def test_no_side_effects_even_after_a_failing_sweep(model, small_prompts):
    prompts = small_prompts[id(model)]
    before_tokens = prompts.corrupted_tokens.clone(), prompts.clean_tokens.clone()
    hooks_before = _hook_count(model)
    _, clean = model.run_with_cache(prompts.clean_tokens)
    snapshot = {k: v.clone() for k, v in clean.items()}
    name, hook = patch_hook(model, "resid_pre", 1, clean["blocks.1.hook_resid_pre"], positions=2)
    model.run_with_hooks(prompts.corrupted_tokens, fwd_hooks=[(name, hook)])
    assert all(torch.equal(clean[k], v) for k, v in snapshot.items())

    calls = {"n": 0}

    def explodes(logits):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("metric failed midway")
        return LogitDiff(prompts)(logits)

    for fast in RUNNERS:
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="midway"):
            patch_sweep(model, prompts, explodes, "resid_pre", memory_budget=1, fast=fast, progress=False)
        assert _hook_count(model) == hooks_before
    assert torch.equal(prompts.corrupted_tokens, before_tokens[0])
    assert torch.equal(prompts.clean_tokens, before_tokens[1])


def test_bad_inputs(model, small_prompts):
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    with pytest.raises(HookpatchError, match="unknown component 'resid'"):
        patch_sweep(model, prompts, metric, "resid", progress=False)
    with pytest.raises(HookpatchError, match=r"layer 5 is out of range"):
        patch_sweep(model, prompts, metric, layers=[5], progress=False)
    with pytest.raises(HookpatchError, match=r"head 9 is out of range for 'z'"):
        patch_sweep(model, prompts, metric, "z", by=("layer", "head"), heads=[9], progress=False)
    with pytest.raises(HookpatchError, match=r"position 99 is out of range"):
        patch_sweep(model, prompts, metric, positions=[99], progress=False)
    with pytest.raises(HookpatchError, match="has no heads"):
        patch_sweep(model, prompts, metric, "resid_pre", by=("layer", "head"), progress=False)
    with pytest.raises(HookpatchError, match="unknown direction 'forward'"):
        patch_sweep(model, prompts, metric, direction="forward", progress=False)
    with pytest.raises(HookpatchError, match=r"the metric returned \(\) .*one value per prompt"):
        patch_sweep(model, prompts, lambda logits: metric(logits).mean(), progress=False)
    with pytest.raises(HookpatchError, match="unknown ablation 'noise'"):
        ablation_sweep(model, prompts, metric, how="noise", progress=False)
    model.train()
    try:
        with pytest.raises(HookpatchError, match="train mode"):
            patch_sweep(model, prompts, metric, progress=False)
    finally:
        model.eval()


def test_padding_position_and_length_mismatch_are_refused(gpt2_model):
    prompts = ioi_prompts(gpt2_model, 6, seed=4)
    last = prompts.n_pos - 1
    with pytest.raises(HookpatchError, match=rf"position {last} is padding in prompt"):
        patch_sweep(gpt2_model, prompts, LogitDiff(prompts), positions=[last], progress=False)
    other = pronoun_prompts(gpt2_model, n=6)
    _, cache = gpt2_model.run_with_cache(other.clean_tokens)
    name, hook = patch_hook(gpt2_model, "resid_pre", 0, cache["blocks.0.hook_resid_pre"], positions=1)
    with pytest.raises(Exception, match="same length|positions"):
        gpt2_model.run_with_hooks(prompts.corrupted_tokens, fwd_hooks=[(name, hook)])
    assert _hook_count(gpt2_model) == 0


def test_kv_heads_of_a_model_without_grouping_are_plain_heads(gpt2_model, small_prompts):
    prompts = small_prompts[id(gpt2_model)]
    result = patch_sweep(gpt2_model, prompts, LogitDiff(prompts), "k", by=("layer", "head"), progress=False)
    assert result.labels["head"] == ("H0", "H1", "H2", "H3") and result.provenance.grid.kv_head_feeds is None


def test_cell_labels_name_the_layer_not_its_index(gpt2_model, small_prompts):
    """A grid restricted to layer 1 labels its cells L1..., not by their row in the grid."""
    prompts = small_prompts[id(gpt2_model)]
    result = patch_sweep(gpt2_model, prompts, LogitDiff(prompts), "z", by=("layer", "head"), layers=[1],
                         progress=False)
    assert result.cell_label((0, 2)) == "L1H2"
    assert result.to_dataframe(ci=False)["label"].iloc[0] == "L1H0"
