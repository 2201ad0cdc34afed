"""Loading, compatibility mode, the facts table and checked tokenization."""

from __future__ import annotations

import pytest
import torch

from hookpatch.errors import HookpatchError
from hookpatch.model import (
    COMPONENTS,
    component_info,
    encode,
    hook_flags,
    model_facts,
    to_single_token,
    write_tiny_checkpoint,
)
from hookpatch.model._loading import load_model, require_eval


def test_bridge_is_in_compatibility_mode_and_eval(model):
    assert model.compatibility_mode is True
    assert model.training is False
    _, cache = model.run_with_cache(model.to_tokens("When John and Mary went to the shops"))
    assert "blocks.0.hook_resid_pre" in cache.keys()


def test_facts_of_each_family(gpt2_model, llama_model):
    gpt2, llama = model_facts(gpt2_model), model_facts(llama_model)
    assert (gpt2.n_layers, gpt2.n_heads, gpt2.n_kv_heads, gpt2.d_head, gpt2.d_model) == (2, 4, 4, 16, 64)
    assert (llama.n_layers, llama.n_heads, llama.n_kv_heads, llama.d_head, llama.d_model) == (2, 4, 2, 16, 64)
    assert not gpt2.grouped_query and llama.grouped_query
    assert llama.query_heads_of_kv_head(1) == [2, 3]
    assert [llama.kv_head_of_query_head(h) for h in range(4)] == [0, 0, 1, 1]
    assert llama.n_heads_of("k") == 2 and llama.n_heads_of("z") == 4 and gpt2.n_heads_of("v") == 4
    assert gpt2.normalization == "LN" and llama.normalization == "RMS"
    assert llama.positional_embedding == "rotary"


def test_facts_table_hook_names_and_shapes_match_a_real_cache(model):
    facts = model_facts(model)
    tokens = model.to_tokens("When John and Mary went to the shops, John gave the bag to")
    with hook_flags(model, COMPONENTS):  # result, q/k/v_input and mlp_in fire only with their flags
        _, cache = model.run_with_cache(tokens)
    batch, pos = tokens.shape
    sizes = {"batch": batch, "pos": pos, "query_pos": pos, "key_pos": pos}
    for row in facts.table():
        for layer in range(facts.n_layers):
            name = COMPONENTS[row["component"]].hook_name(layer)
            assert name in cache.keys(), name
            expected = tuple(sizes.get(a, s) for a, s in zip(row["axes"], row["shape"], strict=True))
            assert tuple(cache[name].shape) == expected, (name, cache[name].shape, expected)


def test_unknown_component_and_out_of_range_layer_and_head(model):
    facts = model_facts(model)
    with pytest.raises(HookpatchError, match=r"unknown component 'resid'.*expected one of"):
        component_info("resid")
    with pytest.raises(HookpatchError, match=r"layer 2 is out of range: this model has 2 layers \(0\.\.1\)"):
        facts.check_layer(2)
    with pytest.raises(HookpatchError, match=r"head 4 is out of range for 'z'"):
        facts.check_head("z", 4)
    if facts.grouped_query:
        with pytest.raises(HookpatchError, match=r"head 2 is out of range for 'k': this model has 2 KV heads"):
            facts.check_head("k", 2)
    with pytest.raises(HookpatchError, match="has no head axis"):
        facts.n_heads_of("resid_pre")


def test_load_model_from_a_local_directory_matches_the_hf_model(tmp_path):
    import transformers

    write_tiny_checkpoint(tmp_path, "gpt2", seed=3)
    bridge = load_model(tmp_path, device="cpu")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = bridge.to_tokens("Mary is a great friend, isn’t")
    with torch.no_grad():
        ours = bridge(tokens).log_softmax(-1)
        ref = hf(tokens).logits.log_softmax(-1)
    # compatibility-mode processing changes logits only by a per-position constant
    assert torch.allclose(ours, ref, atol=1e-4)


def test_load_model_bad_inputs(tmp_path):
    with pytest.raises(HookpatchError, match=r"config\.json is missing"):
        load_model(tmp_path)
    with pytest.raises(HookpatchError, match="there is no network.*local checkpoint directory.*'organism'"):
        load_model("surely-not-cached/model-xyz")
    with pytest.raises(HookpatchError, match="either device= or device_map="):
        load_model(tmp_path, device="cpu", device_map="auto")


def test_train_mode_is_refused(gpt2_model):
    gpt2_model.train()
    try:
        with pytest.raises(HookpatchError, match=r"train mode.*call model\.eval\(\)"):
            require_eval(gpt2_model)
    finally:
        gpt2_model.eval()


def test_tokenization_checks(gpt2_model):
    assert to_single_token(gpt2_model, " she") == gpt2_model.to_single_token(" she")
    two = r"answer ' Mary John' is not a single token: it tokenizes to 2 tokens \[' Mary', ' John'\]"
    with pytest.raises(HookpatchError, match=two):
        to_single_token(gpt2_model, " Mary John")
    with pytest.raises(HookpatchError, match=r"outside the model's vocabulary: \[' shopz'\]"):
        encode(gpt2_model, "When John went to the shopz")
    long_prompt = " ".join(["John"] * (gpt2_model.cfg.n_ctx + 1))
    with pytest.raises(HookpatchError, match="context is 64 tokens"):
        encode(gpt2_model, long_prompt)


def test_bpe_tokenizer_has_gpt2_leading_spaces(gpt2_bpe_model):
    ids = encode(gpt2_bpe_model, "When John and Mary")
    assert gpt2_bpe_model.to_str_tokens(torch.tensor(ids)) == ["<|endoftext|>", "When", " John", " and", " Mary"]
    with pytest.raises(HookpatchError, match=r"answer 'Johnny Marymary' is not a single token"):
        to_single_token(gpt2_bpe_model, "Johnny Marymary")
