"""The pos axis a sweep uses when ``positions=`` is not given."""

from __future__ import annotations

import pytest
import torch

import hookpatch as hp
from hookpatch.sweeps._grid import default_positions

NAMES = ["IO", "S1", "S1+1", "S2", "END"]


@pytest.fixture(scope="module")
def padded(gpt2_model):
    prompts = hp.ioi_prompts(gpt2_model, 16)
    assert prompts.padded and len(set(prompts.lengths.tolist())) > 1
    return prompts


def test_padded_prompts_default_to_their_named_positions(gpt2_model, padded):
    metric = hp.Normalized.from_model(gpt2_model, hp.LogitDiff(padded))
    default = hp.patch_sweep(gpt2_model, padded, metric, "resid_pre", progress=False)
    named = hp.patch_sweep(gpt2_model, padded, metric, "resid_pre", positions=NAMES, progress=False)
    assert default.labels["pos"] == tuple(NAMES) == named.labels["pos"]
    torch.testing.assert_close(default.values, named.values, rtol=0, atol=0)

    attribution = hp.attribution_sweep(gpt2_model, padded, metric, "resid_pre", progress=False)
    assert attribution.labels["pos"] == tuple(NAMES)
    torch.testing.assert_close(
        attribution.values,
        hp.attribution_sweep(gpt2_model, padded, metric, "resid_pre", positions=NAMES, progress=False).values,
    )


def test_prompts_of_one_length_default_to_every_column(gpt2_model):
    prompts = hp.pronoun_prompts(gpt2_model)
    assert not prompts.padded
    assert default_positions(prompts) == tuple(range(prompts.n_pos))


def test_padded_prompts_without_names_say_what_to_pass(gpt2_model, padded):
    custom = hp.make_prompt_set(gpt2_model, list(padded.clean_prompts[:4]), list(padded.corrupted_prompts[:4]),
                                list(padded.answers[:4]), pad=True)
    assert custom.padded and list(custom.positions) == ["END"]
    shortest = int(custom.lengths.min())
    needed = rf"positions= is needed.*positions=\[0, \.\.\., {shortest - 1}, 'END'\]"
    with pytest.raises(hp.HookpatchError, match=needed):
        hp.patch_sweep(gpt2_model, custom, hp.LogitDiff(custom), "resid_pre", progress=False)
