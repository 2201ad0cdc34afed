"""Saved results: the versioned file format, and reading files of the previous version.

A file is a ``torch.save`` of plain data and tensors, read back with ``weights_only=True``
(nothing is unpickled but tensors, numbers, text, lists and dicts):

- format version 2 (current): ``format``, ``format_version``, ``values``, ``axes``,
  ``labels``, ``clean``, ``corrupted``, ``terms`` (name → tensor) and ``provenance`` (the
  :class:`~hookpatch._provenance.Provenance` as plain data);
- format version 1 (hookpatch before typed provenance): the same tensors with a
  free-form ``info`` dict and ``kind: "hookpatch.SweepResult"``. Its ``info`` is translated
  into a provenance record (:func:`provenance_from_info`); what version 1 did not record
  (model, prompt fingerprint, hookpatch version) stays ``None``.

The same translation backs the read-only ``SweepResult.info`` kept for old code
(:func:`legacy_info`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hookpatch._provenance import GridFacts, MetricSpec, Provenance, ResultKind
from hookpatch.errors import HookpatchError
from hookpatch.hooks._factory import ABLATIONS

if TYPE_CHECKING:
    from hookpatch.results import SweepResult

FORMAT = "hookpatch.SweepResult"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_HOW = "results are saved with result.save(path) and read back with SweepResult.load(path)"

# Per-prompt terms that DLA results keep beside the grid, by their name in a version-1 ``info``.
TERM_KEYS = ("bias", "attn_bias", "mlp_bias")
_ATTRIBUTION_VALUES = "estimated metric change, patched - unpatched (per prompt)"
_KIND_OF_METHOD: dict[str, ResultKind] = {
    "patch": "patched_metric",
    **{how: "patched_metric" for how in ABLATIONS},
    "attribution": "attribution_estimate",
    "integrated_gradients": "attribution_estimate",
    "dla": "effect",
    "dla_heads": "effect",
    "dla_neurons": "effect",
    "logit_lens": "readout",
}


def save_result(result: SweepResult, path: str | Path) -> None:
    """Write ``result`` to ``path`` in the current format version."""
    torch.save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "values": result.values.detach().cpu(),
            "axes": list(result.axes),
            "labels": {k: list(v) for k, v in result.labels.items()},
            "clean": result.clean.detach().cpu(),
            "corrupted": None if result.corrupted is None else result.corrupted.detach().cpu(),
            "terms": {k: v.detach().cpu() for k, v in result.terms.items()},
            "provenance": result.provenance.to_dict(),
        },
        path,
    )


def load_result(cls: type[SweepResult], path: str | Path) -> SweepResult:
    """Read a result of format version 1 or 2 from ``path`` (see the module docstring)."""
    if not Path(path).is_file():
        raise HookpatchError(f"path={str(path)!r}: no such file; {_HOW}.")
    try:
        data = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise HookpatchError(
            f"path={str(path)!r} could not be read as a hookpatch sweep result (it is truncated, "
            f"or was not written by SweepResult.save: {type(err).__name__}); {_HOW}."
        ) from err
    if not isinstance(data, dict):
        raise HookpatchError(f"path={str(path)!r} is not a hookpatch sweep result; {_HOW}.")
    tensors = ("values", "axes", "labels", "clean", "corrupted")
    if data.get("format") == FORMAT and "format_version" in data:
        version = data["format_version"]
        if version not in READABLE_VERSIONS:
            raise HookpatchError(
                f"path={str(path)!r} is a hookpatch sweep result of format version {version!r}; this "
                f"hookpatch reads format versions {', '.join(map(str, READABLE_VERSIONS))}. It was "
                "probably written by a newer hookpatch: upgrade hookpatch to read it."
            )
        keys = (*tensors, "terms", "provenance")
        if any(k not in data for k in keys):
            missing = [k for k in keys if k not in data]
            raise HookpatchError(f"path={str(path)!r}: the sweep result lacks {missing} (a damaged file); {_HOW}.")
        provenance, terms = Provenance.from_dict(data["provenance"]), dict(data["terms"])
    elif data.get("kind") == FORMAT and all(k in data for k in (*tensors, "info")):  # format version 1
        provenance, terms = provenance_from_info(data["info"])
    else:
        raise HookpatchError(f"path={str(path)!r} is not a hookpatch sweep result; {_HOW}.")
    return cls(
        values=data["values"],
        axes=tuple(data["axes"]),
        labels={k: tuple(v) for k, v in data["labels"].items()},
        clean=data["clean"],
        corrupted=data["corrupted"],
        provenance=provenance,
        terms=terms,
    )


def provenance_from_info(info: Mapping[str, Any]) -> tuple[Provenance, dict[str, Tensor]]:
    """The provenance and per-prompt terms that a version-1 ``info`` dict described.

    Methods version 1 did not know (a result built by hand) become readouts under their own
    name; the keys version 1 never wrote (model, prompt fingerprint, version) stay ``None``.
    """
    method = str(info.get("method", "unknown"))
    kind = _KIND_OF_METHOD.get(method, "readout")
    ablation = str(info["ablation"]) if "ablation" in info else (method if method in ABLATIONS else None)
    feeds = info.get("kv_head_feeds")
    grid = None if feeds is None else GridFacts(kv_head_feeds=tuple((str(k), tuple(v)) for k, v in feeds.items()))

    def number(key: str) -> int | None:
        return None if info.get(key) is None else int(info[key])

    provenance = Provenance(
        kind=kind,
        method="ablation" if ablation else method,
        metric=MetricSpec.from_dict(info.get("metric")),
        component=info.get("component"),
        direction=info.get("direction"),
        ablation=ablation,
        seed=number("seed"),
        steps=number("steps"),
        passes=number("passes"),
        convention=info.get("convention"),
        layer=number("layer"),
        task=info.get("task"),
        runner=info.get("runner"),
        grid=grid,
        hookpatch_version=None,
    )
    terms = {key: torch.tensor(info[key], dtype=torch.float32) for key in TERM_KEYS if key in info}
    return provenance, terms


def legacy_info(provenance: Provenance, terms: Mapping[str, Tensor]) -> dict[str, Any]:
    """The version-1 ``info`` dict of a result: the inverse of :func:`provenance_from_info`."""
    info: dict[str, Any] = {"method": provenance.ablation or provenance.method,
                            "metric": provenance.metric.to_dict()}
    for key in ("component", "direction", "ablation", "seed", "steps", "passes", "convention", "layer",
                "task", "runner"):
        value = getattr(provenance, key)
        if value is not None:
            info[key] = value
    if provenance.kind == "attribution_estimate":
        info["values"] = _ATTRIBUTION_VALUES
    if provenance.grid is not None and provenance.grid.kv_head_feeds is not None:
        info["kv_head_feeds"] = {k: list(v) for k, v in provenance.grid.kv_head_feeds}
    for key, tensor in terms.items():
        info[key] = tensor.tolist()
    return info
