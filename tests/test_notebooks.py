"""The notebooks: committed without outputs, thin, Colab-ready, and executed on the organism.

Each notebook in ``notebooks/`` is run top to bottom with nbclient in a fresh ``python3``
kernel (this interpreter's ipykernel) with ``HOOKPATCH_MODEL=organism``, so its model cell
loads the shipped model instead of GPT-2 small. A failing assert cell fails the test. The
notebook's last cell (tagged ``results``) prints its key numbers as JSON; they are checked
here against a direct computation on the organism (plain forward passes and
``run_with_hooks`` patches, or hookpatch calls where the notebook's prose promises "the same number"), and so
are the invariants a reader may rely on (DLA parts add up, the lens ends at the model's output):
the user-facing cells hold no checks. An executed notebook exported to HTML keeps every figure.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hookpatch import (
    LogitDiff,
    dla_by_head,
    ioi_prompts,
    load_model,
    make_prompt_set,
    model_facts,
    pronoun_prompts,
    rank_heads,
    tiny_model,
)
from hookpatch.model import to_single_token

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PYPROJECT = NOTEBOOKS.parent / "pyproject.toml"
NAMES = ("pronoun_case_study", "ioi_case_study", "attribution_vs_patching", "coming_from_nnsight")
MISSING = [m for m in ("nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(m) is None]
needs_kernel = pytest.mark.skipif(
    bool(MISSING),
    reason=f"executing notebooks needs {', '.join(MISSING)} (pip install -e '.[test]')",
)
# Warnings that jupyter_client or pyzmq may raise in this process while they drive the kernel
# (platform- and version-dependent; none are hookpatch's). Kept to those two packages.
kernel_warnings = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning:jupyter_client.*"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:zmq.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:jupyter_client.*"),
]


def _read(name: str) -> dict:
    return json.loads((NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8"))


def _code(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


# ------------------------------------------------------------------------------------------
# Static checks: no kernel needed
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    for cell in _read(name)["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{name}: a code cell was committed with outputs"
            assert cell["execution_count"] is None, f"{name}: a code cell has an execution count"


@pytest.mark.parametrize("name", NAMES)
def test_cells_are_thin(name):
    """Cells call library functions: no function, hook or hook registration defined in a notebook."""
    for source in _code(_read(name)):
        for banned in ("def ", "lambda", "run_with_hooks", "add_hook", "fwd_hooks", "hooks("):
            assert banned not in source, f"{name}: a cell contains {banned!r}:\n{source}"


@pytest.mark.parametrize("name", NAMES)
def test_colab_setup_and_model_switch(name):
    nb = _read(name)
    setup, model = _code(nb)[:2]
    assert f'HOOKPATCH_REPO = "{_repository_url()}"' in setup
    assert 'IN_COLAB = "google.colab" in sys.modules' in setup
    # outside Colab, figures embed plotly.js and their data: they show offline and survive HTML export
    assert setup.index('pio.renderers.default = "plotly_mimetype+notebook"') < setup.index("if IN_COLAB:")
    # the install and the renderer only happen inside the Colab branch
    branch = setup.split("if IN_COLAB:", 1)[1]
    assert "%pip install -q git+{HOOKPATCH_REPO}" in branch and 'pio.renderers.default = "colab"' in branch
    assert all(line.startswith("    ") or not line.strip() for line in branch.splitlines()[1:])
    assert 'MODEL = os.environ.get("HOOKPATCH_MODEL", "gpt2-small")' in model
    assert "hp.load_model(MODEL)" in model
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    tagged = [c for c in nb["cells"] if "results" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is nb["cells"][-1], f"{name}: the last cell must be the one tagged 'results'"


def _repository_url() -> str:
    """The repository URL of pyproject.toml's [project.urls], the one place it is kept."""
    match = re.search(r'^Repository = "([^"]+)"', PYPROJECT.read_text(encoding="utf-8"), re.M)
    assert match, "pyproject.toml has no [project.urls] Repository"
    return match.group(1)


@pytest.mark.parametrize("name", NAMES)
def test_user_cells_hold_no_checks(name):
    """Checks for CI live in this file, on the notebook's key numbers, not in the reader's cells."""
    for source in _code(_read(name)):
        assert "assert" not in source, f"{name}: a cell checks something:\n{source}"


# ------------------------------------------------------------------------------------------
# Execution on the organism
# ------------------------------------------------------------------------------------------
@functools.cache
def _run(name: str) -> Any:
    """Run the notebook in a fresh python3 kernel on the organism; return it with its outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    env = {**os.environ, "HOOKPATCH_MODEL": "organism", "CUDA_VISIBLE_DEVICES": "",
           "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute(env=env)  # raises CellExecutionError, with the traceback, if a cell fails
    return nb


def _execute(name: str) -> dict:
    """Run the notebook (once per session) and return the RESULTS its last cell prints."""
    cell = _run(name).cells[-1]
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")
    return json.loads(text)


@pytest.fixture(scope="module")
def organism():
    return load_model("organism", device="cpu")


def _logit_diffs(model, prompts, tokens) -> list[float]:
    """``logit[correct] − logit[incorrect]`` at each prompt's END from a plain forward pass."""
    with torch.no_grad():
        logits = model(tokens)
    rows = torch.arange(len(prompts))
    end = logits[rows, prompts.end]
    return (end[rows, prompts.answer_tokens[:, 0]] - end[rows, prompts.answer_tokens[:, 1]]).tolist()


def _close(a, b, tol=1e-3) -> bool:
    return all(math.isclose(x, y, rel_tol=tol, abs_tol=tol) for x, y in zip(a, b, strict=True))


def _replace_head(z, hook, head, source):
    z[:, :, head] = source[:, :, head]
    return z


@functools.cache
def _head_patching(n: int, seed: int) -> tuple[list[str], list[float], float, float]:
    """Each head's ``z`` (all positions) patched clean → corrupted, by hand: mean logit diff per head."""
    model = load_model("organism", device="cpu")
    prompts = ioi_prompts(model, n, corruption="s2", seed=seed)
    with torch.no_grad():
        _, cache = model.run_with_cache(prompts.clean_tokens)
    labels, patched = [], []
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.attn.hook_z"
        for head in range(model.cfg.n_heads):
            hook = functools.partial(_replace_head, head=head, source=cache[name])
            with torch.no_grad():
                logits = model.run_with_hooks(prompts.corrupted_tokens, fwd_hooks=[(name, hook)])
            rows = torch.arange(len(prompts))
            end = logits[rows, prompts.end]
            diff = end[rows, prompts.answer_tokens[:, 0]] - end[rows, prompts.answer_tokens[:, 1]]
            labels.append(f"L{layer}H{head}")
            patched.append(float(diff.mean()))
    clean = float(np.mean(_logit_diffs(model, prompts, prompts.clean_tokens)))
    corrupted = float(np.mean(_logit_diffs(model, prompts, prompts.corrupted_tokens)))
    return labels, patched, clean, corrupted


def _with_kernel_marks(fn):
    for mark in kernel_warnings:
        fn = mark(fn)
    return needs_kernel(fn)


@_with_kernel_marks
def test_pronoun_notebook(organism):
    results = _execute("pronoun_case_study")
    assert results["model"] == "organism"
    prompts = pronoun_prompts(organism)
    assert results["n_prompts"] == len(prompts) == 20
    assert _close(results["clean_logit_diff"], _logit_diffs(organism, prompts, prompts.clean_tokens))
    assert _close(results["corrupted_logit_diff"], _logit_diffs(organism, prompts, prompts.corrupted_tokens))
    pair = prompts.select([0])
    assert _close([results["pair_clean_logit_diff"]], _logit_diffs(organism, pair, pair.clean_tokens))
    assert _close([results["pair_corrupted_logit_diff"]], _logit_diffs(organism, pair, pair.corrupted_tokens))

    # top heads by DLA: hookpatch, and TransformerLens' own recipe from its pronoun notebook
    ranked = rank_heads(dla_by_head(organism, prompts, LogitDiff(prompts)), k=3)
    assert results["top_dla_heads"] == ranked[ranked["sign"] == "positive"]["label"].tolist()
    with torch.no_grad():
        _, cache = organism.run_with_cache(prompts.clean_tokens)  # all prompts have one length
        per_head, labels = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True, return_labels=True)
    direction = (organism.W_U[:, prompts.answer_tokens[:, 0]] - organism.W_U[:, prompts.answer_tokens[:, 1]]).T
    dla = (per_head * direction).sum(-1).mean(-1)  # [layer * head]
    assert results["top_dla_heads"][0] == labels[int(dla.argmax())]

    b_U = organism.b_U.detach()
    assert math.isclose(results["unembed_bias"]["he"], float(b_U[to_single_token(organism, " he")]), abs_tol=1e-6)
    assert math.isclose(results["unembed_bias"]["she"], float(b_U[to_single_token(organism, " she")]), abs_tol=1e-6)
    assert math.isclose(results["resid_patch_name_layer0"], 1.0, abs_tol=1e-4)

    # what the reader is told holds: every prompt prefers the right pronoun; the name swap maps
    # the set onto itself with the answers exchanged, so the corrupted mean mirrors the clean one
    clean = results["clean_logit_diff"]
    assert min(clean) > 0
    assert _close([np.mean(results["corrupted_logit_diff"])], [-np.mean(clean)])
    # the lens ends at the model's own output; the DLA parts plus the unembedding bias add up to it
    assert _close([results["logit_lens_final"][0]], [np.mean(clean)])
    assert _close([sum(results["dla_layer_parts"]) + np.mean(results["dla_bias"])], [np.mean(clean)])
    # before layer 0 only the name differs: patching it gives back the clean run, on every prompt
    assert math.isclose(results["resid_all_name_layer0"], 1.0, abs_tol=1e-4)


@_with_kernel_marks
def test_ioi_notebook(organism):
    results = _execute("ioi_case_study")
    assert results["model"] == "organism"
    n, seed = results["n_prompts"], results["seed"]
    prompts = ioi_prompts(organism, n, corruption="s2", seed=seed)
    assert _close(results["clean_logit_diff"], _logit_diffs(organism, prompts, prompts.clean_tokens))
    assert _close(results["corrupted_logit_diff"], _logit_diffs(organism, prompts, prompts.corrupted_tokens))
    abc = ioi_prompts(organism, n, corruption="abc", seed=seed)
    assert _close([results["abc_clean_mean"]], [np.mean(_logit_diffs(organism, abc, abc.clean_tokens))])
    assert _close([results["abc_corrupted_mean"]], [np.mean(_logit_diffs(organism, abc, abc.corrupted_tokens))])

    # the top head by DLA is the organism's computed top head on this prompt set
    top = rank_heads(dla_by_head(organism, prompts, LogitDiff(prompts)), k=1)
    assert results["dla_top_head"] == top[top["sign"] == "positive"]["label"].iloc[0]
    assert results["dla_top_heads"][0] == results["dla_top_head"]

    # the head that restores most when patched, from a hand-written run_with_hooks loop
    labels, patched, _, _ = _head_patching(n, seed)
    assert results["head_patching_top"] == labels[int(np.argmax(patched))]

    layer0 = results["resid_layer0"]
    assert list(layer0) == ["IO", "S1", "S1+1", "S2", "END"]
    assert math.isclose(layer0["S2"], 1.0, abs_tol=1e-4)
    assert all(abs(layer0[p]) < 1e-4 for p in ("IO", "S1", "S1+1"))

    # the S2 corruption flips the preferred name, the ABC one leaves no preference
    baselines = results["normalized_baselines"]
    assert baselines["clean"] > 0 > baselines["corrupted"]
    assert _close([baselines["clean"], baselines["corrupted"]],
                  [np.mean(results["clean_logit_diff"]), np.mean(results["corrupted_logit_diff"])])
    assert abs(results["abc_corrupted_mean"]) < results["abc_clean_mean"]
    # the top DLA head pushes the right way; a layer's heads plus its output bias are its attention DLA
    layer, head = map(int, re.fullmatch(r"L(\d+)H(\d+)", results["dla_top_head"]).groups())
    assert results["dla_heads"][layer][head] > 0
    for layer, heads in enumerate(results["dla_heads"]):
        assert _close([sum(heads) + np.mean(results["dla_attn_bias"][layer])],
                      [results["dla_layers"][f"{layer}_attn_out"]])


@_with_kernel_marks
def test_attribution_notebook():
    results = _execute("attribution_vs_patching")
    assert results["model"] == "organism"
    stats = results["statistics"]
    assert set(stats) == {"resid_pre", "resid_pre, IG", "z", "z, IG", "mlp_out", "q", "k"}
    for name, values in stats.items():
        for key in ("pearson", "spearman"):
            value = values[key]
            # mlp_out may be undefined (NaN): the organism's MLPs write nothing, so attribution is all 0
            if not (name == "mlp_out" and math.isnan(value)):
                assert -1.0 - 1e-9 <= value <= 1.0 + 1e-9, (name, key, value)
        for key in ("top_k_overlap", "sign_agreement"):
            assert 0.0 <= values[key] <= 1.0, (name, key, values[key])

    # the harness' Pearson is the correlation of the cell means it reports
    cells = results["heads_cells"]
    assert math.isclose(stats["z"]["pearson"], float(np.corrcoef(cells["activation"], cells["attribution"])[0, 1]),
                        abs_tol=1e-6)
    # activation patching's effect per head, against the hand-written patching loop
    labels, patched, clean, corrupted = _head_patching(results["n_prompts"], results["seed"])
    assert cells["label"] == labels
    expected = [(p - corrupted) / (clean - corrupted) for p in patched]
    assert _close(cells["activation"], expected, tol=1e-4)
    # integrated gradients is at least as faithful as plain attribution where the patch is large
    assert stats["resid_pre, IG"]["pearson"] >= stats["resid_pre"]["pearson"] - 0.02
    assert results["resid_worst_cell"].startswith("L")
    # cells no patch can move agree exactly: before layer 0 only S2 differs, so IO and S1 are 0 in both
    resid = results["resid_cells"]
    for label in ("L0 @ IO", "L0 @ S1"):
        i = resid["label"].index(label)
        assert abs(resid["activation"][i]) < 1e-4 and abs(resid["attribution"][i]) < 1e-4


def test_nnsight_guide_needs_no_nnsight():
    """The guide shows nnsight's code as text beside runnable hookpatch cells: no cell imports it."""
    nb = _read("coming_from_nnsight")
    for source in _code(nb):
        assert not re.search(r"^\s*(import|from)\s+nnsight", source, re.M), source
    prose = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "tracer.invoke(" in prose and "o_proj.input" in prose  # the recipes it translates, shown
    assert "h[l].output[0][:, tok]" in prose  # the pitfall, named


def _write_position(act, hook, index, source):
    act[:, index] = source[:, index]
    return act


def _write_head(act, hook, index, source):
    act[:, :, index] = source[:, :, index]
    return act


def _patched_logit_diffs(model, prompts, hook_name, write, cells, noising=False) -> list[float]:
    """Hand-written patching loop over one prompt: per ``(layer, index)`` cell one
    ``run_with_hooks`` of the target run in which ``write`` copies the source run's activation
    at ``hook_name`` (position or head ``index``); the logit difference at END of each."""
    source, target = ((prompts.corrupted_tokens, prompts.clean_tokens) if noising
                      else (prompts.clean_tokens, prompts.corrupted_tokens))
    with torch.no_grad():
        _, cache = model.run_with_cache(source)
    correct, incorrect = prompts.answer_tokens[0].tolist()
    out = []
    for layer, index in cells:
        name = hook_name.format(layer=layer)
        hook = functools.partial(write, index=index, source=cache[name])
        with torch.no_grad():
            end = model.run_with_hooks(target, fwd_hooks=[(name, hook)])[0, int(prompts.end[0])]
        out.append(float(end[correct] - end[incorrect]))
    return out


def _normalized_grid(model, prompts, hook_name, write, n_layers, n_inner, noising=False) -> list[list[float]]:
    """:func:`_patched_logit_diffs` over ``n_layers × n_inner`` cells, normalized by the plain
    forward passes' logit differences (1 = clean run, 0 = corrupted run)."""
    cells = [(layer, i) for layer in range(n_layers) for i in range(n_inner)]
    clean = _logit_diffs(model, prompts, prompts.clean_tokens)[0]
    corrupted = _logit_diffs(model, prompts, prompts.corrupted_tokens)[0]
    flat = [(v - corrupted) / (clean - corrupted)
            for v in _patched_logit_diffs(model, prompts, hook_name, write, cells, noising)]
    return [flat[i * n_inner:(i + 1) * n_inner] for i in range(n_layers)]


@_with_kernel_marks
def test_nnsight_guide_notebook(organism):
    results = _execute("coming_from_nnsight")
    assert results["model"] == "organism"
    prompts = make_prompt_set(organism, [results["clean"]], [results["corrupted"]], [(" John", " Mary")])
    assert _close([results["clean_logit_diff"]], _logit_diffs(organism, prompts, prompts.clean_tokens))
    assert _close([results["corrupted_logit_diff"]], _logit_diffs(organism, prompts, prompts.corrupted_tokens))
    n_layers, n_heads, n_pos = organism.cfg.n_layers, organism.cfg.n_heads, prompts.n_pos

    # the residual stream at each block's output (nnsight's h[l].output), both directions,
    # and each head's z at all positions, against hand-written run_with_hooks loops
    resid = _normalized_grid(organism, prompts, "blocks.{layer}.hook_resid_post", _write_position, n_layers, n_pos)
    assert _close(np.ravel(results["resid_post"]), np.ravel(resid), tol=1e-4)
    noising = _normalized_grid(organism, prompts, "blocks.{layer}.hook_resid_post", _write_position, n_layers, n_pos,
                               noising=True)
    assert _close(np.ravel(results["noising"]), np.ravel(noising), tol=1e-4)
    heads = _normalized_grid(organism, prompts, "blocks.{layer}.attn.hook_z", _write_head, n_layers, n_heads)
    assert _close(np.ravel(results["heads"]), np.ravel(heads), tol=1e-4)
    best = int(np.argmax(np.ravel(heads)))
    assert results["heads_top"] == f"L{best // n_heads}H{best % n_heads}"
    assert len(results["resid_post_pos_labels"]) == n_pos and results["resid_post_pos_labels"][-1].endswith("(END)")
    # at the last layer's output only END reaches the logits; patching it there gives the clean run back
    assert math.isclose(results["resid_post"][-1][-1], 1.0, abs_tol=1e-4)
    assert all(abs(v) < 1e-4 for v in results["resid_post"][-1][:-1])
    # noising at the last block's output, END: the corrupted run
    assert math.isclose(results["noising"][-1][-1], 0.0, abs_tol=1e-4)

    # grouped-query attention: the same random model (tiny_model is deterministic), query heads
    # through z and KV heads through v, by hand; the head map from the config's group size
    gqa = tiny_model("llama", n_layers=2, d_model=64, n_heads=8, n_kv_heads=2, d_mlp=128)
    config = gqa.original_model.config
    n_q, n_kv = config.num_attention_heads, config.num_key_value_heads
    assert (results["gqa_n_heads"], results["gqa_n_kv_heads"]) == (n_q, n_kv) == (8, 2)
    group = n_q // n_kv  # HuggingFace's repeat_kv: query head h reads KV head h // group
    assert results["gqa_head_map"] == {f"KV{kv}": [f"H{h}" for h in range(n_q) if h // group == kv]
                                       for kv in range(n_kv)}
    assert results["gqa_z_labels"] == [f"H{h}" for h in range(n_q)]
    assert results["gqa_v_labels"] == [f"KV{kv}" for kv in range(n_kv)]
    gqa_prompts = make_prompt_set(gqa, [results["clean"]], [results["corrupted"]], [(" John", " Mary")])
    assert _close([results["gqa_clean_logit_diff"]], _logit_diffs(gqa, gqa_prompts, gqa_prompts.clean_tokens))
    assert _close([results["gqa_corrupted_logit_diff"]], _logit_diffs(gqa, gqa_prompts, gqa_prompts.corrupted_tokens))
    z = _normalized_grid(gqa, gqa_prompts, "blocks.{layer}.attn.hook_z", _write_head, 2, n_q)
    assert _close(np.ravel(results["gqa_z"]), np.ravel(z), tol=1e-4)
    v = _normalized_grid(gqa, gqa_prompts, "blocks.{layer}.attn.hook_v", _write_head, 2, n_kv)
    assert _close(np.ravel(results["gqa_v"]), np.ravel(v), tol=1e-4)
    assert model_facts(gqa).n_heads_of("v") == n_kv

    # the refusals name the argument and what was expected
    assert f"position {n_pos} is out of range" in results["position_error"] and f"0..{n_pos - 1}" in results[
        "position_error"]
    assert "heads=" in results["heads_error"] and "no head axis" in results["heads_error"]


@_with_kernel_marks
@pytest.mark.skipif(importlib.util.find_spec("nbconvert") is None, reason="needs nbconvert (pip install -e '.[test]')")
def test_figures_survive_html_export():
    """Exported to HTML (what nbconvert and Jupyter's "Save and Export" write), the executed
    notebook keeps every plotly figure, with its data and plotly.js inlined (no CDN)."""
    from nbconvert import HTMLExporter

    nb = _run("pronoun_case_study")
    figures = [o["data"]["application/vnd.plotly.v1+json"] for c in nb.cells if c.cell_type == "code"
               for o in c.outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) >= 6
    html, _ = HTMLExporter().from_notebook_node(nb)
    assert html.count("Plotly.newPlot(") >= len(figures)
    assert not re.search(r"<script[^>]+src=[^>]*plotly", html), "plotly.js loaded from the network"
    assert "plotly.js v" in html or "Plotly=" in html or "window.Plotly" in html  # the library, inlined
    for figure in figures:  # each figure's title and data travel in the page
        title = figure["layout"]["title"]["text"]
        assert json.dumps(title)[1:-1] in html, title
        first = figure["data"][0]
        values = first.get("z", first.get("y"))
        assert values is not None and json.dumps(values, separators=(",", ":"))[:40] in html.replace(" ", "")


@needs_kernel
def test_kernel_is_this_interpreter():
    """The python3 kernel that nbclient starts runs this interpreter, where hookpatch is installed."""
    from jupyter_client.manager import KernelManager

    command = KernelManager(kernel_name="python3").format_kernel_cmd()
    assert Path(command[0]).resolve() == Path(sys.executable).resolve()
