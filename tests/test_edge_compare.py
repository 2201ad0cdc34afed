"""compare_edges: exact single-edge patching vs edge attribution, edge by edge.

References are independent of the code under test: exact effects from a plain loop of
``edge_patch`` calls minus the metric of a plain forward on the run being patched; scores from
``edge_attribution``; statistics from ``scipy.stats`` (Pearson, Spearman) and hand counts (top-k
overlap, sign agreement, the bootstrap, the disagreement lists).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.stats
import torch
from transformer_lens.utilities.statistics import derive_generator

from hookpatch import LogitDiff
from hookpatch.circuits import edge_attribution, edge_patch, graph
from hookpatch.circuits._compare import EdgeComparison, _select, compare_edges
from hookpatch.errors import HookpatchError

GPT2_EDGES = [  # every sender kind and receiver kind, both ends of the score range
    "input->L0H0.q", "input->L0H3.k", "input->L0H2.v", "input->MLP0", "L0H1->MLP0", "L0H3->L1H2.q",
    "L0H0->L1H1.k", "MLP0->L1H3.v", "MLP0->MLP1", "L1H0->MLP1", "L1H2->logits", "MLP1->logits", "input->logits",
]
LLAMA_EDGES = ["input->L0H1.q", "input->L0KV1.k", "L0H2->L1KV0.v", "MLP0->L1H3.q", "L1H1->MLP1", "MLP1->logits",
               "input->logits", "L0H0->logits"]


def metric_of(prompts, logits):
    """Logit difference at each prompt's last position, computed by hand."""
    last = logits[torch.arange(len(prompts)), prompts.end]
    return (last.gather(-1, prompts.correct_tokens[:, None]) - last.gather(-1, prompts.incorrect_tokens[:, None]))[:, 0]


def plain_effects(model, prompts, labels, direction):
    """Each edge patched alone by its own edge_patch call, minus the unpatched target run."""
    target = prompts.corrupted_tokens if direction == "denoising" else prompts.clean_tokens
    with torch.no_grad():
        base = metric_of(prompts, model(target)).float()
    rows = [edge_patch(model, prompts, LogitDiff(prompts), [e], direction=direction).values[0] for e in labels]
    return torch.stack(rows).float() - base


def hand_statistics(exact, est, k, tol):
    """Pearson/Spearman (scipy), top-k overlap and sign agreement (counted) of the edge means."""
    a, b = exact.mean(-1).double().numpy(), est.mean(-1).double().numpy()
    top = lambda x: set(sorted(range(len(x)), key=lambda i: (-abs(x[i]), i))[:k])  # noqa: E731
    sign = lambda x: 0 if abs(x) <= tol else (1 if x > 0 else -1)  # noqa: E731
    return {
        "pearson": scipy.stats.pearsonr(a, b)[0],
        "spearman": scipy.stats.spearmanr(a, b)[0],
        "top_k_overlap": len(top(a) & top(b)) / k,
        "sign_agreement": sum(sign(x) == sign(y) for x, y in zip(a, b, strict=True)) / len(a),
    }


@pytest.fixture(scope="module")
def gpt2_cmp(gpt2_model, small_prompts):
    prompts = small_prompts[id(gpt2_model)]
    return compare_edges(gpt2_model, prompts, LogitDiff(prompts), edges=GPT2_EDGES, k=4, n_resamples=300,
                         seed=3, progress=False)


def test_exact_effects_and_scores_match_plain_loops(gpt2_model, small_prompts, gpt2_cmp):
    prompts = small_prompts[id(gpt2_model)]
    g = graph(gpt2_model)
    labels = sorted(GPT2_EDGES, key=g.index)  # the comparison keeps graph order
    assert gpt2_cmp.edges == tuple(labels) and gpt2_cmp.selected == ("given",) * len(labels)
    exact = plain_effects(gpt2_model, prompts, labels, "denoising")
    assert exact.abs().max() > 0.05  # the edges do move the metric
    torch.testing.assert_close(gpt2_cmp.exact, exact, atol=2e-5, rtol=1e-4)
    scores = edge_attribution(gpt2_model, prompts, LogitDiff(prompts), progress=False)
    torch.testing.assert_close(gpt2_cmp.estimate, scores.values[[g.index(e) for e in labels]].float())
    assert gpt2_cmp.attribution.labels["edge"] == tuple(labels)
    assert isinstance(gpt2_cmp, EdgeComparison) and gpt2_cmp.scores.values.shape == (g.n_edges, len(prompts))


def test_statistics_match_scipy_and_a_hand_bootstrap(gpt2_cmp):
    c = gpt2_cmp
    point = hand_statistics(c.exact, c.estimate, c.k, c.sign_tol)
    for name, value in point.items():
        assert getattr(c, name).value == pytest.approx(value, abs=1e-9), name
    # the bootstrap by hand: the documented generator, the same resampled prompts for both methods
    batch = c.exact.shape[-1]
    idx = torch.randint(batch, (c.n_resamples, batch), generator=derive_generator(c.seed, "hookpatch.compare"))
    boot = {name: [] for name in point}
    for row in idx:
        stats = hand_statistics(c.exact[:, row], c.estimate[:, row], c.k, c.sign_tol)
        for name, value in stats.items():
            boot[name].append(value)
    for name, values in boot.items():
        values = np.array(values, dtype=float)
        values = values[~np.isnan(values)]
        low, high = np.quantile(values, [0.025, 0.975])
        stat = getattr(c, name)
        assert (stat.ci_low, stat.ci_high) == pytest.approx((low, high), abs=1e-9), name
    assert c.pearson.ci_low < c.pearson.ci_high


def test_disagreements_and_sign_flips_match_a_hand_sort(gpt2_cmp):
    c = gpt2_cmp
    exact, est = c.exact.mean(-1).tolist(), c.estimate.mean(-1).tolist()
    by_gap = sorted(range(len(c.edges)), key=lambda i: (-abs(est[i] - exact[i]), i))
    df = c.disagreements(5)
    assert list(df["edge"]) == [c.edges[i] for i in by_gap[:5]]
    np.testing.assert_allclose(df["difference"], [est[i] - exact[i] for i in by_gap[:5]], atol=1e-7)
    assert list(df["sender"]) == [c.edges[i].split("->")[0] for i in by_gap[:5]]
    sign = lambda x: 0 if abs(x) <= c.sign_tol else np.sign(x)  # noqa: E731
    flips = sorted((i for i in range(len(c.edges)) if sign(exact[i]) != sign(est[i])), key=lambda i: -abs(exact[i]))
    assert list(c.sign_flips(n=None)["edge"]) == [c.edges[i] for i in flips]
    assert len(flips) == round((1 - c.sign_agreement.value) * len(c.edges))
    assert "largest disagreement: " + c.edges[by_gap[0]] in repr(c)


def test_noising_under_grouped_query_attention(llama_model, small_prompts):
    prompts = small_prompts[id(llama_model)]
    c = compare_edges(llama_model, prompts, LogitDiff(prompts), edges=LLAMA_EDGES, direction="noising",
                      n_resamples=50, progress=False)
    labels = sorted(LLAMA_EDGES, key=graph(llama_model).index)
    exact = plain_effects(llama_model, prompts, labels, "noising")
    assert exact.abs().max() > 0.05
    torch.testing.assert_close(c.exact, exact, atol=2e-5, rtol=1e-4)
    scores = edge_attribution(llama_model, prompts, LogitDiff(prompts), direction="noising", progress=False)
    torch.testing.assert_close(c.estimate, scores.values[[graph(llama_model).index(e) for e in labels]].float())
    assert c.pearson.value == pytest.approx(hand_statistics(c.exact, c.estimate, c.k, 1e-6)["pearson"], abs=1e-9)


def test_default_selection_covers_both_ends(gpt2_model, small_prompts):
    prompts = small_prompts[id(gpt2_model)]
    scores = edge_attribution(gpt2_model, prompts, LogitDiff(prompts), method="eap-ig", steps=3, progress=False)
    c = compare_edges(gpt2_model, prompts, LogitDiff(prompts), scores, n_top=4, n_random=5, n_resamples=50,
                      progress=False)
    g = graph(gpt2_model)
    size = scores.values.mean(-1).abs().tolist()
    top = sorted(range(g.n_edges), key=lambda i: (-size[i], i))[:4]
    assert {e for e, s in zip(c.edges, c.selected, strict=True) if s == "top"} == {g.edges[i].label for i in top}
    randoms = [g.index(e) for e, s in zip(c.edges, c.selected, strict=True) if s == "random"]
    assert len(randoms) == 5 and not set(randoms) & set(top)
    assert list(c.edges) == sorted(c.edges, key=g.index)
    torch.testing.assert_close(c.estimate, scores.values[[g.index(e) for e in c.edges]].float())
    assert c.attribution.provenance.method == "eap_ig"
    again = _select(g, scores, None, 4, 5, seed=0)
    other = _select(g, scores, None, 4, 5, seed=1)
    assert again[0] == tuple(g.index(e) for e in c.edges) and other[0] != again[0]  # seeded draw
    assert _select(g, scores, None, 60, 50, seed=0) == (tuple(range(110)), ("all",) * 110)  # a small graph: all


def test_eap_ig_scores_are_computed_when_not_given(gpt2_model, small_prompts):
    prompts = small_prompts[id(gpt2_model)]
    c = compare_edges(gpt2_model, prompts, LogitDiff(prompts), edges=GPT2_EDGES[:4], method="eap-ig", steps=2,
                      n_resamples=20, progress=False)
    ig = edge_attribution(gpt2_model, prompts, LogitDiff(prompts), method="eap-ig", steps=2, progress=False)
    g = graph(gpt2_model)
    torch.testing.assert_close(c.estimate, ig.values[[g.index(e) for e in c.edges]].float())


def test_bad_input(gpt2_model, llama_model, small_prompts):
    prompts = small_prompts[id(gpt2_model)]
    metric = LogitDiff(prompts)
    scores = edge_attribution(gpt2_model, prompts, metric, progress=False)
    two = prompts.select([0, 1])

    def call(**kw):
        kw = {"edges": GPT2_EDGES[:3], "progress": False, **kw}
        return compare_edges(gpt2_model, prompts, metric, kw.pop("scores", scores), **kw)

    cases = [
        (dict(edges=["input->L0H0.x"]), "receiver"),
        (dict(edges=["L1H0->L0H1.q"]), "not in the graph"),
        (dict(edges=["input->L0H0.q"]), "edges: 1 distinct"),
        (dict(edges=None, n_top=1, n_random=0), "n_top + n_random"),
        (dict(n_top=-1), "n_top"),
        (dict(k=4), "k=4"),
        (dict(level=1.5), "level"),
        (dict(n_resamples=0), "n_resamples"),
        (dict(direction="sideways"), "direction"),
        (dict(direction="noising"), "direction='denoising'"),
        (dict(scores=torch.zeros(110, 4)), "scores: expected an edge_attribution result"),
        (dict(scores=edge_attribution(gpt2_model, prompts, metric, per_position=True, progress=False)),
         "per_position=False"),
        (dict(scores=edge_attribution(gpt2_model, two, LogitDiff(two), progress=False)), "other prompts"),
    ]
    for kw, needle in cases:
        with pytest.raises(HookpatchError, match=re.escape(needle)):
            call(**kw)
    with pytest.raises(HookpatchError, match="graph edges"):  # a Llama's scores on a GPT-2
        lprompts = small_prompts[id(llama_model)]
        other = edge_attribution(llama_model, lprompts, LogitDiff(lprompts), progress=False)
        call(scores=other)
