"""Time a sweep on Ray workers against the same sweep in process, in one run.

The 20-prompt heads-by-position sweep (``z``, by layer × position × head) on a random model
of GPT-2 small's shape, three ways, each at one torch thread per process: in this process
(:class:`~hookpatch.runners.InProcessExecutor`), on one single-threaded Ray worker and on two.
Wall-clock seconds; the Ray rows include starting the actors and each worker loading the model
and caching its own clean and corrupted runs (``startup_s`` is that share, measured by a first
tiny call), but not starting the local Ray cluster itself (``ray_init_s``, recorded). The
results must be equal bit for bit.

    python benchmarks/scaleout.py --json benchmarks/results/scaleout.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hookpatch.metrics import LogitDiff  # noqa: E402
from hookpatch.model import load_model  # noqa: E402
from hookpatch.model._tiny import write_tiny_checkpoint  # noqa: E402
from hookpatch.runners import RayExecutor  # noqa: E402
from hookpatch.sweeps import patch_sweep  # noqa: E402
from sweeps import MODELS, settings_for  # noqa: E402

NOTES = (
    "wall_s is wall-clock seconds of the whole patch_sweep call. For Ray rows it includes starting the "
    "actors, each worker loading the model from its load arguments (a random GPT-2-small-shaped checkpoint "
    "directory, loaded from disk as a user's would be) and caching its own unpatched runs; startup_s is the "
    "wall time of a first call on a one-prompt set with fresh actors, i.e. roughly that share. ray_init_s "
    "(starting the local cluster) is not in any row. Every process runs one torch thread; Ray runs its "
    "workers at niceness 15, which matters only when something else competes for the cores. n_jobs is the "
    "number of jobs the memory budget cut the sweep into; Ray's ActorPool hands each idle worker the next one."
)


def timed_sweep(model, prompts, executor, budget: int):
    t = time.perf_counter()
    result = patch_sweep(model, prompts, LogitDiff(prompts), "z", by=("layer", "pos", "head"),
                         memory_budget=budget, executor=executor, progress=False)
    return time.perf_counter() - t, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--budget-mb", type=int, default=2048, help="memory budget of one job (per worker)")
    parser.add_argument("--setting", default="pronoun", help="prompt set of benchmarks/sweeps.py")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # a checkpoint directory, as a user's model would be: each worker loads it from disk
    checkpoint = tempfile.mkdtemp(prefix="hookpatch-scaleout-")
    spec = dict(MODELS["gpt2-small"])
    write_tiny_checkpoint(checkpoint, spec.pop("family"), n_ctx=1024, init_std=None, **spec)
    model = load_model(checkpoint, device="cpu")
    prompts = settings_for(model)[args.setting]()
    budget = args.budget_mb * 2**20
    rows = []

    seconds, local = timed_sweep(model, prompts, None, budget)
    n_jobs = _n_jobs(model, prompts, budget)
    rows.append({"executor": "in-process", "workers": 0, "wall_s": seconds})
    print(f"in-process        {seconds:8.1f}s  ({n_jobs} jobs)", flush=True)

    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
    ray_init_s = time.perf_counter() - t
    one = prompts.select([0])
    for workers in (1, 2):
        with RayExecutor(workers=workers) as ex:
            startup_s, _ = timed_sweep(model, one, ex, budget)  # fresh actors: load the model, cache runs
        with RayExecutor(workers=workers) as ex:
            seconds, remote = timed_sweep(model, prompts, ex, budget)
        equal = torch.equal(remote.values, local.values)
        rows.append({"executor": "ray", "workers": workers, "wall_s": seconds, "startup_s": startup_s,
                     "bit_identical": equal, "max_abs_diff": float((remote.values - local.values).abs().max())})
        print(f"ray, {workers} worker(s)  {seconds:8.1f}s  start-up ~{startup_s:.1f}s  equal={equal}", flush=True)
    ray.shutdown()

    by = {(r["executor"], r["workers"]): r["wall_s"] for r in rows}
    out = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "ray": ray.__version__,
                    "threads_per_process": 1},
        "notes": NOTES,
        "sweep": {"model": "gpt2-small shape (random)", "setting": args.setting, "n_prompts": len(prompts),
                  "n_tokens": prompts.n_pos, "component": "z", "by": ["layer", "pos", "head"], "n_jobs": n_jobs,
                  "memory_budget_mb": args.budget_mb},
        "ray_init_s": ray_init_s,
        "rows": rows,
        "speedup_2_vs_1_worker": by[("ray", 1)] / by[("ray", 2)],
        "one_worker_vs_in_process": by[("ray", 1)] / by[("in-process", 0)],
    }
    print(f"2 workers vs 1: {out['speedup_2_vs_1_worker']:.2f}x; 1 worker / in-process: "
          f"{out['one_worker_vs_in_process']:.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))


def _n_jobs(model, prompts, budget: int) -> int:
    """How many jobs the sweep is cut into (the same planning the call above did)."""
    from hookpatch.sweeps._engine import Cell, Source, SweepRecipe, plan_jobs
    from hookpatch.sweeps._grid import Grid

    grid = Grid.build(model, prompts, "z", ("layer", "pos", "head"), None, None, None)
    work = SweepRecipe(prompts, LogitDiff(prompts), "z", tuple(grid.layers), None).build(model)
    cells = [Cell(layer, pos, head) for layer, pos, head in grid.cells()]
    return len(plan_jobs(work, "z", cells, "corrupted", Source("clean"), memory_budget=budget))


if __name__ == "__main__":
    main()
