"""The ``hookpatch`` command line.

``hookpatch demo`` runs a small offline patching experiment (the pronoun task, residual
stream patched layer by layer at the name position) and prints the result; it uses the
shipped model organism when present and a tiny random GPT-2-style model otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from hookpatch.errors import HookpatchError


def _demo(args: argparse.Namespace) -> int:
    from transformer_lens import patching

    from hookpatch.metrics import LogitDiff, Normalized, evaluate
    from hookpatch.model.loading import load_model, organism_path
    from hookpatch.model.tiny import tiny_model
    from hookpatch.tasks.pronoun import pronoun_prompts

    if args.model == "organism" and not (organism_path() / "config.json").is_file():
        print("shipped model organism not present; using a tiny random GPT-2-style model", file=sys.stderr)
        model = tiny_model("gpt2")
    elif args.model == "tiny":
        model = tiny_model("gpt2")
    else:
        model = load_model(args.model, device=args.device)
    prompts = pronoun_prompts(model)
    base = LogitDiff(prompts)
    clean = evaluate(model, base, prompts.clean_tokens)
    corrupted = evaluate(model, base, prompts.corrupted_tokens)
    print(f"model: {args.model}  prompts: {len(prompts)} pronoun prompts")
    print(f"clean logit diff {clean.mean():+.3f}   corrupted logit diff {corrupted.mean():+.3f}")
    metric = Normalized.from_model(model, base)
    _, cache = model.run_with_cache(prompts.clean_tokens)
    with torch.no_grad():
        result = patching.get_act_patch_resid_pre(
            model, prompts.corrupted_tokens, cache, lambda logits: metric(logits).mean()
        )
    labels = prompts.position_labels()
    print("normalized logit diff after patching resid_pre (clean into corrupted; 1 = clean, 0 = corrupted)")
    print("layer " + " ".join(f"{lab.split(': ', 1)[1][:9]:>9}" for lab in labels))
    for layer, row in enumerate(result.tolist()):
        print(f"{layer:5d} " + " ".join(f"{v:9.3f}" for v in row))
    return 0


def _report(args: argparse.Namespace) -> int:
    from hookpatch.report import run_report

    report = run_report(args.task, args.model, args.out, args.n_prompts, args.device, progress=not args.quiet)
    print(report.title)
    for line in report.summary:
        print(f"  {line}")
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hookpatch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline patching demo on the pronoun task")
    demo.add_argument("--model", default="organism", help="'organism', 'tiny', a local path or a hub id")
    demo.add_argument("--device", default=None)
    demo.set_defaults(run=_demo)
    report = sub.add_parser("report", help="run a whole case study and write one HTML file")
    report.add_argument("task", help="pronoun or ioi")
    report.add_argument("--model", default="organism", help="'organism' (offline default), a local path or a hub id")
    report.add_argument("--out", required=True, help="the HTML file to write")
    report.add_argument("--n-prompts", type=int, default=None, help="number of prompts (default: the task's set)")
    report.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    report.add_argument("--quiet", action="store_true", help="no progress bars")
    report.set_defaults(run=_report)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except HookpatchError as err:
        print(f"hookpatch: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
