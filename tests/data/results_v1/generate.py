"""Writes the saved results in this folder with hookpatch's format version 1.

These files were written by the code of commit 5e05018 (the last one whose ``SweepResult.save``
wrote an untyped ``info`` dict and no format version); ``expected.json`` holds the mean
value per cell each file must give back. Running this script with a later hookpatch writes
files of the *current* format, so keep the committed files as they are; the script documents
how they were made (``PYTHONPATH=<checkout of 5e05018> python tests/data/results_v1/generate.py``).
"""

import json
from pathlib import Path

import torch

import hookpatch as hp
import hookpatch._effects

HERE = Path(__file__).parent


def main() -> None:
    torch.manual_seed(0)
    model = hp.tiny_model("gpt2")
    prompts = hp.pronoun_prompts(model, n=4, seed=0)
    metric = hp.LogitDiff(prompts)
    norm = hp.Normalized.from_model(model, metric)
    results = {
        "patch_resid_pre": hp.patch_sweep(model, prompts, norm, "resid_pre", progress=False),
        "patch_z_noising": hp.patch_sweep(model, prompts, metric, "z", by=("layer", "head"),
                                          direction="noising", progress=False),
        "ablation_mean_z": hp.ablation_sweep(model, prompts, metric, "z", how="mean", progress=False),
        "ablation_resample_z": hp.ablation_sweep(model, prompts, metric, "z", how="resample", seed=3,
                                                 progress=False),
        "attribution_z": hp.attribution_sweep(model, prompts, metric, "z", by=("layer", "head")),
        "integrated_gradients_resid_pre": hp.attribution_sweep(model, prompts, metric, "resid_pre", steps=4,
                                                               progress=False),
        "dla_component": hp.dla_by_component(model, prompts, metric),
        "dla_heads": hp.dla_by_head(model, prompts, metric),
        "dla_neurons": hp.readouts.dla_by_neuron(model, prompts, metric, 1),
        "logit_lens": hp.logit_lens(model, prompts, metric),
    }
    llama = hp.tiny_model("llama", n_heads=4, n_kv_heads=2)
    lp = hp.pronoun_prompts(llama, n=4, seed=0)
    results["patch_k_gqa"] = hp.patch_sweep(llama, lp, hp.LogitDiff(lp), "k", by=("layer", "head"), progress=False)
    expected = {}
    for name, result in results.items():
        result.save(HERE / f"{name}.pt")
        expected[name] = {
            "mean": result.mean().tolist(),
            "baseline": hp.effects.default_baseline(result.info),
            "effect_mean": result.effect().mean(-1).tolist(),
            "repr": repr(result),
            "info": json.loads(json.dumps(dict(result.info))),
        }
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
