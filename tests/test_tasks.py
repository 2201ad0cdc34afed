"""Prompt-set builders: equal-length pairs, correct answers, positions checked against tokens."""

from __future__ import annotations

import pytest
import torch

from hookpatch.errors import HookpatchError
from hookpatch.tasks import _vocab as vocab
from hookpatch.tasks import ioi_prompts, ioi_tl_demo, make_prompt_set, pronoun_prompts


@pytest.fixture(params=["word", "bpe"])
def tok_model(request, gpt2_model, gpt2_bpe_model):
    return {"word": gpt2_model, "bpe": gpt2_bpe_model}[request.param]


def test_pronoun_set_is_the_users_notebook(tok_model):
    ps = pronoun_prompts(tok_model)
    assert len(ps) == 20
    assert ps.clean_prompts[:4] == (
        "Mary is a great friend, isn’t",
        "John is a great friend, isn’t",
        "Dan is a great friend, isn’t",
        "Amy is a great friend, isn’t",
    )
    assert ps.corrupted_prompts[:4] == (
        "John is a great friend, isn’t",
        "Mary is a great friend, isn’t",
        "Amy is a great friend, isn’t",
        "Dan is a great friend, isn’t",
    )
    assert ps.answers[:2] == ((" she", " he"), (" he", " she"))
    she, he = tok_model.to_single_token(" she"), tok_model.to_single_token(" he")
    assert ps.answer_tokens[:2].tolist() == [[she, he], [he, she]]
    assert ps.clean_tokens.shape == ps.corrupted_tokens.shape == (20, 10)
    for i in range(len(ps)):
        tokens = ps.clean_str_tokens[i]
        assert tokens[0] == "<|endoftext|>"
        assert tokens[int(ps.position("NAME")[i])] == ps.clean_prompts[i].split()[0]
        assert int(ps.end[i]) == len(tokens) - 1 and tokens[-1] == "t"
    # corrupted tokens differ from clean ones only at the name
    differs = (ps.clean_tokens != ps.corrupted_tokens).nonzero()[:, 1]
    assert set(differs.tolist()) == {1}


def test_pronoun_user_names_templates_and_sampling(gpt2_model):
    ps = pronoun_prompts(
        gpt2_model, templates=["{name} is a great student, isn’t"], names=[("Emma", " she"), ("Tom", " he")]
    )
    assert ps.clean_prompts == ("Emma is a great student, isn’t", "Tom is a great student, isn’t")
    assert ps.corrupted_prompts == ("Tom is a great student, isn’t", "Emma is a great student, isn’t")
    sampled = pronoun_prompts(gpt2_model, n=7, seed=1)
    assert len(sampled) == 7 and sampled.clean_prompts == pronoun_prompts(gpt2_model, n=7, seed=1).clean_prompts
    with pytest.raises(HookpatchError, match="exactly two pronouns"):
        pronoun_prompts(gpt2_model, names=[("Mary", " she"), ("John", " he"), ("Rose", " it")])
    with pytest.raises(HookpatchError, match=r"n=21 but there are 20 distinct prompts"):
        pronoun_prompts(gpt2_model, n=21)


@pytest.mark.parametrize("corruption", ["s2", "abc", "swap"])
def test_ioi_positions_answers_and_corruptions(tok_model, corruption):
    ps = ioi_prompts(tok_model, 24, corruption=corruption, seed=3)
    assert len(ps) == 24 and ps.clean_tokens.shape == ps.corrupted_tokens.shape
    assert len(set(t for t in ps.clean_prompts)) > 12
    orders = set()
    for i in range(len(ps)):
        tokens = ps.clean_str_tokens[i]
        io, s = ps.answers[i]
        assert tokens[int(ps.position("IO")[i])] == io
        assert tokens[int(ps.position("S1")[i])] == s
        assert tokens[int(ps.position("S2")[i])] == s
        assert int(ps.position("S1+1")[i]) == int(ps.position("S1")[i]) + 1
        assert int(ps.end[i]) == int(ps.lengths[i]) - 1 and tokens[-1] == " to"
        orders.add("ABBA" if ps.position("IO")[i] < ps.position("S1")[i] else "BABA")
        bad = ps.corrupted_str_tokens[i]
        assert len(bad) == len(tokens)
        s2 = int(ps.position("S2")[i])
        if corruption == "s2":
            assert bad[s2] == io and bad[:s2] == tokens[:s2]
        elif corruption == "abc":
            names = {bad[int(ps.position(k)[i])] for k in ("IO", "S1", "S2")}
            assert len(names) == 3 and not names & {io, s}
        else:
            assert ps.corrupted_prompts[i] == ps.clean_prompts[i ^ 1]
    assert orders == {"ABBA", "BABA"}
    # pad columns hold the pad id after END
    for i in range(len(ps)):
        assert (ps.clean_tokens[i, int(ps.lengths[i]):] == ps.pad_token_id).all()
    assert ioi_prompts(tok_model, 24, corruption=corruption, seed=3).clean_prompts == ps.clean_prompts


def test_ioi_has_at_least_15_templates():
    assert len(vocab.IOI_TEMPLATES) >= 15


def test_tl_demo_set(gpt2_model):
    ps = ioi_tl_demo(gpt2_model)
    assert ps.clean_prompts[:2] == (
        "When John and Mary went to the shops, John gave the bag to",
        "When John and Mary went to the shops, Mary gave the bag to",
    )
    assert ps.answers[:2] == ((" Mary", " John"), (" John", " Mary"))
    assert torch.equal(ps.corrupted_tokens, ps.clean_tokens[[1, 0, 3, 2, 5, 4, 7, 6]])
    assert ps.position("S2").tolist() == [10] * 8


def test_bad_prompt_sets(gpt2_model):
    lengths = (r"prompt 0: clean 'John went to the store' is 6 tokens "
               r"but corrupted 'John and Mary went to the store' is 8 tokens")
    with pytest.raises(HookpatchError, match=lengths):
        make_prompt_set(gpt2_model, ["John went to the store"], ["John and Mary went to the store"], [(" she", " he")])
    with pytest.raises(HookpatchError, match=r"answer ' Mary John' is not a single token: it tokenizes to 2 tokens"):
        make_prompt_set(gpt2_model, ["John went to the store"], ["Mary went to the store"], [(" Mary John", " he")])
    with pytest.raises(HookpatchError, match=r"different lengths.*pass pad=True"):
        make_prompt_set(
            gpt2_model,
            ["John went to the store", "John went to the great store"],
            ["Mary went to the store", "Mary went to the great store"],
            [(" she", " he")] * 2,
        )
    with pytest.raises(HookpatchError, match=r"unknown position name 'S3'.*\['END', 'NAME'\]"):
        pronoun_prompts(gpt2_model).position("S3")
    with pytest.raises(HookpatchError, match=r"outside the model's vocabulary: \[' shopz'\]"):
        pronoun_prompts(gpt2_model, templates=["{name} went to the shopz, isn’t"])
    with pytest.raises(HookpatchError, match="unknown corruption 'xyz'"):
        ioi_prompts(gpt2_model, 4, corruption="xyz")
    with pytest.raises(HookpatchError, match="pass an even n"):
        ioi_prompts(gpt2_model, 3, corruption="swap")
    with pytest.raises(HookpatchError, match=r"different lengths.*pad=True"):
        ioi_prompts(gpt2_model, 4, pad=False)


def test_padded_set_tracks_end_per_prompt(gpt2_model):
    ps = make_prompt_set(
        gpt2_model,
        ["John went to the store", "John went to the great store"],
        ["Mary went to the store", "Mary went to the great store"],
        [(" she", " he")] * 2,
        pad=True,
    )
    assert ps.end.tolist() == [5, 6] and ps.padded
    assert ps.clean_tokens[0, 6].item() == ps.pad_token_id
    sub = ps.select([0])
    assert sub.clean_tokens.shape == (1, 6) and sub.end.tolist() == [5]
    labels = ps.position_labels()
    assert labels[0] == "0: <|endoftext|>" and labels[1] == "1: John"


def test_corruptions_share_the_clean_prompts(gpt2_model):
    sets = [ioi_prompts(gpt2_model, 12, corruption=c, seed=5) for c in ("s2", "abc")]
    assert sets[0].clean_prompts == sets[1].clean_prompts
    assert sets[0].corrupted_prompts != sets[1].corrupted_prompts


def test_a_prompt_set_refuses_unpaired_tokens():
    """Run without pytest's jaxtyping import hook, which would reject the shapes first."""
    import subprocess
    import sys

    code = (
        "import dataclasses; from hookpatch import tiny_model, pronoun_prompts\n"
        "ps = pronoun_prompts(tiny_model('gpt2'))\n"
        "dataclasses.replace(ps, corrupted_tokens=ps.corrupted_tokens[:, :9])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "HookpatchError: clean tokens (20, 10) and corrupted tokens (20, 9) differ in shape" in result.stderr
