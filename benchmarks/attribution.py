"""Cost of attribution patching in forward-pass equivalents, beside activation patching.

On the GPT-2-small-shaped model of ``benchmarks/sweeps.py`` (one CPU thread), for the same
three settings, times attribution patching of every head by position (``z``, layer × pos ×
head) and one plain forward pass of the bridge on the same prompts, and writes their ratio:
the budget is at most 3 forward-equivalents (what attribution patching needs in principle:
one clean forward with cache, one corrupted forward + backward). Activation patching of the
same grid is in ``sweeps.json``.

    python benchmarks/attribution.py --json benchmarks/results/attribution.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hookpatch import tiny_model  # noqa: E402
from hookpatch.attribution import attribution_sweep  # noqa: E402
from hookpatch.metrics import LogitDiff  # noqa: E402
from sweeps import clock, settings_for  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = tiny_model("gpt2", n_layers=12, d_model=768, n_heads=12, d_mlp=3072, n_ctx=1024, vocab_size=50257,
                       init_std=None)
    rows = []
    for name, build in settings_for(model).items():
        prompts = build()
        metric = LogitDiff(prompts)
        with torch.no_grad():
            forward = best_of(functools.partial(model, prompts.clean_tokens))
        atp = best_of(functools.partial(attribution_sweep, model, prompts, metric, "z", by=("layer", "pos", "head"),
                                          progress=False), repeats=2)
        rows.append({"setting": name, "n_prompts": len(prompts), "n_tokens": prompts.n_pos,
                     "sweep": "attribution_heads_by_pos", "hookpatch_s": atp, "forward_s": forward,
                     "forward_equivalents": atp / forward})
        print(f"{name:8s} attribution heads_by_pos {atp:6.3f}s = {atp / forward:4.2f} forwards ({forward:.3f}s each)",
              flush=True)
    out = {"clock": "CPU seconds of the main thread (one torch thread)", "model": "gpt2-small shape, random weights",
           "results": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
