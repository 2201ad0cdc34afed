"""Models placed by ``device_map=``/``n_devices=``, and tensors following their layers' devices.

Without GPUs, a model loaded through a device map onto the CPU must give every sweep, readout
and attribution the very numbers of the same checkpoint loaded with ``device="cpu"``; the
moving logic itself is checked by putting the later blocks on the ``meta`` device, where any
tensor left on the CPU meets a meta weight and raises. benchmarks/_devices.py runs the real
two-device split (``cuda:0`` + CPU) on a machine with a GPU.
"""

from __future__ import annotations

import pytest
import torch

from hookpatch.attribution import attribution_sweep
from hookpatch.errors import HookpatchError
from hookpatch.hooks import layer_device, unembed_device
from hookpatch.hooks._devices import cat_on, follow, is_split, model_devices, parameter_device, to_device
from hookpatch.metrics import LogitDiff
from hookpatch.model import load_model, load_spec, write_tiny_checkpoint
from hookpatch.readouts import dla_by_component, dla_by_head, logit_lens
from hookpatch.runners.fast import FastForward, frozen_kv_from_cache
from hookpatch.runners.fast._layout import dense_layout
from hookpatch.sweeps import ablation_sweep, patch_sweep
from hookpatch.tasks import make_prompt_set

GPT2_MAP = {  # every module of the tiny GPT-2 named, all on the CPU
    "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "cpu",
    "transformer.h.1": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny GPT-2 and Llama checkpoints with random norm weights (a wrong fold would show)."""
    out = {}
    for family, seed in (("gpt2", 21), ("llama", 22)):
        out[family] = write_tiny_checkpoint(tmp_path_factory.mktemp(family), family, seed=seed)
    return out


def _prompts(model):
    return make_prompt_set(
        model,
        ["Mary went to the store", "John went to the park", "Amy went to the shops"],
        ["John went to the store", "Mary went to the park", "Dan went to the shops"],
        [(" she", " he"), (" he", " she"), (" she", " he")],
    )


# ----------------------------------------------------------------------------- arguments


def test_n_devices_beyond_this_machine_is_refused(tmp_path):
    more = torch.cuda.device_count() + 1 if torch.cuda.is_available() else 2
    with pytest.raises(HookpatchError, match=rf"n_devices={more} but this machine has .*leave .*unset|at most"):
        load_model(tmp_path, n_devices=more)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_n_devices_must_be_a_positive_integer(tmp_path, bad):
    with pytest.raises(HookpatchError, match=r"n_devices=.* must be a positive integer: how many CUDA GPUs"):
        load_model(tmp_path, n_devices=bad)


def test_n_devices_is_exclusive_with_device_and_device_map(tmp_path):
    with pytest.raises(HookpatchError, match="either n_devices= or device=, not both"):
        load_model(tmp_path, n_devices=1, device="cpu")
    with pytest.raises(HookpatchError, match="either n_devices= or device_map=, not both"):
        load_model(tmp_path, n_devices=1, device_map={"": "cpu"})


@pytest.mark.parametrize("bad, message", [
    (5, r"device_map= must be a strategy .*got 5"),
    ({}, r"non-empty dict"),
    ({"": "nowhere"}, r"device_map\[''\]='nowhere' is not a torch device"),
    ({"": True}, r"device_map\[''\]=True must be a device"),
    ({3: "cpu"}, r"keys must be module names"),
    ("everywhere", r"device_map='everywhere' is not a torch device"),
])
def test_bad_device_maps_are_refused(tmp_path, bad, message):
    with pytest.raises(HookpatchError, match=message):
        load_model(tmp_path, device_map=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_gpu_in_the_device_map_without_cuda_is_refused(tmp_path):
    with pytest.raises(HookpatchError, match=r"device_map\['transformer.h.1'\]='cuda:1' but this machine has no CUDA"):
        load_model(tmp_path, device_map={"transformer.h.0": "cpu", "transformer.h.1": 1})


def test_n_devices_one_is_one_device_and_is_recorded(checkpoints):
    model = load_model(checkpoints["gpt2"], n_devices=1)
    assert len(model_devices(model)) == 1 and not is_split(model)
    spec = load_spec(model)
    assert spec.option("n_devices") == 1 and spec.option("device") is None
    again = spec.load(device="cpu")  # a new placement replaces the recorded one instead of clashing
    assert load_spec(again).option("n_devices") is None and load_spec(again).option("device") == "cpu"
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------- a device map gives the same numbers


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def placed(request, checkpoints):
    """(family, model loaded with device="cpu", the same checkpoint loaded through a device map:
    GPT-2 with every module named, Llama with ``{"": "cpu"}``)."""
    family = request.param
    device_map = GPT2_MAP if family == "gpt2" else {"": "cpu"}
    plain = load_model(checkpoints[family], device="cpu")
    mapped = load_model(checkpoints[family], device_map=device_map)
    assert load_spec(mapped).option("device_map") == device_map
    return family, plain, mapped


def _same(a, b):
    assert a.values.shape == b.values.shape
    assert torch.allclose(a.values, b.values, atol=1e-6, rtol=0), float((a.values - b.values).abs().max())
    assert torch.allclose(a.clean, b.clean, atol=1e-6, rtol=0)


@pytest.mark.parametrize("component", ["resid_pre", "z", "mlp_out"])
def test_patch_sweep_through_a_device_map_equals_one_device(placed, component):
    family, plain, mapped = placed
    if family == "llama" and component != "z":
        pytest.skip("one Llama component keeps the file fast; GPT-2 runs all three")
    by = ("layer", "head") if component == "z" else ("layer", "pos")
    got = patch_sweep(mapped, _prompts(mapped), LogitDiff(_prompts(mapped)), component, by=by, progress=False)
    want = patch_sweep(plain, _prompts(plain), LogitDiff(_prompts(plain)), component, by=by, progress=False)
    _same(got, want)
    assert float(want.values.abs().max()) > 1e-3  # the sweep measured something


def test_ablation_sweep_through_a_device_map_equals_one_device(placed):
    _, plain, mapped = placed
    got = ablation_sweep(mapped, _prompts(mapped), LogitDiff(_prompts(mapped)), "z", how="mean", progress=False)
    want = ablation_sweep(plain, _prompts(plain), LogitDiff(_prompts(plain)), "z", how="mean", progress=False)
    _same(got, want)


def test_readouts_and_attribution_through_a_device_map_equal_one_device(placed):
    _, plain, mapped = placed
    for fn in (logit_lens, dla_by_component, dla_by_head):
        got, want = (fn(m, _prompts(m), LogitDiff(_prompts(m))) for m in (mapped, plain))
        _same(got, want)
    got = attribution_sweep(mapped, _prompts(mapped), LogitDiff(_prompts(mapped)), "resid_pre", progress=False)
    want = attribution_sweep(plain, _prompts(plain), LogitDiff(_prompts(plain)), "resid_pre", progress=False)
    _same(got, want)


# ------------------------------------------------------------------ the moving logic itself


def test_layer_device_reads_the_blocks_parameters(placed):
    _, plain, _ = placed
    n = plain.cfg.n_layers
    for layer in range(n):
        assert layer_device(plain, layer) == next(plain.blocks[layer].parameters()).device
    assert layer_device(plain, n) == unembed_device(plain) == plain.W_U.device
    with pytest.raises(HookpatchError, match=rf"layer={n + 1} must be a block index 0\.\.{n - 1}"):
        layer_device(plain, n + 1)
    with pytest.raises(HookpatchError, match="has no parameters, so it has no device"):
        parameter_device(torch.nn.Identity())
    assert parameter_device(torch.nn.Identity(), default=torch.device("meta")) == torch.device("meta")


def test_tensors_move_only_when_elsewhere():
    t = torch.arange(6.0).view(2, 3)
    assert to_device(t, "cpu") is t and follow(t, torch.zeros(1)) is t  # no copy on the same device
    meta = to_device(t, "meta")
    assert meta.device.type == "meta" and meta.shape == t.shape
    assert follow(t, meta).device.type == "meta"
    both = cat_on([meta, t])  # on the first tensor's device
    assert both.device.type == "meta" and both.shape == (4, 3)
    assert torch.equal(cat_on([t, t]), torch.cat([t, t]))
    with pytest.raises(HookpatchError, match="tensors= is empty"):
        cat_on([])


def test_a_layout_moves_every_index_and_rotary_table():
    table = torch.arange(16.0).view(8, 2)
    layout = dense_layout(2, 4, torch.device("cpu"), lambda pos: {None: (table[pos], -table[pos])})
    assert layout.to(torch.device("cpu")) is layout
    moved = layout.to(torch.device("meta"))
    assert moved.device.type == "meta" and moved.query_pos.device.type == "meta"
    assert all(t.device.type == "meta" for t in moved.rope[None])
    assert (moved.batch, moved.n_pos, moved.causal) == (layout.batch, layout.n_pos, layout.causal)
    # indices already on the block's device, rotary tables still on the tables' own: moved too
    mixed = dense_layout(2, 4, torch.device("meta"), lambda pos: {None: (table[:8], -table[:8])})
    assert all(t.device.type == "cpu" for t in mixed.rope[None])
    assert all(t.device.type == "meta" for t in mixed.to(torch.device("meta")).rope[None])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_fast_path_moves_rows_to_each_blocks_device(checkpoints, family):
    """Blocks 1.. and the final norm and unembedding on ``meta``: the fast path must move the
    rows, their layout, rotary tables and frozen keys/values there (a CPU tensor meeting a meta
    weight raises), in the dense and in the per-row (frozen prefix) mode, and block 0's numbers
    are the CPU model's."""
    model = load_model(checkpoints[family], device="cpu")
    tokens = _prompts(model).clean_tokens
    key = "attn.hook_rot_k" if family == "llama" else "attn.hook_k"
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"] + [
        f"blocks.{layer}.{point}" for layer in (0, 1) for point in (key, "attn.hook_v")]
    _, want = FastForward(model).run_with_cache(tokens, names)
    for module in (model.blocks[1], model.ln_final, model.unembed):
        module.to("meta")
    split = FastForward(model)
    assert split.block_devices == (torch.device("cpu"), torch.device("meta"))
    assert split.unembed_device.type == "meta" and split.norm_device.type == "meta"
    logits, got = split.run_with_cache(tokens, names)
    assert logits.device.type == "meta" and logits.shape == (*tokens.shape, model.cfg.d_vocab)
    assert torch.equal(got["blocks.0.hook_resid_post"], want["blocks.0.hook_resid_post"])  # block 0: the CPU's numbers
    assert got["blocks.1.hook_resid_pre"].device.type == "meta"  # a hook sees its own block's device
    B, P = tokens.shape
    cache = {k: v.to("meta") if k.startswith("blocks.1.") else v for k, v in want.items()}  # as block 1 caches it
    frozen = frozen_kv_from_cache(cache, 0, model)
    out = split.run(split.embed(tokens), torch.tensor([0, 1, 0]), read_pos=torch.full((B,), P - 1),
                    active_from=torch.tensor([2, 1, 3]), frozen_kv=frozen, unembed=False)
    assert out.device.type == "meta" and out.shape == (B, 1, model.cfg.d_model)
    d = model.cfg.d_model
    assert split.resume_block(1, "hook_mlp_out", torch.zeros(3, d), torch.zeros(3, d)).device.type == "meta"
