"""Tests of the slow circuit references in ``_circuit_refs`` (themselves the yardstick for
hookpatch's circuits engine), against TransformerLens's direct path patching, against
running the model, and against identities that must hold exactly."""

from __future__ import annotations

import pytest
import torch
from _circuit_refs import (
    all_edges,
    ref_edge_patch,
    ref_path_patch,
    ref_sender_deltas,
)
from transformer_lens.patching import get_act_patch_direct_path

from hookpatch import tiny_model

SIZES = dict(n_layers=2, d_model=64, n_heads=4, d_mlp=128)
FAMILIES = {  # family -> tiny_model arguments
    "gpt2": dict(family="gpt2", seed=11),
    "llama_mha": dict(family="llama", n_kv_heads=4, seed=21),
    "llama_gqa": dict(family="llama", n_kv_heads=2, seed=12),
    "qwen3": dict(family="qwen3", n_kv_heads=2, seed=14),
    "gemma2": dict(family="gemma2", n_kv_heads=2, sliding_window=4, seed=15),
}
_MODELS: dict[str, object] = {}


def get_model(name):
    if name not in _MODELS:
        kwargs = dict(FAMILIES[name])
        _MODELS[name] = tiny_model(kwargs.pop("family"), **SIZES, **kwargs)
    return _MODELS[name]


def setup(name, batch=3, n_pos=7, seed=0):
    """A model, target/source prompts of random tokens, and a per-prompt logit-difference metric."""
    model = get_model(name)
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    target = torch.randint(1, vocab, (batch, n_pos), generator=g)
    source = torch.randint(1, vocab, (batch, n_pos), generator=g)
    good, bad = torch.randint(1, vocab, (2, batch), generator=g)

    def metric(logits):
        last = logits[:, -1]
        return last[torch.arange(batch), good] - last[torch.arange(batch), bad]

    return model, target, source, metric


def run_metric(model, tokens, metric):
    with torch.no_grad():
        return metric(model(tokens))


SENDERS = ["input"] + [f"L{i}H{h}" for i in range(2) for h in range(4)] + ["MLP0", "MLP1"]


# --- sender differences ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "qwen3", "gemma2"])
def test_head_delta_is_the_attention_output_change_of_running_the_model(name):
    """Δ of head h = hook_attn_out with only head h's z swapped to the source's, minus the
    target's: checked by actually running that patch (Gemma 2 includes its ln1_post)."""
    model, target, source, _ = setup(name)
    heads = [(0, 1), (1, 2), (1, 3)]
    deltas = ref_sender_deltas(model, target, source, [f"L{i}H{h}" for i, h in heads])
    with torch.no_grad():
        _, cache_t = model.run_with_cache(target)
        _, cache_s = model.run_with_cache(source)
        for layer, head in heads:
            z_name, out_name = f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out"
            seen = {}

            def swap(z, hook, head=head, z_name=z_name):
                z = z.clone()
                z[:, :, head] = cache_s[z_name][:, :, head]
                return z

            def read(x, hook, seen=seen):
                seen["out"] = x.clone()

            model.run_with_hooks(target, fwd_hooks=[(z_name, swap), (out_name, read)])
            expected = seen["out"] - cache_t[out_name]
            assert expected.abs().max() > 1e-3
            torch.testing.assert_close(deltas[f"L{layer}H{head}"], expected, atol=1e-5, rtol=0)


def test_gqa_split_inputs_have_one_copy_per_kv_head():
    """Under grouped-query attention hook_k_input/hook_v_input are [batch, pos, n_kv_heads, d_model]."""
    model, target, _, _ = setup("llama_gqa")
    shapes = {}
    model.set_use_split_qkv_input(True)
    try:
        model.run_with_hooks(target, fwd_hooks=[
            (f"blocks.0.hook_{c}_input", lambda x, hook: shapes.__setitem__(hook.name, tuple(x.shape))) for c in "qkv"
        ])
    finally:
        model.set_use_split_qkv_input(False)
    assert shapes == {
        "blocks.0.hook_q_input": (3, 7, 4, 64), "blocks.0.hook_k_input": (3, 7, 2, 64),
        "blocks.0.hook_v_input": (3, 7, 2, 64),
    }


# --- exact edge patching -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "llama_mha"])
@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_edge_patch_matches_transformer_lens_direct_path(name, component):
    """Head -> head edges equal TransformerLens's get_act_patch_direct_path (denoising:
    target = corrupted, source = clean), per prompt via a random weighting of the batch."""
    model, corrupted, clean, metric = setup(name)
    weights = torch.randn(3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        _, corrupted_cache = model.run_with_cache(corrupted)
    for src_head in (0, 3):
        with torch.no_grad():
            tl = get_act_patch_direct_path(
                model, corrupted, clean_cache, corrupted_cache, lambda lg: (metric(lg) * weights).sum(),
                src_layer=0, src_head=src_head, component=component, verbose=False,
            )
        for dst_head in range(4):
            ours = ref_edge_patch(model, corrupted, clean, [f"L0H{src_head}->L1H{dst_head}.{component}"], metric)
            assert abs((ours * weights).sum().item() - tl[1, dst_head].item()) < 1e-4
    base = (run_metric(model, corrupted, metric) * weights).sum().item()
    assert (tl[1] - base).abs().max() > 1e-3  # the edges do something


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "qwen3", "gemma2"])
def test_empty_edge_set_is_the_target_run(name):
    model, target, source, metric = setup(name)
    torch.testing.assert_close(ref_edge_patch(model, target, source, [], metric), run_metric(model, target, metric))
    torch.testing.assert_close(
        ref_edge_patch(model, target, source, [], metric, recompute_senders=True), run_metric(model, target, metric)
    )


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "qwen3", "gemma2"])
def test_every_sender_into_the_logits(name):
    """The final residual is the sum of all sender outputs, so patching every sender into the
    logits gives the source run, except on Gemma 2, where the post-attention norm makes a
    layer's head Δs not sum to its attention-output change."""
    model, target, source, metric = setup(name)
    got = ref_edge_patch(model, target, source, [f"{s}->logits" for s in SENDERS], metric)
    want = run_metric(model, source, metric)
    if name == "gemma2":
        assert (got - want).abs().max() > 1e-2
        # the input and the MLPs are additive on Gemma 2 too: patch the heads' layer sums by hand
        deltas = ref_sender_deltas(model, target, source, ["input", "MLP0", "MLP1"])
        with torch.no_grad():
            _, cache_t = model.run_with_cache(target)
            _, cache_s = model.run_with_cache(source)
        attn = sum(cache_s[f"blocks.{i}.hook_attn_out"] - cache_t[f"blocks.{i}.hook_attn_out"] for i in range(2))
        final = cache_t["blocks.1.hook_resid_post"] + sum(deltas.values()) + attn
        torch.testing.assert_close(final, cache_s["blocks.1.hook_resid_post"], atol=1e-4, rtol=0)
    else:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "qwen3", "gemma2"])
def test_complete_edge_set(name):
    """With Δs taken against this forward's sender outputs, patching every edge makes every
    receiver see its source-run input: the source run, on every family. With the spec's
    cached Δs a sender whose inputs are patched reaches its receivers twice, so the complete
    edge set overshoots; both readings agree whenever no patched edge's sender has a patched input."""
    model, target, source, metric = setup(name)
    edges = all_edges(model)
    want = run_metric(model, source, metric)
    torch.testing.assert_close(
        ref_edge_patch(model, target, source, edges, metric, recompute_senders=True), want, atol=1e-4, rtol=0
    )
    assert (ref_edge_patch(model, target, source, edges, metric) - want).abs().max() > 1e-2
    upstream = [  # senders input, L0H0, L0H2 (never patched themselves) into layer 1 and the logits
        e for e in edges
        if e.split("->")[0] in ("input", "L0H0", "L0H2") and not e.split("->")[1].startswith(("L0", "MLP0"))
    ]
    torch.testing.assert_close(
        ref_edge_patch(model, target, source, upstream, metric),
        ref_edge_patch(model, target, source, upstream, metric, recompute_senders=True), atol=1e-5, rtol=0,
    )


def test_edge_patch_at_positions_touches_only_those_columns():
    """An edge into the logits patched at other columns than the read one changes nothing;
    at the read column it equals the all-positions patch (the logits read one column)."""
    model, target, source, metric = setup("gpt2")
    base = run_metric(model, target, metric)
    edge = ["L1H2->logits", "MLP1->logits"]
    elsewhere = torch.tensor([[0, 2], [1, 3], [4, 5]])
    torch.testing.assert_close(ref_edge_patch(model, target, source, edge, metric, positions=elsewhere), base)
    last = torch.full((3, 1), 6)
    torch.testing.assert_close(
        ref_edge_patch(model, target, source, edge, metric, positions=last),
        ref_edge_patch(model, target, source, edge, metric),
    )


# --- path patching -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "qwen3", "gemma2"])
@pytest.mark.parametrize("with_positions", [False, True])
@pytest.mark.parametrize("group", ["heads", "mlp"])
def test_path_patch_into_one_sublayer_is_edge_patching(name, with_positions, group):
    """MLPs frozen, receivers all in one sublayer (layer 1's heads, or MLP1): path patching =
    edge patching of every sender -> receiver edge. One head sender per layer, as Gemma 2's
    head Δs do not add; and not heads and MLP of one layer together: path patching replaces
    MLP1's input, so it misses the change that patched layer-1 heads write into it."""
    model, target, source, metric = setup(name)
    kv = "KV1" if name != "gpt2" else "H1"
    if group == "heads":
        senders, receivers = ["input", "L0H1", "MLP0"], ["L1H0.q", "L1H3.q", f"L1{kv}.k", f"L1{kv}.v"]
    else:
        senders, receivers = ["input", "L0H1", "MLP0", "L1H2"], ["MLP1"]
    edges = [f"{s}->{r}" for s in senders for r in receivers]
    positions = torch.tensor([[1, 6], [0, 6], [3, 6]]) if with_positions else None
    path = ref_path_patch(
        model, target, source, senders, receivers, metric, freeze_mlps=True,
        sender_positions=positions, receiver_positions=positions,
    )
    edge = ref_edge_patch(model, target, source, edges, metric, positions)
    torch.testing.assert_close(path, edge, atol=1e-4, rtol=0)
    assert (path - run_metric(model, target, metric)).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "qwen3", "gemma2"])
@pytest.mark.parametrize("sender", ["input", "L0H3", "L1H0", "MLP0"])
def test_path_patch_one_sender_into_logits_is_the_direct_edge(name, sender):
    model, target, source, metric = setup(name)
    path = ref_path_patch(model, target, source, [sender], ["logits"], metric, freeze_mlps=True)
    torch.testing.assert_close(path, ref_edge_patch(model, target, source, [f"{sender}->logits"], metric),
                               atol=1e-4, rtol=0)


def test_path_patch_with_live_mlps_or_sequential_receivers_differs():
    """Recomputed MLPs carry the sender's effect onward (a different number from frozen
    MLPs), and receivers one after another (layer-1 heads, then MLP1) are not the edge set:
    step 2 replaces MLP1's input, hiding what the patched head wrote into it."""
    model, target, source, metric = setup("gpt2")
    frozen = ref_path_patch(model, target, source, ["input"], ["logits"], metric, freeze_mlps=True)
    live = ref_path_patch(model, target, source, ["input"], ["logits"], metric, freeze_mlps=False)
    assert (frozen - live).abs().max() > 1e-3
    receivers = ["L1H0.q", "MLP1"]
    path = ref_path_patch(model, target, source, ["input", "L0H1"], receivers, metric, freeze_mlps=True)
    edge = ref_edge_patch(model, target, source, [f"{s}->{r}" for s in ("input", "L0H1") for r in receivers], metric)
    assert (path - edge).abs().max() > 1e-2


# --- hygiene -----------------------------------------------------------------------------

def test_flags_are_restored_and_bad_labels_refused():
    model, target, source, metric = setup("llama_gqa")
    ref_edge_patch(model, target, source, ["L0H1->L1KV0.k", "input->MLP1"], metric)
    ref_path_patch(model, target, source, ["L0H1"], ["L1KV1.v", "MLP1"], metric)
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_hook_mlp_in
    for bad in ["L0H1->L1H0.k", "L1H0->L0H1.q", "MLP1->MLP1", "L0H9->logits", "L0H1-logits"]:
        with pytest.raises(ValueError):
            ref_edge_patch(model, target, source, [bad], metric)
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_hook_mlp_in
    gpt2 = get_model("gpt2")
    with pytest.raises(ValueError):
        ref_edge_patch(gpt2, target % 50, source % 50, ["L0H1->L1KV0.k"], metric)
