"""Time hookpatch's sweeps against TransformerLens' ``patching`` functions, in one run.

On random models of real shapes (the same FLOPs as the trained ones: GPT-2 small; two blocks of
Llama-3.1-8B's widths with grouped-query attention and its 128k vocabulary; four blocks of
Qwen3-0.6B's), one CPU thread, for up to three prompt sets (1 prompt × 11 tokens; the 20-prompt
pronoun set; 8 IOI prompts × 15 tokens) and three sweeps (resid_pre layer × pos, heads at all
positions, heads by position), it records hookpatch's and TransformerLens' seconds, their ratio,
the largest difference of the results, hookpatch's peak memory above the model's, and the
roofline: the matmul FLOPs an exact implementation must spend (see ``NOTES`` and
:func:`cell_flops`) over a large fp32 matmul's measured throughput. TransformerLens' slowest
sweeps are timed on a measured fraction of their cells and extrapolated; the file says which
(``transformerlens_fraction``).

    python benchmarks/sweeps.py --json benchmarks/results/sweeps.json
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import platform
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch
from transformer_lens import patching

from hookpatch.metrics import LogitDiff
from hookpatch.model import model_facts, tiny_model
from hookpatch.runners import runner_for
from hookpatch.sweeps import patch_sweep
from hookpatch.tasks import ioi_prompts, pronoun_prompts
from hookpatch.tasks._vocab import PRONOUN_TEMPLATES

SWEEPS = {
    "resid_pre_layer_pos": dict(component="resid_pre", by=("layer", "pos")),
    "heads_all_pos": dict(component="z", by=("layer", "head")),
    "heads_by_pos": dict(component="z", by=("layer", "pos", "head")),
}
NOTES = (
    "transformerlens_s is extrapolated from the first transformerlens_fraction of the grid's cells (TL's "
    "cost per cell is constant); max_abs_diff compares those cells. peak_mb is the peak resident memory "
    "above the process's level before the sweep (after handing freed memory back to the OS with "
    "malloc_trim), read from the kernel's high-water mark (VmHWM, reset before the sweep), so nothing "
    "samples beside the timed sweep. roofline_s is the "
    "matmul work an exact implementation must do, over this thread's measured matmul throughput: the two "
    "unpatched runs, then per cell only what the patch can change before the read position (END): for "
    "resid_pre at (layer, p), the patched block's queries, keys and values at p alone (the other positions' "
    "are the unpatched run's) and its attention, output projection and MLP at p..END, then the later blocks "
    "at p..END, the last block's queries at END only; for a head's z, its block's output projection through "
    "that head's rows of W_O (a rank-d_head change) and MLP at the patched positions, then the later "
    "blocks from the first patched position on; positions after END never (causal attention); the logit "
    "difference through its residual direction (2 * d_model FLOPs) unless the logits are soft-capped. "
    "Norms, softmax and other elementwise work are not counted, so roofline_multiple >= 1 by construction. "
    "The runner's one-time check per model (probe_s: the fast path's logits against the bridge's on a short "
    "probe) runs before the first sweep and is not in any sweep's hookpatch_s."
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


def block_flops(facts, kv_from: int, queries: range | list[int]) -> float:
    """Matmul FLOPs of one whole block: keys and values computed for positions ``kv_from..``
    up to the last query (earlier ones are the unpatched run's, cached), and the queries at
    ``queries`` going through attention (each over its causal prefix), the output projection
    and the MLP."""
    d, dh, H, Hkv = facts.d_model, facts.d_head, facts.n_heads, facts.n_kv_heads
    queries = list(queries)
    if not queries:
        return 0.0
    n_kv = max(queries) - kv_from + 1
    proj = 2 * d * dh * (H * len(queries) + 2 * Hkv * n_kv)
    attn = sum(2 * 2 * (q + 1) * dh * H for q in queries)
    return proj + attn + after_attention_flops(facts, len(queries))


def after_attention_flops(facts, n: int, heads: int | None = None) -> float:
    """Matmul FLOPs of a block's rest after attention (output projection and MLP) at ``n``
    positions; ``heads``: the output projection only through that many heads' rows of ``W_O``
    (where only they changed, the output moves by their rank-``d_head`` share)."""
    d, d_mlp = facts.d_model, facts.d_mlp or 4 * facts.d_model
    mlp_matrices = 3 if facts.gated_mlp else 2
    return 2 * n * (facts.n_heads if heads is None else heads) * facts.d_head * d + 2 * n * d * d_mlp * mlp_matrices


def patched_block_flops(facts, layer: int, p: int, end: int) -> float:
    """Matmul FLOPs of block ``layer`` when only position ``p`` of its input differs: queries,
    keys and values at ``p`` alone (every other position's are the unpatched run's), then
    attention, output projection and MLP for the queries that see ``p`` (``p..end``; the last
    block: ``end`` only)."""
    d, dh, H, Hkv = facts.d_model, facts.d_head, facts.n_heads, facts.n_kv_heads
    queries = [end] if layer == facts.n_layers - 1 else list(range(p, end + 1))
    proj = 2 * d * dh * (2 * Hkv + (H if p in queries else 0))
    attn = sum(2 * 2 * (q + 1) * dh * H for q in queries)
    return proj + attn + after_attention_flops(facts, len(queries))


def blocks_from(facts, first: int, p: int, end: int) -> float:
    """Blocks ``first..`` when positions ``p..`` differ from the unpatched run and the metric reads
    ``end``: every block but the last at positions ``p..end``, the last at ``end`` only (its keys and
    values still at ``p..end``). Positions after ``end`` cannot reach it (causal attention)."""
    n = facts.n_layers
    if p > end:
        return 0.0
    total = 0.0
    for layer in range(first, n):
        total += block_flops(facts, p, [end] if layer == n - 1 else range(p, end + 1))
    return total


def cell_flops(facts, sweep: str, layer: int, p: int, end: int, readout: float) -> float:
    """The matmul FLOPs an exact implementation must spend on one cell of one prompt.

    ``resid_pre`` at (layer, p): block ``layer`` with only position p's input changed
    (:func:`patched_block_flops`), then blocks ``layer + 1..`` from position p. A head's ``z``
    patched at positions ``p..`` (all positions: p = 0) changes its block only after attention:
    that head's share of the output projection and the MLP at the patched positions (the last
    block: at ``end`` only), then blocks ``layer + 1..`` from p. ``readout``: the metric from
    the final residual stream."""
    n = facts.n_layers
    if sweep == "resid_pre_layer_pos":
        if p > end:
            return 0.0
        work = patched_block_flops(facts, layer, p, end) + blocks_from(facts, layer + 1, p, end)
    else:
        at = [q for q in ([p] if sweep == "heads_by_pos" else range(end + 1)) if q <= end]
        if layer == n - 1:
            at = [q for q in at if q == end]
        if not at:
            return 0.0  # the patch cannot reach the read position
        work = after_attention_flops(facts, len(at), heads=1) + blocks_from(facts, layer + 1, min(at), end)
    return work + readout


def roofline_flops(facts, prompts, metric, sweep: str, linear_readout: bool) -> float:
    """The matmul FLOPs an exact sweep must do: the two unpatched runs (clean and corrupted, every
    block at every position up to the read), then every cell from its patched block and position
    on (:func:`cell_flops`), reading the metric through its residual direction when it is linear."""
    n, H = facts.n_layers, facts.n_heads
    readout = 2 * facts.d_model * (1 if linear_readout else facts.d_vocab)
    total = 0.0
    reads = metric.read_positions
    for b in range(len(prompts)):
        end = int(reads[b])
        total += 2 * (blocks_from(facts, 0, 0, end) + readout)
        for layer in range(n):
            if sweep == "resid_pre_layer_pos":
                total += sum(cell_flops(facts, sweep, layer, p, end, readout) for p in range(prompts.n_pos))
            elif sweep == "heads_all_pos":
                total += H * cell_flops(facts, sweep, layer, 0, end, readout)
            else:
                total += H * sum(cell_flops(facts, sweep, layer, p, end, readout) for p in range(prompts.n_pos))
    return total


def model_shape(model) -> SimpleNamespace:
    """The sizes the roofline needs: :func:`~hookpatch.model_facts` plus whether the MLP is gated."""
    return SimpleNamespace(**dataclasses.asdict(model_facts(model)), gated_mlp=hasattr(model.blocks[0].mlp, "gate"))


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


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (Linux's ``VmHWM``, via ``/proc/self/clear_refs``)
    to its current level; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Peak resident memory of this process since start or the last :func:`reset_peak_rss` (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return rss_mb()


class PeakMemory:
    """Peak resident memory above the level at entry: the kernel's own high-water mark, reset
    at entry (no sampling, so nothing runs beside the timed sweep); where the kernel cannot
    reset it, sampled every millisecond in a thread (torch releases the GIL in its kernels, so
    the sampler keeps running during a sweep)."""

    def __enter__(self) -> PeakMemory:
        release_freed_memory()
        self.base = self.peak = rss_mb()
        self._kernel = reset_peak_rss()
        self._stop = threading.Event()
        self._thread = None if self._kernel else threading.Thread(target=self._sample, daemon=True)
        if self._thread is not None:
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_mb(), peak_rss_mb() if self._kernel else 0.0)

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


# Model shapes: GPT-2 small whole; Llama-3.1-8B and Qwen3-0.6B as a few blocks of their real widths
# with their real vocabularies (the unembedding is a large share of a short prompt's FLOPs).
MODELS = {
    "gpt2-small": dict(family="gpt2", n_layers=12, d_model=768, n_heads=12, d_mlp=3072, vocab_size=50257),
    "llama3-8b-2-blocks": dict(family="llama", n_layers=2, d_model=4096, n_heads=32, n_kv_heads=8, d_mlp=14336,
                               vocab_size=128256),
    "qwen3-0.6b-4-blocks": dict(family="qwen3", n_layers=4, d_model=1024, n_heads=16, n_kv_heads=8, head_dim=128,
                                d_mlp=3072, vocab_size=151936),
}
SETTINGS = {"gpt2-small": "single,pronoun,ioi", "llama3-8b-2-blocks": "single,ioi", "qwen3-0.6b-4-blocks": "single,ioi"}
# TL's cost per cell is the same for every cell: a measured fraction extrapolates linearly.
# The fractions keep the whole run (three shapes, seven settings) near 20 minutes on one thread.
TL_FRACTION = {
    "single": {"resid_pre_layer_pos": 1.0, "heads_all_pos": 1.0, "heads_by_pos": 0.05},
    "pronoun": {"resid_pre_layer_pos": 0.15, "heads_all_pos": 0.15, "heads_by_pos": 0.02},
    "ioi": {"resid_pre_layer_pos": 0.15, "heads_all_pos": 0.15, "heads_by_pos": 0.02},
}


def build_model(shape: str):
    """A random model of ``shape`` (HF's own initialisation), through the real loading path."""
    spec = dict(MODELS[shape])
    return tiny_model(spec.pop("family"), n_ctx=1024, init_std=None, **spec)


def bench_setting(model, name: str, prompts, throughput: float, budget_mb: int, tl_fraction: float | None) -> dict:
    """Every sweep of :data:`SWEEPS` on one prompt set: hookpatch, TransformerLens, roofline."""
    shape = model_shape(model)
    metric = LogitDiff(prompts)
    linear_readout = getattr(model.cfg, "output_logits_soft_cap", None) in (None, 0, -1.0)
    rows = []
    for sweep, spec in SWEEPS.items():
        with PeakMemory() as memory, torch.no_grad():
            t = clock()
            ours = patch_sweep(model, prompts, metric, spec["component"], by=spec["by"],
                               memory_budget=budget_mb * 2**20, progress=False)
            ours_s = clock() - t
        peak = memory.above_base_mb
        fraction = tl_fraction or TL_FRACTION[name][sweep]
        tl_s, tl_values, index = time_tl(model, prompts, metric, sweep, fraction)
        n_cells = ours.values[..., 0].numel()
        tl_total = tl_s * n_cells / len(index)
        ours_flat = ours.mean().reshape(-1)[: len(index)]
        diff = float((ours_flat - tl_values.reshape(-1)).abs().max())
        roof = roofline_flops(shape, prompts, metric, sweep, linear_readout) / throughput
        rows.append({
            "sweep": sweep, "hookpatch_s": ours_s, "transformerlens_s": tl_total,
            "transformerlens_fraction": len(index) / n_cells, "speedup": tl_total / ours_s,
            "max_abs_diff": diff, "roofline_s": roof, "roofline_multiple": ours_s / roof,
            "peak_mb": peak, "cells": n_cells, "runner": ours.provenance.runner,
        })
        print(f"{name:8s} {sweep:20s} hookpatch {ours_s:8.2f}s  TL {tl_total:9.2f}s "
              f"(x{tl_total / ours_s:5.1f})  roofline x{ours_s / roof:4.2f}  diff {diff:.1e}  "
              f"peak {peak:7.1f} MB", flush=True)
    return {"name": name, "n_prompts": len(prompts), "n_tokens": prompts.n_pos, "sweeps": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--tl-fraction", type=float, default=None, help="override the TL fraction for every sweep")
    parser.add_argument("--models", default=",".join(MODELS), help=f"model shapes, of {sorted(MODELS)}")
    parser.add_argument("--settings", default=None, help="prompt sets (single, pronoun, ioi); default per model")
    parser.add_argument("--budget-mb", type=int, default=2048)
    args = parser.parse_args()
    torch.set_num_threads(1)
    throughput = matmul_flops_per_s()
    out = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1,
                    "clock": "CPU seconds of the main thread (one torch thread)", "matmul_gflops": throughput / 1e9},
        "notes": NOTES,
        "memory_budget_mb": args.budget_mb,
        "models": [],
    }
    for shape in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(shape)
        facts = model_facts(model)
        # The runner's one-time check per model (its probe: the fast path's logits against the
        # bridge's), timed on its own rather than charged to whichever sweep happens to run first.
        t = clock()
        with torch.no_grad():
            runner = runner_for(model).name
        probe_s = clock() - t
        entry = {"shape": shape, "n_layers": facts.n_layers, "d_model": facts.d_model, "n_heads": facts.n_heads,
                 "n_kv_heads": facts.n_kv_heads, "d_head": facts.d_head, "d_mlp": facts.d_mlp,
                 "d_vocab": facts.d_vocab, "runner": runner, "probe_s": probe_s, "settings": []}
        print(shape, flush=True)
        settings = settings_for(model)
        for name in (args.settings or SETTINGS[shape]).split(","):
            entry["settings"].append(
                bench_setting(model, name, settings[name](), throughput, args.budget_mb, args.tl_fraction)
            )
        out["models"].append(entry)
        del model
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
