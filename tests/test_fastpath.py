"""FastForward against the bridge itself, on every architecture variant: logits, every hook
point, edits, per-row frozen prefixes and start layers, resumed blocks, the hook points that
need config flags on the bridge, refusals."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from hookpatch.errors import HookpatchError
from hookpatch.model import tiny_model
from hookpatch.runners.fast import (
    FLAG_POINTS,
    RESUME_POINTS,
    FastForward,
    frozen_kv_from_cache,
)

ATOL = 1e-4
BATCH, SEQ = 3, 12


def tokens_for(model, seed=0, shared_prefix=0):
    """Random token rows (ids >= 2: no BOS/UNK); the first ``shared_prefix`` equal across rows."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(2, model.cfg.d_vocab, (BATCH, SEQ), generator=g)
    toks[:, :shared_prefix] = toks[0, :shared_prefix]
    return toks


def hook_names(model, fast):
    """Every hook point the fast path fires that the bridge fires without config flags."""
    points = [p for p in fast.hook_points if p not in FLAG_POINTS]
    return [f"blocks.{layer}.{p}" for layer in range(model.cfg.n_layers) for p in points]


BRIDGE_FLAGS = ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in")


@contextmanager
def bridge_flags(model):
    """The bridge with the flags on that make it fire FLAG_POINTS (turned off again after)."""
    assert not any(getattr(model.cfg, flag, False) for flag in BRIDGE_FLAGS)
    try:
        for flag in BRIDGE_FLAGS:
            getattr(model, f"set_{flag}")(True)
        yield model
    finally:
        for flag in BRIDGE_FLAGS:
            getattr(model, f"set_{flag}")(False)


def recorder(store):
    def record(x, hook):
        assert hook.layer() == int(hook.name.split(".")[1])
        store[hook.name] = x.detach().clone()
        return x

    return record


def resid_at(cache, model, start):
    last = model.cfg.n_layers - 1
    return cache[f"blocks.{start}.hook_resid_pre"] if start <= last else cache[f"blocks.{last}.hook_resid_post"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls run fastest on one thread (and do not spin against other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_CLEAN: dict = {}


def clean_run(model, seed, shared_prefix=0):
    """``run_with_cache`` of :func:`tokens_for`'s tokens, memoized per model and tokens."""
    key = (id(model), seed, shared_prefix)
    if key not in _CLEAN:
        toks = tokens_for(model, seed, shared_prefix)
        with torch.no_grad():
            _CLEAN[key] = (toks, *model.run_with_cache(toks))
    return _CLEAN[key]


def perturb(model, g):
    """Random biases on every projection (adding Qwen2-style q/k/v biases where absent) and
    random norm weights and biases, in place."""
    noise = lambda t, base=0.0: t.copy_(base + 0.2 * torch.randn(t.shape, generator=g))  # noqa: E731
    for block in model.blocks:
        mlp = block.mlp
        projs = [block.attn.q, block.attn.k, block.attn.v, block.attn.o, getattr(mlp, "in"), mlp.out]
        for proj in projs + ([mlp.gate] if hasattr(mlp, "gate") else []):
            module = proj.original_component
            if module.bias is None:
                module.bias = torch.nn.Parameter(torch.empty(module.weight.shape[0]))
            noise(module.bias)
    for norm in [b.ln1 for b in model.blocks] + [b.ln2 for b in model.blocks] + [model.ln_final]:
        noise(norm.original_component.weight, 1.0)
        if getattr(norm.original_component, "bias", None) is not None:
            noise(norm.original_component.bias)
    noise(model.unembed.original_component.bias)


@pytest.fixture(scope="module")
def perturbed_models():
    """Fresh models with nonzero biases and non-trivial norm weights (the fixtures' are 0 / 1)."""
    models = {
        "gpt2": tiny_model("gpt2", n_layers=2, d_model=64, n_heads=4, d_mlp=128, seed=1),
        "llama": tiny_model("llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, seed=1),
    }
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in models.values():
            perturb(model, g)
    return models


def hf_checkpoint(tmp_path_factory, name, config_class, model_class, seed, **config):
    """A random 2-layer HF model of a family ``tiny_model`` does not build, loaded as a bridge."""
    import transformers

    from hookpatch.model import byte_bpe_tokenizer, load_model

    tok = byte_bpe_tokenizer()
    cfg = getattr(transformers, config_class)(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.bos_token_id, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **config,
    )
    torch.manual_seed(seed)
    hf = getattr(transformers, model_class)(cfg)
    with torch.no_grad():  # random matrices, and norm weights away from their trivial values
        for p in hf.parameters():
            p.normal_(0.0, 0.2) if p.ndim == 2 else p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return load_model(str(path))


@pytest.fixture(scope="module")
def gemma3_model(tmp_path_factory):
    """Gemma 3: Gemma 2's block with offset q/k norms, a local and a global rotary table (a
    4-token window on layer 0) and, here, a final soft cap."""
    return hf_checkpoint(
        tmp_path_factory, "gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", 17, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24, final_logit_softcapping=8.0,
    )


@pytest.fixture(scope="module")
def olmo2_model(tmp_path_factory):
    """OLMo-2: a norm after (not before) each sublayer, q/k norms over all heads together."""
    import warnings

    with warnings.catch_warnings():  # the bridge cannot fold OLMo-2's post-norms, and says so
        warnings.simplefilter("ignore", UserWarning)
        return hf_checkpoint(tmp_path_factory, "olmo2", "Olmo2Config", "Olmo2ForCausalLM", 18)


NEW_VARIANTS = ("qwen2", "qwen3", "gemma2", "mistral", "gemma3", "olmo2")  # random norm weights
ANY = ("gpt2", "llama", "gpt2 perturbed", "llama perturbed", *NEW_VARIANTS)


@pytest.fixture(params=ANY)
def any_model(request, perturbed_models):
    """GPT-2 and Llama as built (trivial norms) and with random biases and norm weights; Qwen2
    (q/k/v biases), Qwen3 (q/k norms), Gemma 2 (offset norms around each sublayer, soft caps,
    a 4-token window on layer 0) and Mistral (a 6-token window on every layer)."""
    name = request.param
    if name.endswith(" perturbed"):
        return perturbed_models[name.split()[0]]
    return request.getfixturevalue(f"{name}_model")


@torch.no_grad()
def test_logits_match_bridge_from_every_start(any_model):
    model = any_model
    _, logits, cache = clean_run(model, seed=0)
    fast = FastForward(model)
    read_pos = torch.tensor([SEQ - 1, 4, 0])
    for start in range(model.cfg.n_layers + 1):
        resid = resid_at(cache, model, start)
        torch.testing.assert_close(fast.run(resid, start), logits, atol=ATOL, rtol=0)
        read = fast.run(resid, start, read_pos=read_pos)
        assert read.shape == (BATCH, 1, model.cfg.d_vocab)
        torch.testing.assert_close(read[:, 0], logits[torch.arange(BATCH), read_pos], atol=ATOL, rtol=0)
        several = fast.run(resid, start, read_pos=torch.tensor([[1, 7]] * BATCH))
        torch.testing.assert_close(several, logits[:, [1, 7]], atol=ATOL, rtol=0)
        normalized = fast.run(resid, start, read_pos=read_pos, unembed=False)  # ln_final.hook_normalized
        assert normalized.shape == (BATCH, 1, model.cfg.d_model)
        torch.testing.assert_close(fast.unembed(normalized), read, atol=ATOL, rtol=0)


@torch.no_grad()
def test_every_hook_point_matches_run_with_cache(any_model):
    model = any_model
    _, _, cache = clean_run(model, seed=0)
    fast = FastForward(model)
    names = hook_names(model, fast)
    seen = {}
    fast.run(cache["blocks.0.hook_resid_pre"], 0, hooks={n: recorder(seen) for n in names})
    assert sorted(seen) == sorted(names)
    for name in names:
        assert seen[name].shape == cache[name].shape, name
        torch.testing.assert_close(seen[name], cache[name], atol=ATOL, rtol=0, msg=name)


def head_slice(index, dim, fn):
    """A hook that applies ``fn`` to one slice of the activation, out of place."""

    def hook(x, hook):
        out = x.clone()
        out.select(dim, index).copy_(fn(x.select(dim, index)))
        return out

    return hook


EDITS = {
    "zero z head 1": ("blocks.1.attn.hook_z", head_slice(1, 2, torch.zeros_like)),
    "replace v kv-head 0": ("blocks.0.attn.hook_v", head_slice(0, 2, lambda v: v.flip(1) + 0.5)),
    "scale pattern": ("blocks.0.attn.hook_pattern", lambda p, hook: p * 0.5),
    "add to resid_mid": ("blocks.0.hook_resid_mid", lambda x, hook: x.add_(0.7)),  # in place: reaches both readers
    "shift q": ("blocks.1.attn.hook_q", lambda q, hook: q + 0.3),
    "shift pre-rotary k": ("blocks.1.attn.hook_k", lambda k, hook: k * 2.0),
    "neuron 3 off": ("blocks.0.mlp.hook_post", head_slice(3, 2, torch.zeros_like)),
    "zero attn_out": ("blocks.0.hook_attn_out", lambda x, hook: x * 0.0),
    "scale mlp_out": ("blocks.1.hook_mlp_out", lambda x, hook: x * 3.0),
    "edit resid_post": ("blocks.1.hook_resid_post", lambda x, hook: x.roll(1, dims=1)),
}


@torch.no_grad()
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_editing_hooks_match_run_with_hooks(any_model, edit):
    model = any_model
    name, fn = EDITS[edit]
    toks, _, cache = clean_run(model, seed=2)
    expected = model.run_with_hooks(toks, fwd_hooks=[(name, fn)])
    fast = FastForward(model)
    layer = int(name.split(".")[1])
    read_pos = torch.tensor([11, 3, 6])
    for start in sorted({0, layer}):
        resid = cache[f"blocks.{start}.hook_resid_pre"]
        torch.testing.assert_close(fast.run(resid, start, hooks={name: fn}), expected, atol=ATOL, rtol=0)
        read = fast.run(resid, start, hooks={name: fn}, read_pos=read_pos)
        torch.testing.assert_close(read[:, 0], expected[torch.arange(BATCH), read_pos], atol=ATOL, rtol=0)


# Per-row mode: 2 variants x BATCH prompts; row r is prompt r % BATCH, computed from position
# ACTIVE[r] on, joining at block STARTS[r] (int: every row at that block).
ACTIVE = torch.tensor([0, 3, 7, SEQ - 1, 5, 2])
ROW_EDITS = {  # hook point -> (position axis, out-of-place edit of the selected entries)
    "blocks.0.hook_resid_pre": (1, lambda x: x * 0.5 + 1.0),
    "blocks.0.attn.hook_v": (1, lambda v: v * -1.5),
    "blocks.1.attn.hook_q": (1, lambda q: q + 0.3),
    "blocks.1.attn.hook_k": (1, lambda k: k * 0.7),
    "blocks.0.attn.hook_pattern": (2, lambda p: p * 0.5),
    "blocks.1.attn.hook_z": (1, lambda z: z.flip(-1)),
    "blocks.0.mlp.hook_post": (1, lambda x: x * 2.0),
    "blocks.1.hook_resid_mid": (1, lambda x: x - 0.4),
}


def rows_from(layer, pos_axis, fn, active, starts):
    """A hook applying ``fn`` at each row's positions ``>= active[row]``, in rows whose start
    block is ``<= layer`` (the others are frozen there)."""

    def hook(x, hook):
        cols = torch.arange(x.shape[pos_axis])
        sel = (cols >= active.unsqueeze(-1)) & (starts <= layer).unsqueeze(-1)  # [rows, pos]
        sel = sel.view(x.shape[0], *([1] * (pos_axis - 1)), x.shape[pos_axis], *([1] * (x.ndim - pos_axis - 1)))
        if hook.name.endswith(("hook_resid_mid", "ln2.hook_in")):  # in place: the MLP and the residual see it
            return x.copy_(torch.where(sel, fn(x), x))
        return torch.where(sel, fn(x), x)

    return hook


@torch.no_grad()
@pytest.mark.parametrize(
    "starts", [0, [0, 1, 0, 1, 1, 0], [0, 2, 1, 2, 1, 0]],
    ids=["one start", "start per row", "some rows after the last block"],
)
@pytest.mark.parametrize("point", sorted(ROW_EDITS))
def test_rows_with_own_frozen_prefix_match_run_with_hooks(any_model, point, starts):
    model = any_model
    toks, _, cache = clean_run(model, seed=3)
    rows = len(ACTIVE)
    prompt = torch.arange(rows) % BATCH
    start = torch.tensor(starts).expand(rows) if isinstance(starts, list) else torch.full((rows,), starts)
    pos_axis, fn = ROW_EDITS[point]
    layer = int(point.split(".")[1])
    first = int(start.min())
    resid = torch.stack([resid_at(cache, model, int(s))[p] for s, p in zip(start, prompt, strict=True)])
    hooks = {point: rows_from(layer, pos_axis, fn, ACTIVE, start)} if layer >= first else {}
    fast = FastForward(model)
    end = torch.full((rows,), SEQ - 1)
    frozen = frozen_kv_from_cache(cache, first, model)  # batch BATCH, tiled over the variants
    got = fast.run(resid, starts if isinstance(starts, int) else start, hooks=hooks, read_pos=end,
                   active_from=ACTIVE, frozen_kv=frozen)
    reads = torch.stack([ACTIVE, torch.full((rows,), SEQ - 1)], -1)  # [rows, 2]
    several = fast.run(resid, starts if isinstance(starts, int) else start, hooks=hooks, read_pos=reads,
                       active_from=ACTIVE, frozen_kv=[(k[prompt], v[prompt]) for k, v in frozen])
    for r in range(rows):
        ref_hook = rows_from(layer, pos_axis, fn, ACTIVE[r : r + 1], start[r : r + 1])
        want = model.run_with_hooks(toks[prompt[r] : prompt[r] + 1], fwd_hooks=[(point, ref_hook)])[0]
        torch.testing.assert_close(got[r, 0], want[SEQ - 1], atol=ATOL, rtol=0, msg=f"row {r}")
        torch.testing.assert_close(several[r], want[reads[r]], atol=ATOL, rtol=0, msg=f"row {r}")


@torch.no_grad()
def test_per_row_mode_hooks_see_the_unpatched_run_at_computed_positions(any_model):
    model = any_model
    _, logits, cache = clean_run(model, seed=0)
    fast = FastForward(model)
    names = hook_names(model, fast)
    seen = {}
    active = ACTIVE[:BATCH]
    got = fast.run(cache["blocks.0.hook_resid_pre"], 0, hooks={n: recorder(seen) for n in names},
                   read_pos=torch.full((BATCH,), SEQ - 1), active_from=active,
                   frozen_kv=frozen_kv_from_cache(cache, 0, model))
    assert got.shape == (BATCH, 1, model.cfg.d_vocab)
    for name in names:
        assert seen[name].shape == cache[name].shape, name
        heads_first = name.endswith(("hook_q_normed", "hook_k_normed")) and seen[name].ndim == 4  # not OLMo-2's
        pattern_like = heads_first or name.endswith(("hook_pattern", "hook_attn_scores"))
        for r in range(BATCH):
            a = int(active[r])
            want = cache[name][r, :, a:] if pattern_like else cache[name][r, a:]
            have = seen[name][r, :, a:] if pattern_like else seen[name][r, a:]
            torch.testing.assert_close(have, want, atol=ATOL, rtol=0, msg=f"{name} row {r}")
    torch.testing.assert_close(got[:, 0], logits[:, SEQ - 1], atol=ATOL, rtol=0)


@torch.no_grad()
def test_per_row_mode_refuses_bad_inputs(llama_model):
    model = llama_model
    _, _, cache = clean_run(model, seed=0)
    fast = FastForward(model)
    resid = cache["blocks.0.hook_resid_pre"]
    frozen = frozen_kv_from_cache(cache, 0, model)
    end = torch.full((BATCH,), SEQ - 1)
    active = torch.tensor([0, 4, 8])
    with pytest.raises(HookpatchError, match=r"read_pos \[\[11, 3\], \[11, 3\], \[11, 3\]\] reads before active_from"):
        fast.run(resid, 0, read_pos=torch.tensor([[SEQ - 1, 3]] * BATCH), active_from=active, frozen_kv=frozen)
    with pytest.raises(HookpatchError, match="needs read_pos"):
        fast.run(resid, 0, active_from=active, frozen_kv=frozen)
    with pytest.raises(HookpatchError, match="needs frozen_kv"):
        fast.run(resid, 0, read_pos=end, active_from=active)
    short = [(k[:, :-1], v) for k, v in frozen]
    expected = r"frozen_kv\[0\] k has shape \(3, 11, 2, 16\); expected \[b, 12, 2, 16\] with b dividing 3"
    with pytest.raises(HookpatchError, match=expected):
        fast.run(resid, 0, read_pos=end, active_from=active, frozen_kv=short)
    two_rows = [frozen[0], (frozen[1][0][:2], frozen[1][1][:2])]  # 2 does not divide 3 rows
    with pytest.raises(HookpatchError, match=r"frozen_kv\[1\] k has shape \(2, 12, 2, 16\)"):
        fast.run(resid, 0, read_pos=end, active_from=active, frozen_kv=two_rows)
    with pytest.raises(HookpatchError, match="frozen_kv has 1 entries; expected one"):
        fast.run(resid, 0, read_pos=end, active_from=active, frozen_kv=frozen[:1])
    with pytest.raises(HookpatchError, match=r"active_from must lie in \[0, 12\)"):
        fast.run(resid, 0, read_pos=end, active_from=torch.tensor([0, 4, SEQ]), frozen_kv=frozen)
    with pytest.raises(HookpatchError, match="only read with active_from"):
        fast.run(resid, 0, frozen_kv=frozen)
    with pytest.raises(HookpatchError, match="start per row needs active_from"):
        fast.run(resid, torch.tensor([0, 1, 0]))
    with pytest.raises(HookpatchError, match=r"start must lie in 0..2"):
        fast.run(resid, torch.tensor([0, 3, 0]), read_pos=end, active_from=active, frozen_kv=frozen)


@torch.no_grad()
@pytest.mark.parametrize("point", ["blocks.0.attn.hook_q_normed", "blocks.1.attn.hook_k_normed"])
def test_qk_norm_hook_points_match_the_bridge(qwen3_model, point):
    """Qwen3's normed q and k (``[batch, head, pos, d_head]``, as the bridge fires them):
    an edit of one head, dense and per row from a frozen prefix."""
    model = qwen3_model
    toks, logits, cache = clean_run(model, seed=6)
    fast = FastForward(model)
    fn = head_slice(1, 1, lambda x: x.flip(-1))
    expected = model.run_with_hooks(toks, fwd_hooks=[(point, fn)])
    got = fast.run(cache["blocks.0.hook_resid_pre"], 0, hooks={point: fn})
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - logits).abs().max() > 1e-3
    layer, active, start = int(point.split(".")[1]), ACTIVE[:BATCH], torch.tensor([0, 1, 0])
    edit = lambda x: fn(x, None)  # noqa: E731
    resid = torch.stack([resid_at(cache, model, int(s))[r] for r, s in enumerate(start)])
    got = fast.run(resid, start, hooks={point: rows_from(layer, 2, edit, active, start)},
                   read_pos=torch.full((BATCH,), SEQ - 1), active_from=active,
                   frozen_kv=frozen_kv_from_cache(cache, 0, model))
    for r in range(BATCH):
        ref_hook = rows_from(layer, 2, edit, active[r : r + 1], start[r : r + 1])
        want = model.run_with_hooks(toks[r : r + 1], fwd_hooks=[(point, ref_hook)])[0, SEQ - 1]
        torch.testing.assert_close(got[r, 0], want, atol=ATOL, rtol=0, msg=f"row {r}")


def test_variants_and_refusals(request, gpt2_model, llama_model, qwen3_model, gemma2_model, monkeypatch):
    """Each family runs on its own variant; Gemma's final soft cap is exposed; flags and
    layouts no variant reproduces are refused with the reason."""
    for name in ("gpt2", "llama", *NEW_VARIANTS):
        fast = FastForward(request.getfixturevalue(f"{name}_model"))
        family_variant = {"qwen2": "llama", "mistral": "llama", "gemma3": "gemma2", "olmo2": "qwen3"}
        assert fast.variant == family_variant.get(name, name)
        assert fast.final_softcap == (8.0 if name.startswith("gemma") else None)
    assert FastForward.supports(gpt2_model) and FastForward.supports(llama_model)
    assert not FastForward.supports(object())
    with pytest.raises(HookpatchError, match="not a TransformerBridge"):
        FastForward(object())
    monkeypatch.setattr(gpt2_model.cfg, "output_logits_soft_cap", 30.0)
    assert not FastForward.supports(gpt2_model)
    with pytest.raises(HookpatchError, match="soft-capped"):
        FastForward(gpt2_model)
    monkeypatch.undo()
    monkeypatch.setattr(llama_model.cfg, "parallel_attn_mlp", True)
    with pytest.raises(HookpatchError, match="parallel_attn_mlp"):
        FastForward(llama_model)
    monkeypatch.undo()
    monkeypatch.setattr(gemma2_model.blocks[1].attn.original_component, "sinks", torch.zeros(4), raising=False)
    with pytest.raises(HookpatchError, match="attention has sinks"):
        FastForward(gemma2_model)
    monkeypatch.undo()
    monkeypatch.setattr(qwen3_model.cfg, "qk_norm_after_rope", True)
    with pytest.raises(HookpatchError, match="qk_norm_after_rope"):
        FastForward(qwen3_model)


@torch.no_grad()
def test_bad_arguments_are_refused(llama_model):
    fast = FastForward(llama_model)
    resid = torch.zeros(BATCH, SEQ, llama_model.cfg.d_model)
    with pytest.raises(HookpatchError, match="not a hook point"):
        fast.run(resid, 0, hooks={"blocks.0.hook_resid_pre_typo": lambda x, h: x})
    with pytest.raises(HookpatchError, match="before start"):
        fast.run(resid, 1, hooks={"blocks.0.hook_resid_post": lambda x, h: x})
    with pytest.raises(HookpatchError, match="read_pos"):
        fast.run(resid, 0, read_pos=torch.tensor([SEQ, 0, 0]))
    with pytest.raises(HookpatchError, match="same shape"):
        fast.run(resid, 0, hooks={"blocks.0.attn.hook_z": lambda z, h: z.sum(2)})
    with pytest.raises(HookpatchError, match="the cache lacks"):
        frozen_kv_from_cache({}, 0, llama_model)


@pytest.mark.parametrize("component", ["z", "mlp_out", "k"])
@pytest.mark.parametrize("family", ["gpt2", "llama", *NEW_VARIANTS])
def test_run_with_cache_equals_the_bridge(family, component, request):
    """The sweep's caches: the fast runner's full forward from the embeddings (Gemma 2's
    scaled embedding and final soft cap included)."""
    from hookpatch.runners._fast_runner import fast_cache_names
    from hookpatch.tasks import pronoun_prompts

    model = request.getfixturevalue(f"{family}_model")
    prompts = pronoun_prompts(model, n=4)
    fast = FastForward(model)
    n = model.cfg.n_layers
    names = fast_cache_names(component, range(n), n, fast.rotary)
    logits, cache = fast.run_with_cache(prompts.clean_tokens, names)
    ref_logits, ref = model.run_with_cache(prompts.clean_tokens)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert sorted(cache) == sorted(names)
    for name in names:
        torch.testing.assert_close(cache[name], ref[name], atol=ATOL, rtol=1e-5, msg=name)
    at_end, _ = fast.run_with_cache(prompts.clean_tokens, names, read_pos=prompts.end)
    assert at_end.shape == (4, 1, model.cfg.d_vocab)
    assert torch.allclose(at_end[:, 0], ref_logits[torch.arange(4), prompts.end], atol=1e-5)


FLAG_EDITS = {  # hook point -> out-of-place edit; each touches one head where it has heads
    "blocks.0.hook_q_input": head_slice(1, 2, lambda x: x.roll(1, -1)),  # not affine: a norm follows
    "blocks.1.hook_k_input": head_slice(1, 2, lambda x: x.flip(-1)),  # KV head 1 under GQA
    "blocks.0.hook_v_input": head_slice(0, 2, lambda x: x.roll(3, -1)),
    "blocks.1.attn.hook_result": head_slice(0, 2, torch.zeros_like),
    "blocks.0.hook_mlp_in": lambda x, hook: x + x.flip(-1),  # reaches the MLP, not the residual
}


@torch.no_grad()
@pytest.mark.parametrize("point", sorted(FLAG_EDITS))
def test_flag_hook_points_match_the_bridge_with_its_flags_on(any_model, point):
    """Per-head inputs, per-head results and the MLP input: what they hold and what an edit
    does, against the bridge with use_split_qkv_input / use_attn_result / use_hook_mlp_in on.
    Dense from block 0, and per row from a frozen prefix."""
    model = any_model
    toks, logits, cache = clean_run(model, seed=5)
    fast = FastForward(model)
    seen, ref_seen = {}, {}
    fn = FLAG_EDITS[point]
    with bridge_flags(model):
        expected = model.run_with_hooks(toks, fwd_hooks=[(point, recorder(ref_seen)), (point, fn)])
        got = fast.run(cache["blocks.0.hook_resid_pre"], 0, hooks={point: lambda x, h: fn(recorder(seen)(x, h), h)})
        torch.testing.assert_close(seen[point], ref_seen[point], atol=ATOL, rtol=0)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        assert (got - logits).abs().max() > 1e-3  # the edit matters

        active, rows = ACTIVE[:BATCH], torch.arange(BATCH)
        layer = int(point.split(".")[1])
        start = torch.tensor([0, layer, 0])
        hooks = {point: rows_from(layer, 1, lambda x: fn(x, None), active, start)}
        resid = torch.stack([resid_at(cache, model, int(s))[r] for s, r in zip(start, rows, strict=True)])
        got = fast.run(resid, start, hooks=hooks, read_pos=torch.full((BATCH,), SEQ - 1), active_from=active,
                       frozen_kv=frozen_kv_from_cache(cache, 0, model))
        for r in range(BATCH):
            ref_hook = rows_from(layer, 1, lambda x: fn(x, None), active[r : r + 1], start[r : r + 1])
            want = model.run_with_hooks(toks[r : r + 1], fwd_hooks=[(point, ref_hook)])[0, SEQ - 1]
            torch.testing.assert_close(got[r, 0], want, atol=ATOL, rtol=0, msg=f"row {r}")


BASE = {  # resume point -> the residual stream resume_block adds to (None: not read)
    "attn.hook_z": "hook_resid_pre", "hook_attn_out": "hook_resid_pre",
    "hook_resid_mid": None, "hook_mlp_out": "hook_resid_mid", "hook_resid_post": None,
}


@torch.no_grad()
@pytest.mark.parametrize("point", RESUME_POINTS)
def test_resume_block_finishes_the_block_as_the_bridge_does(any_model, point):
    """From an edited activation after attention, the rest of the block as the bridge computes
    it (the edit made in place, so at hook_resid_mid it reaches the MLP and the residual)."""
    model = any_model
    toks, _, cache = clean_run(model, seed=0)
    layer = model.cfg.n_layers - 1
    noise = 0.5 * torch.randn(cache[f"blocks.{layer}.{point}"].shape, generator=torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}

    def edit(act, hook):
        act.add_(noise)
        seen["act"] = act.clone()
        return act

    def keep(act, hook):
        seen["post"] = act.clone()

    model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{layer}.{point}", edit), (f"blocks.{layer}.hook_resid_post", keep)])
    base = BASE[point]
    resid = None if base is None else cache[f"blocks.{layer}.{base}"].flatten(0, 1)
    fast = FastForward(model)
    out = fast.resume_block(layer, point, resid, seen["act"].flatten(0, 1))
    assert out.shape == (BATCH * SEQ, model.cfg.d_model)
    torch.testing.assert_close(out, seen["post"].flatten(0, 1), atol=ATOL, rtol=0)
    with pytest.raises(HookpatchError, match="is not one of"):
        fast.resume_block(layer, "attn.hook_q", resid, seen["act"].flatten(0, 1))
