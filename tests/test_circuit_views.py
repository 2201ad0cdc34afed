"""Circuit views and the report's Circuit section: every line, width, colour and band a figure
draws is checked against the circuit's own edges and scores or the curve's own numbers
(widths against the linear rule computed here), and wrong inputs are refused by name."""

from __future__ import annotations

import dataclasses
import html
import re

import jaxtyping
import pytest
import torch

import hookpatch
from hookpatch.circuits import Circuit, edge_attribution, faithfulness_curve, graph, top_n
from hookpatch.errors import HookpatchError
from hookpatch.metrics import LogitDiff, Normalized
from hookpatch.report import CIRCUIT_BUDGETS, Report, _circuit_section, circuit_sentences, discovered_circuit
from hookpatch.tasks._ioi import ioi_prompts
from hookpatch.views import circuit_graph, faithfulness_curve_plot

BLUE, RED, GREY = "#2166ac", "#b2182b", "#8c8c8c"
# a hand-made circuit of the 2-layer × 4-head GPT-2 graph: label -> score (largest |score| 2)
HAND = {"input->L0H1.v": 0.5, "L0H1->L1H2.q": -0.25, "L0H1->L1H2.k": 1.0, "MLP0->L1H2.v": 0.0,
        "L1H2->logits": 2.0, "input->MLP0": -2.0, "L0H3->MLP0": 0.1}
HAND_NODES = {"input", "L0H1", "L0H3", "MLP0", "L1H2", "logits"}


@pytest.fixture(scope="module")
def g(gpt2_model):
    return graph(gpt2_model)


@pytest.fixture(scope="module")
def hand(g):
    return Circuit.from_edges(g, list(HAND), scores=list(HAND.values()))


@pytest.fixture(scope="module")
def prompts(gpt2_model):
    return hookpatch.pronoun_prompts(gpt2_model, n=3, seed=0)


@pytest.fixture(scope="module")
def scores(gpt2_model, prompts):
    return edge_attribution(gpt2_model, prompts, LogitDiff(prompts), progress=False).mean()


@pytest.fixture(scope="module")
def curve(gpt2_model, prompts, scores):
    return faithfulness_curve(gpt2_model, prompts, LogitDiff(prompts), scores, budgets=(0.05, 0.1, 0.5, 1.0),
                              n_resamples=200)


def _traces(fig, kind):
    return [t for t in fig.to_dict()["data"] if t["meta"]["kind"] == kind]


def test_hand_made_circuit_edges_colours_widths_and_dashes(hand):
    fig = circuit_graph(hand)
    edges = _traces(fig, "edge")
    assert len(edges) == len(HAND) and {t["name"] for t in edges} == set(HAND)
    for t in edges:
        s = HAND[t["name"]]
        assert t["meta"]["score"] == pytest.approx(s)
        assert t["line"]["color"] == (BLUE if s >= 0 else RED)
        assert t["line"]["width"] == pytest.approx(1 + 7 * abs(s) / 2.0)
        inp = t["name"].split(".")[-1] if "." in t["name"] else None
        assert t["line"]["dash"] == {"q": "solid", "k": "dash", "v": "dot", None: "solid"}[inp]
        assert t["hovertext"][1] == f"{t['name']}<br>score {s:+.4g}"
    (nodes,) = _traces(fig, "nodes")
    assert set(nodes["text"]) == HAND_NODES and len(nodes["text"]) == 6
    (others,) = _traces(fig, "other nodes")
    assert len(others["x"]) == 1 + 8 + 2 + 1 - 6  # input, 8 heads, 2 MLPs, logits; minus the circuit's
    layout = fig.to_dict()["layout"]
    assert layout["yaxis"]["ticktext"] == ["input", "layer 0", "layer 1", "logits"]
    assert layout["title"]["text"] == "Circuit: 7 of 110 edges, 6 nodes (hand-made)"


def test_edges_join_the_rows_of_their_nodes(hand):
    by_name = {t["name"]: t for t in _traces(circuit_graph(hand), "edge")}
    k = by_name["L0H1->L1H2.k"]  # layer 0 head 1 (row 1) → layer 1 head 2 (row 2), the key meets it centred
    assert k["x"] == pytest.approx([1, 1.5, 2]) and k["y"] == pytest.approx([1, 1.5, 2])
    assert by_name["L0H1->L1H2.q"]["x"][-1] == pytest.approx(2 - 0.18)  # query left of centre
    v = by_name["MLP0->L1H2.v"]  # MLP0 right of the heads, above layer 0's row
    assert (v["x"][0], v["y"][0]) == pytest.approx((4, 1.45)) and v["x"][-1] == pytest.approx(2.18)
    out = by_name["L1H2->logits"]  # logits centred on the top row
    assert (out["x"][-1], out["y"][-1]) == pytest.approx((1.5, 3))
    assert by_name["input->L0H1.v"]["y"][0] == 0


def test_unscored_and_empty_circuits(g):
    plain = Circuit.from_edges(g, ["input->L0H1.v", "L0H1->logits"])
    fig = circuit_graph(plain, title="Mine")
    edges = _traces(fig, "edge")
    assert [t["line"]["color"] for t in edges] == [GREY, GREY]
    assert [t["line"]["width"] for t in edges] == [2.0, 2.0]
    assert edges[0]["hovertext"][0] == "input->L0H1.v"
    assert [t["name"] for t in _traces(fig, "legend")] == ["query input", "key input", "value input"]
    assert fig.layout.title.text == "Mine"
    empty = circuit_graph(Circuit(g, ()))
    assert not _traces(empty, "edge") and not _traces(empty, "nodes")
    assert empty.layout.annotations[0].text == "empty circuit: no edges"


def test_grouped_query_key_edge_reaches_every_head_of_its_group(llama_model):
    lg = graph(llama_model)  # 4 query heads, 2 KV heads: KV head 1 feeds heads 2 and 3
    c = Circuit.from_edges(lg, ["input->L0KV1.k"], scores=[-0.3])
    (edge,) = _traces(circuit_graph(c), "edge")
    assert edge["x"] == [1.5, 1.75, 2.0, None, 1.5, 2.25, 3.0]  # input (centred) to heads 2 and 3, key centred
    assert edge["y"] == [0.0, 0.5, 1.0, None, 0.0, 0.5, 1.0]
    assert edge["line"]["color"] == RED and edge["hovertext"][1] == "input->L0KV1.k<br>score -0.3"
    (nodes,) = _traces(circuit_graph(c), "nodes")
    assert set(nodes["text"]) == {"input", "L0H2", "L0H3"}


def test_attributed_circuit_widths_grow_with_abs_score(g, scores):
    c = top_n(g, scores, 20, prune=False)
    edges = {t["name"]: t for t in _traces(circuit_graph(c), "edge")}
    assert len(edges) == 20
    pairs = sorted((abs(s), edges[label]["line"]["width"]) for label, s in zip(c.labels, c.scores, strict=True))
    widths = [w for _, w in pairs]
    assert widths == sorted(widths) and widths[-1] == pytest.approx(8.0)
    top = max(abs(s) for s in c.scores)
    for label, s in zip(c.labels, c.scores, strict=True):
        assert edges[label]["line"]["color"] == (BLUE if s >= 0 else RED)
        assert edges[label]["line"]["width"] == pytest.approx(1 + 7 * abs(s) / top)


def test_curve_plot_draws_the_curve_band_and_random_baseline(curve):
    fig = faithfulness_curve_plot(curve).to_dict()
    data = {t["name"]: t for t in fig["data"]}
    assert list(data) == ["95% CI high", "95% CI", "circuit", "random 95% CI high", "random 95% CI",
                          "random circuits (same sizes)"]
    for t in fig["data"]:
        assert t["x"] == pytest.approx([0.05, 0.1, 0.5, 1.0])
    assert data["circuit"]["y"] == pytest.approx(curve.faithfulness.tolist())
    assert data["95% CI high"]["y"] == pytest.approx(curve.ci_high.tolist())
    assert data["95% CI"]["y"] == pytest.approx(curve.ci_low.tolist()) and data["95% CI"]["fill"] == "tonexty"
    assert data["random circuits (same sizes)"]["y"] == pytest.approx(curve.random_faithfulness.tolist())
    assert data["random 95% CI"]["y"] == pytest.approx(curve.random_ci_low.tolist())
    assert [c[1] for c in data["circuit"]["customdata"]] == list(curve.n_edges)
    assert sorted(s["y0"] for s in fig["layout"]["shapes"]) == [0.0, 1.0]
    assert fig["layout"]["xaxis"]["type"] == "log"
    title = fig["layout"]["title"]["text"]
    c, r = curve.cpr, curve.random_cpr
    assert f"CPR {c.value:.3f} [{c.ci_low:.3f}, {c.ci_high:.3f}]" in title
    assert f"CMD {curve.cmd.value:.3f} [" in title and f"random circuits: CPR {r.value:.3f} [{r.ci_low:.3f}" in title


def test_curve_plot_by_edges_and_without_baseline(gpt2_model, prompts, scores, curve):
    if min(curve.n_edges) > 0:
        by_edges = faithfulness_curve_plot(curve, x="edges").to_dict()
        assert by_edges["data"][2]["x"] == [float(n) for n in curve.n_edges]
    else:
        with pytest.raises(HookpatchError, match=r"x='edges'.*0 edges.*x='fraction'"):
            faithfulness_curve_plot(curve, x="edges")
    bare = faithfulness_curve(gpt2_model, prompts, LogitDiff(prompts), scores, budgets=(0.5, 1.0), n_random=0,
                              n_resamples=50)
    fig = faithfulness_curve_plot(bare)
    assert [t.name for t in fig.data] == ["95% CI high", "95% CI", "circuit"]
    assert "random" not in fig.layout.title.text
    emptied = dataclasses.replace(curve, n_edges=(0, *curve.n_edges[1:]))
    with pytest.raises(HookpatchError, match=r"x='edges'.*log axis.*x='fraction'"):
        faithfulness_curve_plot(emptied, x="edges")


def test_bad_input_is_refused_by_name(hand, curve):
    # wrong types run without the test-time type checker (jaxtyping + beartype), as a user sees them
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        with pytest.raises(HookpatchError, match=r"circuit_graph\(circuit\) needs a Circuit.*top_n.*got str"):
            circuit_graph("L0H1->logits")
        with pytest.raises(HookpatchError, match=r"circuit_graph: title=3 must be a string or None"):
            circuit_graph(hand, title=3)
        with pytest.raises(HookpatchError, match=r"faithfulness_curve_plot\(curve\) needs the FaithfulnessCurve.*"
                                                 r"got Circuit"):
            faithfulness_curve_plot(hand)
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)
    with pytest.raises(HookpatchError, match=r"x='budget': expected one of \('fraction', 'edges'\)"):
        faithfulness_curve_plot(curve, x="budget")


def test_discovered_circuit_falls_back_to_the_largest_budget(curve):
    low = dataclasses.replace(curve, faithfulness=torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64))
    assert discovered_circuit(low) == 3 and discovered_circuit(low, target=0.3) == 1
    text = circuit_sentences(low, 3)
    assert text.startswith(f"No budget reaches faithfulness 0.8; the largest circuit keeps {curve.n_edges[3]} of "
                           "110 edges (budget 1,")
    assert "faithfulness 0.700 [" in text


@pytest.mark.parametrize("task", ["pronoun", "ioi"])
def test_report_circuit_section_on_the_organism(task, monkeypatch):
    import hookpatch.circuits as circuits

    calls = {}

    def spy(name):
        real = getattr(circuits, name)

        def call(*args, **kwargs):
            calls[name] = (kwargs, real(*args, **kwargs))
            return calls[name][1]
        monkeypatch.setattr(circuits, name, call)

    spy("edge_attribution")
    spy("faithfulness_curve")
    spy("compare_edges")
    model = hookpatch.load_model("organism")
    prompts = hookpatch.pronoun_prompts(model, n=8) if task == "pronoun" else ioi_prompts(model, 4)
    metric = Normalized.from_model(model, LogitDiff(prompts))
    report = Report("t")
    _circuit_section(report, model, prompts, metric, progress=False)
    (title, body), (cmp_title, cmp_body) = report.sections
    assert title == "Circuit" and body.count("Plotly.newPlot") == 2
    # the edge-level check: EAP-IG against exact single-edge patching, numbers from the comparison
    _, comparison = calls["compare_edges"]
    assert cmp_title == "Attribution vs patching, edge by edge" and cmp_body.count("Plotly.newPlot") == 1
    c = comparison
    assert (f"Pearson {c.pearson.value:.2f} [{c.pearson.ci_low:.2f}, {c.pearson.ci_high:.2f}]" in cmp_body
            and f"On {len(c.edges)} edges" in cmp_body and html.escape(c.disagreements(1).iloc[0]["edge"]) in cmp_body)
    assert not re.search(r"<script[^>]+src=", body)
    attr_kwargs, _ = calls["edge_attribution"]
    assert attr_kwargs == {"method": "eap-ig", "steps": 5, "progress": False}
    curve_kwargs, curve = calls["faithfulness_curve"]
    assert curve_kwargs == {"budgets": CIRCUIT_BUDGETS, "progress": False}
    # the text's numbers, read here from the curve the section computed
    f = curve.faithfulness.tolist()
    i = next((j for j, v in enumerate(f) if v >= 0.8), len(f) - 1)
    n = len(curve.circuits[i])
    assert f"keeps {n} of 262 edges (budget {CIRCUIT_BUDGETS[i]:g}" in body
    assert f"faithfulness {f[i]:.3f} [{float(curve.ci_low[i]):.3f}, {float(curve.ci_high[i]):.3f}]" in body
    for stat in (curve.cpr, curve.cmd, curve.random_cpr, curve.random_cmd):
        assert f"{stat.value:.3f} [{stat.ci_low:.3f}, {stat.ci_high:.3f}]" in body
    assert f"Circuit: {n} of 262 edges" in body  # the drawn circuit is the chosen one
    assert report.summary[0].startswith("circuit: The smallest circuit with faithfulness ≥ 0.8 keeps")
