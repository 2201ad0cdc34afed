"""Path patching views and the IOI report's path patching section: every number a figure
draws is the result's paired effect (checked against values − baseline computed here), its
labels are the result's senders and receivers, and wrong results are refused by name."""

from __future__ import annotations

import pytest
import torch

import hookpatch
from hookpatch.circuits import path_patch_sweep
from hookpatch.errors import HookpatchError
from hookpatch.metrics import LogitDiff, Normalized
from hookpatch.readouts import dla_by_head
from hookpatch.report import Report, _path_patching_section, path_patching_sentences, path_receivers
from hookpatch.sweeps import patch_sweep
from hookpatch.tasks._ioi import ioi_prompts
from hookpatch.views import path_patching_bars, path_patching_heatmap

RECEIVERS = ["L1H0", "L1H2"]


@pytest.fixture(scope="module")
def prompts(gpt2_model):
    return hookpatch.pronoun_prompts(gpt2_model, n=3, seed=0)


@pytest.fixture(scope="module")
def metric(prompts):
    return LogitDiff(prompts)


@pytest.fixture(scope="module")
def sweep(gpt2_model, prompts, metric):
    """path_patch_sweep into RECEIVERS' queries, cached per grid, semantics and direction."""
    cache = {}

    def run(by=("layer", "head"), semantics="direct", direction="denoising"):
        key = (by, semantics, direction)
        if key not in cache:
            cache[key] = path_patch_sweep(gpt2_model, prompts, metric, RECEIVERS, receiver_input="q", by=by,
                                          semantics=semantics, direction=direction, progress=False)
        return cache[key]
    return run


def _reference_mean(result, baseline):
    """The mean paired effect, computed here from the stored per-prompt values."""
    base = {"corrupted": result.corrupted, "clean": result.clean}[baseline]
    return (result.values - base).mean(-1)


@pytest.mark.parametrize("semantics, direction, baseline",
                         [("direct", "denoising", "corrupted"), ("ioi", "noising", "clean")])
def test_layer_head_heatmap_draws_the_paired_effects(sweep, semantics, direction, baseline):
    result = sweep(semantics=semantics, direction=direction)
    eff = result.effects()
    fig = path_patching_heatmap(result).to_dict()
    (trace,) = fig["data"]
    z, hover = torch.tensor(trace["z"]), torch.tensor(trace["customdata"])  # [layer, head], [layer, head, 4]
    assert z.shape == (1, 4)  # only layer 0 sends to layer-1 receivers
    assert torch.allclose(z, _reference_mean(result, baseline), atol=1e-6)
    assert torch.allclose(hover[..., 0], z)
    assert torch.equal(hover[..., 1], eff.ci_low) and torch.equal(hover[..., 2], eff.ci_high)
    assert torch.equal(hover[..., 3], eff.p_adjusted.float())
    assert bool((hover[..., 1] <= z + 1e-7).all() and (z <= hover[..., 2] + 1e-7).all())
    assert list(trace["x"]) == ["H0", "H1", "H2", "H3"] and list(trace["y"]) == ["0"]
    assert trace["zmid"] == 0 and trace["colorscale"][0][1] == "rgb(103,0,31)"  # RdBu around 0
    assert "p (%{meta})" in trace["hovertemplate"] and trace["meta"] == "holm"
    title = fig["layout"]["title"]["text"]
    assert f"({semantics})" in title and "L1H0.q, L1H2.q" in title and direction in title
    assert f"patched − {baseline} run" in trace["colorbar"]["title"]["text"]
    layout = fig["layout"]
    assert layout["xaxis"]["title"]["text"] == "Head" and layout["yaxis"]["title"]["text"] == "Layer"
    assert path_patching_heatmap(result, title="Mine").to_dict()["layout"]["title"]["text"] == "Mine"


def test_sender_receiver_heatmap(sweep):
    result = sweep(by=("sender", "receiver"))
    eff = result.effects()
    (trace,) = path_patching_heatmap(result).to_dict()["data"]
    assert list(trace["y"]) == ["input", "L0H0", "L0H1", "L0H2", "L0H3", "MLP0"]
    assert list(trace["x"]) == ["L1H0.q", "L1H2.q"]
    z = torch.tensor(trace["z"])
    assert torch.allclose(z, _reference_mean(result, "corrupted"), atol=1e-6)
    assert torch.equal(torch.tensor(trace["customdata"])[..., 1], eff.ci_low)
    assert "Sender %{y}<br>Receiver %{x}" in trace["hovertemplate"]
    # each single edge into one receiver: the (sender, receiver) cells differ across receivers
    assert not torch.allclose(z[:, 0], z[:, 1])


def test_layer_pos_head_heatmap_has_one_facet_per_head(sweep):
    result = sweep(by=("layer", "pos", "head"))
    eff = result.effects()
    fig = path_patching_heatmap(result).to_dict()
    assert [t["name"] for t in fig["data"]] == list(result.labels["head"])
    assert [a["text"] for a in fig["layout"]["annotations"]] == list(result.labels["head"])
    reference = _reference_mean(result, "corrupted")  # [layer, pos, head]
    for h, trace in enumerate(fig["data"]):
        assert list(trace["x"]) == list(result.labels["pos"]) and list(trace["y"]) == list(result.labels["layer"])
        assert torch.allclose(torch.tensor(trace["z"]), reference[:, :, h], atol=1e-6)
        assert torch.equal(torch.tensor(trace["customdata"])[..., 2], eff.ci_high[:, :, h])
        assert trace["coloraxis"] == "coloraxis"
    assert fig["layout"]["coloraxis"]["cmid"] == 0


def test_bars_rank_the_top_senders_with_their_intervals(sweep):
    result = sweep()
    eff = result.effects()
    (bar,) = path_patching_bars(result, k=3).to_dict()["data"]
    reference = _reference_mean(result, "corrupted")[0]  # [head]: layer 0 only
    order = sorted(range(4), key=lambda h: -abs(float(reference[h])))[:3]
    assert list(bar["x"]) == [f"L0H{h}" for h in order]
    assert bar["y"] == pytest.approx([float(reference[h]) for h in order], abs=1e-6)
    y = torch.tensor(bar["y"])
    high = torch.tensor([float(eff.ci_high[0, h]) for h in order])
    low = torch.tensor([float(eff.ci_low[0, h]) for h in order])
    assert torch.allclose(torch.tensor(bar["error_y"]["array"]), high - y, atol=1e-6)
    assert torch.allclose(torch.tensor(bar["error_y"]["arrayminus"]), y - low, atol=1e-6)
    assert bar["marker"]["color"] == ["#2166ac" if v >= 0 else "#b2182b" for v in bar["y"]]
    # more than there are cells: every sender, still sorted by |mean|
    (every,) = path_patching_bars(result, k=100).to_dict()["data"]
    assert len(every["x"]) == 4 and list(torch.tensor(every["y"]).abs()) == sorted(torch.tensor(every["y"]).abs(),
                                                                                   reverse=True)


@pytest.mark.parametrize("by, expected", [
    (("sender",), {"input", "L0H0", "L0H1", "L0H2", "L0H3", "MLP0"}),
    (("sender", "receiver"), {f"{s}->{r}" for s in ("input", "L0H0", "L0H1", "L0H2", "L0H3", "MLP0")
                              for r in ("L1H0.q", "L1H2.q")}),
])
def test_bars_label_senders_and_edges(sweep, by, expected):
    result = sweep(by=by)
    (bar,) = path_patching_bars(result, k=100).to_dict()["data"]
    assert set(bar["x"]) == expected
    reference = _reference_mean(result, "corrupted").reshape(-1)
    labels = list(result.labels["sender"]) if by == ("sender",) else [
        f"{s}->{r}" for s in result.labels["sender"] for r in result.labels["receiver"]]
    flat = dict(zip(labels, reference.tolist(), strict=True))
    assert bar["y"] == pytest.approx([flat[x] for x in bar["x"]], abs=1e-6)


def test_bars_label_positions(sweep):
    result = sweep(by=("layer", "pos", "head"))
    (bar,) = path_patching_bars(result, k=2).to_dict()["data"]
    reference = _reference_mean(result, "corrupted")[0]  # [pos, head]
    pos, head = divmod(int(reference.abs().reshape(-1).argmax()), 4)
    assert bar["x"][0] == f"L0H{head} @ {result.labels['pos'][pos]}"


def test_bad_input_is_refused_by_name(gpt2_model, prompts, metric, sweep):
    patched = patch_sweep(gpt2_model, prompts, metric, "z", by=("layer", "head"), progress=False)
    for view in (path_patching_heatmap, path_patching_bars):
        with pytest.raises(HookpatchError, match=r"method is 'patch'.*path_patch_sweep.*patching_heatmap"):
            view(patched)
    with pytest.raises(HookpatchError, match=r"axes \('sender',\).*path_patching_bars"):
        path_patching_heatmap(sweep(by=("sender",)))
    for k in (0, -1, 2.5):
        with pytest.raises(HookpatchError, match="k="):
            path_patching_bars(sweep(), k=k)


def test_sentences_name_the_top_senders_with_their_intervals(sweep):
    result = sweep(semantics="ioi")
    eff = result.effects()
    text = path_patching_sentences(result)
    order = sorted(range(4), key=lambda h: -abs(float(eff.mean[0, h])))
    for h in order[:2]:
        m, lo, hi = (float(t[0, h]) for t in (eff.mean, eff.ci_low, eff.ci_high))
        assert f"L0H{h} ({m:+.3g} [{lo:+.3g}, {hi:+.3g}])" in text
    assert f"L0H{order[2]} (" not in text
    excluding = int(((eff.ci_low > 0) | (eff.ci_high < 0)).sum())
    assert text.startswith("Through the queries of L1H0, L1H2, the sender heads")
    assert text.endswith(f"{excluding} of 4 sender heads have an interval that excludes 0.")


def test_path_receivers_skip_layer_zero_and_weak_heads(gpt2_model, prompts, metric):
    dla = dla_by_head(gpt2_model, prompts, metric)
    mean = dla.mean()
    later = sorted(((float(mean[1, h]), f"L1H{h}") for h in range(4) if float(mean[1, h]) > 0), reverse=True)
    expected = [label for value, label in later[:3] if value >= 0.1 * later[0][0]]
    assert path_receivers(dla) == expected
    assert all(not r.startswith("L0") for r in path_receivers(dla, k=8, min_share=0.0))


def test_ioi_report_section_on_the_organism():
    model = hookpatch.load_model("organism")
    prompts = ioi_prompts(model, 4)
    base = LogitDiff(prompts)
    dla = dla_by_head(model, prompts, base)
    receivers = path_receivers(dla)
    assert receivers and all(int(r[1]) >= 1 for r in receivers) and len(receivers) <= 3
    report = Report("t")
    _path_patching_section(report, model, prompts, Normalized.from_model(model, base), dla, progress=False)
    ((title, body),) = report.sections
    assert title == "Path patching into the top heads' queries"
    assert "Plotly.newPlot" in body and "Through the queries of " + ", ".join(receivers) + " at END" in body
    assert report.summary[0].startswith("path patching: Through the queries of")
