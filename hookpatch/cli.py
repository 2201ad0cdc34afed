"""The ``hookpatch`` command line.

``hookpatch report {pronoun,ioi}`` runs a whole case study and writes one HTML file
(see :mod:`hookpatch.report`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from hookpatch.errors import HookpatchError


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
