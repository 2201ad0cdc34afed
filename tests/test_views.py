"""Views: figure dicts carry the result's labels, shapes, titles and colour midpoints; the
attention view's HTML is offline (inlined circuitsvis bundle, no CDN) and names its heads."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from hookpatch.attribution import compare
from hookpatch.errors import HookpatchError
from hookpatch.metrics import LogitDiff, Normalized
from hookpatch.readouts import dla_by_component, dla_by_head, logit_lens, rank_heads
from hookpatch.results import SweepResult
from hookpatch.sweeps import ablation_sweep, patch_sweep
from hookpatch.tasks import ioi_prompts, pronoun_prompts
from hookpatch.views import (
    ablation_heatmap,
    attention_view,
    attention_view_html,
    comparison_scatter,
    dla_bars,
    dla_heads_heatmap,
    javascript,
    logit_lens_line,
    patching_heatmap,
    ranked_heads_bar,
)
from hookpatch.views._attention import bundle_path


@pytest.fixture(scope="module")
def prompts(gpt2_model):
    return pronoun_prompts(gpt2_model, n=4)


@pytest.fixture(scope="module")
def metric(gpt2_model, prompts):
    return LogitDiff(prompts)


def _heatmap(fig):
    (trace,) = [t for t in fig.to_dict()["data"] if t["type"] == "heatmap"]
    return trace


def test_patching_heatmap_layer_pos_uses_the_result_labels(gpt2_model, prompts, metric):
    norm = Normalized.from_model(gpt2_model, metric)
    result = patch_sweep(gpt2_model, prompts, norm, "resid_pre", progress=False)
    fig = patching_heatmap(result).to_dict()
    trace = fig["data"][0]
    assert len(trace["z"]) == result.shape[0] and len(trace["z"][0]) == result.shape[1]
    assert list(trace["x"]) == list(result.labels["pos"]) and list(trace["y"]) == list(result.labels["layer"])
    assert trace["colorscale"][0][1] == "rgb(103,0,31)" and trace["zmid"] == 0  # RdBu
    assert "1 = clean, 0 = corrupted" in trace["colorbar"]["title"]["text"]
    layout = fig["layout"]
    assert layout["xaxis"]["title"]["text"] == "Position" and layout["yaxis"]["title"]["text"] == "Layer"
    assert list(layout["xaxis"]["ticktext"]) == list(result.labels["pos"])
    assert "resid_pre" in layout["title"]["text"] and "normalized_logit_diff" in layout["title"]["text"]
    assert torch.allclose(torch.tensor(trace["z"]), result.mean())
    assert patching_heatmap(result, title="Mine").to_dict()["layout"]["title"]["text"] == "Mine"


def test_patching_heatmap_layer_head(gpt2_model, prompts, metric):
    result = patch_sweep(gpt2_model, prompts, metric, "z", by=("layer", "head"), progress=False)
    fig = patching_heatmap(result).to_dict()
    trace = fig["data"][0]
    assert list(trace["x"]) == ["H0", "H1", "H2", "H3"] and len(trace["z"]) == 2
    assert fig["layout"]["xaxis"]["title"]["text"] == "Head"
    assert "1 = clean" not in trace["colorbar"]["title"]["text"]  # not normalized


def test_patching_heatmap_layer_pos_head_has_one_facet_per_head(gpt2_model, prompts, metric):
    result = patch_sweep(gpt2_model, prompts, metric, "z", by=("layer", "pos", "head"), progress=False)
    fig = patching_heatmap(result).to_dict()
    traces = fig["data"]
    assert [t["name"] for t in traces] == list(result.labels["head"])
    assert [a["text"] for a in fig["layout"]["annotations"]] == list(result.labels["head"])
    for h, trace in enumerate(traces):
        assert list(trace["x"]) == list(result.labels["pos"]) and list(trace["y"]) == list(result.labels["layer"])
        assert torch.allclose(torch.tensor(trace["z"]), result.mean()[:, :, h])
        effect = (result.values - result.corrupted).mean(-1)[:, :, h]  # denoising: vs the corrupted run
        assert torch.allclose(torch.tensor(trace["customdata"])[..., 0], effect, atol=1e-6)
        assert "effect vs corrupted" in trace["hovertemplate"]
        assert trace["coloraxis"] == "coloraxis"
    assert fig["layout"]["coloraxis"]["cmid"] == 0
    assert fig["layout"]["coloraxis"]["colorscale"][0][1] == "rgb(103,0,31)"
    titles = {
        k: v["title"]["text"] for k, v in fig["layout"].items() if k.startswith(("xaxis", "yaxis")) and "title" in v
    }
    assert set(titles.values()) == {"Position", "Layer"}


def test_ablation_heatmap_midpoint_is_the_clean_mean(gpt2_model, prompts, metric):
    result = ablation_sweep(gpt2_model, prompts, metric, "z", how="mean", progress=False)
    fig = ablation_heatmap(result).to_dict()
    trace = fig["data"][0]
    assert trace["zmid"] == pytest.approx(float(result.clean.mean()))
    assert trace["colorscale"][0][1] == "rgb(103,0,31)"
    assert list(trace["x"]) == list(result.labels["head"]) and fig["layout"]["xaxis"]["title"]["text"] == "Head"
    assert "Mean ablation" in fig["layout"]["title"]["text"]
    # the hover carries each head's change from the clean run with its paired CI and p-value
    hover = torch.tensor(trace["customdata"])  # [layer, head, 4]
    eff = result.effects()
    assert torch.allclose(hover[..., 0], (result.values - result.clean).mean(-1), atol=1e-6)
    assert torch.allclose(hover[..., 1], eff.ci_low) and torch.allclose(hover[..., 3], eff.p_adjusted.float())
    assert "effect vs clean" in trace["hovertemplate"] and "p (holm)" in trace["hovertemplate"]
    # ranked bars of the ablation: the change from the clean run, paired error bars
    table = rank_heads(result, k=2)
    bars = ranked_heads_bar(table).to_dict()
    by_label = dict(zip(table["label"], table["effect_mean"], strict=True))
    change = (result.values - result.clean).mean(-1)
    for bar in bars["data"]:
        for label, y in zip(bar["x"], bar["y"], strict=True):
            layer, head = int(label[1]), int(label[3])
            assert y == pytest.approx(float(change[layer, head]), abs=1e-6) == by_label[label]
    assert bars["layout"]["yaxis"]["title"]["text"] == "effect (intervened − clean run)"
    patch = patch_sweep(gpt2_model, prompts, metric, "z", by=("layer", "head"), progress=False)
    with pytest.raises(HookpatchError, match="patching_heatmap"):
        ablation_heatmap(patch)


def test_logit_lens_line_one_trace_per_result(gpt2_model, prompts, metric):
    lenses = [logit_lens(gpt2_model, prompts, metric, convention=c) for c in ("final_scale", "renormalized")]
    fig = logit_lens_line(lenses).to_dict()
    lines = [t for t in fig["data"] if t["mode"] == "lines+markers"]
    assert [t["name"] for t in lines] == ["final_scale", "renormalized"]
    for line, lens in zip(lines, lenses, strict=True):
        assert list(line["x"]) == list(lens.labels["point"]) == ["0_pre", "0_mid", "1_pre", "1_mid", "final_post"]
        assert torch.allclose(torch.tensor(line["y"]), lens.mean())
        assert "%{x}" in line["hovertemplate"] and "%{y" in line["hovertemplate"]
    assert [t["name"] for t in fig["data"] if t.get("fill") == "toself"] == ["final_scale CI", "renormalized CI"]
    assert list(fig["layout"]["xaxis"]["ticktext"]) == list(lenses[0].labels["point"])
    single = logit_lens_line(lenses[0], ci=False, names=["lens"]).to_dict()
    assert [t["name"] for t in single["data"]] == ["lens"]


def test_dla_views(gpt2_model, prompts, metric):
    parts = dla_by_component(gpt2_model, prompts, metric)
    fig = dla_bars(parts).to_dict()
    bar = fig["data"][0]
    assert list(bar["x"]) == list(parts.labels["component"]) and len(bar["y"]) == parts.shape[0]
    assert len(bar["error_y"]["array"]) == parts.shape[0]
    assert fig["layout"]["xaxis"]["title"]["text"] == "Component"

    heads = dla_by_head(gpt2_model, prompts, metric)
    trace = _heatmap(dla_heads_heatmap(heads))
    assert list(trace["x"]) == list(heads.labels["head"]) and trace["zmid"] == 0
    assert torch.allclose(torch.tensor(trace["z"]), heads.mean())

    table = rank_heads(heads, k=2)
    fig = ranked_heads_bar(table, value_title="DLA").to_dict()
    assert sorted(x for t in fig["data"] for x in t["x"]) == sorted(table["label"])
    assert {t["name"] for t in fig["data"]} == set(table["sign"])
    assert all(label.startswith("L") and "H" in label for label in fig["layout"]["xaxis"]["ticktext"])
    for trace in fig["data"]:
        rows = table[table["sign"] == trace["name"]]
        assert trace["error_y"]["array"] == pytest.approx((rows["effect_ci_high"] - rows["effect_mean"]).tolist())
        assert trace["error_y"]["arrayminus"] == pytest.approx((rows["effect_mean"] - rows["effect_ci_low"]).tolist())


def test_comparison_scatter_has_a_diagonal_and_the_correlations(gpt2_model, prompts, metric):
    cmp = compare(gpt2_model, prompts, metric, "z", by=("layer", "head"), k=3, n_resamples=50, progress=False)
    fig = comparison_scatter(cmp).to_dict()
    cells, diagonal = fig["data"]
    assert list(cells["text"]) == list(cmp.to_dataframe()["label"])
    assert cells["x"] == pytest.approx(cmp.to_dataframe()["attribution"].tolist())
    assert diagonal["name"] == "y = x" and list(diagonal["x"]) == list(diagonal["y"])
    title = fig["layout"]["title"]["text"]
    assert "Pearson" in title and repr(cmp.pearson) in title and repr(cmp.spearman) in title
    assert "Attribution" in fig["layout"]["xaxis"]["title"]["text"]


def test_views_refuse_results_on_the_wrong_axes():
    point = SweepResult(values=torch.zeros(3, 2), axes=("point",), labels={"point": ("a", "b", "c")},
                        clean=torch.zeros(2))
    grid = SweepResult(values=torch.zeros(2, 3, 2), axes=("layer", "pos"),
                       labels={"layer": ("0", "1"), "pos": ("0: a", "1: b", "2: c")}, clean=torch.zeros(2))
    for view, bad in [(patching_heatmap, point), (ablation_heatmap, point), (logit_lens_line, grid),
                      (dla_bars, grid), (dla_heads_heatmap, grid)]:
        with pytest.raises(HookpatchError, match=r"axes \("):
            view(bad)
    with pytest.raises(HookpatchError, match="columns"):
        ranked_heads_bar(grid.to_dataframe())


def test_attention_view_is_offline_and_names_heads_and_tokens(gpt2_model):
    prompts = ioi_prompts(gpt2_model, 4, seed=1)  # padded: prompts differ in length
    p = int(prompts.lengths.argmin())
    view = attention_view(gpt2_model, prompts, ["L1H2", (0, 3)], prompt=p)
    length = int(prompts.lengths[p])
    assert view.patterns.shape == (2, length, length)
    assert view.head_labels == ("L1H2", "L0H3") and view.tokens == prompts.clean_str_tokens[p]
    _, cache = gpt2_model.run_with_cache(prompts.clean_tokens)
    assert torch.allclose(view.patterns[0], cache["blocks.1.attn.hook_pattern"][p, 2, :length, :length], atol=1e-5)
    assert torch.allclose(view.patterns.sum(-1), torch.ones(2, length), atol=1e-4)

    page = view.to_html()
    assert view._repr_html_().count("var CircuitsVis") == 1
    for text in ("L1H2", "L0H3", "CircuitsVis.AttentionHeads", *(t for t in view.tokens if "<" not in t)):
        assert json.dumps(text)[1:-1] in page
    props = json.loads(re.search(r"CircuitsVis\.AttentionHeads, (\{.*\})\);", page)[1])
    assert props["tokens"] == list(view.tokens) and props["attentionHeadNames"] == ["L1H2", "L0H3"]
    assert torch.allclose(torch.tensor(props["attention"]), view.patterns, atol=1e-5)
    lowered = page.lower()
    assert "unpkg" not in lowered and "cdn" not in lowered and "<script src" not in lowered
    assert "sourcemappingurl" not in lowered
    assert page.count("var CircuitsVis") == 1 and page.count("</script>") == 2  # the bundle and the render call
    assert len(page) > bundle_path().stat().st_size * 0.9

    bare = view.to_html(include_js=False)
    assert "var CircuitsVis" not in bare and "L1H2" in bare and len(bare) < 100_000
    two = javascript() + attention_view_html(gpt2_model, prompts, "L0H1", include_js=False) + bare
    assert two.count("var CircuitsVis") == 1


def test_attention_view_takes_rank_heads_rows_and_the_corrupted_run(gpt2_model, prompts, metric):
    table = rank_heads(dla_by_head(gpt2_model, prompts, metric), k=2)
    view = attention_view(gpt2_model, prompts, table, prompt=1, run="corrupted")
    assert view.head_labels == tuple(table["label"])
    assert view.tokens == prompts.corrupted_str_tokens[1] and "corrupted prompt 1" in view.title


def test_attention_view_bad_heads(gpt2_model, prompts):
    for heads, match in [(["L9H0"], "does not exist"), ([(0, 4)], "does not exist"), (["head 3"], "L9H7"),
                         ([], "empty"), ([(0, 1, 2)], "pairs")]:
        with pytest.raises(HookpatchError, match=match):
            attention_view(gpt2_model, prompts, heads)
    with pytest.raises(HookpatchError, match="run"):
        attention_view(gpt2_model, prompts, ["L0H0"], run="patched")
    with pytest.raises(HookpatchError, match="out of range"):
        attention_view(gpt2_model, prompts, ["L0H0"], prompt=len(prompts))


def test_tokens_cannot_close_the_script(gpt2_model, prompts):
    view = attention_view(gpt2_model, prompts, ["L0H0"])
    view = type(view)(view.patterns, ("</script>",) + view.tokens[1:], view.head_labels, 0, "clean", "<b>t</b>")
    bare = view.to_html(include_js=False)
    assert bare.count("</script>") == 1 and "&lt;b&gt;" in bare


def test_importing_views_changes_no_plotly_defaults():
    code = ("import plotly.io as pio; before = (pio.templates.default, pio.renderers.default); "
            "import hookpatch.views; assert (pio.templates.default, pio.renderers.default) == before, before")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_grouped_query_model_kv_labels_and_query_head_patterns(llama_model):
    prompts = pronoun_prompts(llama_model, n=4)
    result = patch_sweep(llama_model, prompts, LogitDiff(prompts), "v", by=("layer", "head"), progress=False)
    trace = patching_heatmap(result).to_dict()["data"][0]
    assert list(trace["x"]) == list(result.labels["head"]) == ["KV0", "KV1"]
    view = attention_view(llama_model, prompts, ["L1H3"])  # query heads: 4 per layer
    assert view.patterns.shape[0] == 1 and "L1H3" in view.to_html(include_js=False)
