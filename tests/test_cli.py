"""The command line's own options: ``--version`` and a ``--quiet`` report with no progress bar."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import hookpatch

# what a tqdm bar (hookpatch's sweeps, transformers' "Loading weights") leaves in a stream
BAR = re.compile(r"\d+%\||it/s|s/it|Loading weights")


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hookpatch.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})


def test_version():
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?\S*|0\+unknown", hookpatch.__version__)
    result = _cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"hookpatch {hookpatch.__version__}"


def test_quiet_report_prints_no_progress_bar(tmp_path):
    out = tmp_path / "ioi.html"
    result = _cli("report", "ioi", "--n-prompts", "2", "--out", str(out), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    assert not BAR.search(result.stdout + result.stderr), result.stderr
