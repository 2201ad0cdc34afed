"""Circuit extraction and faithfulness, against hand computations and plain edge_patch loops.

References: extraction rules re-done by hand (sorting, list comprehensions, a naive O(n²)
greedy loop, hand-built pruning examples); faithfulness points against one ``edge_patch``
call per circuit normalized by hand; CPR/CMD against a hand trapezoid in Python floats.
"""

from __future__ import annotations

import math

import pytest
import torch

from hookpatch import LogitDiff
from hookpatch.circuits import _faithfulness as faith_module
from hookpatch.circuits import edge_patch, graph
from hookpatch.circuits._circuit import Circuit, greedy, prune, receiver_nodes, threshold, top_n
from hookpatch.circuits._faithfulness import faithfulness, faithfulness_curve
from hookpatch.circuits._graph import EdgeIndices
from hookpatch.errors import HookpatchError
from hookpatch.tasks import pronoun_prompts

TOL = 1e-5
_PROMPTS: dict[int, object] = {}


def prompts_for(model):
    if id(model) not in _PROMPTS:
        _PROMPTS[id(model)] = pronoun_prompts(model, n=3, seed=0)
    return _PROMPTS[id(model)]


def random_scores(g, seed=0, batch=None):
    gen = torch.Generator().manual_seed(seed)
    shape = (g.n_edges,) if batch is None else (g.n_edges, batch)
    return torch.randn(shape, generator=gen)


def hand_norm(values, clean, corrupted):
    low, high = float(corrupted.double().mean()), float(clean.double().mean())
    return (float(values.double().mean()) - low) / (high - low)


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("absolute", [True, False])
def test_top_n_and_threshold_by_hand(model, absolute):
    g = graph(model)
    s = random_scores(g, 1)
    key = [abs(float(x)) if absolute else float(x) for x in s]
    order = sorted(range(g.n_edges), key=lambda i: (-key[i], i))
    c = top_n(g, s, 7, absolute=absolute, prune=False)
    assert set(c.labels) == {g.edges[i].label for i in order[:7]}
    assert c.scores == tuple(float(s[g.index(e)]) for e in c.edges)
    t = 1.2
    c = threshold(g, s, t, absolute=absolute, prune=False)
    assert set(c.labels) == {g.edges[i].label for i in range(g.n_edges) if key[i] >= t}
    # [n_edges, batch] scores are averaged over prompts
    s2 = random_scores(g, 2, batch=3)
    assert top_n(g, s2, 9, absolute=absolute).edges == top_n(g, s2.mean(-1), 9, absolute=absolute).edges


def naive_greedy(g, s, n):
    """Each step: scan every unpicked edge whose receiver's node is in the circuit; take the largest |score|."""
    nodes, picked = {g.nodes[-1]}, []
    while len(picked) < n:
        best = None
        for i, e in enumerate(g.edges):
            if i in picked or not any(node in nodes for node in receiver_nodes(g, e.receiver)):
                continue
            if best is None or abs(float(s[i])) > abs(float(s[best])):
                best = i
        if best is None:
            break
        picked.append(best)
        nodes.add(g.edges[best].sender)
    return {g.edges[i].label for i in picked}


@pytest.mark.parametrize("n", [1, 5, 20])
def test_greedy_against_naive_loop(model, n):
    g = graph(model)
    s = random_scores(g, 3)
    assert set(greedy(g, s, n, prune=False).labels) == naive_greedy(g, s, n)


def test_greedy_hand_example(gpt2_model):
    g = graph(gpt2_model)
    s = torch.full((g.n_edges,), 0.01)
    for label, value in [("L0H0->L1H0.q", 20.0), ("L0H1->L1H2.q", 10.0), ("L1H2->logits", 5.0)]:
        s[g.index(label)] = value
    assert set(top_n(g, s, 2, prune=False).labels) == {"L0H0->L1H0.q", "L0H1->L1H2.q"}
    assert set(greedy(g, s, 2, prune=False).labels) == {"L1H2->logits", "L0H1->L1H2.q"}
    assert len(greedy(g, s, 2)) == 0  # nothing reaches L0H1 from the input: pruned away
    s[g.index("input->L0H1.v")] = 8.0
    assert set(greedy(g, s, 3).labels) == {"L1H2->logits", "L0H1->L1H2.q", "input->L0H1.v"}


def test_prune_hand_examples(gpt2_model, llama_model):
    g = graph(gpt2_model)
    path = ["input->L0H0.q", "L0H0->L1H1.k", "L1H1->logits"]
    dead = ["L0H2->logits",  # sender not reached from the input
            "input->L0H3.v",  # L0H3 sends nowhere
            "input->MLP0", "MLP0->L1H0.q"]  # L1H0 never reaches the logits
    c = prune(Circuit.from_edges(g, path + dead, tuple(float(i) for i in range(7))))
    assert set(c.labels) == set(path)
    assert c.scores == (0.0, 1.0, 2.0)
    assert prune(c).edges == c.edges  # idempotent
    assert {n.label for n in c.nodes} == {"input", "L0H0", "L1H1", "logits"}
    gq = graph(llama_model)  # KV head 1 feeds query heads 2 and 3
    kv1 = ("input->L0KV1.k", "L0H3->logits")
    assert set(prune(Circuit.from_edges(gq, kv1)).labels) == set(kv1)
    assert len(prune(Circuit.from_edges(gq, ("input->L0KV0.k", "L0H3->logits")))) == 0
    assert {n.label for n in Circuit.from_edges(gq, ["input->L1KV1.v"]).nodes} == {"input", "L1H2", "L1H3"}


def test_save_load_round_trip(tmp_path, gpt2_model, llama_model):
    g = graph(llama_model)
    c = top_n(g, random_scores(g, 4), 12)
    c.save(tmp_path / "c.json")
    back = Circuit.load(tmp_path / "c.json")
    assert back == c and back.scores == c.scores and back.method == c.method
    assert Circuit.load(tmp_path / "c.json", graph=g) == c
    assert "Circuit(" in repr(c) and len(c) == len(c.labels)
    with pytest.raises(HookpatchError, match="another model"):
        Circuit.load(tmp_path / "c.json", graph=graph(gpt2_model))
    (tmp_path / "v9.json").write_text((tmp_path / "c.json").read_text().replace('"version": 1', '"version": 9'))
    with pytest.raises(HookpatchError, match="version"):
        Circuit.load(tmp_path / "v9.json")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(HookpatchError, match="not a circuit file"):
        Circuit.load(tmp_path / "x.json")


# --------------------------------------------------------------------------- faithfulness


def test_full_circuit_is_one_and_empty_is_zero(model):
    g, prompts = graph(model), prompts_for(model)
    res = faithfulness(model, prompts, LogitDiff(prompts), [Circuit(g, g.edges), Circuit(g, ())], completeness=True)
    assert res.faithfulness.tolist() == pytest.approx([1.0, 0.0], abs=TOL)
    assert res.completeness.tolist() == pytest.approx([0.0, 1.0], abs=TOL)  # removing all = corrupted run
    assert res.values[0].tolist() == pytest.approx(res.clean.tolist(), abs=TOL)
    assert res.values[1].tolist() == pytest.approx(res.corrupted.tolist(), abs=TOL)


def exact_edge_scores(model, prompts, metric):
    """Each edge's exact effect when patched alone (denoising), mean over prompts."""
    g = graph(model)
    res = edge_patch(model, prompts, metric, edge_sets=[[e] for e in g.edges])
    return res.values - res.corrupted


@pytest.mark.parametrize("method", ["top_n", "greedy"])
def test_curve_matches_plain_edge_patch_loop(model, method, monkeypatch):
    g, prompts = graph(model), prompts_for(model)
    metric = LogitDiff(prompts)
    scores = exact_edge_scores(model, prompts, metric)
    calls = []
    real = faith_module.edge_patch
    monkeypatch.setattr(faith_module, "edge_patch", lambda *a, **k: calls.append(1) or real(*a, **k))
    budgets = (0.05, 0.1, 0.3, 0.6, 1.0)
    curve = faithfulness_curve(model, prompts, metric, scores, budgets=budgets, method=method, n_random=2)
    assert len(calls) == 1  # every circuit of the curve, random ones included, in one call
    extract = top_n if method == "top_n" else greedy
    hand_f = []
    for i, b in enumerate(budgets):
        c = extract(g, scores, max(1, round(b * g.n_edges)))
        assert curve.circuits[i] == c and curve.n_edges[i] == len(c)
        one = edge_patch(model, prompts, metric, [e for e in g.edges if e not in set(c.edges)], direction="noising")
        assert curve.values[i].tolist() == pytest.approx(one.values[0].tolist(), abs=TOL)
        hand_f.append(hand_norm(one.values[0], one.clean, one.corrupted))
    assert curve.faithfulness.tolist() == pytest.approx(hand_f, abs=TOL)
    assert hand_f[-1] == pytest.approx(1.0, abs=TOL)
    cpr = sum((budgets[i + 1] - budgets[i]) * (hand_f[i] + hand_f[i + 1]) / 2 for i in range(len(budgets) - 1))
    cmd = sum((budgets[i + 1] - budgets[i]) * (abs(1 - hand_f[i]) + abs(1 - hand_f[i + 1])) / 2
              for i in range(len(budgets) - 1))
    assert curve.cpr.value == pytest.approx(cpr, abs=TOL) and curve.cmd.value == pytest.approx(cmd, abs=TOL)
    # the random baseline: per draw, the same number of edges as the scored circuit
    for d, draw in enumerate(curve.random_circuits):
        assert tuple(len(c) for c in draw) == curve.n_edges
        for i, c in enumerate(draw[:2]):
            one = edge_patch(model, prompts, metric, list(c.complement()), direction="noising")
            assert curve.random_values[d, i].tolist() == pytest.approx(one.values[0].tolist(), abs=TOL)
    per_draw = [[hand_norm(curve.random_values[d, i], curve.clean, curve.corrupted) for i in range(len(budgets))]
                for d in range(2)]
    mean_of_draws = [(a + b) / 2 for a, b in zip(*per_draw, strict=True)]
    assert curve.random_faithfulness.tolist() == pytest.approx(mean_of_draws, abs=TOL)
    r_cpr = sum(sum((budgets[i + 1] - budgets[i]) * (f[i] + f[i + 1]) / 2 for i in range(len(budgets) - 1))
                for f in per_draw) / 2
    assert curve.random_cpr.value == pytest.approx(r_cpr, abs=TOL)


def test_bootstrap_intervals_and_seeded_random_baseline(gpt2_model):
    prompts = pronoun_prompts(gpt2_model, n=8, seed=1)
    g = graph(gpt2_model)
    scores = random_scores(g, 5)
    kw = dict(budgets=(0.1, 0.3, 0.6, 1.0), n_random=2, n_resamples=500)
    a = faithfulness_curve(gpt2_model, prompts, LogitDiff(prompts), scores, seed=3, **kw)
    assert bool((a.ci_low <= a.faithfulness + TOL).all() and (a.faithfulness <= a.ci_high + TOL).all())
    for stat in (a.cpr, a.cmd, a.random_cpr, a.random_cmd):
        assert stat.ci_low - TOL <= stat.value <= stat.ci_high + TOL and stat.ci_low < stat.ci_high
    assert a.ci_low[-1] == pytest.approx(1.0, abs=TOL) and a.ci_high[-1] == pytest.approx(1.0, abs=TOL)
    b = faithfulness_curve(gpt2_model, prompts, LogitDiff(prompts), scores, seed=3, **kw)
    assert a.random_circuits == b.random_circuits and torch.equal(a.random_values, b.random_values)
    assert (a.cpr.ci_low, a.cpr.ci_high) == (b.cpr.ci_low, b.cpr.ci_high)
    c = faithfulness_curve(gpt2_model, prompts, LogitDiff(prompts), scores, seed=4, **kw)
    assert a.random_circuits != c.random_circuits
    assert "CPR" in repr(a) and len(a.to_dataframe()) == 4


# --------------------------------------------------------------------------- bad input


def test_bad_input(gpt2_model, llama_model):
    prompts, g = prompts_for(gpt2_model), graph(gpt2_model)
    metric, s = LogitDiff(prompts), random_scores(g)
    for budgets in [(0.0, 0.5), (0.5, 1.5), (0.5, 0.2), (0.5,)]:
        with pytest.raises(HookpatchError, match="budgets="):
            faithfulness_curve(gpt2_model, prompts, metric, s, budgets=budgets)
    with pytest.raises(HookpatchError, match="method='threshold'"):
        faithfulness_curve(gpt2_model, prompts, metric, s, method="threshold")
    with pytest.raises(HookpatchError, match=r"scores: shape \(5,\)"):
        faithfulness_curve(gpt2_model, prompts, metric, s[:5])
    with pytest.raises(HookpatchError, match="scores: expected a Tensor"):
        top_n(g, s.tolist(), 3)
    with pytest.raises(HookpatchError, match=r"n=-1"):
        top_n(g, s, -1)
    with pytest.raises(HookpatchError, match="ablation='bogus'"):
        faithfulness(gpt2_model, prompts, metric, Circuit(g, ()), ablation="bogus")
    other = top_n(graph(llama_model), random_scores(graph(llama_model)), 5)
    with pytest.raises(HookpatchError, match=r"circuits\[0\] belongs to another model"):
        faithfulness(gpt2_model, prompts, metric, [other])
    with pytest.raises(HookpatchError, match="scores: 1 scores for 2 edges"):
        Circuit.from_edges(g, ["input->logits", "MLP0->logits"], [1.0])
    with pytest.raises(HookpatchError, match="not in the graph"):
        Circuit.from_edges(g, ["L1H0->L0H0.q"])
    assert math.isfinite(faithfulness(gpt2_model, prompts, metric, [["input->logits"]]).faithfulness[0])


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_ablated_faithfulness_is_normalized_by_the_fully_ablated_model(gpt2_model, small_prompts, ablation):
    """With mean or zero ablation the 0 point is the model with every edge ablated: the full
    circuit gives 1, the empty one 0, and a circuit's value is the plain edge_patch normalization."""
    prompts = small_prompts[id(gpt2_model)]
    metric = LogitDiff(prompts)
    g = graph(gpt2_model)
    circuit = Circuit(g, tuple(g.edges[::7]))
    res = faithfulness(gpt2_model, prompts, metric, [Circuit(g, tuple(g.edges)), Circuit(g, ()), circuit],
                       ablation=ablation)
    torch.testing.assert_close(res.faithfulness[:2].double(), torch.tensor([1.0, 0.0]).double(), atol=1e-5, rtol=0)
    plain = edge_patch(gpt2_model, prompts, metric, edge_sets=[circuit.complement(), list(g.edges)],
                       direction="noising", ablation=ablation).values
    expected = (plain[0].mean() - plain[1].mean()) / (res.clean.mean() - plain[1].mean())
    torch.testing.assert_close(res.faithfulness[2].double(), expected.double(), atol=1e-5, rtol=0)


def _reference_prune(g, edges):
    """Node-set reachability written out edge by edge: keep an edge whose sender the input
    reaches and one of whose receiver's nodes reaches the logits."""
    def nodes_of(r):
        if r.input == "logits":
            return [g.nodes[-1]]
        if r.input == "mlp":
            return [n for n in g.nodes if n.kind == "mlp" and n.layer == r.layer]
        heads = g.query_heads(r)
        return [n for n in g.nodes if n.kind == "head" and n.layer == r.layer and n.head in heads]

    reach_fwd, reach_bwd = {g.nodes[0]}, {g.nodes[-1]}
    changed = True
    while changed:
        changed = False
        for e in edges:
            if e.sender in reach_fwd:
                for n in nodes_of(e.receiver):
                    if n not in reach_fwd:
                        reach_fwd.add(n)
                        changed = True
            if any(n in reach_bwd for n in nodes_of(e.receiver)) and e.sender not in reach_bwd:
                reach_bwd.add(e.sender)
                changed = True
    return [e for e in edges if e.sender in reach_fwd and any(n in reach_bwd for n in nodes_of(e.receiver))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prune_equals_edge_by_edge_reachability(gpt2_model, llama_model, seed):
    """Random circuits of several sizes on a plain and a grouped-query graph."""
    gen = torch.Generator().manual_seed(seed)
    for model in (gpt2_model, llama_model):
        g = graph(model)
        for n in (5, 20, 60):
            picked = sorted(torch.randperm(g.n_edges, generator=gen)[:n].tolist())
            c = Circuit(g, tuple(g.edge_at(i) for i in picked))
            assert prune(c).edges == tuple(_reference_prune(g, list(c.edges)))
            assert c.complement() == tuple(e for e in g.edges if e not in set(c.edges))
            assert c.complement_indices().indices == tuple(i for i in range(g.n_edges) if i not in set(picked))


def test_edge_indices_are_checked_and_equal_edge_lists(gpt2_model, small_prompts):
    prompts = small_prompts[id(gpt2_model)]
    g = graph(gpt2_model)
    chosen = (0, 7, 40)
    by_index = edge_patch(gpt2_model, prompts, LogitDiff(prompts), edges=EdgeIndices(chosen))
    by_edge = edge_patch(gpt2_model, prompts, LogitDiff(prompts), edges=[g.edge_at(i) for i in chosen])
    assert torch.equal(by_index.values, by_edge.values)
    for bad in ((3, 1), (0, g.n_edges), (-1, 2), (2, 2)):
        with pytest.raises(HookpatchError, match="EdgeIndices"):
            edge_patch(gpt2_model, prompts, LogitDiff(prompts), edges=EdgeIndices(bad))
