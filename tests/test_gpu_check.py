"""The GPU check script's quick mode, run on the CPU: every section runs and writes its numbers.

``benchmarks/gpu_check.py`` is run for real only on a machine with a GPU; this smoke test runs
its ``main`` with ``--device cpu --quick`` (tiny models, one test file) so that a broken import,
a renamed key or a section that raises shows here, without a GPU. The numbers it checks have
independent references inside the script itself (TransformerLens's sweeps and edge attribution,
the fp32 model for bf16), so the assertions are on those comparisons.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results(gpu_check, tmp_path_factory):
    """One quick CPU run of the whole script (about 20-30 s)."""
    path = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    threads = torch.get_num_threads()
    try:
        returned = gpu_check.main(["--device", "cpu", "--quick", "--out", str(path)])
    finally:
        torch.set_num_threads(threads)
    written = json.loads(path.read_text())
    assert written["ok"] == returned["ok"]
    return written


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_every_section_ran_without_error(results):
    assert results["errors"] == {}
    assert results["ok"] is True
    assert results["machine"]["device"] == "cpu" and results["versions"]["torch"] == torch.__version__
    tests = results["device_tests"]
    assert tests["device"] == "cpu" and tests["ok"] and tests["failed"] == 0 and tests["passed"] > 0
    assert [m["shape"] for m in results["models"]] == ["tiny-gpt2", "tiny-llama"]


def test_sweeps_equal_transformer_lens_and_times_are_finite(results):
    for model in results["models"]:
        rows = {r["sweep"]: r for r in model["timings"]}
        assert set(rows) == {"resid_pre_layer_pos", "heads_by_pos"}
        for row in rows.values():
            for key in ("hookpatch_s", "transformerlens_s", "speedup", "max_abs_diff", "effect_scale"):
                assert finite(row[key]), (key, row)
            assert row["hookpatch_s"] > 0 and 0 < row["transformerlens_fraction"] <= 1
            assert row["effect_scale"] > 0.1  # a real effect, so equality below means something
            assert row["max_abs_diff"] < 1e-4 and row["equal"]
        cells = model["n_layers"] * model["n_tokens"]
        assert rows["resid_pre_layer_pos"]["cells"] == cells
        assert rows["heads_by_pos"]["cells"] == cells * model["n_heads"]


def test_edge_attribution_matches_transformer_lens_on_gpt2(results):
    gpt2, llama = results["models"]
    eap = gpt2["edge_attribution"]
    assert eap["n_edges"] > 0 and finite(eap["forward_equivalents"]) and finite(eap["reference_s"])
    assert eap["score_scale"] > 0.1 and eap["max_abs_diff"] < 1e-5 and eap["equal"]
    assert llama["edge_attribution"]["reference"] is None  # no TransformerLens reference for GQA
    assert finite(llama["edge_attribution"]["hookpatch_s"])


def test_bf16_rows_are_close_to_fp32_and_not_identical(results):
    for model in results["models"]:
        bf16 = model["bf16"]
        assert [r["check"].split()[0] for r in bf16["rows"]] == [
            "patch_sweep", "patch_sweep", "edge_attribution", "edge_patch"]
        for row in bf16["rows"]:
            assert finite(row["rel_diff"]) and finite(row["noise_floor"]) and row["scale"] > 0
            # bf16 really ran (a differing result) and stays within the stated tolerance
            assert 0 < row["rel_diff"] <= max(bf16["tolerance"], 2 * row["noise_floor"]) and row["ok"]


def test_split_device_check_dry_run(results):
    split = results["split_device"]
    if "skipped" in split:
        pytest.skip(split["skipped"])
    assert split["devices"] == ["cpu", "cpu"] and split["ok"]
    for family in ("gpt2", "llama"):
        assert all(finite(v) and v <= 1e-4 for v in split[family]["max_abs_diff"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_without_a_gpu_the_default_run_says_what_to_pass(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "--device cpu --quick" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_bf16_rows_fail_on_an_error_of_the_effects_size(gpu_check):
    ref = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(3, 4)
    close = gpu_check.compare_bf16("close", ref * 1.02, ref, scale=1.0, floor=0.01)
    assert close["rel_diff"] == pytest.approx(0.02) and close["ok"]
    wrong = gpu_check.compare_bf16("wrong position", ref.roll(1, dims=0), ref, scale=1.0, floor=0.01)
    assert wrong["rel_diff"] > 1 and not wrong["ok"]
    noisy = gpu_check.compare_bf16("at its noise floor", ref * 1.15, ref, scale=1.0, floor=0.1)
    assert noisy["ok"] and noisy["noise_floor"] == pytest.approx(0.1)


def test_a_failing_section_is_recorded_and_the_others_still_run(gpu_check):
    out = {"errors": {}}

    def broken():
        raise RuntimeError("tensor on the wrong device")

    assert gpu_check.attempt(out, "shape.timings", broken) is None
    assert "RuntimeError: tensor on the wrong device" in out["errors"]["shape.timings"]
    assert gpu_check.attempt(out, "shape.bf16", lambda x: x + 1, 1) == 2 and list(out["errors"]) == ["shape.timings"]
