"""Attribution at every site is the derivative of real activation patching.

The reference is a hand-written patch loop, sharing no code with hookpatch's attribution or
patching: ``model.run_with_hooks`` with a hook that writes a value into the activation in
place, as activation patching does (so every reader of the activation sees it: under
TransformerLens 4's compatibility mode ``hook_resid_mid`` is ``ln2.hook_in``, read by the
MLP branch *and* the residual skip).

- Attribution patching equals the central finite difference of patching
  ``base + ε·(target − base)`` into each grid cell (and into the whole site), per prompt.
- Integrated gradients summed over a site, Richardson-extrapolated in the step count,
  equals the effect of patching the whole site.

Precision: the models are float64 copies of the session fixtures, with ε = 1e-3, so the
central difference's truncation error (~ε²) and round-off are far below the tolerance of
1e-3 × the component's effect scale. (HF's Llama RMSNorm and rotary compute in float32
even in a float64 model, which leaves ~1e-4 absolute noise in the llama differences; ε =
1e-2 would bring truncation errors of ~1e-3 relative, too close to the tolerance.)
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from hookpatch.attribution import attribution_sweep, compare
from hookpatch.metrics import LogitDiff
from hookpatch.tasks import make_prompt_set

EPS = 1e-3
RTOL = 1e-3
CLEAN = ["Mary went to the store", "John went to the park", "Amy went to the shops"]
CORRUPTED = ["John went to the store", "Mary went to the park", "Dan went to the shops"]
ANSWERS = [(" she", " he"), (" he", " she"), (" she", " he")]

# Hook names and activation layouts, written out by hand: residual-width sites are
# [batch, pos, d_model]; z/q/k/v are [batch, pos, head, d_head] (k/v over KV heads);
# pattern is [batch, head, query_pos, key_pos].
HOOKS = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "z": "blocks.{}.attn.hook_z",
    "q": "blocks.{}.attn.hook_q",
    "k": "blocks.{}.attn.hook_k",
    "v": "blocks.{}.attn.hook_v",
    "pattern": "blocks.{}.attn.hook_pattern",
}
RESIDUAL = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
N_LAYERS = 2


@pytest.fixture(scope="module")
def models(gpt2_model, llama_model):
    """float64 copies of both families (the session fixtures stay float32)."""
    return {"gpt2": copy.deepcopy(gpt2_model).double(), "llama": copy.deepcopy(llama_model).double()}


@pytest.fixture(scope="module")
def prompt_sets(models):
    return {family: make_prompt_set(m, CLEAN, CORRUPTED, ANSWERS) for family, m in models.items()}


def write_in_place(activation, hook, *, value):
    """The reference patch: overwrite the activation in place and return it."""
    activation.copy_(value.to(activation.dtype))
    return activation


def patched_metric(model, tokens, metric, name, values):
    """``[n, batch]`` metric with ``values[i]`` (``[batch, ...]``) written at ``name``, one
    forward of ``n`` stacked copies of the prompts."""
    n, batch = values.shape[0], tokens.shape[0]
    hook = partial(write_in_place, value=values.flatten(0, 1))
    with torch.no_grad():
        logits = model.run_with_hooks(tokens.repeat(n, 1), fwd_hooks=[(name, hook)])
    return metric(logits.reshape(n, batch, *logits.shape[1:])).double()


def runs(model, prompts, direction, name):
    """(tokens of the patched run, its activation at ``name``, the source run's activation)."""
    base, target = (
        (prompts.corrupted_tokens, prompts.clean_tokens)
        if direction == "denoising"
        else (prompts.clean_tokens, prompts.corrupted_tokens)
    )
    with torch.no_grad():
        _, base_cache = model.run_with_cache(base, names_filter=[name])
        _, target_cache = model.run_with_cache(target, names_filter=[name])
    return base, base_cache[name], target_cache[name]


def cell_masks(component, shape):
    """``(masks [n_cells, *shape], cells)``: one boolean mask per cell of the finest grid
    ((pos) for residual sites, (pos, head) otherwise), then the whole site."""
    masks, cells = [], []
    n_pos = shape[2] if component == "pattern" else shape[1]
    n_heads = 1 if component in RESIDUAL else shape[1] if component == "pattern" else shape[2]
    for pos in range(n_pos):
        for head in range(n_heads):
            mask = torch.zeros(shape, dtype=torch.bool)
            if component in RESIDUAL:
                mask[:, pos] = True
            elif component == "pattern":
                mask[:, head, pos] = True
            else:
                mask[:, pos, head] = True
            masks.append(mask)
            cells.append((pos,) if component in RESIDUAL else (pos, head))
    masks.append(torch.ones(shape, dtype=torch.bool))
    cells.append("site")
    return torch.stack(masks), cells


def finite_differences(model, tokens, metric, name, base, target, masks):
    """``[n_cells, batch]``: d metric / d ε of patching ``base + ε·(target − base)`` into each
    mask's entries, by central differences at ε = ±EPS."""
    step = masks.to(base.device) * (target - base).unsqueeze(0)
    up = patched_metric(model, tokens, metric, name, base.unsqueeze(0) + EPS * step)
    down = patched_metric(model, tokens, metric, name, base.unsqueeze(0) - EPS * step)
    return (up - down) / (2 * EPS)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("component", list(HOOKS))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attribution_is_the_derivative_of_patching(models, prompt_sets, family, component, direction):
    """Per cell of (layer, pos) / (layer, pos, head), and per whole site (layer,)."""
    model, prompts = models[family], prompt_sets[family]
    metric = LogitDiff(prompts)
    by = ("layer", "pos") if component in RESIDUAL else ("layer", "pos", "head")
    grid = attribution_sweep(model, prompts, metric, component, by=by, direction=direction, progress=False)
    site = attribution_sweep(model, prompts, metric, component, by=("layer",), direction=direction, progress=False)
    estimates, references = [], []
    for layer in range(N_LAYERS):
        name = HOOKS[component].format(layer)
        tokens, base, target = runs(model, prompts, direction, name)
        masks, cells = cell_masks(component, tuple(base.shape))
        fd = finite_differences(model, tokens, metric, name, base, target, masks)
        references.append(fd)
        estimates.append(torch.stack([site.values[layer] if c == "site" else grid.values[(layer, *c)] for c in cells]))
    estimate, reference = torch.stack(estimates).double(), torch.stack(references)
    scale = reference.abs().max()
    assert scale > 1e-2, f"{component}: too small an effect to test ({scale})"
    err = (estimate - reference).abs().max()
    assert err <= RTOL * scale, f"{family} {component} {direction}: |AtP − FD| = {err:.3g}, scale {scale:.3g}"


def site_effect(model, prompts, metric, direction, name):
    """``[batch]`` effect of patching the whole site: hand loop minus the unpatched run."""
    tokens, base, target = runs(model, prompts, direction, name)
    values = torch.stack([base, target])
    patched = patched_metric(model, tokens, metric, name, values)
    return patched[1] - patched[0]


STEPS = (16, 32, 64)


def richardson(ig):
    """The N → ∞ limit of left Riemann sums ``ig[N]`` at N = 16, 32, 64: remove the 1/N
    term, then the 1/N² term."""
    once = {n: 2 * ig[2 * n] - ig[n] for n in (16, 32)}
    return (4 * once[32] - once[16]) / 3


IG_CASES = [(f, c, "denoising") for f in ("gpt2", "llama") for c in HOOKS] + [
    (f, "resid_mid", "noising") for f in ("gpt2", "llama")
]


@pytest.mark.parametrize(("family", "component", "direction"), IG_CASES)
def test_integrated_gradients_converge_to_patching_the_site(models, prompt_sets, family, component, direction):
    """IG's left Riemann sum has the Euler–Maclaurin error c₁/N + c₂/N² + O(1/N⁴), so two
    Richardson steps over N = 16, 32, 64 leave an O(1/N⁴) error. (From N = 16 on the
    one-step estimates 2·IG(2N) − IG(N) shrink fourfold per doubling on both families; at
    N = 8 llama's are not yet in that regime.)"""
    model, prompts = models[family], prompt_sets[family]
    metric = LogitDiff(prompts)
    ig = {
        steps: attribution_sweep(
            model, prompts, metric, component, by=("layer",), direction=direction, steps=steps,
            steps_per_pass=64, progress=False,
        ).values.double()
        for steps in STEPS
    }
    effect = torch.stack(
        [site_effect(model, prompts, metric, direction, HOOKS[component].format(layer)) for layer in range(N_LAYERS)]
    )
    scale = effect.abs().max()
    assert scale > 1e-2, f"{component}: too small an effect to test ({scale})"
    err = (richardson(ig) - effect).abs().max()
    assert err <= RTOL * scale, f"{family} {component} {direction}: |IG − patching| = {err:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_compare_at_resid_mid_agrees_with_patching(models, prompt_sets, family):
    """compare's two columns at resid_mid, whole sites: IG (Richardson-extrapolated) equals
    activation patching, and compare's activation effect equals the hand loop."""
    model, prompts = models[family], prompt_sets[family]
    metric = LogitDiff(prompts)
    cmps = {
        steps: compare(model, prompts, metric, "resid_mid", by=("layer",), steps=steps, k=1,
                       n_resamples=20, progress=False)
        for steps in STEPS
    }
    hooks = [HOOKS["resid_mid"].format(layer) for layer in range(N_LAYERS)]
    effect = torch.stack([site_effect(model, prompts, metric, "denoising", hook) for hook in hooks])
    activation = cmps[64].activation_effect.double()
    assert torch.allclose(activation, effect, atol=1e-6 * effect.abs().max())
    extrapolated = richardson({n: c.attribution.values.double() for n, c in cmps.items()})
    assert (extrapolated - activation).abs().max() <= RTOL * activation.abs().max()
