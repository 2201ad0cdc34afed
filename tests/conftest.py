"""Tiny random bridges of every architecture family, built once per test session.

The ``model`` fixture (GPT-2 and Llama, HF's trivial norm weights and biases) is what most
tests run on; ``variant_model`` runs a test on all six families, each with random norm
weights and biases, and is kept for the variant-equivalence matrix.

Every fixture model is built on ``DEVICE``: the CPU unless the environment variable
``HOOKPATCH_TEST_DEVICE`` names another device (``HOOKPATCH_TEST_DEVICE=cuda``), so that the
same tests catch a tensor left on the wrong device on a GPU machine
(``benchmarks/gpu_check.py`` runs them so). Tests that build their own models keep them on
the CPU. The tests never require a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from hookpatch.model import tiny_model
from hookpatch.tasks import make_prompt_set

torch.set_num_threads(2)

DEVICE = os.environ.get("HOOKPATCH_TEST_DEVICE", "cpu")  # where the fixture models live


@pytest.fixture(scope="session")
def gpt2_model():
    """GPT-2 style: LayerNorm, learned positions, multi-head; word-level tokenizer."""
    return tiny_model("gpt2", device=DEVICE, n_layers=2, d_model=64, n_heads=4, d_mlp=128, norm_std=0.0)


@pytest.fixture(scope="session")
def llama_model():
    """Llama style: RMSNorm, rotary, gated MLP, grouped-query attention (4 query / 2 KV heads)."""
    return tiny_model("llama", device=DEVICE, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128, norm_std=0.0)


@pytest.fixture(scope="session")
def gpt2_bpe_model():
    """GPT-2 style with a byte-level BPE tokenizer (GPT-2's leading-space scheme)."""
    return tiny_model(
        "gpt2", device=DEVICE, tokenizer="bpe", n_layers=2, d_model=64, n_heads=4, d_mlp=128, norm_std=0.0
    )


@pytest.fixture(params=["gpt2", "llama"])
def model(request, gpt2_model, llama_model):
    """Each architecture family in turn."""
    return {"gpt2": gpt2_model, "llama": llama_model}[request.param]


SIZES = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128)  # the variant matrix's shape
VARIANT_ARGS = {  # write_tiny_checkpoint's arguments per variant, so a test can rebuild the checkpoint
    "gpt2": dict(SIZES, seed=11),
    "llama": dict(SIZES, seed=12),
    "qwen2": dict(SIZES, seed=13),
    "qwen3": dict(SIZES, seed=14),
    "gemma2": dict(SIZES, sliding_window=4, seed=15),
    "mistral": dict(SIZES, sliding_window=6, seed=16),
}
VARIANTS = tuple(VARIANT_ARGS)


@pytest.fixture(scope="session")
def gpt2_variant_model():
    """GPT-2 with random LayerNorm weights and biases everywhere (a wrong fold shows)."""
    return tiny_model("gpt2", device=DEVICE, **VARIANT_ARGS["gpt2"])


@pytest.fixture(scope="session")
def llama_variant_model():
    """Llama (grouped-query attention) with random RMSNorm weights."""
    return tiny_model("llama", device=DEVICE, **VARIANT_ARGS["llama"])


@pytest.fixture(scope="session")
def qwen2_model():
    """Qwen2: Llama's block with random q/k/v biases; byte-level BPE tokenizer, no BOS."""
    return tiny_model("qwen2", device=DEVICE, **VARIANT_ARGS["qwen2"])


@pytest.fixture(scope="session")
def qwen3_model():
    """Qwen3: per-head q/k RMSNorm, head_dim 32 (4 heads x 32 = 128 wide, d_model 64)."""
    return tiny_model("qwen3", device=DEVICE, **VARIANT_ARGS["qwen3"])


@pytest.fixture(scope="session")
def gemma2_model():
    """Gemma 2: offset RMSNorm around each sublayer, soft-capping, a 4-token window on layer 0."""
    return tiny_model("gemma2", device=DEVICE, **VARIANT_ARGS["gemma2"])


@pytest.fixture(scope="session")
def mistral_model():
    """Mistral with a 6-token window on every layer, shorter than the task prompts.

    HuggingFace's default 4096-token window would never act on a test prompt, making Mistral
    a copy of Llama; a short window tests that every path honours it.
    """
    return tiny_model("mistral", device=DEVICE, **VARIANT_ARGS["mistral"])


@pytest.fixture(params=VARIANTS)
def variant_model(request):
    """Each of the six architecture variants in turn (built on first use, once per session)."""
    name = request.param
    return request.getfixturevalue(f"{name}_variant_model" if name in ("gpt2", "llama") else f"{name}_model")


@pytest.fixture(scope="session")
def small_prompts(gpt2_model, llama_model):
    """Four short prompt pairs (6 tokens) per model, so reference loops stay cheap."""
    def build(m):
        return make_prompt_set(
            m,
            ["Mary went to the store", "John went to the park", "Amy went to the shops", "Dan went to the bank"],
            ["John went to the store", "Mary went to the park", "Dan went to the shops", "Amy went to the bank"],
            [(" she", " he"), (" he", " she"), (" she", " he"), (" he", " she")],
        )
    return {id(m): build(m) for m in (gpt2_model, llama_model)}
