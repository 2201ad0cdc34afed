"""Pieces of the one-screen ``repr`` of prompt sets, metrics and results.

A ``repr`` at the prompt should say what an object is (task, sizes, labels, baselines) in a
few lines, never print every prompt or tensor: these helpers shorten the parts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hookpatch._provenance import Provenance


def clip(text: str, width: int = 80) -> str:
    """``text`` cut to at most ``width`` characters with ``…`` in the middle."""
    if len(text) <= width:
        return text
    half = (width - 1) // 2
    return text[:half] + "…" + text[-half:]


def listing(items: Iterable[object], n: int = 6) -> str:
    """``"a, b, c, …, z"``: the first ``n - 1`` items and the last, comma-separated."""
    texts = [str(i) for i in items]
    if len(texts) > n:
        texts = texts[: n - 1] + ["…", texts[-1]]
    return ", ".join(texts)


def axes_line(axes: Iterable[str], labels: Mapping[str, Sequence[str]]) -> str:
    """``"layer 3 (0, 1, 2) × pos 5 (IO, S1, …, END)"``: each axis, its size and some labels."""
    return " × ".join(f"{a} {len(labels[a])} ({listing(labels[a])})" for a in axes)


def what_was_done(provenance: Provenance) -> str:
    """``"patch resid_pre denoising, metric normalized_logit_diff"`` from a result's provenance."""
    words = (provenance.method_label, provenance.component, provenance.direction, provenance.convention)
    text = " ".join(str(v) for v in words if v)
    name = provenance.metric.name
    return ", ".join(part for part in (text, f"metric {name}" if name else "") if part)
