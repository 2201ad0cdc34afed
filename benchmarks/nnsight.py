"""Time the nnsight tutorials' patching recipe against hookpatch's ``patch_sweep``, in one run.

The recipe is the one the nnsight activation-patching tutorials teach, corrected for today's
packages: one batched ``model.trace()``, the clean and the corrupted prompt as the first two
invokes, then one invoke per patched cell. Two experiments, each on a random model of a real
shape built offline (one checkpoint, read twice: by hookpatch as a ``TransformerBridge`` and
by ``transformers`` as the plain HuggingFace model that nnsight wraps):

- **residual stream by layer × position** on GPT-2 small's shape (1 prompt; 8 IOI prompts):
  nnsight writes the clean ``model.transformer.h[l].input`` at position ``p`` into the
  corrupted run; hookpatch runs ``patch_sweep(..., "resid_pre", by=("layer", "pos"))``;
- **each query head's output at all positions** on a Llama shape with grouped-query attention
  (two blocks of Llama-3.2-1B's widths, 32 query heads sharing 8 KV heads, its 128k vocabulary):
  nnsight reshapes ``self_attn.o_proj.input`` to ``[batch, pos, head, d_head]`` and writes one
  head's slice, as the tutorial's Llama-3.1-8B section does; hookpatch runs
  ``patch_sweep(..., "z", by=("layer", "head"))``.

Both results are checked against each other on every cell, and against a plain loop of
HuggingFace forward pre-hooks (one forward per cell, written without either library; every cell
for one prompt, every 4th for 8), to 1e-4 in logit-difference units; the run stops if not. The tutorials' own idiom,
``model.transformer.h[l].output[0][:, tok] = ...``, is run too on the single GPT-2 prompt: with
transformers 5 a block returns a tensor, so ``[0]`` takes the first prompt and ``[:, tok]`` a
hidden-state *channel*; its error against the reference is recorded.

One CPU thread (``torch.set_num_threads(1)``), one process, CPU seconds of the main thread:
nnsight runs intervention code in greenlets on the calling thread, so that clock counts it.
A batched trace holds every invoke's logits at once (``[rows, pos, vocab]``), so the cells are
split into traces whose logits fit ``--logits-mb`` (each trace repeats the clean and corrupted
invokes, as the recipe needs them); hookpatch gets the same number as its ``memory_budget``.

    pip install -e ".[nnsight]"
    python benchmarks/nnsight.py --json benchmarks/results/nnsight.json
    python benchmarks/nnsight.py --quick --json /tmp/nnsight.json   # small shapes, seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from jaxtyping import Float, Int
from torch import Tensor
from transformers import AutoModelForCausalLM

from hookpatch.metrics import LogitDiff
from hookpatch.model import load_model, model_facts
from hookpatch.model._tiny import write_tiny_checkpoint
from hookpatch.runners import runner_for
from hookpatch.sweeps import patch_sweep
from hookpatch.tasks import PromptSet, ioi_prompts, make_prompt_set

# GPT-2 small whole; a Llama with grouped-query attention as two blocks of Llama-3.2-1B's widths
# and its real vocabulary (the unembedding is a large share of a short prompt's FLOPs).
MODELS = {
    "gpt2-small": dict(family="gpt2", n_layers=12, d_model=768, n_heads=12, d_mlp=3072, vocab_size=50257),
    "llama3.2-1b-2-blocks": dict(family="llama", n_layers=2, d_model=2048, n_heads=32, n_kv_heads=8,
                                 d_mlp=8192, vocab_size=128256),
    # small shapes for a smoke run (--quick)
    "tiny-gpt2": dict(family="gpt2", n_layers=2, d_model=64, n_heads=4, d_mlp=128),
    "tiny-llama": dict(family="llama", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_mlp=128),
}
EXPERIMENT = {"gpt2": "resid_pre_layer_pos", "llama": "heads_all_pos"}
SETTINGS = {"gpt2-small": "single,ioi", "llama3.2-1b-2-blocks": "single,ioi", "tiny-gpt2": "single,ioi",
            "tiny-llama": "single,ioi"}
QUICK_MODELS = "tiny-gpt2,tiny-llama"
# The reference loop runs one plain forward per cell; on 8 prompts it checks every 4th cell (a
# quarter of the grid, spread over every layer) to keep the whole run near 7 minutes on one thread.
REFERENCE_EVERY = {"single": 1, "ioi": 4}
TOLERANCE = 1e-4
NOTES = (
    "nnsight_s: the corrected tutorial recipe (one batched trace, clean and corrupted invokes, one invoke "
    "per cell; cells split over traces whose logits fit logits_mb, each trace repeating the clean and "
    "corrupted invokes) on the plain HuggingFace model read from the same checkpoint as hookpatch's bridge, "
    "wrapped with nnsight.LanguageModel(hf_model, tokenizer=...), under torch.no_grad(). hookpatch_s: "
    "patch_sweep with memory_budget = logits_mb; its one-time check per model (probe_s: the fast path's "
    "logits against the bridge's on a short probe) runs before the first setting and is in no hookpatch_s. "
    "reference_s: a plain loop of HuggingFace forward pre-hooks, one forward of all prompts per cell, on "
    "reference_cells of the cells (every cell for one prompt, every 4th for 8). "
    "Values are logit differences (correct - incorrect answer at the last position) per cell and prompt; "
    "max_abs_diff_* compare them. uncorrected: the tutorials' idiom h[l].output[0][:, tok] = "
    "clean[l][:, tok] (clean[l] = h[l].output[0]), which with transformers 5 copies hidden channel tok "
    "of the first prompt at every position; compared with the reference's resid_pre at layer l + 1 "
    "(the block's output), layers 0..n-2. Clock: CPU seconds of the main thread, one torch thread."
)


def import_nnsight() -> Any:
    """The nnsight package. Run as a script, this file's directory comes first on ``sys.path``
    and this file (``nnsight.py``) would shadow the package, so that entry is dropped first."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import nnsight

    return nnsight


def clock() -> float:
    """CPU seconds of this thread: with one torch thread, all of a run's compute (nnsight's
    intervention code runs in greenlets on this thread), and nothing of other processes."""
    return time.thread_time()


def build_models(shape: str, directory: Path) -> tuple[Any, Any]:
    """A random model of ``shape`` (HF's own initialisation, seed 0): the checkpoint that
    :func:`hookpatch.tiny_model` writes, loaded once as hookpatch's bridge and once as the plain
    HuggingFace model (fp32, eval) that nnsight and the reference loop run."""
    spec = dict(MODELS[shape])
    family = spec.pop("family")
    big = "vocab_size" in spec
    write_tiny_checkpoint(directory, family, n_ctx=1024 if big else 64, init_std=None if big else 0.2, **spec)
    bridge = load_model(str(directory), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return bridge, hf


def prompt_sets(model: Any) -> dict[str, Callable[[], PromptSet]]:
    """One IOI pair (the tutorials' sentence, with words every offline tokenizer knows) and 8 IOI
    prompts of one template (one length, so no padding)."""
    return {
        "single": lambda: make_prompt_set(
            model, ["When John and Mary went to the store, Mary gave the bag to"],
            ["When John and Mary went to the store, John gave the bag to"], [(" John", " Mary")],
        ),
        "ioi": lambda: ioi_prompts(
            model, 8, templates=["When {A} and {B} went to the {place}, {S} gave the {object} to"]
        ),
    }


def logit_diff(logits: Float[Tensor, "batch pos vocab"], answers: Int[Tensor, "batch 2"]) -> Float[Tensor, " batch"]:
    """``logit[correct] - logit[incorrect]`` at the last position of each prompt."""
    last = logits[:, -1]
    rows = torch.arange(len(answers))
    return last[rows, answers[:, 0]] - last[rows, answers[:, 1]]


def cells_of(experiment: str, n_layers: int, n_pos: int, n_heads: int) -> list[tuple[int, int]]:
    """The grid in hookpatch's order: (layer, pos) or (layer, head)."""
    inner = n_pos if experiment == "resid_pre_layer_pos" else n_heads
    return [(layer, i) for layer in range(n_layers) for i in range(inner)]


def chunks(cells: list, rows: int, n_pos: int, d_vocab: int, logits_mb: int) -> list[list]:
    """Split ``cells`` so one trace's logits (``(cells + 2) * rows`` rows) fit ``logits_mb``."""
    per_invoke = rows * n_pos * d_vocab * 4
    size = max(1, logits_mb * 2**20 // per_invoke - 2)
    return [cells[i : i + size] for i in range(0, len(cells), size)]


# ------------------------------------------------------------------------------------------
# nnsight: the tutorials' recipe, corrected
# ------------------------------------------------------------------------------------------
def nnsight_resid(lm: Any, clean: Tensor, corrupted: Tensor, answers: Tensor, cells: list) -> dict:
    """Residual stream at a block's input, one invoke per (layer, pos), in one batched trace.

    ``clean_hs`` is created before the trace and filled in the clean invoke: invokes run as the
    model reaches what each asks for, and each patch invoke reads its layer's entry only after
    the model reached that layer's input, where the clean invoke (served first) has stored it.
    """
    layers = lm.transformer.h
    clean_hs: dict[int, Any] = {}
    results: dict[tuple[int, int], Any] = {}
    needed = sorted({layer for layer, _ in cells})
    with lm.trace() as tracer:
        with tracer.invoke(clean):
            for layer in needed:
                clean_hs[layer] = layers[layer].input
        with tracer.invoke(corrupted):
            pass
        for layer, pos in cells:
            with tracer.invoke(corrupted):
                hidden = layers[layer].input
                hidden[:, pos] = clean_hs[layer][:, pos]
                logits = lm.lm_head.output
                results[layer, pos] = logit_diff(logits, answers).save()
    return {cell: value.detach().clone() for cell, value in results.items()}


def nnsight_resid_uncorrected(lm: Any, clean: Tensor, corrupted: Tensor, answers: Tensor, cells: list) -> dict:
    """The tutorials' idiom as written: ``h[l].output[0][:, tok] = clean_hs[l][:, tok]``.

    With transformers 5 a GPT-2 block returns a tensor ``[batch, pos, d_model]``, not a tuple:
    ``output[0]`` is the first prompt's ``[pos, d_model]`` and ``[:, tok]`` its hidden channel
    ``tok`` at every position. Nothing fails; the wrong values are copied.
    """
    layers = lm.transformer.h
    clean_hs: dict[int, Any] = {}
    results: dict[tuple[int, int], Any] = {}
    needed = sorted({layer for layer, _ in cells})
    with lm.trace() as tracer:
        with tracer.invoke(clean):
            for layer in needed:
                clean_hs[layer] = layers[layer].output[0]
        with tracer.invoke(corrupted):
            pass
        for layer, tok in cells:
            with tracer.invoke(corrupted):
                patched = layers[layer].output[0]  # the tutorials' line, with the read first (see nnsight_resid)
                patched[:, tok] = clean_hs[layer][:, tok]
                logits = lm.lm_head.output
                results[layer, tok] = logit_diff(logits, answers).save()
    return {cell: value.detach().clone() for cell, value in results.items()}


def nnsight_heads(lm: Any, clean: Tensor, corrupted: Tensor, answers: Tensor, cells: list, n_heads: int) -> dict:
    """Each query head's output at all positions, one invoke per (layer, head): the tutorial's
    Llama recipe, ``self_attn.o_proj.input`` viewed as ``[batch, pos, head, d_head]``."""
    layers = lm.model.layers
    clean_z: dict[int, Any] = {}
    results: dict[tuple[int, int], Any] = {}
    needed = sorted({layer for layer, _ in cells})
    with lm.trace() as tracer:
        with tracer.invoke(clean):
            for layer in needed:
                z = layers[layer].self_attn.o_proj.input
                clean_z[layer] = z.view(*z.shape[:2], n_heads, -1)
        with tracer.invoke(corrupted):
            pass
        for layer, head in cells:
            with tracer.invoke(corrupted):
                z = layers[layer].self_attn.o_proj.input
                z.view(*z.shape[:2], n_heads, -1)[:, :, head] = clean_z[layer][:, :, head]
                logits = lm.lm_head.output
                results[layer, head] = logit_diff(logits, answers).save()
    return {cell: value.detach().clone() for cell, value in results.items()}


# ------------------------------------------------------------------------------------------
# The reference: HuggingFace forward pre-hooks, one forward per cell
# ------------------------------------------------------------------------------------------
def _capture(store: dict, key: int, module: Any, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else kwargs["hidden_states"]
    store[key] = hidden.detach().clone()


def _write_pos(pos: int, source: Tensor, module: Any, args: tuple, kwargs: dict) -> Any:
    hidden = (args[0] if args else kwargs["hidden_states"]).clone()
    hidden[:, pos] = source[:, pos]
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def _write_head(head: int, n_heads: int, source: Tensor, module: Any, args: tuple) -> tuple:
    z = args[0].clone()
    z.view(*z.shape[:2], n_heads, -1)[:, :, head] = source.view(*source.shape[:2], n_heads, -1)[:, :, head]
    return (z, *args[1:])


def reference(hf: Any, experiment: str, clean: Tensor, corrupted: Tensor, answers: Tensor, cells: list,
              n_heads: int) -> dict:
    """Patched logit differences per cell from plain HuggingFace forward (pre-)hooks."""
    if experiment == "resid_pre_layer_pos":
        modules = list(hf.transformer.h) if hasattr(hf, "transformer") else list(hf.model.layers)
    else:
        modules = [layer.self_attn.o_proj for layer in hf.model.layers]
    store: dict[int, Tensor] = {}
    handles = [m.register_forward_pre_hook(functools.partial(_capture, store, i), with_kwargs=True)
               for i, m in enumerate(modules)]
    with torch.no_grad():
        hf(clean)
    for handle in handles:
        handle.remove()
    results = {}
    for layer, i in cells:
        if experiment == "resid_pre_layer_pos":
            hook = functools.partial(_write_pos, i, store[layer])
            handle = modules[layer].register_forward_pre_hook(hook, with_kwargs=True)
        else:
            handle = modules[layer].register_forward_pre_hook(functools.partial(_write_head, i, n_heads, store[layer]))
        try:
            with torch.no_grad():
                results[layer, i] = logit_diff(hf(corrupted).logits, answers)
        finally:
            handle.remove()
    return results


# ------------------------------------------------------------------------------------------
# One setting
# ------------------------------------------------------------------------------------------
def _max_diff(a: dict, b: dict) -> float:
    """Largest difference over the cells both hold."""
    return max(float((a[c] - b[c]).abs().max()) for c in a if c in b)


def bench_setting(bridge: Any, hf: Any, family: str, name: str, prompts: PromptSet, logits_mb: int,
                  uncorrected: bool) -> dict:
    """hookpatch, nnsight and the reference on one prompt set; the uncorrected idiom if asked."""
    experiment = EXPERIMENT[family]
    facts = model_facts(bridge)
    clean, corrupted = prompts.clean_tokens.cpu(), prompts.corrupted_tokens.cpu()
    answers = prompts.answer_tokens.cpu()
    cells = cells_of(experiment, facts.n_layers, prompts.n_pos, facts.n_heads)
    lm = import_nnsight().LanguageModel(hf, tokenizer=bridge.tokenizer)

    component, by = ("resid_pre", ("layer", "pos")) if experiment == "resid_pre_layer_pos" else ("z", ("layer", "head"))
    t = clock()
    with torch.no_grad():
        ours = patch_sweep(bridge, prompts, LogitDiff(prompts), component, by=by, memory_budget=logits_mb * 2**20,
                           progress=False)
    hookpatch_s = clock() - t
    values = ours.values.reshape(len(cells), len(prompts)).cpu()
    hp_cells = {cell: values[i] for i, cell in enumerate(cells)}

    parts = chunks(cells, len(prompts), prompts.n_pos, facts.d_vocab, logits_mb)
    t = clock()
    ns: dict = {}
    for part in parts:  # under no_grad, as the bridge's sweep and the reference run
        with torch.no_grad():
            if experiment == "resid_pre_layer_pos":
                ns.update(nnsight_resid(lm, clean, corrupted, answers, part))
            else:
                ns.update(nnsight_heads(lm, clean, corrupted, answers, part, facts.n_heads))
    nnsight_s = clock() - t

    checked = cells[:: REFERENCE_EVERY[name]]
    t = clock()
    ref = reference(hf, experiment, clean, corrupted, answers, checked, facts.n_heads)
    reference_s = clock() - t
    row = {
        "experiment": experiment, "cells": len(cells), "traces": len(parts), "reference_cells": len(checked),
        "hookpatch_s": hookpatch_s, "nnsight_s": nnsight_s, "reference_s": reference_s,
        "speedup": nnsight_s / hookpatch_s, "runner": ours.provenance.runner,
        "max_abs_diff_hookpatch_nnsight": _max_diff(hp_cells, ns),
        "max_abs_diff_hookpatch_reference": _max_diff(hp_cells, ref),
        "max_abs_diff_nnsight_reference": _max_diff(ns, ref),
    }
    for key in ("max_abs_diff_hookpatch_nnsight", "max_abs_diff_hookpatch_reference", "max_abs_diff_nnsight_reference"):
        if not row[key] <= TOLERANCE:
            raise SystemExit(f"{name}: {key} = {row[key]:.2e} > {TOLERANCE}: the results disagree")
    print(f"{name:7s} {experiment:20s} {len(cells):4d} cells  hookpatch {hookpatch_s:7.2f}s  "
          f"nnsight {nnsight_s:7.2f}s (x{nnsight_s / hookpatch_s:5.1f})  reference {reference_s:7.2f}s  "
          f"max diff {max(row[k] for k in row if k.startswith('max_abs')):.1e}", flush=True)

    if uncorrected:
        wrong_cells = [(layer, p) for layer, p in cells if layer < facts.n_layers - 1 and (layer + 1, p) in ref]
        wrong: dict = {}
        for part in chunks(wrong_cells, len(prompts), prompts.n_pos, facts.d_vocab, logits_mb):
            with torch.no_grad():
                wrong.update(nnsight_resid_uncorrected(lm, clean, corrupted, answers, part))
        # the block's output at layer l is the next block's input: the reference's resid_pre at l + 1
        errors = torch.stack([(wrong[layer, p] - ref[layer + 1, p]).abs().max() for layer, p in wrong_cells])
        with torch.no_grad():
            clean_ld = float(logit_diff(hf(clean).logits, answers).mean())
            corrupted_ld = float(logit_diff(hf(corrupted).logits, answers).mean())
        row["uncorrected"] = {
            "idiom": "h[l].output[0][:, tok] = clean_hs[l][:, tok]",
            "cells": len(wrong_cells), "max_abs_error": float(errors.max()), "mean_abs_error": float(errors.mean()),
            "clean_logit_diff": clean_ld, "corrupted_logit_diff": corrupted_ld,
            "max_abs_error_normalized": float(errors.max()) / abs(clean_ld - corrupted_ld),
        }
        print(f"        uncorrected idiom: max |error| {float(errors.max()):.3f} logit-diff units, "
              f"mean {float(errors.mean()):.3f} (clean - corrupted = {clean_ld - corrupted_ld:.3f})", flush=True)
    return {"name": name, "n_prompts": len(prompts), "n_tokens": prompts.n_pos, **row}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--models", default=None, help=f"model shapes, of {sorted(MODELS)}")
    parser.add_argument("--quick", action="store_true", help=f"smoke run on small shapes ({QUICK_MODELS})")
    parser.add_argument("--logits-mb", type=int, default=1024, help="one trace's logits; hookpatch's memory budget")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shapes = (args.models or (QUICK_MODELS if args.quick else "gpt2-small,llama3.2-1b-2-blocks")).split(",")
    out: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1,
                    "clock": "CPU seconds of the main thread (one torch thread)"},
        "versions": {"nnsight": import_nnsight().__version__, "transformers": transformers.__version__},
        "nnsight_wrapper": "nnsight.LanguageModel(AutoModelForCausalLM.from_pretrained(checkpoint), tokenizer=...)",
        "notes": NOTES, "logits_mb": args.logits_mb, "tolerance": TOLERANCE, "models": [],
    }
    for shape in shapes:
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory(prefix="hookpatch-nnsight-") as tmp:
            bridge, hf = build_models(shape, Path(tmp))
        facts = model_facts(bridge)
        family = MODELS[shape]["family"]
        # hookpatch's one-time check per model (its fast path's logits against the bridge's on a
        # short probe), timed on its own rather than charged to the first setting
        t = clock()
        with torch.no_grad():
            runner = runner_for(bridge).name
        probe_s = clock() - t
        entry = {"shape": shape, "n_layers": facts.n_layers, "d_model": facts.d_model, "n_heads": facts.n_heads,
                 "n_kv_heads": facts.n_kv_heads, "d_head": facts.d_head, "d_vocab": facts.d_vocab,
                 "runner": runner, "probe_s": probe_s, "settings": []}
        print(shape, flush=True)
        sets = prompt_sets(bridge)
        for name in SETTINGS[shape].split(","):
            uncorrected = family == "gpt2" and name == "single"
            entry["settings"].append(bench_setting(bridge, hf, family, name, sets[name](), args.logits_mb, uncorrected))
        out["models"].append(entry)
        del bridge, hf
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
