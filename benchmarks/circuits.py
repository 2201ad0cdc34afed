"""Time hookpatch's path patching against TransformerLens and a plain hook implementation, in one run.

On the GPT-2-small-shaped random model of ``benchmarks/sweeps.py`` (one CPU thread, CPU seconds
of that thread), for two prompt sets (1 prompt × 11 tokens; 8 IOI prompts × 15 tokens), every
head before the receiver head L9H9 is a sender into L9H9's query, in two ways:

(a) ``direct``: ``path_patch_sweep(..., receiver_input="q", by=("layer", "head"),
    semantics="direct")`` against TransformerLens 4.3's direct path patching
    (``patching.get_act_patch_direct_path``) restricted to the one destination: per source
    head, exactly TL's own work for that receiver — its source write ``z @ W_O`` from the two
    caches, then one ``run_with_hooks`` of the corrupted tokens under ``_split_qkv_input`` with
    ``_make_direct_path_hook`` on L9H9's ``hook_q_input`` (TL's ``..._all_sources`` would loop
    over every later destination head as well). TL's metric is a scalar per run, so hookpatch's
    per-prompt values are compared through their batch mean.
(b) ``ioi``: ``path_patch_sweep(..., semantics="ioi", receiver_positions="END")`` against a
    plain implementation with two forwards of the bridge per sender (:func:`plain_ioi`): run 1
    sets the sender's z to the clean run's and freezes every other head's z to the corrupted
    run's (MLPs recomputed), stopping at L9 (``stop_at_layer=9``, which returns ``blocks.9.hook_resid_pre``); run 2 is
    the corrupted run with L9H9's query input (``use_split_qkv_input``, ``hook_q_input``)
    replaced by that recording at END. Compared per prompt.

Where the reference is slow, it runs on an evenly spread fraction of the senders (its cost per
sender is constant: one or two whole forwards) and its time is extrapolated; the ``reference``
string says which fraction, and ``max_abs_diff`` compares those senders.

Roofline (``roofline_multiple`` = hookpatch seconds over roofline seconds): the matmul FLOPs an
exact implementation must do, over this thread's measured fp32 matmul throughput (``gflops``).
Per prompt b, with read position e (END), d = d_model, dh = d_head, receiver in layer r,
sender in layer s, m = the MLP's matrices (2 for GPT-2), ``after(n)`` = ``2 n dh d`` (one head's
W_O slice) + ``2 n d d_mlp m`` (the MLP) at n positions, ``blocks(r+1.., from p)`` = every later
block at positions p..e (keys/values from p, the last block's queries at e only; see
``sweeps.blocks_from``), R = ``2 d`` (the logit difference through its residual direction):

    both:  2 * (blocks(0.., from 0) + R)                                   the two unpatched runs
    (a), per sender:  2 (e+1) dh d                                          the sender's write Δ
                    + 2 (e+1) d dh + Σ_{q≤e} 4 (q+1) dh + after(e+1)         receiver's q, attention, W_O, MLP
                    + blocks(r+1.., from 0) + R
    (b), per sender:  2 dh d + (r - s) · 2 d d_mlp m                         run 1 at END: its write, MLPs s..r-1
                    + 2 d dh + 4 (e+1) dh + after(1)                         run 2: receiver at END only
                    + blocks(r+1.., from e) + R

(if the receiver's layer is the last, its queries run at e only). Run 1 of (b) is counted at
END alone: with every other head frozen it has no attention, so a sender's write at a position
reaches the residual stream at that position only, and the receiver reads END alone (the plain
reference runs it at every position). Norms, softmax and other elementwise work are not
counted, so roofline_multiple ≥ 1 by construction. hookpatch runs ``REPEATS`` times (the
first call builds the model's graph, once per model shape), each right after measuring the
matmul throughput (best of five), and the multiple is the smallest of time over roofline at that
moment's throughput; ``hookpatch_s`` is the fastest call. This machine's speed drifts by ±10%
within minutes, so a throughput measured once at the start misstates later multiples.
``peak_mb`` is hookpatch's peak resident memory above the level before its calls (as in
``sweeps.py``). The runner's one-time probe is run before any timing and excluded.

Edge attribution (setting ``edge_attribution``, the 20 pronoun prompts × 11 tokens): EAP of every
edge, EAP-IG with 5 steps and a 10-point faithfulness curve (its default budgets, top-n of the
EAP scores; without and with one random circuit per budget), each in forward-equivalents: its
time over one plain no-grad forward of the bridge over the same batch (best of 3). EAP is
compared with TransformerLens's ``attribution_patch(granularity="edge")``, which takes one
prompt per call: it runs on ``tl_prompts`` of the prompts, its time is extrapolated, and its
per-(edge, position) scores summed over positions are compared with hookpatch's per prompt.

    python benchmarks/circuits.py --json benchmarks/results/circuits.json
    python benchmarks/circuits.py --quick --json /tmp/circuits-quick.json    # tiny model, seconds
    python benchmarks/circuits.py --profile                                 # hookpatch's top 10
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import patching

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hookpatch.circuits import edge_attribution, faithfulness_curve, path_patch_sweep  # noqa: E402
from hookpatch.metrics import LogitDiff  # noqa: E402
from hookpatch.model import model_facts, tiny_model  # noqa: E402
from hookpatch.runners import runner_for  # noqa: E402
from sweeps import (  # noqa: E402
    MODELS,
    PeakMemory,
    after_attention_flops,
    block_flops,
    blocks_from,
    clock,
    matmul_flops_per_s,
    model_shape,
    settings_for,
)

# The full run: GPT-2 small's shape, receiver L9H9 (a name mover in the trained model).
# ``fraction``: the share of senders the reference is timed on, per (setting, run).
FULL = {
    "model": dict(MODELS["gpt2-small"]),
    "receiver": (9, 9),
    "settings": ("single", "ioi"),
    "fraction": {("single", "direct"): 1.0, ("single", "ioi"): 1.0, ("ioi", "direct"): 0.25, ("ioi", "ioi"): 0.25},
    "tl_prompts": 2,  # TransformerLens's edge attribution, one prompt per call: 2 of the 20 measured
}
# The smoke run: a tiny GPT-2 (seconds in all), every sender measured.
QUICK = {
    "model": dict(family="gpt2", n_layers=4, d_model=64, n_heads=4, d_mlp=256),
    "receiver": (2, 3),
    "settings": ("single", "ioi"),
    "fraction": {},
    "tl_prompts": 2,
}


def spread(n: int, fraction: float) -> list[int]:
    """``round(n * fraction)`` indices of ``range(n)`` spread evenly (all of them for 1.0)."""
    k = max(1, min(n, round(n * fraction)))
    if k == n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)} if k > 1 else {0})


# ------------------------------------------------------------------------- the references


def tl_direct(
    model: Any, prompts: Any, metric: Callable[[Tensor], Tensor], receiver: tuple[int, int],
    senders: list[tuple[int, int]],
) -> tuple[float, Float[Tensor, " sender"]]:
    """TransformerLens' direct path patching of each sender into ``receiver``'s query: the work
    ``get_act_patch_direct_path`` does for that one destination (its caches built untimed, as
    the caller of TL's function passes them in). Returns (seconds, batch-mean metric per sender)."""
    _, clean_cache = model.run_with_cache(prompts.clean_tokens)
    _, corrupted_cache = model.run_with_cache(prompts.corrupted_tokens)
    dst_layer, dst_head = receiver
    out = torch.empty(len(senders))
    t = clock()
    with patching._split_qkv_input(model):
        for i, (src_layer, src_head) in enumerate(senders):
            W_O = model.blocks[src_layer].attn.W_O[src_head]
            z_name = f"blocks.{src_layer}.attn.hook_z"
            delta = clean_cache[z_name][:, :, src_head] @ W_O - corrupted_cache[z_name][:, :, src_head] @ W_O
            fired: list[bool] = []
            logits = model.run_with_hooks(
                prompts.corrupted_tokens,
                fwd_hooks=[(f"blocks.{dst_layer}.attn.hook_q_input",
                            patching._make_direct_path_hook(delta, dst_head, fired))],
            )
            assert fired, "the q-input hook did not fire"
            out[i] = metric(logits).mean().item()
    return clock() - t, out


def plain_ioi(
    model: Any, prompts: Any, metric: Callable[[Tensor], Tensor], receiver: tuple[int, int],
    senders: list[tuple[int, int]],
) -> tuple[float, Float[Tensor, "sender batch"]]:
    """IOI path patching (Wang et al. 2022) of each sender into ``receiver``'s query at END, two
    plain ``run_with_hooks`` per sender. Run 1 (corrupted tokens): the sender's z from the clean
    run, every other head's z frozen to the corrupted run, MLPs recomputed; it stops at the
    receiver's layer and records the residual stream entering it. Run 2: the corrupted run with
    the receiver's own query input replaced by that recording at END. Returns (seconds, metric
    per sender and prompt); the two caches are built untimed."""
    layer_r, head_r = receiver
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(layer_r)]
    _, clean_cache = model.run_with_cache(prompts.clean_tokens, names_filter=lambda n: n in z_names)
    _, corrupted_cache = model.run_with_cache(prompts.corrupted_tokens, names_filter=lambda n: n in z_names)
    rows = torch.arange(len(prompts))
    end = prompts.position("END").cpu()
    out = torch.empty(len(senders), len(prompts))
    t = clock()
    for i, (layer_s, head_s) in enumerate(senders):
        frozen = {}
        for layer in range(layer_r):
            z = corrupted_cache[z_names[layer]]
            if layer == layer_s:
                z = z.clone()
                z[:, :, head_s] = clean_cache[z_names[layer]][:, :, head_s]
            frozen[z_names[layer]] = z

        def freeze(act: Tensor, hook: Any, frozen: dict[str, Tensor] = frozen) -> Tensor:
            return frozen[hook.name]

        # stop_at_layer=r returns the residual stream entering block r (its hook_resid_pre).
        resid = model.run_with_hooks(prompts.corrupted_tokens, fwd_hooks=[(name, freeze) for name in z_names],
                                     stop_at_layer=layer_r)

        def replace_q(x: Float[Tensor, "batch pos head d_model"], hook: Any, resid: Tensor = resid) -> Tensor:
            x = x.clone()
            x[rows, end, head_r] = resid[rows, end]
            return x

        with patching._split_qkv_input(model):
            logits = model.run_with_hooks(prompts.corrupted_tokens,
                                          fwd_hooks=[(f"blocks.{layer_r}.attn.hook_q_input", replace_q)])
        out[i] = metric(logits)
    return clock() - t, out


# ------------------------------------------------------------------------------- roofline


REPEATS = 3  # hookpatch calls per run; the fastest is reported


def roofline_flops(shape: Any, prompts: Any, metric: Any, receiver: tuple[int, int], semantics: str) -> float:
    """The matmul FLOPs of the module docstring's formula, summed over prompts and senders."""
    f = shape
    d, dh, n = f.d_model, f.d_head, f.n_layers
    mats = 3 if f.gated_mlp else 2
    layer_r = receiver[0]
    readout = 2 * d
    total = 0.0
    for b in range(len(prompts)):
        e = int(metric.read_positions[b])
        total += 2 * (blocks_from(f, 0, 0, e) + readout)
        for layer_s in range(layer_r):
            write = 2 * (e + 1) * dh * d
            if semantics == "direct":
                queries = [e] if layer_r == n - 1 else list(range(e + 1))
                receiver_block = (2 * d * dh * len(queries) + sum(4 * (q + 1) * dh for q in queries)
                                  + after_attention_flops(f, len(queries), heads=1))
                later = blocks_from(f, layer_r + 1, 0, e)
                per = write + receiver_block + later
            else:
                run1 = 2 * dh * d + (layer_r - layer_s) * 2 * d * f.d_mlp * mats  # at END only
                run2 = 2 * d * dh + 4 * (e + 1) * dh + after_attention_flops(f, 1, heads=1)
                run2 += sum(block_flops(f, e, [e]) for _ in range(layer_r + 1, n))
                per = run1 + run2
            total += f.n_heads * (per + readout)
    return total


# ------------------------------------------------------------------------------ the runs


def hookpatch_run(model: Any, prompts: Any, metric: Any, receiver: tuple[int, int], semantics: str) -> Any:
    """hookpatch's sweep of every head before ``receiver`` into its query."""
    label = f"L{receiver[0]}H{receiver[1]}"
    extra = {"receiver_positions": "END"} if semantics == "ioi" else {}
    return path_patch_sweep(model, prompts, metric, label, receiver_input="q", by=("layer", "head"),
                            semantics=semantics, progress=False, **extra)


def bench_setting(model: Any, name: str, prompts: Any, config: dict, throughput: float) -> dict:
    """Runs (a) and (b) on one prompt set."""
    shape = model_shape(model)
    metric = LogitDiff(prompts)
    receiver = config["receiver"]
    all_senders = [(layer, head) for layer in range(receiver[0]) for head in range(shape.n_heads)]
    runs = []
    for semantics in ("direct", "ioi"):
        with PeakMemory() as memory, torch.no_grad():
            times, multiples = [], []
            flops = roofline_flops(shape, prompts, metric, receiver, semantics)
            for _ in range(REPEATS):  # each call against the machine's speed measured just before it
                speed = matmul_flops_per_s()
                t = clock()
                res = hookpatch_run(model, prompts, metric, receiver, semantics)
                times.append(clock() - t)
                multiples.append(times[-1] / (flops / speed))
            ours_s = min(times)
        ours = res.values.reshape(len(all_senders), len(prompts))  # [sender, batch], (layer, head) order
        fraction = config["fraction"].get((name, semantics), 1.0)
        pick = spread(len(all_senders), fraction)
        senders = [all_senders[i] for i in pick]
        with torch.no_grad():
            if semantics == "direct":
                ref_s, ref = tl_direct(model, prompts, metric, receiver, senders)
                diff = float((ours[pick].mean(-1) - ref).abs().max())
                reference = "transformer_lens.patching.get_act_patch_direct_path, destination only"
            else:
                ref_s, ref = plain_ioi(model, prompts, metric, receiver, senders)
                diff = float((ours[pick] - ref).abs().max())
                reference = "plain run_with_hooks, two forwards per sender"
        measured = len(senders) / len(all_senders)
        if measured < 1:
            reference += f" ({100 * measured:.0f}% of senders measured, extrapolated)"
        ref_total = ref_s / measured
        run = "a_direct_q" if semantics == "direct" else "b_ioi_q_end"
        runs.append({
            "run": run, "hookpatch_s": ours_s, "reference": reference, "reference_s": ref_total,
            "speedup": ref_total / ours_s, "max_abs_diff": diff, "roofline_multiple": min(multiples),
            "peak_mb": memory.above_base_mb,
        })
        print(f"{name:7s} {run:12s} hookpatch {ours_s:7.2f}s  reference {ref_total:8.2f}s (x{ref_total / ours_s:5.1f})"
              f"  roofline x{min(multiples):4.2f}  diff {diff:.1e}  peak {memory.above_base_mb:6.1f} MB", flush=True)
    return {"name": name, "n_prompts": len(prompts), "n_tokens": prompts.n_pos, "runs": runs}


def bench_edge_attribution(model: Any, prompts: Any, tl_prompts: int) -> dict:
    """Edge attribution of every edge (EAP; EAP-IG with 5 steps) and a 10-point faithfulness
    curve, in forward-equivalents (one plain no-grad forward of the bridge over the batch), and
    EAP against TransformerLens's edge-granularity ``attribution_patch`` (which runs one prompt
    at a time: timed on ``tl_prompts`` of them and extrapolated) in the same run."""
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    metric = LogitDiff(prompts)
    with torch.no_grad():
        forward = min(_timed(lambda: model(prompts.clean_tokens)) for _ in range(3))
    runs = []
    eap_s = min(_timed(lambda: edge_attribution(model, prompts, metric, progress=False)) for _ in range(2))
    eap = edge_attribution(model, prompts, metric, progress=False)
    # TransformerLens: per prompt, scores per (edge, position); summed over positions to compare
    labels = {label: i for i, label in enumerate(eap.labels["edge"])}
    config = EdgeAttributionConfig(granularity="edge")
    diffs, tl_s = [], 0.0
    for i in range(tl_prompts):
        end, good, bad = int(prompts.end[i]), int(prompts.correct_tokens[i]), int(prompts.incorrect_tokens[i])
        t = clock()
        res = attribution_patch(model, prompts.clean_tokens[i : i + 1], prompts.corrupted_tokens[i : i + 1],
                                lambda logits, e=end, a=good, b=bad: logits[0, e, a] - logits[0, e, b], config)
        tl_s += clock() - t
        theirs = torch.zeros(len(labels), dtype=torch.float64)
        for (writer, reader), value in res.edge_scores.items():
            theirs[labels[f"{_tl_sender(writer)}->{_tl_receiver(reader)}"]] += value
        diffs.append(float((eap.values[:, i].double() - theirs).abs().max()))
    tl_total = tl_s * len(prompts) / tl_prompts
    runs.append({"run": "eap_all_edges", "hookpatch_s": eap_s, "forward_s": forward,
                 "forward_equivalents": eap_s / forward,
                 "reference": f"transformer_lens attribution_patch(granularity='edge'), one prompt per call "
                              f"({tl_prompts} of {len(prompts)} prompts measured, extrapolated)",
                 "reference_s": tl_total, "speedup": tl_total / eap_s, "max_abs_diff": max(diffs),
                 "roofline_multiple": None, "peak_mb": None})
    ig_s = _timed(lambda: edge_attribution(model, prompts, metric, method="eap-ig", steps=5, progress=False))
    runs.append({"run": "eap_ig_5_steps", "hookpatch_s": ig_s, "forward_s": forward,
                 "forward_equivalents": ig_s / forward,
                 "reference": "TransformerLens has no EAP-IG (ig_steps>1 raises)",
                 "reference_s": None, "speedup": None, "max_abs_diff": None, "roofline_multiple": None,
                 "peak_mb": None})
    scores = eap.mean()
    for n_random in (0, 1):
        curve_s = _timed(lambda n=n_random: faithfulness_curve(model, prompts, metric, scores, n_random=n))
        runs.append({"run": f"faithfulness_curve_10_points{'_with_random' if n_random else ''}",
                     "hookpatch_s": curve_s, "forward_s": forward, "forward_equivalents": curve_s / forward,
                     "reference": None, "reference_s": None, "speedup": None, "max_abs_diff": None,
                     "roofline_multiple": None, "peak_mb": None})
    for r in runs:
        print(f"edges   {r['run']:38s} {r['hookpatch_s']:7.2f}s = {r['forward_equivalents']:5.1f} forwards"
              + (f"  TL {r['reference_s']:7.1f}s (x{r['speedup']:5.1f}) diff {r['max_abs_diff']:.1e}"
                 if r["speedup"] else ""), flush=True)
    return {"name": "edge_attribution", "n_prompts": len(prompts), "n_tokens": prompts.n_pos, "runs": runs}


def _timed(fn: Any) -> float:
    t = clock()
    fn()
    return clock() - t


def _tl_sender(node: Any) -> str:
    return {"embed": "input", "attn_head_out": f"L{node.layer}H{node.head}", "mlp_out": f"MLP{node.layer}"}[node.kind]


def _tl_receiver(node: Any) -> str:
    if node.kind in ("q_input", "k_input", "v_input"):
        return f"L{node.layer}H{node.head}.{node.kind[0]}"
    return f"MLP{node.layer}" if node.kind == "mlp_in" else "logits"


def profile(model: Any, settings: dict, config: dict) -> None:
    """cProfile of hookpatch's two runs per setting: the top 10 entries by own time."""
    for name in config["settings"]:
        prompts = settings[name]()
        metric = LogitDiff(prompts)
        for semantics in ("direct", "ioi"):
            prof = cProfile.Profile()
            with torch.no_grad():
                prof.enable()
                hookpatch_run(model, prompts, metric, config["receiver"], semantics)
                prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(10)
            print(f"== {name} {semantics}\n" + "\n".join(buf.getvalue().splitlines()[:30]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="a tiny model: a smoke run of seconds")
    parser.add_argument("--profile", action="store_true", help="only profile hookpatch's runs (top 10), no references")
    args = parser.parse_args()
    if not args.json and not args.profile:
        parser.error("--json FILE is needed (or --profile)")
    config = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = dict(config["model"])
    family = spec.pop("family")
    model = tiny_model(family, **spec) if args.quick else tiny_model(family, n_ctx=1024, init_std=None, **spec)
    with torch.no_grad():
        runner = runner_for(model).name  # the one-time probe, untimed
    settings = settings_for(model)
    if args.profile:
        profile(model, settings, config)
        return
    throughput = matmul_flops_per_s()
    facts = model_facts(model)
    out = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1,
                    "clock": "CPU seconds of the main thread (one torch thread)"},
        "gflops": throughput / 1e9,
        "model": {"shape": "tiny-gpt2" if args.quick else "gpt2-small", "n_layers": facts.n_layers,
                  "d_model": facts.d_model, "n_heads": facts.n_heads, "d_head": facts.d_head, "d_mlp": facts.d_mlp,
                  "d_vocab": facts.d_vocab, "runner": runner},
        "receiver": f"L{config['receiver'][0]}H{config['receiver'][1]}.q",
        "notes": "Roofline " + __doc__.split("Roofline ", 1)[1].split("    python", 1)[0].strip(),
        "settings": [],
    }
    print(f"matmul {throughput / 1e9:.1f} GFLOP/s, runner {runner}", flush=True)
    for name in config["settings"]:
        out["settings"].append(bench_setting(model, name, settings[name](), config, throughput))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    out["settings"].append(bench_edge_attribution(model, settings["pronoun"](), config["tl_prompts"]))
    Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
