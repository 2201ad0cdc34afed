"""A model split over two devices gives the numbers of the same model on one: the GPU check.

:func:`split_device_check` loads a checkpoint twice, once on the CPU (the reference) and once
split between ``cuda:0`` (embeddings and the first half of the blocks) and the CPU (the other
blocks, the final norm and the unembedding): a real two-device model on a machine with one GPU.
It runs patch_sweep (resid_pre, z and mlp_out, on the fast runner and on the bridge's hooks),
ablation_sweep, the logit lens, DLA and attribution_sweep on both and returns the largest
differences. The prompts sit on the unembedding's device, where a metric indexes ``W_U`` with
the answer tokens; two checks keep them where ``make_prompt_set`` puts them (``cfg.device``, the
embedding's), which needs the metrics to move those indices to ``W_U``'s device. Every tensor
a sweep puts next to an activation has to follow that activation's device for the split run to
work at all, and to match for the numbers to agree.

TransformerBridge refuses a HuggingFace device map that mixes a GPU with the CPU (it treats CPU
entries as offloading), so the check first asks ``load_model(device_map=...)`` for that map and
records the refusal, then splits the loaded model itself (:func:`split_between`): the modules
move, and a forward pre-hook on each moves its inputs to its device, as accelerate's hooks do
for a model dispatched over several GPUs.

    from benchmarks._devices import split_device_check
    print(split_device_check("gpt2"))            # a tiny GPT-2 written on the fly, or a checkpoint directory
"""

from __future__ import annotations

import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

TOLERANCE = 1e-4  # |split - cpu| allowed, times max(1, |value|): float32 GPU vs CPU rounding


def _move(obj: Any, device: torch.device) -> Any:
    """Tensors in ``obj`` (nested tuples, lists and dicts) on ``device``."""
    if isinstance(obj, Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _inputs_to(device: torch.device) -> Callable[..., Any]:
    def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _move(args, device), _move(kwargs, device)

    return hook


def split_between(model: Any, first: str, second: str, n_first: int | None = None) -> dict[str, str]:
    """Move the embeddings, the rotary module and blocks ``0..n_first-1`` of a loaded bridge to
    ``first``, the other blocks, the final norm and the unembedding to ``second`` (default
    ``n_first``: half the blocks), each with a pre-hook moving its inputs to its device.

    Returns module name -> device. The model then runs as one dispatched over two devices:
    activations of block ``l`` live on block ``l``'s device, logits on ``second``.
    """
    n = int(model.cfg.n_layers)
    n_first = n // 2 if n_first is None else n_first
    places: dict[str, str] = {}
    for name in ("embed", "pos_embed", "rotary_emb"):
        if hasattr(model, name):
            places[name] = first
    for layer in range(n):
        places[f"blocks.{layer}"] = first if layer < n_first else second
    places.update({"ln_final": second, "unembed": second})
    for name, device in places.items():
        module = model.get_submodule(name)
        module.to(device)
        module.register_forward_pre_hook(_inputs_to(torch.device(device)), with_kwargs=True)
    model.cfg.device = first  # where tokens go in
    model.cfg.n_devices = 2
    return places


def _hf_device_map(model: Any, first: str, second: str) -> dict[str, str]:
    """The same placement as a HuggingFace device map over the wrapped HF model's modules."""
    hf = model.original_model
    n = int(model.cfg.n_layers)
    layers = next(name for name, m in hf.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n)
    prefix = layers.rpartition(".")[0]
    out: dict[str, str] = {}
    for name, _ in hf.named_children():
        if name != prefix.split(".")[0]:
            out[name] = second  # lm_head
    for name, _ in hf.get_submodule(prefix).named_children():
        full = f"{prefix}.{name}"
        if full == layers:
            out.update({f"{layers}.{i}": first if i < n // 2 else second for i in range(n)})
        else:
            out[full] = second if name in ("ln_f", "norm", "final_layernorm") else first
    return out


def _checkpoint(model_name_or_dir: str | Path, tmp: Path) -> str:
    """A directory or hub id as given; a tiny family name (``"gpt2"``) becomes a 4-block checkpoint."""
    from hookpatch.model import FAMILIES, write_tiny_checkpoint

    if str(model_name_or_dir) in FAMILIES:
        return str(write_tiny_checkpoint(tmp / str(model_name_or_dir), str(model_name_or_dir), n_layers=4, seed=5))
    return str(model_name_or_dir)


def _prompts(model: Any, where: str) -> Any:
    """Four prompt pairs, on the device ``make_prompt_set`` picks (``cfg.device``, the embedding's:
    ``where="built"``) or on the unembedding's (``where="unembed"``)."""
    from hookpatch.hooks import unembed_device
    from hookpatch.tasks import make_prompt_set

    prompts = make_prompt_set(
        model,
        ["Mary went to the store", "John went to the park", "Amy went to the shops", "Dan went to the bank"],
        ["John went to the store", "Mary went to the park", "Dan went to the shops", "Amy went to the bank"],
        [(" she", " he"), (" he", " she"), (" she", " he"), (" he", " she")],
    )
    return prompts if where == "built" else prompts.to(unembed_device(model))


def _checks() -> dict[str, Callable[[Any], Any]]:
    """Name -> what to compute on a model (a SweepResult)."""
    from hookpatch.attribution import attribution_sweep
    from hookpatch.metrics import LogitDiff
    from hookpatch.readouts import dla_by_component, dla_by_head, logit_lens
    from hookpatch.sweeps import ablation_sweep, patch_sweep

    def run(fn: Callable[..., Any], *args: Any, where: str = "unembed", **kwargs: Any) -> Callable[[Any], Any]:
        def go(model: Any) -> Any:
            prompts = _prompts(model, where)
            return fn(model, prompts, LogitDiff(prompts), *args, **kwargs)

        return go

    quiet = {"progress": False}
    return {
        # prompts where make_prompt_set puts them (the embedding's device): the metric's answer
        # indices then meet W_U on the unembedding's device
        "patch_sweep_resid_pre_prompts_as_built": run(patch_sweep, "resid_pre", where="built", **quiet),
        "logit_lens_prompts_as_built": run(logit_lens, where="built"),
        "patch_sweep_resid_pre_fast": run(patch_sweep, "resid_pre", fast=True, **quiet),
        "patch_sweep_resid_pre_bridge": run(patch_sweep, "resid_pre", fast=False, **quiet),
        "patch_sweep_z_fast": run(patch_sweep, "z", by=("layer", "head"), fast=True, **quiet),
        "patch_sweep_z_by_pos_fast": run(patch_sweep, "z", by=("layer", "pos", "head"), fast=True, **quiet),
        "patch_sweep_z_bridge": run(patch_sweep, "z", by=("layer", "head"), fast=False, **quiet),
        "patch_sweep_mlp_out_fast": run(patch_sweep, "mlp_out", fast=True, **quiet),
        "ablation_sweep_z_mean": run(ablation_sweep, "z", how="mean", **quiet),
        "logit_lens": run(logit_lens),
        "dla_by_component": run(dla_by_component),
        "dla_by_head": run(dla_by_head),
        "attribution_sweep_resid_pre": run(attribution_sweep, "resid_pre", **quiet),
        "attribution_sweep_z": run(attribution_sweep, "z", by=("layer", "head"), **quiet),
    }


def _diff(got: Any, want: Any) -> float:
    """Largest |got - want| over the values and the clean run's metric, scaled by max(1, |want|)."""
    pairs = [(got.values, want.values), (got.clean, want.clean)]
    worst = 0.0
    for a, b in pairs:
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        if a.shape != b.shape:
            return float("inf")
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        worst = max(worst, float((a - b).abs().max()) / scale if a.numel() else 0.0)
    return worst


def split_device_check(
    model_name_or_dir: str | Path = "gpt2", *, tolerance: float = TOLERANCE,
    devices: tuple[str, str] = ("cuda:0", "cpu"),
) -> dict:
    """Every sweep kind, readout and attribution on a model split between ``cuda:0`` and the CPU,
    against the same model on the CPU.

    Args:
        model_name_or_dir: a checkpoint directory or hub id, or a tiny family name
            (``"gpt2"``, ``"llama"``, ...: a 4-block random checkpoint written to a temp directory).
        tolerance: largest allowed difference, relative to max(1, |value|).
        devices: the first half's device and the rest's (``("cpu", "cpu")`` dry-runs the check
            without a GPU: same code, no transfer).

    Returns:
        ``{"ok": bool, "max_abs_diff": {check: float}, "errors": {check: str}, "warnings":
        {check: [str]}, "placement": {module: device}, "device_map_load": str,
        "n_devices_error": str, "tolerance": float}``; ``ok`` is True when every check ran
        (the ``_fast`` ones on the fast runner) and differs by at most ``tolerance``.

    Raises:
        RuntimeError: without a CUDA GPU (a split needs two devices).
    """
    if any(torch.device(d).type == "cuda" for d in devices) and not torch.cuda.is_available():
        raise RuntimeError(
            "split_device_check needs a CUDA GPU: it splits the model between cuda:0 and the CPU. "
            "torch.cuda.is_available() is False on this machine; run it on the GPU check machine."
        )
    from hookpatch.errors import HookpatchError
    from hookpatch.model import load_model

    first, second = devices
    report: dict[str, Any] = {"max_abs_diff": {}, "errors": {}, "warnings": {}, "tolerance": tolerance}
    with tempfile.TemporaryDirectory() as tmp:
        path = _checkpoint(model_name_or_dir, Path(tmp))
        reference = load_model(path, device="cpu")
        try:  # TransformerBridge's verdict on a GPU + CPU device map
            load_model(path, device_map=_hf_device_map(reference, first, second))
            report["device_map_load"] = "accepted (the check still uses the explicit split)"
        except HookpatchError as err:
            report["device_map_load"] = f"refused: {err}"
        try:
            load_model(path, n_devices=(torch.cuda.device_count() if torch.cuda.is_available() else 0) + 2)
            report["n_devices_error"] = "NOT RAISED"
        except HookpatchError as err:
            report["n_devices_error"] = str(err)
        split = load_model(path, device="cpu")
        report["placement"] = split_between(split, first, second)
    for name, compute in _checks().items():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = compute(split)
            if caught:
                report["warnings"][name] = sorted({str(w.message)[:300] for w in caught})
            want = compute(reference)
            report["max_abs_diff"][name] = _diff(got, want)
            runner = getattr(got.provenance, "runner", None)
            if name.endswith("_fast") and runner != "fast":
                report["errors"][name] = f"ran on the {runner!r} runner, not the fast one"
        except Exception as err:  # noqa: BLE001 - every failure is reported, the others still run
            report["errors"][name] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-6)}"
    report["ok"] = not report["errors"] and all(d <= tolerance for d in report["max_abs_diff"].values())
    return report


if __name__ == "__main__":  # pragma: no cover - run by hand on a GPU machine
    import json
    import sys

    print(json.dumps(split_device_check(sys.argv[1] if len(sys.argv) > 1 else "gpt2"), indent=2, default=str))
