"""A whole case study in one self-contained HTML page: ``hookpatch report {pronoun,ioi}``.

Runs the steps of a case study on a model, for the pronoun or the IOI task — prediction
check, logit lens, layer and head DLA, attention views of the top heads, head ablation (zero
and mean), residual patching by layer × position, head patching, attribution vs activation
patching, path patching (IOI), an EAP-IG circuit with its faithfulness curve — and writes one
HTML file with plotly's JavaScript and circuitsvis' inlined once, so it opens offline.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hookpatch._checks import check_device
from hookpatch.errors import HookpatchError

TASKS = ("pronoun", "ioi")
IOI_POSITIONS = ["IO", "S1", "S1+1", "S2", "END"]


@dataclass
class Report:
    """Sections of a report (title, HTML body) and the lines of its text summary."""

    title: str
    sections: list[tuple[str, str]] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    def add(self, title: str, body: str, note: str = "") -> None:
        text = f"<p class='note'>{html.escape(note)}</p>" if note else ""
        self.sections.append((title, text + body))

    def to_html(self) -> str:
        """One page: plotly's and circuitsvis' JavaScript inlined once, no external URL."""
        from plotly.offline import get_plotlyjs

        from hookpatch.views import javascript as attention_javascript

        toc = "".join(f"<li><a href='#s{i}'>{html.escape(t)}</a></li>" for i, (t, _) in enumerate(self.sections))
        body = "".join(
            f"<section id='s{i}'><h2>{html.escape(t)}</h2>{b}</section>" for i, (t, b) in enumerate(self.sections)
        )
        summary = "".join(f"<li>{html.escape(line)}</li>" for line in self.summary)
        return (
            "<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
            "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:2px 6px}"
            ".note{color:#444}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script>"
            f"{attention_javascript()}"
            f"</head><body><h1>{html.escape(self.title)}</h1><ul>{summary}</ul><ol>{toc}</ol>{body}</body></html>"
        )


def _figure(fig: Any) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False)


def _table(frame: Any) -> str:
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)


def _ranked_heads(table: Any, title: str) -> str:
    """A rank_heads table as bars with paired CIs and the table itself ("" if no head moved the metric)."""
    from hookpatch import views

    return _figure(views.ranked_heads_bar(table, title=title)) + _table(table) if len(table) else ""


def build_report(model: Any, model_name: str, task: str, n_prompts: int | None, *, progress: bool = True) -> Report:
    """Run the case study for ``task`` on ``model`` and collect its sections."""
    from hookpatch import views
    from hookpatch.attribution import compare
    from hookpatch.metrics import AnswerLoss, LogitDiff, Normalized, evaluate
    from hookpatch.readouts import dla_by_component, dla_by_head, logit_lens, predictions, rank_heads
    from hookpatch.sweeps import ablation_sweep, patch_sweep
    from hookpatch.tasks._ioi import ioi_prompts
    from hookpatch.tasks._pronoun import pronoun_prompts

    check_arguments(task, n_prompts)
    if task == "pronoun":
        prompts = pronoun_prompts(model, n=n_prompts)
        positions = None
    else:
        prompts = ioi_prompts(model, n_prompts or 16)
        positions = IOI_POSITIONS
    report = Report(f"hookpatch report: {task} on {model_name}")
    base = LogitDiff(prompts)
    metric = Normalized.from_model(model, base)
    clean = evaluate(model, base, prompts.clean_tokens)
    corrupted = evaluate(model, base, prompts.corrupted_tokens)
    report.summary.append(
        f"{len(prompts)} {task} prompts; logit difference clean {clean.mean():+.3f}, corrupted {corrupted.mean():+.3f}"
    )

    check = predictions(model, prompts.clean_prompts[0], prompts.answers[0][0], k=10)
    assert check.answer is not None  # predictions() ranks the answer it is given
    report.add(
        "Prediction check", _table(check.to_dataframe()),
        f"{prompts.clean_prompts[0]!r} → answer {check.answer.token!r} has rank {check.answer.rank}, "
        f"probability {check.answer.prob:.1%}.",
    )
    per_prompt = "".join(
        f"<tr><td>{html.escape(p)}</td><td>{html.escape(a[0])}</td><td>{c:+.3f}</td><td>{d:+.3f}</td></tr>"
        for p, a, c, d in zip(prompts.clean_prompts, prompts.answers, clean.tolist(), corrupted.tolist(), strict=True)
    )
    report.add("Logit difference per prompt",
               f"<table><tr><th>prompt</th><th>answer</th><th>clean</th><th>corrupted</th></tr>{per_prompt}</table>")

    lenses = [logit_lens(model, prompts, base, convention=c) for c in ("final_scale", "renormalized")]
    report.add("Logit lens", _figure(views.logit_lens_line(lenses)),
               "Logit difference read from the residual stream after each layer, with the final "
               "LayerNorm scale of the real run (linear, as DLA reads it) and renormalized per layer.")

    parts = dla_by_component(model, prompts, base)
    heads = dla_by_head(model, prompts, base)
    ranked = rank_heads(heads, k=3)
    report.add("Direct logit attribution by layer", _figure(views.dla_bars(parts)))
    report.add("Direct logit attribution by head", _figure(views.dla_heads_heatmap(heads))
               + _ranked_heads(ranked, "Top heads by DLA"))
    top = ranked[ranked["sign"] == "positive"]
    if len(top):
        report.summary.append("top heads by DLA: " + ", ".join(top["label"]))
        report.add("Attention patterns of the top heads",
                   views.attention_view(model, prompts, top, prompt=0).to_html(include_js=False),
                   f"Prompt 0: {prompts.clean_prompts[0]!r}.")

    for how in ("zero", "mean"):
        ablated = ablation_sweep(model, prompts, base, "z", how=how, progress=progress)
        report.add(f"Head ablation ({how})", _figure(views.ablation_heatmap(ablated))
                   + _ranked_heads(rank_heads(ablated, k=3),
                                   f"Heads whose {how} ablation moves the logit difference most"),
                   "Logit difference after ablating each head's output; the colour midpoint is the clean run. "
                   "The bars rank heads by the change from the clean run (mean over prompts, paired 95% CI).")
    loss = ablation_sweep(model, prompts, AnswerLoss(prompts), "z", how="zero", progress=progress)
    report.add("Head ablation (zero), loss", _figure(views.ablation_heatmap(loss)))

    resid = patch_sweep(model, prompts, metric, "resid_pre", positions=positions, progress=progress)
    report.add("Residual stream patching (layer × position)", _figure(views.patching_heatmap(resid)),
               "Clean residual stream patched into the corrupted run; 1 = clean, 0 = corrupted.")
    head_patch = patch_sweep(model, prompts, metric, "z", by=("layer", "head"), progress=progress)
    patch_ranked = rank_heads(head_patch, k=3)
    report.add("Head patching (all positions)", _figure(views.patching_heatmap(head_patch))
               + _ranked_heads(patch_ranked, "Heads whose clean output restores the most"),
               "The bars rank heads by the change from the corrupted run (mean over prompts, paired 95% CI).")
    restores = patch_ranked[patch_ranked["sign"] == "positive"]
    if len(restores):
        best = restores.iloc[0]
        report.summary.append(
            f"head patching: largest recovery {best['effect_mean']:.3f} [{best['effect_ci_low']:.3f}, "
            f"{best['effect_ci_high']:.3f}] at {best['label']} (Holm-adjusted p {best['p_adjusted']:.3g})"
        )

    comparison = compare(model, prompts, metric, "z", by=("layer", "head"), progress=progress)
    report.add("Attribution vs activation patching (heads)", _figure(views.comparison_scatter(comparison))
               + _table(comparison.disagreements(5)))
    report.summary.append(
        f"attribution vs activation patching over heads: Pearson {comparison.pearson.value:.3f}, "
        f"Spearman {comparison.spearman.value:.3f}"
    )
    if task == "ioi":
        _path_patching_section(report, model, prompts, metric, heads, progress)
    _circuit_section(report, model, prompts, metric, progress)
    return report


def check_arguments(
    task: str, n_prompts: int | None, out: str | Path | None = None, device: str | None = None
) -> None:
    """Refuse bad arguments (task, prompt count, output path, device) before any model is loaded."""
    check_device(device, "--device")
    if task not in TASKS:
        raise HookpatchError(f"unknown task {task!r}; expected one of {TASKS}.")
    if n_prompts is not None and n_prompts < 1:
        raise HookpatchError(f"--n-prompts {n_prompts}: ask for at least one prompt.")
    if out is not None:
        out = Path(out)
        parent = out.parent if str(out.parent) else Path(".")
        if out.is_dir() or not parent.is_dir():
            raise HookpatchError(f"cannot write the report to {out}: choose a file in an existing directory.")
        if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise HookpatchError(f"cannot write the report to {out}: permission denied.")


def run_report(task: str, model_name: str, out: str | Path, n_prompts: int | None = None,
               device: str | None = None, progress: bool = True) -> Report:
    """Load ``model_name``, run the case study and write the HTML to ``out``."""
    from hookpatch.model._loading import load_model

    check_arguments(task, n_prompts, out, device)
    model = load_model(model_name, device=device)
    report = build_report(model, model_name, task, n_prompts, progress=progress)
    Path(out).write_text(report.to_html(), encoding="utf-8")
    return report


PATH_RECEIVERS = 3  # at most this many receiver heads for the path patching section
PATH_MIN_SHARE = 0.1  # a receiver's DLA is at least this share of the top receiver's


def path_receivers(dla: Any, k: int = PATH_RECEIVERS, min_share: float = PATH_MIN_SHARE) -> list[str]:
    """The heads whose queries the path patching section patches: the top ``k`` heads by
    positive mean DLA at the final position, in layers ≥ 1 (a layer-0 head reads only the
    embeddings, so no head sends to it), dropping heads under ``min_share`` of the top one."""
    mean = dla.mean()  # [layer, head]
    ranked = sorted(
        ((float(mean[i, j]), f"L{layer}{head}")
         for i, layer in enumerate(dla.labels["layer"]) if int(layer) >= 1
         for j, head in enumerate(dla.labels["head"]) if float(mean[i, j]) > 0),
        key=lambda item: -item[0],
    )[:k]
    return [label for value, label in ranked if value >= min_share * ranked[0][0]]


def path_patching_sentences(result: Any, k: int = 2) -> str:
    """Two sentences from a path patching result: its top ``k`` senders by ``|mean effect|``
    with paired CIs, and how many senders' CIs exclude 0."""
    from hookpatch.views._paths import sender_labels, top_cells

    eff = result.effects()
    labels = sender_labels(result)
    mean, low, high = (t.reshape(-1) for t in (eff.mean, eff.ci_low, eff.ci_high))
    top = [f"{labels[i]} ({float(mean[i]):+.3g} [{float(low[i]):+.3g}, {float(high[i]):+.3g}])"
           for i in top_cells(eff.mean, k).tolist()]
    receivers = ", ".join(r.split(".")[0] for r in result.provenance.receivers)
    positions = result.provenance.receiver_positions
    where = f" at {', '.join(str(x) for x in positions)}" if positions else ""
    excluding = int(((low > 0) | (high < 0)).sum())
    return (
        f"Through the queries of {receivers}{where}, the sender heads that move "
        f"{result.provenance.metric.name} most are {' and '.join(top)} "
        f"(mean change against the {eff.baseline} run, paired {eff.level:.0%} CI). "
        f"{excluding} of {len(labels)} sender heads have an interval that excludes 0."
    )


def _path_patching_section(report: Report, model: Any, prompts: Any, metric: Any, dla: Any, progress: bool) -> None:
    """"Path patching into the top heads' queries": which earlier heads change, at END, the
    queries of the heads that write the answer (the IOI paper's name-mover analysis)."""
    from hookpatch import views
    from hookpatch.circuits import path_patch_sweep

    title = "Path patching into the top heads' queries"
    receivers = path_receivers(dla)
    if not receivers:
        report.add(title, "", "No head after layer 0 raises the logit difference directly, so no head's "
                              "query has a sender to path-patch from.")
        return
    result = path_patch_sweep(model, prompts, metric, receivers, receiver_input="q", semantics="ioi",
                              receiver_positions="END", progress=progress)
    sentences = path_patching_sentences(result)
    report.summary.append("path patching: " + sentences.split(". ")[0])
    report.add(
        title, _figure(views.path_patching_heatmap(result)) + f"<p>{html.escape(sentences)}</p>",
        f"Receivers: the top heads by DLA at END in layers ≥ 1 ({', '.join(receivers)}). Each earlier head's "
        "clean output is patched into the corrupted run with every other head frozen (IOI-paper path "
        "patching); only the receivers' queries at END take the result. Effects are changes of the normalized "
        "logit difference against the corrupted run (1 = the whole clean − corrupted gap).",
    )


CIRCUIT_BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # fractions of the edges; short enough for a small model
CIRCUIT_TARGET = 0.8  # the discovered circuit: the smallest budget whose faithfulness reaches this


def discovered_circuit(curve: Any, target: float = CIRCUIT_TARGET) -> int:
    """The index of the curve's smallest budget whose faithfulness (point estimate) is at least
    ``target``, or of the largest budget when none reaches it."""
    reached = [i for i, f in enumerate(curve.faithfulness.tolist()) if f >= target]
    return reached[0] if reached else len(curve.budgets) - 1


def circuit_sentences(curve: Any, index: int, target: float = CIRCUIT_TARGET) -> str:
    """Two or three sentences from a faithfulness curve and the chosen budget ``index``: the
    circuit's size and faithfulness with its interval, and CPR/CMD against the random baseline."""
    c = curve.circuits[index]
    f, low, high = (float(t[index]) for t in (curve.faithfulness, curve.ci_low, curve.ci_high))
    reached = f >= target
    which = (f"The smallest circuit with faithfulness ≥ {target:g}" if reached
             else f"No budget reaches faithfulness {target:g}; the largest circuit")
    text = (f"{which} keeps {len(c)} of {c.graph.n_edges} edges (budget {curve.budgets[index]:g}, "
            f"{len(c.nodes)} nodes) and has faithfulness {f:.3f} [{low:.3f}, {high:.3f}] "
            f"({curve.level:.0%} bootstrap CI over prompts). ")
    text += f"Over the budgets CPR is {curve.cpr!r} and CMD {curve.cmd!r}"
    if curve.random_cpr is not None:
        text += (f", against CPR {curve.random_cpr!r} and CMD {curve.random_cmd!r} for random circuits of the "
                 "same sizes")
    return text + " (CPR: higher is better; CMD: lower is better)."


def _circuit_section(report: Report, model: Any, prompts: Any, metric: Any, progress: bool) -> None:
    """"Circuit": EAP-IG scores every edge, top-n circuits at each budget of
    ``CIRCUIT_BUDGETS`` are run alone by exact edge patching, and the smallest one that keeps
    ``CIRCUIT_TARGET`` of the clean − corrupted gap is drawn as "the discovered circuit"."""
    from hookpatch import views
    from hookpatch.circuits import edge_attribution, faithfulness_curve

    scores = edge_attribution(model, prompts, metric, method="eap-ig", steps=5, progress=progress)
    curve = faithfulness_curve(model, prompts, metric, scores.mean(), budgets=CIRCUIT_BUDGETS, progress=progress)
    index = discovered_circuit(curve)
    sentences = circuit_sentences(curve, index)
    report.summary.append("circuit: " + sentences.split(". ")[0])
    report.add(
        "Circuit",
        _figure(views.circuit_graph(curve.circuits[index])) + _figure(views.faithfulness_curve_plot(curve))
        + f"<p>{html.escape(sentences)}</p>",
        "Every edge (sender output → receiver input) scored by EAP-IG (5 steps, denoising); at each budget the "
        "top-|score| edges, pruned to input → logits paths, are run alone: the clean run with every other edge "
        "given the corrupted run's sender output. Faithfulness 1 = the full model, 0 = the corrupted run. "
        "Edge colour: sign of the score (blue raises the normalized logit difference); width: |score|; "
        "dash: the receiving input (q solid, k dashed, v dotted).",
    )
    _edge_comparison_section(report, model, prompts, metric, scores, progress)


def edge_comparison_sentences(comparison: Any) -> str:
    """Two sentences from an edge comparison: the agreement statistics with their CIs, and the
    edge where attribution and exact patching disagree most."""
    def stat(s: Any) -> str:
        return f"{s.value:.2f} [{s.ci_low:.2f}, {s.ci_high:.2f}]"

    worst = comparison.disagreements(1).iloc[0]
    return (
        f"On {len(comparison.edges)} edges (the top ones by |EAP-IG| and a random sample of the rest), EAP-IG "
        f"against exact single-edge patching: Pearson {stat(comparison.pearson)}, Spearman "
        f"{stat(comparison.spearman)}, sign agreement {stat(comparison.sign_agreement)}. They disagree most on "
        f"{worst['edge']} (attribution {worst['attribution']:+.3g}, exact {worst['exact']:+.3g})."
    )


def _edge_comparison_section(report: Report, model: Any, prompts: Any, metric: Any, scores: Any,
                             progress: bool) -> None:
    """"Attribution vs patching, edge by edge": the EAP-IG scores checked against exact
    single-edge patching on the top-scored edges and a random sample of the others."""
    from hookpatch import views
    from hookpatch.circuits import compare_edges

    comparison = compare_edges(model, prompts, metric, scores, progress=progress)
    sentences = edge_comparison_sentences(comparison)
    report.summary.append("edges: " + sentences.split(". ")[0])
    report.add(
        "Attribution vs patching, edge by edge",
        _figure(views.comparison_scatter(comparison)) + f"<p>{html.escape(sentences)}</p>",
        "Each point is one edge: its EAP-IG score (x) against the change exact patching of that edge alone makes "
        "(y), means over prompts; on the diagonal the first-order estimate is exact.",
    )
