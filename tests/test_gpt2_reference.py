"""Published GPT-2 small numbers of the pronoun and IOI case studies, reproduced with hookpatch.

Sources (``/work/shared/seeds``): the TransformerLens pronoun notebook (003: ``test_prompt``,
per-prompt and mean logit difference over its 20 prompts, the head DLA, the Mary/John patching
pair, the unembed bias after LayerNorm folding), the nnsight IOI tutorial (000: one prompt
pair without BOS) and TransformerLens' IOI demo (its 8 prompts, mean logit difference 3.552).

These need GPT-2 small's weights in the local HuggingFace cache and are skipped otherwise;
they never download and are never faked. Run ``huggingface-cli download gpt2`` once (or let
``load_model("gpt2-small")`` download it with a network) to enable them. Tolerances are about
1e-3 relative to the printed digits.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hookpatch import (
    LogitDiff,
    dla_by_head,
    evaluate,
    load_model,
    make_prompt_set,
    predictions,
    pronoun_prompts,
    rank_heads,
)
from hookpatch.readouts import unembed_bias
from hookpatch.tasks import ioi_tl_demo

GPT2_REPO = "gpt2"  # what TransformerLens' alias "gpt2-small" resolves to


def _gpt2_cached() -> bool:
    """Whether config, weights and tokenizer of GPT-2 small are in the local HuggingFace cache."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(GPT2_REPO, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure (not cached, no hub client) means "skip"
        return False
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()
    return (path / "config.json").is_file() and has_weights and has_tokenizer


pytestmark = [
    pytest.mark.gpt2,
    pytest.mark.skipif(not _gpt2_cached(), reason="GPT-2 small is not in the local HuggingFace cache "
                       "(huggingface-cli download gpt2 to run these reference tests)"),
]

MARY = "Mary is a great friend, isn’t"
# 003, "Per prompt logit difference" over the 20 prompts (5 frames x Mary, John, Dan, Amy)
PER_PROMPT = [3.8977, 4.8540, 3.9663, 3.4600, 5.1857, 4.7339, 3.7226, 4.7266, 3.9201, 4.4638,
              3.5116, 3.5193, 4.1234, 3.2621, 2.4767, 3.4701, 4.3414, 4.8153, 3.8098, 3.8759]


def approx(value: float, rel: float = 1e-3):
    return pytest.approx(value, rel=rel, abs=1e-3)


@pytest.fixture(scope="module")
def model():
    return load_model("gpt2-small", device="cpu")


@pytest.fixture(scope="module")
def prompts(model):
    return pronoun_prompts(model)


def test_prediction_check(model):
    """003 ``test_prompt``: " she" first at 82.67 %, then " it" and " he"."""
    mary = predictions(model, MARY, " she", k=3)
    assert [row.token for row in mary.top] == [" she", " it", " he"]
    assert mary.answer.rank == 0 and mary.answer.prob == approx(0.8267)
    john = predictions(model, "John is a great friend, isn’t", " he", k=2)
    assert [row.token for row in john.top] == [" he", " it"]
    assert john.answer.prob == approx(0.8343)


def test_pronoun_pair_logit_differences(model, prompts):
    """003 patching section: clean 3.898 (" she" − " he" on Mary), corrupted −4.854 (same answers on John)."""
    pair = prompts.select([0])
    assert pair.clean_prompts == (MARY,) and pair.corrupted_prompts == ("John is a great friend, isn’t",)
    assert pair.answers == ((" she", " he"),)
    metric = LogitDiff(pair)
    assert float(evaluate(model, metric, pair.clean_tokens)[0]) == approx(3.898)
    assert float(evaluate(model, metric, pair.corrupted_tokens)[0]) == approx(-4.854)


def test_pronoun_mean_and_per_prompt_logit_difference(model, prompts):
    """003: mean logit difference 4.0068 over the 20 prompts, and each prompt's value."""
    assert len(prompts) == 20
    clean = evaluate(model, LogitDiff(prompts), prompts.clean_tokens)
    assert float(clean.mean()) == approx(4.0068)
    assert clean.tolist() == pytest.approx(PER_PROMPT, rel=1e-3, abs=1e-3)


def test_unembed_bias(model):
    """003: b_U is 4.5582 for " he" and 3.6625 for " she" after folding: a 2.449x prior for " he"."""
    bias = unembed_bias(model, " he", " she")
    assert bias.bias_a == approx(4.5582)
    assert bias.bias_b == approx(3.6625)
    assert bias.ratio == approx(2.4490)


def test_top_dla_heads(model, prompts):
    """003 head attribution on the 20 pronoun prompts (logit difference): L9H7, L10H9, L11H8 on top."""
    ranked = rank_heads(dla_by_head(model, prompts, LogitDiff(prompts)), k=3)
    top = ranked[ranked["sign"] == "positive"]["label"].tolist()
    assert set(top) == {"L9H7", "L10H9", "L11H8"}


def test_transformer_lens_ioi_demo(model):
    """TransformerLens' IOI demo: mean logit difference 3.552 on its 8 prompts; the swap mirrors it."""
    demo = ioi_tl_demo(model)
    assert len(demo) == 8
    metric = LogitDiff(demo)
    clean = evaluate(model, metric, demo.clean_tokens)
    corrupted = evaluate(model, metric, demo.corrupted_tokens)
    assert float(clean.mean()) == approx(3.552)
    assert float(corrupted.mean()) == approx(-3.552)


def test_nnsight_ioi_pair(model):
    """000 (nnsight, no BOS): clean 4.124, corrupted −2.272 for " John" − " Mary"."""
    pair = make_prompt_set(
        model,
        ["After John and Mary went to the store, Mary gave a bottle of milk to"],
        ["After John and Mary went to the store, John gave a bottle of milk to"],
        [(" John", " Mary")],
        prepend_bos=False,
    )
    metric = LogitDiff(pair)
    assert float(evaluate(model, metric, pair.clean_tokens)[0]) == approx(4.124)
    assert float(evaluate(model, metric, pair.corrupted_tokens)[0]) == approx(-2.272)
