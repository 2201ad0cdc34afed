"""Attention views: circuitsvis' AttentionHeads for chosen heads on one prompt, offline.

The patterns come from ``model.run_with_cache`` (``blocks.{l}.attn.hook_pattern``) on the
chosen prompt alone, cut to its real length; heads are given as ``(layer, head)`` pairs,
``"L9H7"`` labels, or a :func:`hookpatch.readouts.rank_heads` table (its rows, in order).

The HTML never loads anything: circuitsvis' own browser bundle (``circuitsvis/dist/cdn/
iife.js``, shipped inside the Python package) is inlined as a classic ``<script>`` that
defines the global ``CircuitsVis``, and each view is a ``<div>`` plus a small script calling
``CircuitsVis.render``. circuitsvis' ``render`` would instead probe the network and import
from a CDN. A page with several views includes :func:`javascript` once and the views with
``include_js=False``.
"""

from __future__ import annotations

import html
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hookpatch.errors import HookpatchError
from hookpatch.model._facts import hook_name, model_facts
from hookpatch.model._loading import require_eval
from hookpatch.tasks._promptset import PromptSet

RUNS = ("clean", "corrupted")
HEAD_LABEL = re.compile(r"^L(\d+)H(\d+)$")


def bundle_path() -> Path:
    """The circuitsvis browser bundle shipped in the installed circuitsvis package."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.exists():
        raise HookpatchError(f"circuitsvis' bundled JavaScript is missing ({path}); reinstall circuitsvis.")
    return path


def javascript() -> str:
    """A ``<script>`` defining the global ``CircuitsVis`` from the bundled JS (~1.3 MB); once per page."""
    code = bundle_path().read_text(encoding="utf-8")
    code = re.sub(r"//# sourceMappingURL=\S*\s*$", "", code)  # the map is not shipped with the page
    code = code.replace("</script", "<\\/script")  # only inside JS strings; same string, page stays valid
    return f"<script>\n{code}\n</script>"


@dataclass(frozen=True)
class AttentionView:
    """Attention patterns of some heads on one prompt, rendered by circuitsvis.

    Attributes:
        patterns: ``[head, query, key]`` attention probabilities, cut to the prompt's length.
        tokens: the prompt's tokens as text.
        head_labels: one ``"L9H7"`` label per head.
        prompt, run: which prompt of the set and which run (``"clean"``/``"corrupted"``).
        title: the heading shown above the view.
    """

    patterns: Float[Tensor, "head query key"] = field(repr=False)
    tokens: tuple[str, ...]
    head_labels: tuple[str, ...]
    prompt: int
    run: str
    title: str

    def to_html(self, include_js: bool = True) -> str:
        """An HTML fragment that renders offline; ``include_js=False`` if the page has :func:`javascript`."""
        div = f"hookpatch-attention-{uuid.uuid4().hex[:12]}"
        props = {
            "attention": [[[round(v, 5) for v in row] for row in head] for head in self.patterns.tolist()],
            "tokens": list(self.tokens),
            "attentionHeadNames": list(self.head_labels),
            "maskUpperTri": True,
        }
        props_js = json.dumps(props).replace("<", "\\u003c")  # "<" occurs only in strings
        return (
            (javascript() + "\n" if include_js else "")
            + f'<div class="hookpatch-attention">\n<h4>{html.escape(self.title)}</h4>\n'
            + f'<div id="{div}" style="margin: 15px 0;"></div>\n'
            + f'<script>\nCircuitsVis.render("{div}", CircuitsVis.AttentionHeads, {props_js});\n</script>\n</div>'
        )

    def _repr_html_(self) -> str:
        """Jupyter/Colab: a self-contained fragment (JS inlined)."""
        return self.to_html(include_js=True)

    def save(self, path: str | Path) -> None:
        """Write a standalone HTML page with the view to ``path``."""
        page = (f"<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"</head>\n<body>\n{self.to_html()}\n</body>\n</html>\n")
        Path(path).write_text(page, encoding="utf-8")


@torch.no_grad()
def attention_view(
    model: Any, prompts: PromptSet, heads: Any, *, prompt: int = 0, run: str = "clean", title: str | None = None
) -> AttentionView:
    """Attention patterns of ``heads`` on prompt ``prompt`` of ``prompts``.

    Example:
        >>> top = rank_heads(dla_by_head(model, prompts, LogitDiff(prompts)), k=3)
        >>> attention_view(model, prompts, top[top.sign == "positive"])      # renders in Jupyter
        >>> attention_view(model, prompts, ["L9H6", "L9H9"], prompt=2).save("heads.html")

    Args:
        model: a TransformerBridge in eval mode.
        prompts: the prompt set.
        heads: ``(layer, head)`` pairs, ``"L9H7"`` labels, or a rank_heads DataFrame.
        prompt: which prompt to show. run: ``"clean"`` or ``"corrupted"``.
        title: the heading (default: the run, prompt index and prompt text).
    """
    require_eval(model)
    if run not in RUNS:
        raise HookpatchError(f"run={run!r}: expected one of {RUNS}.")
    if not -len(prompts) <= prompt < len(prompts):
        raise HookpatchError(f"prompt={prompt} is out of range for {len(prompts)} prompts.")
    prompt = prompt % len(prompts)
    facts = model_facts(model)
    pairs = parse_heads(heads, facts.n_layers, facts.n_heads)
    length = int(prompts.lengths[prompt])
    tokens = prompts.clean_tokens if run == "clean" else prompts.corrupted_tokens
    str_tokens = (prompts.clean_str_tokens if run == "clean" else prompts.corrupted_str_tokens)[prompt]
    layers = sorted({layer for layer, _ in pairs})
    names = {hook_name("pattern", layer) for layer in layers}
    _, cache = model.run_with_cache(tokens[prompt : prompt + 1, :length], names_filter=lambda n: n in names)
    patterns = torch.stack([cache[hook_name("pattern", layer)][0, head] for layer, head in pairs])
    text = (prompts.clean_prompts if run == "clean" else prompts.corrupted_prompts)[prompt]
    return AttentionView(
        patterns=patterns.float().cpu(),
        tokens=tuple(str_tokens[:length]),
        head_labels=tuple(f"L{layer}H{head}" for layer, head in pairs),
        prompt=prompt,
        run=run,
        title=title if title is not None else f"Attention patterns, {run} prompt {prompt}: {text}",
    )


def attention_view_html(
    model: Any, prompts: PromptSet, heads: Any, *, prompt: int = 0, run: str = "clean",
    title: str | None = None, include_js: bool = True,
) -> str:
    """:func:`attention_view` as an HTML fragment; ``include_js=False`` on a page that has :func:`javascript`."""
    return attention_view(model, prompts, heads, prompt=prompt, run=run, title=title).to_html(include_js)


def parse_heads(heads: Any, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """``(layer, head)`` pairs from pairs, ``"L9H7"`` labels or a rank_heads table, range-checked."""
    if hasattr(heads, "columns"):  # a DataFrame, e.g. rank_heads(...)
        if not {"layer", "head"} <= set(heads.columns):
            raise HookpatchError("heads: a table of heads needs 'layer' and 'head' columns, as rank_heads gives.")
        items: Sequence[Any] = list(zip(heads["layer"].tolist(), heads["head"].tolist(), strict=True))
    elif isinstance(heads, str):
        items = [heads]
    elif isinstance(heads, tuple) and len(heads) == 2 and all(isinstance(v, int) for v in heads):
        items = [heads]  # one (layer, head) pair
    else:
        items = list(heads)
    if not items:
        raise HookpatchError("heads is empty; name at least one head, e.g. ['L1H0'] or [(1, 0)].")
    pairs = []
    for item in items:
        if isinstance(item, str):
            match = HEAD_LABEL.match(item.strip())
            if match is None:
                raise HookpatchError(f"head label {item!r} is not of the form 'L9H7' (layer 9, head 7).")
            layer, head = int(match[1]), int(match[2])
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            layer, head = int(item[0]), int(item[1])
        else:
            raise HookpatchError(f"head {item!r}: give (layer, head) pairs or labels like 'L9H7'.")
        if not 0 <= layer < n_layers or not 0 <= head < n_heads:
            raise HookpatchError(
                f"head L{layer}H{head} does not exist: the model has {n_layers} layers of {n_heads} heads "
                f"(L0H0 to L{n_layers - 1}H{n_heads - 1})."
            )
        pairs.append((layer, head))
    return pairs
