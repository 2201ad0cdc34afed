"""Tiny random bridges of both architecture families, built once per test session."""

from __future__ import annotations

import pytest
import torch

from hookpatch.model.tiny import tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def gpt2_model():
    """GPT-2 style: LayerNorm, learned positions, multi-head; word-level tokenizer."""
    return tiny_model("gpt2", n_layers=2, d_model=64, n_heads=4, d_mlp=128)


@pytest.fixture(scope="session")
def llama_model():
    """Llama style: RMSNorm, rotary, gated MLP, grouped-query attention (4 query / 2 KV heads)."""
    return tiny_model("llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128)


@pytest.fixture(scope="session")
def gpt2_bpe_model():
    """GPT-2 style with a byte-level BPE tokenizer (GPT-2's leading-space scheme)."""
    return tiny_model("gpt2", tokenizer="bpe", n_layers=2, d_model=64, n_heads=4, d_mlp=128)


@pytest.fixture(params=["gpt2", "llama"])
def model(request, gpt2_model, llama_model):
    """Each architecture family in turn."""
    return {"gpt2": gpt2_model, "llama": llama_model}[request.param]
