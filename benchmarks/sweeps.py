"""Time hookpatch's sweeps against TransformerLens' ``patching`` functions, in one run.

On a GPT-2-small-shaped model (random weights: the same FLOPs), one CPU thread, for three
settings (1 prompt × 11 tokens; the 20-prompt pronoun set, 11 tokens; 8 IOI prompts × 16
tokens) and three sweeps (resid_pre layer × pos, heads at all positions, heads by position),
it records hookpatch's and TransformerLens' seconds, their ratio, the largest difference of
the results, hookpatch's peak memory above the model's, and the roofline: the FLOPs the
sweep minimally needs (layers at and after the patch, positions at and after the patched
position, logits only where the metric reads) over a large fp32 matmul's measured
throughput. TransformerLens' slowest sweeps are timed on a measured fraction of their cells
and extrapolated; the file says which (``transformerlens_fraction``).

    python benchmarks/sweeps.py --json benchmarks/results/sweeps.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import threading
import time
from pathlib import Path

import pandas as pd
import torch
from transformer_lens import patching

from hookpatch.metrics import LogitDiff
from hookpatch.model.facts import model_facts
from hookpatch.model.tiny import tiny_model
from hookpatch.sweeps import patch_sweep
from hookpatch.tasks.ioi import ioi_prompts
from hookpatch.tasks.pronoun import pronoun_prompts
from hookpatch.tasks.vocab import PRONOUN_TEMPLATES

SWEEPS = {
    "resid_pre_layer_pos": dict(component="resid_pre", by=("layer", "pos")),
    "heads_all_pos": dict(component="z", by=("layer", "head")),
    "heads_by_pos": dict(component="z", by=("layer", "pos", "head")),
}
NOTES = (
    "transformerlens_s is extrapolated from the first transformerlens_fraction of the grid's cells (TL's "
    "cost per cell is constant); max_abs_diff compares those cells. peak_mb is the peak resident memory "
    "above the process's level before the sweep (after handing freed memory back to the OS with "
    "malloc_trim), sampled every millisecond by a thread whose CPU time is not counted. roofline_s counts, "
    "per cell, every layer from the patched one at every position from "
    "the patched one, plus the full unembedding at END. hookpatch does less than that, so "
    "roofline_multiple can fall below 1: the last layer runs only at END; a patch after attention (z) "
    "finishes its own layer at the patched positions only, without recomputing that layer's attention; "
    "and the logit difference is read through its residual direction (W_U[:, correct] - W_U[:, wrong]) "
    "instead of the full unembedding."
)
TL_AXES = {
    "resid_pre_layer_pos": (["layer", "pos"], patching.layer_pos_patch_setter, "resid_pre"),
    "heads_all_pos": (["layer", "head"], patching.layer_head_vector_patch_setter, "z"),
    "heads_by_pos": (["layer", "pos", "head"], patching.layer_pos_head_vector_patch_setter, "z"),
}


def clock() -> float:
    """CPU seconds of this thread: with one torch thread, all of a sweep's compute, and neither
    other processes on the machine nor the memory sampler's thread."""
    return time.thread_time()


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    """Sustained fp32 matmul throughput of this machine and thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        a @ b
        best = min(best, clock() - t)
    return 2 * n**3 / best


def block_flops(facts, n_new: int, n_keys_total: int) -> float:
    """FLOPs of one block for ``n_new`` query positions attending over up to ``n_keys_total``."""
    d, dh, H, Hkv = facts.d_model, facts.d_head, facts.n_heads, facts.n_kv_heads
    proj = 2 * n_new * d * dh * (H + 2 * Hkv) + 2 * n_new * H * dh * d
    first = n_keys_total - n_new  # keys before the first new query
    keys = sum(first + i + 1 for i in range(n_new))  # causal: query i sees its prefix
    attn = 2 * 2 * keys * dh * H
    mlp = 2 * 2 * n_new * d * (facts.d_mlp or 4 * d)
    return proj + attn + mlp


def roofline_flops(facts, prompts, sweep: str) -> float:
    """Minimal FLOPs of a sweep: per cell, layers >= L and positions >= p, logits at END."""
    total = 0.0
    n_layers, n_heads = facts.n_layers, facts.n_heads
    unembed = 2 * facts.d_model * facts.d_vocab
    for b in range(len(prompts)):
        P = int(prompts.lengths[b])
        for L in range(n_layers):
            layers_after = n_layers - L
            if sweep == "heads_all_pos":
                total += n_heads * (layers_after * block_flops(facts, P, P) + unembed)
            else:
                per_pos = sum(layers_after * block_flops(facts, P - p, P) + unembed for p in range(P))
                total += per_pos * (n_heads if sweep == "heads_by_pos" else 1)
    return total


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def release_freed_memory() -> None:
    """Hand memory freed by earlier work back to the OS (glibc's malloc_trim), so that a sweep
    reusing it still shows as growth; a no-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every millisecond in a thread
    (torch releases the GIL in its kernels, so the sampler keeps running during a sweep)."""

    def __enter__(self) -> PeakMemory:
        release_freed_memory()
        self.base = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def above_base_mb(self) -> float:
        return self.peak - self.base


def time_tl(model, prompts, metric, sweep: str, fraction: float) -> tuple[float, torch.Tensor, pd.DataFrame]:
    """TransformerLens' generic patcher on the first ``fraction`` of the grid's cells."""
    axes, setter, act = TL_AXES[sweep]
    facts = model_facts(model)
    sizes = {"layer": facts.n_layers, "pos": prompts.n_pos, "head": facts.n_heads}
    index = pd.MultiIndex.from_product([range(sizes[a]) for a in axes], names=axes).to_frame(index=False)
    n = max(1, round(len(index) * fraction))
    index = index.iloc[:n]
    _, clean_cache = model.run_with_cache(prompts.clean_tokens)
    t = clock()
    with torch.no_grad():
        values = patching.generic_activation_patch(
            model, prompts.corrupted_tokens, clean_cache, lambda logits: metric(logits).mean(),
            setter, act, index_df=index,
        )
    return clock() - t, values, index


def settings_for(model) -> dict:
    """The three prompt sets, built lazily for ``model``."""
    # The pronoun frames (vocab.PRONOUN_TEMPLATES) with one leading word: GPT-2 reads them as 11 tokens (its BPE
    # splits "’" in two); the offline word-level tokenizer needs the extra word to match.
    frames = ["Then " + t for t in PRONOUN_TEMPLATES]
    return {
        "single": lambda: pronoun_prompts(model, templates=frames).select([0]),
        "pronoun": lambda: pronoun_prompts(model, templates=frames),
        "ioi": lambda: ioi_prompts(
            model, 8, templates=["When {A} and {B} went to the {place}, {S} gave the {object} to"]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--tl-fraction", type=float, default=None, help="override the TL fraction for every sweep")
    parser.add_argument("--settings", default="single,pronoun,ioi")
    parser.add_argument("--budget-mb", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = tiny_model("gpt2", n_layers=12, d_model=768, n_heads=12, d_mlp=3072, n_ctx=1024, vocab_size=50257,
                       init_std=None)
    facts = model_facts(model)
    throughput = matmul_flops_per_s()
    settings = settings_for(model)
    # TL's cost per cell is the same for every cell: a measured fraction extrapolates linearly.
    default_fraction = {
        "single": {"resid_pre_layer_pos": 1.0, "heads_all_pos": 1.0, "heads_by_pos": 0.1},
        "pronoun": {"resid_pre_layer_pos": 0.25, "heads_all_pos": 0.25, "heads_by_pos": 0.04},
        "ioi": {"resid_pre_layer_pos": 0.25, "heads_all_pos": 0.25, "heads_by_pos": 0.04},
    }
    out = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1,
                    "clock": "CPU seconds of the main thread (one torch thread)", "matmul_gflops": throughput / 1e9},
        "notes": NOTES,
        "model": {"shape": "gpt2-small", "n_layers": facts.n_layers, "d_model": facts.d_model,
                  "n_heads": facts.n_heads, "d_mlp": facts.d_mlp, "d_vocab": facts.d_vocab},
        "memory_budget_mb": args.budget_mb,
        "settings": [],
    }
    for name in args.settings.split(","):
        prompts = settings[name]()
        metric = LogitDiff(prompts)
        rows = []
        for sweep, spec in SWEEPS.items():
            with PeakMemory() as memory, torch.no_grad():
                t = clock()
                ours = patch_sweep(model, prompts, metric, spec["component"], by=spec["by"],
                                   memory_budget=args.budget_mb * 2**20, progress=False)
                ours_s = clock() - t
            peak = memory.above_base_mb
            fraction = args.tl_fraction or default_fraction[name][sweep]
            tl_s, tl_values, index = time_tl(model, prompts, metric, sweep, fraction)
            n_cells = ours.values[..., 0].numel()
            tl_total = tl_s * n_cells / len(index)
            ours_flat = ours.mean().reshape(-1)[: len(index)]
            diff = float((ours_flat - tl_values.reshape(-1)).abs().max())
            roof = roofline_flops(facts, prompts, sweep) / throughput
            rows.append({
                "sweep": sweep, "hookpatch_s": ours_s, "transformerlens_s": tl_total,
                "transformerlens_fraction": len(index) / n_cells, "speedup": tl_total / ours_s,
                "max_abs_diff": diff, "roofline_s": roof, "roofline_multiple": ours_s / roof,
                "peak_mb": peak, "cells": n_cells,
            })
            print(f"{name:8s} {sweep:20s} hookpatch {ours_s:8.2f}s  TL {tl_total:9.2f}s "
                  f"(x{tl_total / ours_s:5.1f})  roofline x{ours_s / roof:4.2f}  diff {diff:.1e}  "
                  f"peak {peak:7.1f} MB", flush=True)
        out["settings"].append({"name": name, "n_prompts": len(prompts), "n_tokens": prompts.n_pos, "sweeps": rows})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
