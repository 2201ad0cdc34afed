"""The GPU check: device-sensitive tests on CUDA, a bf16 check, sweep and edge timings against TransformerLens.

One command on a machine with a CUDA GPU (no network needed; a few minutes on an H200):

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

It writes one JSON file (rewritten after each section: a run cut short keeps what it measured):

1. ``device_tests``: the files of :data:`DEVICE_TESTS` (sweeps against TransformerLens, runners,
   circuit references, edge attribution, readouts, attribution against finite differences), one
   ``pytest -q -x`` each with ``HOOKPATCH_TEST_DEVICE=cuda``, so ``tests/conftest.py`` builds its
   fixture models on the GPU and a tensor left on the wrong device fails them (tests that build
   their own models keep them on the CPU). Pass/fail counts per file.
2. ``split_device``: ``split_device_check`` of ``benchmarks/_devices.py`` (a tiny model split
   between ``cuda:0`` and the CPU against the same model on the CPU), where that file exists.
3. ``models``: a random GPT-2-small-shaped model and a Llama-3.2-1B-shaped one (16 blocks,
   d_model 2048, 32 query / 8 KV heads, d_mlp 8192; vocabulary cut from 128256 to 32768 and
   embeddings untied, so it builds in seconds), on the 20 pronoun prompts. ``timings``:
   ``patch_sweep`` resid_pre (layer × pos) and z (layer × pos × head) in fp32 against
   TransformerLens's ``generic_activation_patch`` in the same run (``sweeps.time_tl`` on
   :data:`TL_CELLS` cells of each grid, extrapolated: its cost per cell is constant), and the
   largest difference of their values. ``edge_attribution``: EAP of every edge in
   forward-equivalents and, on GPT-2, against TransformerLens's edge ``attribution_patch``
   (one prompt per call, as in ``benchmarks/circuits.py``). ``bf16``: the same checkpoint in
   bf16 against fp32: patch_sweep (resid_pre; z by layer × head), edge_patch (the top 10, top 100
   and all edges by EAP score) and edge_attribution.

Clocks: wall seconds after ``torch.cuda.synchronize()``, each timed call after an untimed
warm-up; fp32 matmuls are true fp32 (``allow_tf32`` is recorded). bf16: each result's change
against the unpatched corrupted run (its effect) in bf16 against fp32, the largest difference
over the prompts and cells over the largest fp32 effect (``rel_diff``; EAP scores over the
largest fp32 score). bf16 keeps 8 bits of mantissa, so through a dozen blocks a result moves by
some per cent of the effect (2-16% in bf16 runs on the CPU), about as much as the unpatched
metrics themselves (``noise_floor``: the same ratio for the clean and corrupted runs), where a
wrong device, dtype or position moves it by the whole effect: a row passes below
:data:`BF16_TOLERANCE` or twice its noise floor (an effect is the difference of two runs). Matrices are
drawn with std :data:`INIT_STD`, not HuggingFace's 0.02, with which a random GPT-2 small barely
reads its input (the name swap moves a 0.7 logit difference by 0.02: bf16 rounding alone would
exceed the effects).

Without a GPU, ``--device cpu --quick`` runs every section at tiny sizes on the CPU (a smoke test,
run by ``tests/test_gpu_check.py``); without ``--device cpu`` the script exits saying so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hookpatch  # noqa: E402
import sweeps  # noqa: E402
from circuits import _tl_receiver, _tl_sender  # noqa: E402
from hookpatch.circuits import edge_attribution, edge_patch  # noqa: E402
from hookpatch.metrics import LogitDiff  # noqa: E402
from hookpatch.model import load_model, model_facts, write_tiny_checkpoint  # noqa: E402
from hookpatch.runners import runner_for  # noqa: E402
from hookpatch.sweeps import patch_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEVICE_TESTS = (
    "tests/test_sweeps.py", "tests/test_runners.py", "tests/test_circuit_refs.py", "tests/test_edge_attribution.py",
    "tests/test_edge_attribution_tl.py", "tests/test_readouts.py", "tests/test_attribution_fd.py",
)
QUICK_TESTS = ("tests/test_readouts.py",)
SHAPES = {
    "gpt2-small": dict(sweeps.MODELS["gpt2-small"]),
    "llama3.2-1b-vocab32k": dict(family="llama", n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8, d_mlp=8192,
                                 vocab_size=32768),
}
QUICK_SHAPES = {
    "tiny-gpt2": dict(family="gpt2", n_layers=2, d_model=64, n_heads=4, d_mlp=128),
    "tiny-llama": dict(family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128),
}
INIT_STD = 0.03  # std of every matrix of the full-size models (see the module docstring)
TIMED_SWEEPS = ("resid_pre_layer_pos", "heads_by_pos")  # keys of sweeps.SWEEPS
TL_CELLS = 96  # TransformerLens is timed on this many cells of each grid (all, if fewer)
TL_EDGE_PROMPTS = 2  # TransformerLens's edge attribution: prompts measured (one per call)
BF16_TOLERANCE = 0.1  # a bf16 row passes below this (over the largest fp32 effect) or twice its noise floor
EQUAL_TOLERANCE = 1e-4  # fp32 hookpatch vs TransformerLens: absolute, or relative to effects above 1


def make_clock(device: torch.device) -> Callable[[], float]:
    """Wall seconds, after waiting for the GPU's queued work (so a timer brackets real work)."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:  # importable from a path pip never installed to
        return None


def machine_facts(device: torch.device) -> dict:
    """Where and with what this run happened."""
    facts = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
             "device": str(device), "clock": "wall seconds after torch.cuda.synchronize (CPU: wall seconds)"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(gpu=props.name, gpu_memory_gb=props.total_memory / 2**30, cuda=torch.version.cuda,
                     allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    facts["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    versions = {name: package_version(name) for name in ("transformer-lens", "transformers")}
    return {"machine": facts, "versions": {"hookpatch": hookpatch.__version__, "torch": torch.__version__, **versions}}


def run_device_tests(files: tuple[str, ...], device: str, budget_s: float) -> dict:
    """Each test file in its own ``pytest -q -x`` with the fixture models on ``device``; files
    not started before ``budget_s`` seconds are recorded as not run."""
    env, deadline, rows = {**os.environ, "HOOKPATCH_TEST_DEVICE": device}, time.monotonic() + budget_s, []
    for path in files:
        left = deadline - time.monotonic()
        if left < 5:
            rows.append({"file": path, "status": "not run (time budget spent)", "passed": 0, "failed": 0})
            continue
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", path],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired as err:
            lines = (err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or "").splitlines()
            status = "timed out"
        summary = " ".join(lines[-3:])
        counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary)}
        rows.append({"file": path, "status": status, "seconds": time.perf_counter() - t,
                     "passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
                     "errors": counts.get("errors", counts.get("error", 0)), "skipped": counts.get("skipped", 0),
                     "failures": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:10],
                     "tail": lines[-25:] if status != "passed" else lines[-1:]})
        print(f"tests on {device}: {path:40s} {status:20s} {counts.get('passed', 0)} passed", flush=True)
    return {"device": device, "files": rows, "passed": sum(r["passed"] for r in rows),
            "failed": sum(r["failed"] + r.get("errors", 0) for r in rows),
            "ok": all(r["status"] == "passed" for r in rows)}


def run_split_check(device: torch.device) -> dict:
    """``benchmarks/_devices.py``'s split-model check on GPT-2 and Llama (on the CPU: its dry
    run, both halves on the CPU)."""
    try:
        from _devices import split_device_check
    except ImportError as err:
        return {"skipped": f"benchmarks/_devices.py is not importable: {err}"}
    devices = ("cuda:0", "cpu") if device.type == "cuda" else ("cpu", "cpu")
    out = {family: split_device_check(family, devices=devices) for family in ("gpt2", "llama")}
    print("split device check:", {k: v.get("ok") for k, v in out.items()}, flush=True)
    return {"devices": list(devices), **out, "ok": all(v.get("ok") for v in out.values())}


def build_models(spec: dict, device: torch.device, quick: bool) -> tuple[Any, Any, float]:
    """One random checkpoint of ``spec``'s shape, loaded in fp32 and in bf16 on ``device``."""
    family, sizes = spec["family"], {k: v for k, v in spec.items() if k != "family"}
    sizes.update({} if quick else dict(n_ctx=1024, init_std=INIT_STD))
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hookpatch-gpu-check-") as tmp:
        write_tiny_checkpoint(tmp, family, **sizes)
        fp32 = load_model(tmp, device=device)
        bf16 = load_model(tmp, device=device, dtype=torch.bfloat16)
    return fp32, bf16, time.perf_counter() - t


def time_sweeps(model: Any, prompts: Any, clock: Callable[[], float], tl_cells: int, budget: int) -> list[dict]:
    """hookpatch's sweeps of :data:`TIMED_SWEEPS` against TransformerLens's, in fp32."""
    metric = LogitDiff(prompts)
    cuda = torch.device(model.cfg.device).type == "cuda"
    rows = []
    for name in TIMED_SWEEPS:
        spec = sweeps.SWEEPS[name]
        one = prompts.select([0])
        with torch.no_grad():  # warm-up: the runner's probe, the kernels' first launch
            patch_sweep(model, one, LogitDiff(one), spec["component"], by=spec["by"], layers=[0], progress=False)
            if cuda:  # peak GPU memory of the sweep, above what the model and the caches hold
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            t = clock()
            ours = patch_sweep(model, prompts, metric, spec["component"], by=spec["by"], memory_budget=budget,
                               progress=False)
            ours_s = clock() - t
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
        n_cells = ours.values[..., 0].numel()
        tl_s, tl_values, index = sweeps.time_tl(model, prompts, metric, name, min(1.0, tl_cells / n_cells))
        tl_total = tl_s * n_cells / len(index)
        ours_mean = ours.mean().double().cpu()
        diff = float((ours_mean.reshape(-1)[: len(index)] - tl_values.cpu().double().reshape(-1)).abs().max())
        effect = float((ours_mean - ours.corrupted.double().cpu().mean()).abs().max())
        rows.append({"sweep": name, "cells": n_cells, "hookpatch_s": ours_s, "transformerlens_s": tl_total,
                     "transformerlens_fraction": len(index) / n_cells, "speedup": tl_total / ours_s,
                     "max_abs_diff": diff, "effect_scale": effect, "equal": diff <= EQUAL_TOLERANCE * max(effect, 1.0),
                     "runner": ours.provenance.runner, "peak_gpu_mb": peak})
        print(f"  {name:20s} hookpatch {ours_s:7.3f}s  TL {tl_total:8.3f}s (x{tl_total / ours_s:6.1f})  "
              f"diff {diff:.1e}  runner {ours.provenance.runner}", flush=True)
    return rows


def time_edges(model: Any, prompts: Any, clock: Callable[[], float], tl_prompts: int) -> dict:
    """EAP of every edge in forward-equivalents; against TransformerLens's edge attribution
    (``tl_prompts`` prompts, one per call, extrapolated) when ``tl_prompts`` > 0."""
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    metric = LogitDiff(prompts)
    one = prompts.select([0])
    with torch.no_grad():
        model(prompts.clean_tokens)
        times = [(clock(), model(prompts.clean_tokens), clock()) for _ in range(3)]
    forward = min(end - start for start, _, end in times)
    edge_attribution(model, one, LogitDiff(one), progress=False)  # warm-up
    t = clock()
    eap = edge_attribution(model, prompts, metric, progress=False)
    eap_s = clock() - t
    row = {"n_edges": len(eap.labels["edge"]), "hookpatch_s": eap_s, "forward_s": forward,
           "forward_equivalents": eap_s / forward, "reference": None, "reference_s": None, "max_abs_diff": None}
    if tl_prompts:
        labels = {label: i for i, label in enumerate(eap.labels["edge"])}
        diffs, tl_s = [], 0.0
        for i in range(tl_prompts):
            end, good, bad = int(prompts.end[i]), int(prompts.correct_tokens[i]), int(prompts.incorrect_tokens[i])
            t = clock()
            res = attribution_patch(model, prompts.clean_tokens[i: i + 1], prompts.corrupted_tokens[i: i + 1],
                                    lambda logits, e=end, a=good, b=bad: logits[0, e, a] - logits[0, e, b],
                                    EdgeAttributionConfig(granularity="edge"))
            tl_s += clock() - t
            theirs = torch.zeros(len(labels), dtype=torch.float64)
            for (writer, reader), value in res.edge_scores.items():  # per (edge, position): summed
                theirs[labels[f"{_tl_sender(writer)}->{_tl_receiver(reader)}"]] += float(value)
            diffs.append(float((eap.values[:, i].double().cpu() - theirs).abs().max()))
        row.update(reference=f"transformer_lens attribution_patch(granularity='edge'), {tl_prompts} of "
                             f"{len(prompts)} prompts measured, extrapolated",
                   reference_s=tl_s * len(prompts) / tl_prompts, max_abs_diff=max(diffs),
                   score_scale=float(eap.values.abs().max()), equal=max(diffs) <= EQUAL_TOLERANCE)
        row["speedup"] = row["reference_s"] / eap_s
    print(f"  eap, {row['n_edges']} edges     hookpatch {eap_s:7.3f}s = {row['forward_equivalents']:.1f} forwards"
          + (f"  TL {row['reference_s']:8.3f}s  diff {row['max_abs_diff']:.1e}" if tl_prompts else ""), flush=True)
    return row


def effects(result: Any) -> Float[Tensor, "*grid batch"]:
    """Each cell's change of the metric against the unpatched corrupted run, in float64."""
    return result.values.double().cpu() - result.corrupted.double().cpu()


def compare_bf16(check: str, ours: Tensor, ref: Tensor, scale: float, floor: float) -> dict:
    """One bf16 row: the largest difference from fp32, relative to ``scale``; ``floor``: the
    largest bf16-vs-fp32 difference of the unpatched clean and corrupted metrics (an effect, a
    difference of two runs, may carry twice that)."""
    diff = float((ours - ref).abs().max())
    rel = diff / scale if scale > 0 else math.inf
    floor = floor / scale if scale > 0 else math.inf
    print(f"  bf16 {check:26s} rel diff {rel:.3f} (noise floor {floor:.3f}, scale {scale:.3g})", flush=True)
    return {"check": check, "max_abs_diff": diff, "scale": scale, "rel_diff": rel, "noise_floor": floor,
            "ok": rel <= max(BF16_TOLERANCE, 2 * floor)}


def bf16_check(fp32: Any, bf16: Any, prompts: Any) -> dict:
    """patch_sweep (resid_pre; z by layer × head), edge_patch and edge_attribution of the bf16
    model against the fp32 one, on the same prompts."""
    metric = LogitDiff(prompts)
    rows, floor = [], 0.0
    with torch.no_grad():
        for component, by in (("resid_pre", ("layer", "pos")), ("z", ("layer", "head"))):
            ref = patch_sweep(fp32, prompts, metric, component, by=by, progress=False)
            ours = patch_sweep(bf16, prompts, metric, component, by=by, progress=False)
            floor = max(floor, float((ours.clean.double() - ref.clean.double()).abs().max()),
                        float((ours.corrupted.double() - ref.corrupted.double()).abs().max()))
            rows.append(compare_bf16(f"patch_sweep {component} {'x'.join(by)}", effects(ours), effects(ref),
                                     float(effects(ref).abs().max()), floor))
    ref_eap = edge_attribution(fp32, prompts, metric, progress=False)
    ours_eap = edge_attribution(bf16, prompts, metric, progress=False)
    rows.append(compare_bf16("edge_attribution eap", ours_eap.values.double(), ref_eap.values.double(),
                             float(ref_eap.values.abs().max()), floor))
    labels = ref_eap.labels["edge"]
    order = ref_eap.mean().abs().argsort(descending=True).tolist()
    sets = [[labels[i] for i in order[:k]] for k in (10, 100, len(labels))]
    ref = edge_patch(fp32, prompts, metric, edge_sets=sets)
    ours = edge_patch(bf16, prompts, metric, edge_sets=sets)
    rows.append(compare_bf16("edge_patch top10/top100/all", effects(ours), effects(ref),
                             float(effects(ref).abs().max()), floor))
    return {"tolerance": BF16_TOLERANCE, "runner": ours.provenance.runner, "rows": rows,
            "ok": all(r["ok"] for r in rows)}


def check_shape(shape: str, spec: dict, device: torch.device, quick: bool, clock: Callable[[], float],
                out: dict) -> dict:
    """Build one shape's models, then its timings, edge attribution and bf16 check (each
    recorded on its own, so one failing section leaves the others' results)."""
    fp32, bf16, build_s = build_models(spec, device, quick)
    facts, prompts = model_facts(fp32), sweeps.settings_for(fp32)["pronoun"]()
    prompts = prompts.select(list(range(4))) if quick else prompts
    with torch.no_grad():
        runner = runner_for(fp32).name
    entry = {"shape": shape, "family": spec["family"], "n_layers": facts.n_layers, "d_model": facts.d_model,
             "n_heads": facts.n_heads, "n_kv_heads": facts.n_kv_heads, "d_head": facts.d_head, "d_mlp": facts.d_mlp,
             "d_vocab": facts.d_vocab, "init_std": None if quick else INIT_STD, "n_prompts": len(prompts),
             "n_tokens": prompts.n_pos, "build_s": build_s, "runner": runner}
    print(f"{shape}: built in {build_s:.1f}s, runner {runner}", flush=True)
    entry["timings"] = attempt(out, f"{shape}.timings", time_sweeps, fp32, prompts, clock, 8 if quick else TL_CELLS,
                               (8 if device.type == "cuda" else 1) * 2**30)  # memory budget of one stacked forward
    entry["edge_attribution"] = attempt(out, f"{shape}.edge_attribution", time_edges, fp32, prompts, clock,
                                        TL_EDGE_PROMPTS if spec["family"] == "gpt2" else 0)
    entry["bf16"] = attempt(out, f"{shape}.bf16", bf16_check, fp32, bf16, prompts)
    return entry


def attempt(out: dict, key: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or None with its error recorded under ``out["errors"][key]``: a GPU run is
    one chance, so one failing section must not cost the others their results."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - recorded in the results file and printed
        out["errors"][key] = "".join(traceback.format_exception(err)[-6:])
        print(f"{key} FAILED: {type(err).__name__}: {err}", flush=True)
        return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the results (JSON)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a CPU run, e.g. with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny models and one test file: a smoke run")
    parser.add_argument("--tests-budget-s", type=float, default=150.0, help="time for the device tests in all")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the device tests")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "gpu_check.py: no CUDA GPU here (torch.cuda.is_available() is False). It checks the library "
                       "on a GPU; for a smoke run on the CPU pass --device cpu --quick.\n")
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device!r}: expected cuda, cuda:N or cpu")
    started, clock, cpu_clock = time.perf_counter(), make_clock(device), sweeps.clock
    sweeps.clock = clock  # sweeps.time_tl times with sweeps.clock (CPU seconds there): wall seconds here
    try:
        return run_all(args, device, clock, started)
    finally:
        sweeps.clock = cpu_clock


def run_all(args: argparse.Namespace, device: torch.device, clock: Callable[[], float], started: float) -> dict:
    """Every section in turn, the results file rewritten after each."""
    torch.manual_seed(0)
    out: dict[str, Any] = {**machine_facts(device), "quick": args.quick, "errors": {},
                           "bf16_tolerance": BF16_TOLERANCE, "notes": __doc__.split("Clocks: ", 1)[1].split(
                               "\n\nWithout a GPU", 1)[0].replace("\n", " ")}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out["total_s"] = time.perf_counter() - started
        path.write_text(json.dumps(out, indent=2))

    if not args.skip_tests:
        out["device_tests"] = attempt(out, "device_tests", run_device_tests, QUICK_TESTS if args.quick
                                      else DEVICE_TESTS, str(device), args.tests_budget_s)
        save()
    out["split_device"] = attempt(out, "split_device", run_split_check, device)
    save()
    out["models"] = []
    for shape, spec in (QUICK_SHAPES if args.quick else SHAPES).items():
        entry = attempt(out, shape, check_shape, shape, spec, device, args.quick, clock, out)
        out["models"].append(entry or {"shape": shape})
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    passes = [s.get("ok", True) for s in [out.get("device_tests"), out["split_device"]] if s is not None]
    passes += [r.get("equal", r.get("ok", True)) for m in out["models"] for r in [m.get("bf16") or {}]
               + (m.get("timings") or []) + [m.get("edge_attribution") or {}]]
    out["ok"] = not out["errors"] and all(passes)
    save()
    print(f"done in {out['total_s']:.0f}s: {'all checks passed' if out['ok'] else 'SOME CHECKS FAILED'}; "
          f"results in {path}", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
