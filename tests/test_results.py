"""Typed results: kinds, provenance, versioned save/load, load specs and prompt fingerprints.

References: files written by the previous hookpatch (format version 1, ``tests/data/results_v1``,
with the mean values and ``info`` that version computed, in ``expected.json``); results
computed again here; the model rebuilt from its recorded load spec against the original;
a hand-written sha256 of the prompt set's tensors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from jaxtyping import TypeCheckError

import hookpatch as hp
from hookpatch.attribution import compare_results
from hookpatch.errors import HookpatchError
from hookpatch.metrics import LogitDiff, Normalized
from hookpatch.model import LoadSpec, load_spec
from hookpatch.readouts import dla_by_head
from hookpatch.results import FORMAT_VERSION, GridFacts, MetricSpec, Provenance, SweepResult
from hookpatch.tasks import pronoun_prompts

V1 = Path(__file__).parent / "data" / "results_v1"
EXPECTED = json.loads((V1 / "expected.json").read_text())
KIND_OF_V1 = {
    "patch_resid_pre": "patched_metric", "patch_z_noising": "patched_metric", "ablation_mean_z": "patched_metric",
    "ablation_resample_z": "patched_metric", "patch_k_gqa": "patched_metric",
    "attribution_z": "attribution_estimate", "integrated_gradients_resid_pre": "attribution_estimate",
    "dla_component": "effect", "dla_heads": "effect", "dla_neurons": "effect", "logit_lens": "readout",
}
QUIET = {"progress": False}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_files_of_format_version_1_load_with_the_numbers_that_version_computed(name):
    expected = EXPECTED[name]
    result = SweepResult.load(V1 / f"{name}.pt")
    assert result.kind == KIND_OF_V1[name]
    assert torch.equal(result.mean(), torch.tensor(expected["mean"]))
    assert result.provenance.default_baseline == expected["baseline"]
    assert torch.allclose(result.effect().mean(-1), torch.tensor(expected["effect_mean"]), atol=1e-6, rtol=0)
    assert repr(result) == expected["repr"]
    assert result.info == expected["info"]  # the old dict, derived back from the typed record
    assert result.provenance.hookpatch_version is None and result.provenance.model is None


def test_version_1_provenance_is_typed():
    ablation = SweepResult.load(V1 / "ablation_resample_z.pt").provenance
    assert (ablation.method, ablation.ablation, ablation.seed, ablation.component) == ("ablation", "resample", 3, "z")
    assert ablation.direction is None and ablation.metric == MetricSpec("logit_diff", linear=True)
    patch = SweepResult.load(V1 / "patch_resid_pre.pt").provenance
    assert patch.direction == "denoising" and patch.metric.normalized and patch.metric.base == "logit_diff"
    gqa = SweepResult.load(V1 / "patch_k_gqa.pt").provenance
    assert gqa.grid == GridFacts(kv_head_feeds=(("KV0", ("H0", "H1")), ("KV1", ("H2", "H3"))))
    ig = SweepResult.load(V1 / "integrated_gradients_resid_pre.pt").provenance
    assert (ig.method, ig.steps, ig.passes) == ("integrated_gradients", 4, 2)
    dla = SweepResult.load(V1 / "dla_heads.pt")
    assert dla.terms["attn_bias"].shape == (2, 4)
    assert SweepResult.load(V1 / "logit_lens.pt").provenance.convention == "final_scale"


def test_a_version_1_file_saved_again_is_current_and_keeps_everything(tmp_path):
    for name in EXPECTED:
        old = SweepResult.load(V1 / f"{name}.pt")
        old.save(tmp_path / "again.pt")
        assert torch.load(tmp_path / "again.pt", weights_only=True)["format_version"] == FORMAT_VERSION == 2
        new = SweepResult.load(tmp_path / "again.pt")
        assert new.provenance == old.provenance and new.info == old.info
        assert torch.equal(new.values, old.values) and new.labels == old.labels
        assert new.terms.keys() == old.terms.keys() and all(torch.equal(new.terms[k], old.terms[k]) for k in new.terms)


@pytest.fixture(scope="module")
def fresh(gpt2_model):
    """One result of each kind, computed now."""
    prompts = pronoun_prompts(gpt2_model, n=4, seed=0)
    metric = LogitDiff(prompts)
    return prompts, {
        "patch": hp.patch_sweep(gpt2_model, prompts, Normalized.from_model(gpt2_model, metric), "resid_pre",
                                layers=[1], positions=[1, 2], **QUIET),
        "ablation": hp.ablation_sweep(gpt2_model, prompts, metric, "z", how="resample", seed=5, **QUIET),
        "attribution": hp.attribution_sweep(gpt2_model, prompts, metric, "z", by=("layer", "head"), **QUIET),
        "dla": dla_by_head(gpt2_model, prompts, metric),
        "lens": hp.logit_lens(gpt2_model, prompts, metric, convention="renormalized"),
    }


def test_every_kind_round_trips_with_its_provenance(fresh, gpt2_model, tmp_path):
    prompts, results = fresh
    kinds = {name: r.kind for name, r in results.items()}
    assert kinds == {"patch": "patched_metric", "ablation": "patched_metric", "attribution": "attribution_estimate",
                     "dla": "effect", "lens": "readout"}
    for name, result in results.items():
        p = result.provenance
        assert p.model == load_spec(gpt2_model) and p.model.loader == "tiny_model"
        assert p.prompts_fingerprint == prompts.fingerprint() and p.task == "pronoun"
        assert p.hookpatch_version == hp.__version__
        result.save(tmp_path / f"{name}.pt")
        back = SweepResult.load(tmp_path / f"{name}.pt")
        assert back.provenance == p, name
        assert torch.equal(back.values, result.values) and torch.equal(back.clean, result.clean)
        assert back.labels == result.labels and back.axes == result.axes
        assert torch.equal(back.effects(n_resamples=50, n_permutations=50).mean,
                           result.effects(n_resamples=50, n_permutations=50).mean)
        assert repr(back) == repr(result)


def test_provenance_records_what_each_call_did(fresh):
    _, r = fresh
    patch = r["patch"].provenance
    assert (patch.method, patch.direction, patch.component, patch.ablation) == ("patch", "denoising", "resid_pre", None)
    assert patch.grid == GridFacts(layers=(1,), positions=(1, 2), heads=None)
    assert patch.metric.normalized and patch.metric.base == "logit_diff" and patch.default_baseline == "corrupted"
    assert patch.runner in ("fast", "bridge")
    ablation = r["ablation"].provenance
    assert (ablation.method, ablation.ablation, ablation.seed, ablation.direction) == ("ablation", "resample", 5, None)
    assert ablation.default_baseline == "clean" and ablation.grid.heads == (0, 1, 2, 3)
    attribution = r["attribution"].provenance
    assert (attribution.method, attribution.steps, attribution.direction) == ("attribution", 1, "denoising")
    assert attribution.default_baseline == "none"
    assert r["dla"].provenance.method == "dla_heads" and r["dla"].terms["attn_bias"].shape == (2, 4)
    assert r["lens"].provenance.convention == "renormalized" and r["lens"].provenance.component is None


def test_the_baseline_follows_the_kind_not_the_method_name():
    values, clean, corrupted = torch.ones(2, 3), torch.zeros(3), torch.full((3,), 0.5)
    labels = {"layer": ("0", "1")}

    def result(**fields):
        return SweepResult(values=values, axes=("layer",), labels=labels, clean=clean, corrupted=corrupted,
                           provenance=Provenance(**fields))

    mine = result(kind="patched_metric", method="my_patch", direction="denoising")
    assert mine.effects(n_resamples=20, n_permutations=20).baseline == "corrupted"
    assert torch.equal(mine.effect(), values - corrupted)
    noising = result(kind="patched_metric", method="patch", direction="noising")
    assert torch.equal(noising.effect(), values - clean)
    estimate = result(kind="attribution_estimate", method="my_estimate")
    assert torch.equal(estimate.effect(), values)
    with pytest.raises(HookpatchError, match="baseline='clean': the values of a my_estimate result are already"):
        estimate.effect("clean")
    assert torch.equal(result(kind="readout", method="probe").effect("clean"), values - clean)


def test_an_unknown_format_version_is_refused_with_the_fix(fresh, tmp_path):
    _, results = fresh
    path = tmp_path / "future.pt"
    results["dla"].save(path)
    data = torch.load(path, weights_only=True)
    torch.save({**data, "format_version": 3}, path)
    with pytest.raises(HookpatchError, match=r"format version 3; this hookpatch reads format versions 1, 2.*upgrade"):
        SweepResult.load(path)
    torch.save({**data, "provenance": {**data["provenance"], "sparkle": 1}}, path)
    with pytest.raises(HookpatchError, match=r"unknown fields \['sparkle'\]"):
        SweepResult.load(path)
    torch.save({k: v for k, v in data.items() if k != "terms"}, path)
    with pytest.raises(HookpatchError, match=r"lacks \['terms'\]"):
        SweepResult.load(path)
    torch.save({"values": torch.zeros(2)}, path)
    with pytest.raises(HookpatchError, match="is not a hookpatch sweep result"):
        SweepResult.load(path)


def test_bad_provenance_is_refused():
    # Under pytest jaxtyping's runtime checker sees a wrong kind or type first; without it, the
    # record's own check does (the direction check runs either way).
    with pytest.raises((HookpatchError, TypeCheckError), match="'metric'"):
        Provenance(kind="metric", method="patch")  # type: ignore[arg-type]
    with pytest.raises(HookpatchError, match=r"direction='forward': expected one of \('denoising', 'noising'\)"):
        Provenance(kind="patched_metric", method="patch", direction="forward")
    with pytest.raises((HookpatchError, TypeCheckError), match="provenance"):
        SweepResult(values=torch.zeros(1, 2), axes=("layer",), labels={"layer": ("0",)}, clean=torch.zeros(2),
                    provenance={"method": "patch"})  # type: ignore[arg-type]


def test_compare_reads_kinds_and_fingerprints(fresh, gpt2_model):
    prompts, results = fresh
    metric = LogitDiff(prompts)
    patch = hp.patch_sweep(gpt2_model, prompts, metric, "z", by=("layer", "head"), **QUIET)
    with pytest.raises(HookpatchError, match="attribution= must be an attribution result"):
        compare_results(patch, patch)
    other = pronoun_prompts(gpt2_model, n=4, seed=1)
    assert other.fingerprint() != prompts.fingerprint()
    elsewhere = hp.attribution_sweep(gpt2_model, other, LogitDiff(other), "z", by=("layer", "head"), **QUIET)
    with pytest.raises(HookpatchError, match="prompts_fingerprint="):
        compare_results(patch, elsewhere)
    assert compare_results(patch, results["attribution"], k=2, n_resamples=20).k == 2


def test_fingerprint_is_a_hash_of_the_tensors_a_run_reads(gpt2_model):
    prompts = pronoun_prompts(gpt2_model, n=4, seed=0)
    digest = hashlib.sha256()
    for name, tensor in [("clean_tokens", prompts.clean_tokens), ("corrupted_tokens", prompts.corrupted_tokens),
                         ("answer_tokens", prompts.answer_tokens), ("lengths", prompts.lengths),
                         ("pad_token_id", torch.tensor([prompts.pad_token_id]))] + [
                             (f"position {n}", prompts.positions[n]) for n in sorted(prompts.positions)]:
        digest.update(f"{name} {tuple(tensor.shape)};".encode())
        digest.update(b"".join(int(v).to_bytes(8, "little", signed=True) for v in tensor.flatten().tolist()))
    assert prompts.fingerprint() == digest.hexdigest()[:16]
    assert prompts.select([0, 1, 2, 3]).fingerprint() == prompts.fingerprint()
    assert prompts.select([1, 0, 2, 3]).fingerprint() != prompts.fingerprint()
    swapped = prompts.select([0, 1, 2, 3])
    object.__setattr__(swapped, "answer_tokens", prompts.answer_tokens.flip(-1))
    assert swapped.fingerprint() != prompts.fingerprint()
    narrow = prompts.select([0, 1, 2, 3])
    object.__setattr__(narrow, "clean_tokens", prompts.clean_tokens.int())
    assert narrow.fingerprint() == prompts.fingerprint()  # the integer dtype does not matter


def test_load_spec_rebuilds_the_same_model(gpt2_model):
    spec = load_spec(gpt2_model)
    assert spec.loader == "tiny_model" and spec.name == "gpt2" and spec.option("d_model") == 64
    again = spec.load()
    assert load_spec(again) == spec
    tokens = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        assert torch.equal(again(tokens), gpt2_model(tokens))
    assert LoadSpec.from_dict(spec.to_dict()) == spec
    organism = hp.load_model("organism", device="cpu")
    recorded = load_spec(organism)
    assert (recorded.loader, recorded.name, recorded.option("fold_ln"), recorded.option("dtype")) == (
        "load_model", "organism", True, "torch.float32")
    with torch.no_grad():
        assert torch.equal(recorded.load()(tokens), organism(tokens))
    given = LoadSpec("load_model", "organism", "x", (("tokenizer", {"object recorded by class name": "Tok"}),))
    with pytest.raises(HookpatchError, match=r"tokenizer= an object \(Tok\).*load\(tokenizer=\.\.\.\)"):
        given.load()
