"""Components as data: the flag-gated components (result, q_input, k_input, v_input, mlp_in)
equal hand-written hook loops on the bridge and TransformerLens' own patching functions;
hook flags are restored after a sweep and after a failing one; hook names are built only
through the component table."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformer_lens import patching
from transformer_lens.tools.analysis.attribution_patching import cache_activation_and_gradient

import hookpatch
from hookpatch.attribution import attribution_sweep
from hookpatch.errors import HookpatchError
from hookpatch.hooks import patch_hook
from hookpatch.metrics import LogitDiff
from hookpatch.model import COMPONENTS, component_info, hook_flags, hook_name, model_facts
from hookpatch.sweeps import ablation_sweep, patch_sweep
from hookpatch.tasks import pronoun_prompts

ATOL = 1e-4
NEW = ("result", "q_input", "k_input", "v_input", "mlp_in")
PER_HEAD = ("result", "q_input", "k_input", "v_input")
FLAGS = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in")
POSITIONS = [0, 3, 5]


def flag_state(model):
    """Every hook flag where the bridge reads it: its config, each block's attention config
    (attention flags) and each block's config (use_hook_mlp_in), which may be copies."""
    state = {f"cfg.{f}": bool(getattr(model.cfg, f, False)) for f in FLAGS}
    for i, block in enumerate(model.blocks):
        state.update({f"{i}.attn.{f}": bool(getattr(block.attn.config, f, False)) for f in FLAGS[:2]})
        state[f"{i}.block.use_hook_mlp_in"] = bool(block._read_use_hook_mlp_in())
    return state


class flags_on:
    """The flag a hand-written reference needs, set by hand with the bridge's setter."""

    def __init__(self, model, flag):
        self.model, self.flag = model, flag

    def __enter__(self):
        getattr(self.model, f"set_{self.flag}")(True)

    def __exit__(self, *exc):
        getattr(self.model, f"set_{self.flag}")(False)


def hand_loop(model, prompts, metric, name_of, flag, cells, direction="denoising"):
    """One run_with_hooks per cell, the hook written by hand: copy the activation, overwrite
    one (position, head) slice with the source run's, return the copy. Returning a copy is
    what TransformerLens' HookedTransformer does at hook_mlp_in (it hooks a clone of
    resid_mid), so only the MLP branch sees the patch; for the per-head forks the hooked
    tensor is a fresh copy anyway."""
    run, source = (
        (prompts.corrupted_tokens, prompts.clean_tokens) if direction == "denoising"
        else (prompts.clean_tokens, prompts.corrupted_tokens)
    )
    out = []
    with flags_on(model, flag), torch.no_grad():
        _, cache = model.run_with_cache(source)
        for layer, pos, head in cells:
            src = cache[name_of(layer)]

            def hook(act, hook, pos=pos, head=head, src=src):
                act = act.clone()
                index = (slice(None), slice(None) if pos is None else pos) + (() if head is None else (head,))
                act[index] = src[index]
                return act

            out.append(metric(model.run_with_hooks(run, fwd_hooks=[(name_of(layer), hook)])))
    return torch.stack(out)  # [cell, batch]


def tl_generic(model, prompts, metric, component, setter, axes, cells, flag):
    """TransformerLens' own generic_activation_patch at this component's hook, one forward per
    cell (its default index table sizes a head axis by query heads, except for k and v)."""
    index_df = pd.DataFrame([tuple(c) for c in cells], columns=list(axes))
    with flags_on(model, flag), torch.no_grad():
        _, cache = model.run_with_cache(prompts.clean_tokens)
        return patching.generic_activation_patch(
            model, prompts.corrupted_tokens, cache, lambda logits: metric(logits).mean(),
            patch_setter=setter, activation_name=component, index_df=index_df,
        )


def cells_of(facts, component, by):
    heads = range(facts.n_heads_of(component)) if "head" in by else [None]
    positions = POSITIONS if "pos" in by else [None]
    return [(layer, p, h) for layer in range(facts.n_layers) for p in positions for h in heads]


def test_table_rows_of_the_new_components(llama_model):
    """Hook names, flags and axes; under grouped-query attention k_input/v_input are per KV head."""
    facts = model_facts(llama_model)
    rows = {row["component"]: row for row in facts.table()}
    assert rows["result"]["hook_name"] == "blocks.0.attn.hook_result"
    assert rows["result"]["shape"] == ("batch", "pos", 4, 64) and rows["result"]["flag"] == "use_attn_result"
    assert rows["q_input"]["shape"] == ("batch", "pos", 4, 64) and rows["q_input"]["head_axis"] == "head"
    for c in ("k_input", "v_input"):
        assert rows[c]["shape"] == ("batch", "pos", 2, 64) and rows[c]["head_axis"] == "kv_head"
        assert rows[c]["flag"] == "use_split_qkv_input" and facts.n_heads_of(c) == 2
    assert rows["mlp_in"]["hook_name"] == "blocks.0.hook_mlp_in" and rows["mlp_in"]["flag"] == "use_hook_mlp_in"
    assert not component_info("mlp_in").in_place and component_info("resid_mid").in_place
    assert [c.name for c in COMPONENTS.values() if c.flag is None] == [
        "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern"]


@pytest.mark.parametrize("component", NEW)
def test_table_shapes_match_the_bridge_cache_with_flags(model, small_prompts, component):
    """The table's axes are what the bridge really hands the hook, at every layer."""
    prompts = small_prompts[id(model)]
    facts = model_facts(model)
    info = component_info(component)
    sizes = {**facts.axis_sizes(), "batch": len(prompts), "pos": prompts.n_pos}
    with flags_on(model, info.flag), torch.no_grad():
        _, cache = model.run_with_cache(prompts.clean_tokens)
    for layer in range(facts.n_layers):
        assert tuple(cache[info.hook_name(layer)].shape) == tuple(sizes[a] for a in info.axes)
    assert not any(flag_state(model).values())


@pytest.mark.parametrize("component", PER_HEAD)
@pytest.mark.parametrize("by", [("layer", "head"), ("layer", "pos", "head")])
def test_head_components_equal_hand_loop_and_transformerlens(model, small_prompts, component, by):
    """Per head (query heads, or KV heads for k_input/v_input), at all positions or by position."""
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    facts = model_facts(model)
    info = component_info(component)
    n = facts.n_heads_of(component)
    positions = POSITIONS if "pos" in by else None
    result = patch_sweep(model, prompts, metric, component, by=by, positions=positions, fast=False, progress=False)
    cells = cells_of(facts, component, by)
    assert result.values.shape == (facts.n_layers, *([len(POSITIONS)] if positions else []), n, len(prompts))
    if positions:  # TransformerLens at the same cells (its own setter, one forward per cell)
        setter = patching.layer_pos_head_vector_patch_setter
        tl = tl_generic(model, prompts, metric, component, setter, ("layer", "pos", "head"), cells, info.flag)
    else:
        setter = patching.layer_head_vector_patch_setter
        layer_head = [(layer, head) for layer, _, head in cells]
        tl = tl_generic(model, prompts, metric, component, setter, ("layer", "head"), layer_head, info.flag)
        loop = hand_loop(model, prompts, metric, info.hook_name, info.flag, cells)
        assert torch.allclose(result.values.reshape(len(cells), -1), loop, atol=ATOL)
    assert torch.allclose(result.mean().flatten(), tl, atol=ATOL)
    kv = facts.grouped_query and info.head_axis == "kv_head"
    assert result.labels["head"][-1] == (f"KV{n - 1}" if kv else f"H{n - 1}")
    assert not any(flag_state(model).values())


# Each new component against an older one it must equal, patched by TransformerLens' own function.
IDENTITIES = {
    # every head's copy of the residual → that head's queries/keys/values (clean source)
    "q_input": ("q", patching.get_act_patch_attn_head_q_all_pos),
    "k_input": ("k", patching.get_act_patch_attn_head_k_all_pos),
    "v_input": ("v", patching.get_act_patch_attn_head_v_all_pos),
}


@pytest.mark.parametrize("component", sorted(IDENTITIES))
def test_input_copies_equal_transformerlens_qkv_patching(model, small_prompts, component):
    """Patching head h's copy of the residual with the clean one makes exactly head h's q (or
    KV head g's k/v) clean, so it equals TransformerLens' q/k/v head patching."""
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    _, fn = IDENTITIES[component]
    with torch.no_grad():
        _, cache = model.run_with_cache(prompts.clean_tokens)
        tl = fn(model, prompts.corrupted_tokens, cache, lambda logits: metric(logits).mean())
    result = patch_sweep(model, prompts, metric, component, by=("layer", "head"), fast=False, progress=False)
    assert torch.allclose(result.mean(), tl, atol=ATOL)


VARIANT_IDENTITIES = {  # component, grid → TransformerLens' function for the component it equals
    "result": (("layer", "pos"), patching.get_act_patch_attn_out),
    "mlp_in": (("layer", "pos"), patching.get_act_patch_mlp_out),
    "k_input": (("layer", "head"), patching.get_act_patch_attn_head_k_all_pos),
}


def test_every_variant_patches_the_new_components_on_the_bridge(variant_model):
    """On all six architecture variants (q/k norms, post-sublayer norms, sliding windows,
    grouped-query attention): result at a position as attn_out, mlp_in as mlp_out, k_input
    per KV head as k, each equal to TransformerLens' function; the flags are off after."""
    model = variant_model
    prompts = pronoun_prompts(model, n=3, seed=0)
    metric = LogitDiff(prompts)
    with torch.no_grad():
        _, cache = model.run_with_cache(prompts.clean_tokens)
    for component, (by, fn) in VARIANT_IDENTITIES.items():
        with torch.no_grad():
            tl = fn(model, prompts.corrupted_tokens, cache, lambda logits: metric(logits).mean())
        result = patch_sweep(model, prompts, metric, component, by=by, fast=False, progress=False)
        assert torch.allclose(result.mean(), tl, atol=ATOL), component
    assert not any(flag_state(model).values())


def test_result_of_all_heads_equals_transformerlens_attn_out(model, small_prompts):
    """attn_out = sum over heads of result + b_O, so all heads' results at a position patch
    attn_out there."""
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    with torch.no_grad():
        _, cache = model.run_with_cache(prompts.clean_tokens)
        tl = patching.get_act_patch_attn_out(model, prompts.corrupted_tokens, cache, lambda lg: metric(lg).mean())
    result = patch_sweep(model, prompts, metric, "result", by=("layer", "pos"), fast=False, progress=False)
    assert result.values.shape == (model_facts(model).n_layers, prompts.n_pos, len(prompts))
    assert torch.allclose(result.mean(), tl, atol=ATOL)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_mlp_in_equals_hand_loop_and_transformerlens_mlp_out(model, small_prompts, direction):
    """The MLP acts per position, so patching its input with the source run's makes its output
    the source's there: mlp_in patching equals TransformerLens' mlp_out patching. An in-place
    edit at hook_mlp_in would also reach the residual skip (the bridge hooks resid_mid itself)
    and give resid_mid patching instead."""
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    facts = model_facts(model)
    result = patch_sweep(model, prompts, metric, "mlp_in", direction=direction, fast=False, progress=False)
    cells = [(layer, p, None) for layer in range(facts.n_layers) for p in range(prompts.n_pos)]
    loop = hand_loop(model, prompts, metric, component_info("mlp_in").hook_name, "use_hook_mlp_in", cells, direction)
    assert torch.allclose(result.values.reshape(len(cells), -1), loop, atol=ATOL)
    run, source = (
        (prompts.corrupted_tokens, prompts.clean_tokens) if direction == "denoising"
        else (prompts.clean_tokens, prompts.corrupted_tokens)
    )
    with torch.no_grad():
        _, cache = model.run_with_cache(source)
        tl = patching.get_act_patch_mlp_out(model, run, cache, lambda logits: metric(logits).mean())
    assert torch.allclose(result.mean(), tl, atol=ATOL)
    resid_mid = patch_sweep(model, prompts, metric, "resid_mid", direction=direction, fast=False, progress=False)
    assert not torch.allclose(result.mean(), resid_mid.mean(), atol=1e-2)  # the skip did not see it


@pytest.mark.parametrize("component", ["result", "k_input"])
def test_mean_ablation_equals_hand_loop(model, small_prompts, component):
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    facts = model_facts(model)
    info = component_info(component)
    result = ablation_sweep(model, prompts, metric, component, how="mean", fast=False, progress=False)
    out = []
    with flags_on(model, info.flag), torch.no_grad():
        _, cache = model.run_with_cache(prompts.clean_tokens)
        for layer in range(facts.n_layers):
            mean = cache[info.hook_name(layer)].mean(0)  # [pos, head, d_model] over the prompts
            for h in range(facts.n_heads_of(component)):

                def hook(act, hook, mean=mean, h=h):
                    act = act.clone()
                    act[:, :, h] = mean[:, h]
                    return act

                logits = model.run_with_hooks(prompts.clean_tokens, fwd_hooks=[(info.hook_name(layer), hook)])
                out.append(metric(logits))
    assert torch.allclose(result.values.reshape(len(out), -1), torch.stack(out), atol=ATOL)


def test_patch_hook_on_mlp_in_returns_a_new_tensor(gpt2_model, small_prompts):
    """patch_hook at mlp_in in a user's own loop leaves the residual skip alone: it equals
    patching mlp_out at the same place, as the sweep does."""
    prompts = small_prompts[id(gpt2_model)]
    metric = LogitDiff(prompts)
    with hook_flags(gpt2_model, ["mlp_in"]), torch.no_grad():
        _, cache = gpt2_model.run_with_cache(prompts.clean_tokens)
        name, hook = patch_hook(gpt2_model, "mlp_in", 0, cache[hook_name("mlp_in", 0)], positions=3)
        mine = metric(gpt2_model.run_with_hooks(prompts.corrupted_tokens, fwd_hooks=[(name, hook)]))
        name, hook = patch_hook(gpt2_model, "mlp_out", 0, cache[hook_name("mlp_out", 0)], positions=3)
        out = metric(gpt2_model.run_with_hooks(prompts.corrupted_tokens, fwd_hooks=[(name, hook)]))
    sweep = patch_sweep(gpt2_model, prompts, metric, "mlp_in", layers=0, positions=3, fast=False, progress=False)
    assert not torch.allclose(mine, metric(gpt2_model(prompts.corrupted_tokens)), atol=1e-3)  # it reaches END
    assert torch.allclose(mine, out, atol=ATOL) and torch.allclose(mine, sweep.values.flatten(), atol=ATOL)


def test_attribution_on_new_components_equals_transformerlens_gradients(model, small_prompts):
    """Gradient × (clean − corrupted) per head at result and k_input, and per position at
    mlp_in, against TransformerLens' backward-hook gradient capture with the flags set by hand
    (at hook_mlp_in that capture sees the MLP branch only, as patching there does)."""
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    facts = model_facts(model)
    summed = lambda logits: metric(logits).sum()  # noqa: E731 - prompts do not interact
    for component in ("result", "k_input", "mlp_in"):
        info = component_info(component)
        names = [info.hook_name(layer) for layer in range(facts.n_layers)]
        with flags_on(model, info.flag):
            base = cache_activation_and_gradient(model, prompts.corrupted_tokens, summed, names_filter=names)
            target = cache_activation_and_gradient(
                model, prompts.clean_tokens, summed, names_filter=names, compute_gradient=False
            )
        per_pos = torch.stack([
            (base.gradients[n] * (target.activations[n] - base.activations[n])).sum(-1) for n in names
        ])  # [layer, batch, pos(, head)]
        if info.head_axis:
            by, ref = ("layer", "head"), per_pos.sum(2).movedim(1, -1)  # [layer, head, batch]
        else:
            by, ref = ("layer", "pos"), per_pos.transpose(1, 2)  # [layer, pos, batch]
        res = attribution_sweep(model, prompts, metric, component, by=by, progress=False)
        assert res.values.shape == ref.shape
        assert torch.allclose(res.values, ref, atol=ATOL), component
    assert not any(flag_state(model).values())


def test_flags_restored_after_sweeps_and_after_a_failing_one(model, small_prompts):
    prompts = small_prompts[id(model)]
    metric = LogitDiff(prompts)
    assert not any(flag_state(model).values())
    patch_sweep(model, prompts, metric, "result", by=("layer", "head"), fast=False, progress=False)
    assert not any(flag_state(model).values())
    calls = []

    def failing(logits):
        calls.append(1)
        if len(calls) > 2:  # after both baselines, during the first chunk
            raise RuntimeError("metric failed")
        return metric(logits)

    for component in NEW:
        with pytest.raises(RuntimeError, match="metric failed"):
            calls.clear()
            patch_sweep(model, prompts, failing, component, fast=False, progress=False)
        assert not any(flag_state(model).values()), component
        assert not any(p.fwd_hooks or p.bwd_hooks for p in model.hook_dict.values())
    # a flag that was on stays on
    model.set_use_attn_result(True)
    try:
        patch_sweep(model, prompts, metric, "result", by=("layer", "head"), fast=False, progress=False)
        with hook_flags(model, ["result", "mlp_in"]):
            assert model.cfg.use_attn_result and model.cfg.use_hook_mlp_in
        assert model.cfg.use_attn_result and not model.cfg.use_hook_mlp_in
    finally:
        model.set_use_attn_result(False)
    assert not any(flag_state(model).values())


def test_hook_flags_restores_on_error_and_reports_conflicts(model):
    with pytest.raises(KeyboardInterrupt):
        with hook_flags(model, ["result", "q_input", "mlp_in", "z"]):
            assert all(v for k, v in flag_state(model).items())
            raise KeyboardInterrupt
    assert not any(flag_state(model).values())
    model.set_use_attn_in(True)  # exclusive with the split q/k/v inputs
    try:
        with pytest.raises(HookpatchError, match=r"cannot turn on use_split_qkv_input \(needed by k_input"):
            with hook_flags(model, ["result", "k_input"]):
                pass
        assert not model.cfg.use_attn_result  # the flag turned on before the failing one is off again
    finally:
        model.set_use_attn_in(False)
    with pytest.raises(HookpatchError, match=r"unknown component 'results'.*expected one of"):
        with hook_flags(model, ["results"]):
            pass


def test_grids_and_selection_of_new_components(llama_model, small_prompts):
    prompts = small_prompts[id(llama_model)]
    metric = LogitDiff(prompts)
    with pytest.raises(HookpatchError, match=r"'mlp_in' has no heads; a grid by head needs one of .*result, q_input"):
        patch_sweep(llama_model, prompts, metric, "mlp_in", by=("layer", "head"), fast=False, progress=False)
    quiet = dict(fast=False, progress=False)
    with pytest.raises(HookpatchError, match=r"head 2 is out of range for 'v_input': this model has 2 KV heads"):
        patch_sweep(llama_model, prompts, metric, "v_input", by=("layer", "head"), heads=[2], **quiet)
    res = patch_sweep(llama_model, prompts, metric, "v_input", by=("layer", "head"), layers=1, **quiet)
    assert res.labels["head"] == ("KV0", "KV1")
    feeds = {kv: list(heads) for kv, heads in dict(res.provenance.grid.kv_head_feeds).items()}
    assert feeds == {"KV0": ["H0", "H1"], "KV1": ["H2", "H3"]}


# Files that still build hook names themselves; each must move to hookpatch.model._facts
# (hook_name, resid_entering, attention_key). A new file here fails the test.
PENDING: tuple[str, ...] = ()
HOOK_NAME_BUILT = re.compile(r"""f["']blocks\.\{|["']blocks\.\{layer\}|\.format\(layer=""")


def test_hook_names_are_built_only_through_the_table():
    root = Path(hookpatch.__file__).parent
    offenders = set()
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel == "model/_facts.py":
            continue
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        if HOOK_NAME_BUILT.search(code):
            offenders.add(rel)
    assert not [f for f in offenders if not f.startswith(PENDING)], sorted(offenders)
    facts_code = (root / "model" / "_facts.py").read_text()
    assert HOOK_NAME_BUILT.search(facts_code)  # the pattern does find the table's own templates
