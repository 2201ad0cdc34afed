"""The ``hookpatch`` command line.

``hookpatch report {pronoun,ioi}`` runs a whole case study and writes one HTML file
(see :mod:`hookpatch.report`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence

from hookpatch import __version__
from hookpatch.errors import HookpatchError


@contextlib.contextmanager
def _loading_bars(enabled: bool) -> Iterator[None]:
    """Turn transformers' and huggingface_hub's progress bars (weight loading, downloads) off
    while the block runs when ``enabled`` is false, and restore their previous state after."""
    if enabled:
        yield
        return
    from huggingface_hub import utils as hub
    from transformers.utils import logging

    hub_was_off, transformers_was_on = hub.are_progress_bars_disabled(), logging.is_progress_bar_enabled()
    hub.disable_progress_bars()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if not hub_was_off:
            hub.enable_progress_bars()
        if transformers_was_on:
            logging.enable_progress_bar()


def _report(args: argparse.Namespace) -> int:
    from hookpatch.report import run_report

    with _loading_bars(enabled=not args.quiet):
        report = run_report(args.task, args.model, args.out, args.n_prompts, args.device, progress=not args.quiet)
    print(report.title)
    for line in report.summary:
        print(f"  {line}")
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hookpatch", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
