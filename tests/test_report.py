"""The report command: exit codes and messages, a self-contained HTML file, and a real
headless Chromium that renders every figure and attention view without JavaScript errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hookpatch.cli import main
from hookpatch.model._loading import organism_path

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


@pytest.fixture(scope="module")
def model_arg():
    """The report's default: the organism shipped with hookpatch."""
    assert (organism_path() / "config.json").is_file()
    return "organism"


@pytest.fixture(scope="module")
def report_file(tmp_path_factory, model_arg):
    out = tmp_path_factory.mktemp("report") / "pronoun.html"
    assert main(["report", "pronoun", "--model", model_arg, "--out", str(out), "--n-prompts", "8", "--quiet"]) == 0
    return out


def test_report_is_self_contained(report_file, capsys):
    text = report_file.read_text(encoding="utf-8")
    assert text.count("<section") >= 10
    assert not re.search(r"<script[^>]+src=", text), "external script"
    # outside the inlined bundles (whose code names URLs of features never used here, such as
    # plotly's geo maps), nothing refers to the network
    markup = re.sub(r"<script[^>]*>.*?</script>", "", text, flags=re.S)
    assert not re.search(r"https?://", markup)
    assert text.count("Plotly.newPlot") >= 8
    for title in ("Prediction check", "Logit lens", "Direct logit attribution by head", "Head ablation (zero)",
                  "Head ablation (mean)", "Residual stream patching", "Head patching",
                  "Attribution vs activation patching"):
        assert title in text


def test_report_prints_a_summary(tmp_path, model_arg, capsys):
    out = tmp_path / "ioi.html"
    assert main(["report", "ioi", "--model", model_arg, "--out", str(out), "--n-prompts", "4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "hookpatch report: ioi" in printed and "logit difference clean" in printed and f"wrote {out}" in printed
    assert out.stat().st_size > 100_000


@pytest.mark.parametrize(
    "args, message",
    [
        (["report", "sentiment", "--out", "X"], "unknown task 'sentiment'"),
        (["report", "pronoun", "--model", "nobody/nothing-here", "--out", "X"], "no network"),
        (["report", "pronoun", "--out", "/nonexistent-dir/r.html"], "cannot write the report"),
        (["report", "pronoun", "--out", "X", "--n-prompts", "0"], "at least one prompt"),
    ],
)
def test_report_bad_arguments(tmp_path, args, message, capsys):
    args = [str(tmp_path / "r.html") if a == "X" else a for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "hookpatch.cli", "report", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--n-prompts" in result.stdout


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(report_file, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000",
             "--enable-logging=stderr", "--v=0"]
    url = report_file.resolve().as_uri()
    dom = subprocess.run(["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and ("Error" in line or "Uncaught" in line)]
    assert not errors, errors
    html = dom.stdout
    source = report_file.read_text(encoding="utf-8")
    figures = source.count("Plotly.newPlot")
    assert html.count('class="main-svg"') >= figures  # every plotly figure drew its SVG
    views = source.count("CircuitsVis.render(")
    assert views >= 1 and html.count("Head Selector") >= views  # every attention view rendered
    shot = ARTIFACTS / "report.png"
    subprocess.run(["chromium", *flags, "--window-size=1200,4000", f"--screenshot={shot}", url],
                   capture_output=True, text=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 10_000
