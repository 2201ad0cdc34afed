"""The test_prompt-style table: top-k rows and the answer's rank equal a hand computation."""

from __future__ import annotations

import pytest

from hookpatch.errors import HookpatchError
from hookpatch.readouts import predictions


def test_predictions_match_the_logits(model):
    prompt = "Mary is a great friend, isn’t"
    result = predictions(model, prompt, " she", k=5)
    logits = model(model.to_tokens(prompt))[0, -1]
    top = logits.topk(5)
    assert [r.token_id for r in result.top] == top.indices.tolist()
    assert [r.rank for r in result.top] == [0, 1, 2, 3, 4]
    assert [r.logit for r in result.top] == pytest.approx(top.values.tolist(), abs=1e-5)
    probs = logits.softmax(-1)
    she = model.to_single_token(" she")
    assert result.answer.token == " she"
    assert result.answer.prob == pytest.approx(probs[she].item(), rel=1e-5)
    assert result.answer.rank == int((logits > logits[she]).sum())
    assert result.str_tokens[-3:] == (" isn", "’", "t")
    table = result.to_dataframe()
    assert list(table.columns) == ["rank", "token", "token_id", "logit", "prob"] and len(table) == 5
    text = str(result)
    assert "Answer ' she': rank" in text and text.count("Top ") == 5


def test_predictions_bad_input(gpt2_model):
    with pytest.raises(HookpatchError, match="not a single token"):
        predictions(gpt2_model, "Mary is a great friend, isn’t", " she he")
    with pytest.raises(HookpatchError, match="k=0"):
        predictions(gpt2_model, "Mary is a great friend, isn’t", k=0)
