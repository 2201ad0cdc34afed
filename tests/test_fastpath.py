"""FastForward against the bridge itself: logits, every hook point, edits, prefixes, per-row
frozen prefixes and start layers, refusals."""

from __future__ import annotations

import pytest
import torch

from hookpatch.errors import HookpatchError
from hookpatch.model.tiny import tiny_model
from hookpatch.sweeps.fastpath import (
    BLOCK_POINTS,
    GATED_POINTS,
    RESUME_POINTS,
    ROTARY_POINTS,
    FastForward,
    frozen_kv_from_cache,
    prefix_kv_from_cache,
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
    points = BLOCK_POINTS + (ROTARY_POINTS if fast.rotary else ())
    points += GATED_POINTS if model.cfg.gated_mlp else ()
    return [f"blocks.{layer}.{p}" for layer in range(model.cfg.n_layers) for p in points]


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


@pytest.fixture(params=["fixture", "perturbed"])
def any_model(request, model, perturbed_models):
    """Each family as built, and with random biases and norm weights."""
    if request.param == "fixture":
        return model
    return perturbed_models["llama" if model.cfg.positional_embedding_type == "rotary" else "gpt2"]


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
    "add to resid_mid": ("blocks.0.hook_resid_mid", lambda x, hook: x + 0.7),
    "shift q": ("blocks.1.attn.hook_q", lambda q, hook: q + 0.3),
    "shift pre-rotary k": ("blocks.1.attn.hook_k", lambda k, hook: k * 2.0),
    "neuron 3 off": ("blocks.0.mlp.hook_post", head_slice(3, 2, torch.zeros_like)),
    "zero attn_out": ("blocks.0.hook_attn_out", lambda x, hook: x * 0.0),
    "scale mlp_out": ("blocks.1.hook_mlp_out", lambda x, hook: x * 3.0),
    "edit resid_post": ("blocks.1.hook_resid_post", lambda x, hook: x.roll(1, dims=1)),
}


@torch.no_grad()
@pytest.mark.parametrize("edit", sorted(EDITS))
def test_editing_hooks_match_run_with_hooks(model, edit):
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


@torch.no_grad()
def test_resid_mid_edit_reaches_residual_on_request(model):
    """Default: the bridge's ln2.hook_in semantics; on request: HookedTransformer's."""
    _, _, cache = clean_run(model, seed=2)
    seen = {}
    hooks = {"blocks.0.hook_resid_mid": lambda x, hook: x + 1.0}
    hooks |= {f"blocks.0.{p}": recorder(seen) for p in ("hook_mlp_out", "hook_resid_post")}
    for carries, shift in ((False, 0.0), (True, 1.0)):
        fast = FastForward(model, resid_mid_edits_residual=carries)
        fast.run(cache["blocks.0.hook_resid_pre"], 0, hooks=hooks)
        residual = seen["blocks.0.hook_resid_post"] - seen["blocks.0.hook_mlp_out"]
        torch.testing.assert_close(residual, cache["blocks.0.hook_resid_mid"] + shift, atol=ATOL, rtol=0)


def later_than(p0, fn):
    """Apply ``fn`` only at absolute positions >= p0 (positions axis 1), via ``hook.pos_offset``."""

    def hook(x, hook):
        pos = getattr(hook, "pos_offset", 0) + torch.arange(x.shape[1])
        keep = (pos < p0).view(1, -1, *([1] * (x.ndim - 2)))
        return torch.where(keep, x, fn(x))

    return hook


@torch.no_grad()
@pytest.mark.parametrize("p0", [1, 5, SEQ - 1])
def test_prefix_kv_matches_full_run(model, p0):
    toks, logits, cache = clean_run(model, seed=4, shared_prefix=p0)
    fast = FastForward(model)
    last = model.cfg.n_layers - 1
    edit = later_than(p0, lambda v: v * -1.5)  # confined to positions >= p0
    edited = model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{last}.attn.hook_v", edit)])
    for start in range(model.cfg.n_layers):
        prefix = prefix_kv_from_cache(cache, start, p0, model)
        resid = cache[f"blocks.{start}.hook_resid_pre"][:, p0:]
        names = [n for n in hook_names(model, fast) if int(n.split(".")[1]) >= start]
        seen = {}
        hooks = {n: recorder(seen) for n in names}
        got = fast.run(resid, start, offset=p0, prefix_kv=prefix, hooks=hooks)
        torch.testing.assert_close(got, logits[:, p0:], atol=ATOL, rtol=0)
        for name in names:
            pattern_like = name.endswith(("hook_pattern", "hook_attn_scores"))
            want = cache[name][:, :, p0:] if pattern_like else cache[name][:, p0:]
            torch.testing.assert_close(seen[name], want, atol=ATOL, rtol=0, msg=name)

        # The rows share their first p0 tokens, so a one-row prefix broadcasts.
        shared = [(k[:1], v[:1]) for k, v in prefix]
        read_pos = torch.tensor([SEQ - 1, p0, SEQ - 1])
        hooks = {f"blocks.{last}.attn.hook_v": edit}
        got = fast.run(resid, start, offset=p0, prefix_kv=shared, hooks=hooks, read_pos=read_pos)
        torch.testing.assert_close(got[:, 0], edited[torch.arange(BATCH), read_pos], atol=ATOL, rtol=0)


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
        pattern_like = name.endswith(("hook_pattern", "hook_attn_scores"))
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
    with pytest.raises(HookpatchError, match="are alternatives"):
        fast.run(resid[:, 2:], 0, read_pos=end, offset=2, prefix_kv=prefix_kv_from_cache(cache, 0, 2, model),
                 active_from=active, frozen_kv=frozen)
    with pytest.raises(HookpatchError, match="only read with active_from"):
        fast.run(resid, 0, frozen_kv=frozen)
    with pytest.raises(HookpatchError, match="start per row needs active_from"):
        fast.run(resid, torch.tensor([0, 1, 0]))
    with pytest.raises(HookpatchError, match=r"start must lie in 0..2"):
        fast.run(resid, torch.tensor([0, 3, 0]), read_pos=end, active_from=active, frozen_kv=frozen)


def test_supports_both_families_and_refuses_others(gpt2_model, llama_model, monkeypatch):
    assert FastForward.supports(gpt2_model) and FastForward.supports(llama_model)
    assert not FastForward.supports(object())
    with pytest.raises(HookpatchError, match="not a TransformerBridge"):
        FastForward(object())
    monkeypatch.setattr(gpt2_model.cfg, "output_logits_soft_cap", 30.0)
    assert not FastForward.supports(gpt2_model)
    with pytest.raises(HookpatchError, match="soft-capped"):
        FastForward(gpt2_model)
    monkeypatch.undo()
    monkeypatch.setattr(llama_model.cfg, "use_attn_result", True)
    with pytest.raises(HookpatchError, match="use_attn_result"):
        FastForward(llama_model)


@torch.no_grad()
def test_bad_arguments_are_refused(llama_model):
    fast = FastForward(llama_model)
    resid = torch.zeros(BATCH, SEQ, llama_model.cfg.d_model)
    with pytest.raises(HookpatchError, match="not a hook point"):
        fast.run(resid, 0, hooks={"blocks.0.hook_resid_pre_typo": lambda x, h: x})
    with pytest.raises(HookpatchError, match="before start"):
        fast.run(resid, 1, hooks={"blocks.0.hook_resid_post": lambda x, h: x})
    with pytest.raises(HookpatchError, match="needs prefix_kv"):
        fast.run(resid, 0, offset=2)
    with pytest.raises(HookpatchError, match="read_pos"):
        fast.run(resid, 0, read_pos=torch.tensor([SEQ, 0, 0]))
    with pytest.raises(HookpatchError, match="same shape"):
        fast.run(resid, 0, hooks={"blocks.0.attn.hook_z": lambda z, h: z.sum(2)})
    with pytest.raises(HookpatchError, match="the cache lacks"):
        prefix_kv_from_cache({}, 0, 2, llama_model)


@pytest.mark.parametrize("component", ["z", "mlp_out", "k"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_run_with_cache_equals_the_bridge(family, component, gpt2_model, llama_model):
    """The sweep's caches: the fast runner's full forward from the embeddings."""
    from hookpatch.sweeps.engine import fast_cache_names
    from hookpatch.tasks.pronoun import pronoun_prompts

    model = {"gpt2": gpt2_model, "llama": llama_model}[family]
    prompts = pronoun_prompts(model, n=4)
    fast = FastForward(model)
    n = model.cfg.n_layers
    names = fast_cache_names(component, range(n), n, fast.rotary)
    logits, cache = fast.run_with_cache(prompts.clean_tokens, names)
    ref_logits, ref = model.run_with_cache(prompts.clean_tokens)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert sorted(cache) == sorted(names)
    for name in names:
        assert torch.allclose(cache[name], ref[name], atol=1e-5), name
    at_end, _ = fast.run_with_cache(prompts.clean_tokens, names, read_pos=prompts.end)
    assert at_end.shape == (4, 1, model.cfg.d_vocab)
    assert torch.allclose(at_end[:, 0], ref_logits[torch.arange(4), prompts.end], atol=1e-5)


@pytest.mark.parametrize("edits_residual", [False, True])
@pytest.mark.parametrize("point", RESUME_POINTS)
def test_resume_block_finishes_the_block_as_run_does(any_model, point, edits_residual):
    """From an edited activation after attention, the rest of the block as run() computes it."""
    torch.manual_seed(0)
    fast = FastForward(any_model, resid_mid_edits_residual=edits_residual)
    tokens = tokens_for(any_model)
    B, P = tokens.shape
    layer = any_model.cfg.n_layers - 1
    name = f"blocks.{layer}.{point}"
    seen: dict[str, torch.Tensor] = {}

    def edit(act, hook):
        seen["act"] = act = act + 0.5 * torch.randn_like(act)
        return act

    def keep(act, hook):
        seen[hook.name] = act.clone()

    keepers = [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"]
    if point != "hook_resid_mid":  # the unedited resid_mid: capture it where it is not edited
        keepers.append(f"blocks.{layer}.hook_resid_mid")
    with torch.no_grad():
        fast.run(fast.embed(tokens), 0, hooks={**{k: keep for k in keepers}, name: edit})
        if point == "hook_resid_mid":
            _, clean = fast.run_with_cache(tokens, [f"blocks.{layer}.hook_resid_mid"])
            seen[f"blocks.{layer}.hook_resid_mid"] = clean[f"blocks.{layer}.hook_resid_mid"]
        base = {
            "attn.hook_z": "hook_resid_pre", "hook_attn_out": "hook_resid_pre",
            "hook_resid_mid": "hook_resid_mid", "hook_mlp_out": "hook_resid_mid", "hook_resid_post": None,
        }[point]
        resid = None if base is None else seen[f"blocks.{layer}.{base}"].flatten(0, 1)
        out = fast.resume_block(layer, point, resid, seen["act"].flatten(0, 1))
    assert out.shape == (B * P, any_model.cfg.d_model)
    post = seen["act"] if point == "hook_resid_post" else seen[f"blocks.{layer}.hook_resid_post"]
    assert torch.allclose(out, post.flatten(0, 1), atol=1e-5)
    with pytest.raises(HookpatchError, match="is not one of"):
        fast.resume_block(layer, "attn.hook_q", resid, seen["act"].flatten(0, 1))
