"""Provenance: a typed, frozen record of what produced a result.

A result's numbers mean different things depending on how they were made: the metric after
a patch (to be compared with a baseline run), an effect already (DLA contributions), a
gradient estimate of a patching effect, or a metric read off a run (the logit lens). The
record says which (``kind``), and how: method, component, direction or ablation and seed,
the metric, the model and how it was loaded, the prompt set's fingerprint, the runner, the
grid, and the hookpatch version. Views, effects and comparisons read these fields; nothing
parses strings.

Every field is plain data (text, numbers, tuples) so the record saves as plain data
(:meth:`Provenance.to_dict`) and compares with ``==``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from hookpatch.errors import HookpatchError
from hookpatch.model._loading import LoadSpec

ResultKind = Literal["patched_metric", "effect", "attribution_estimate", "readout"]
"""What a result's values are:

- ``"patched_metric"``: the metric after an intervention (patching, ablation), per prompt;
  its effect is the change against a baseline run (clean or corrupted);
- ``"effect"``: already a contribution to the metric (direct logit attribution);
- ``"attribution_estimate"``: a gradient estimate of the change patching would make;
- ``"readout"``: the metric read off a run (the logit lens at each layer).
"""

KINDS: tuple[str, ...] = get_args(ResultKind)
DIRECTIONS = ("denoising", "noising")


def _current_version() -> str:
    from hookpatch import __version__

    return __version__


@dataclass(frozen=True)
class MetricSpec:
    """What a result's metric measured.

    Attributes:
        name: the metric's name (``"logit_diff"``, ``"normalized_logit_diff"``, or a plain
            callable's ``__name__``).
        linear: whether it is linear in the final residual stream (``None``: not known, a
            plain callable).
        base: for a normalized metric, the name of the metric it normalizes.
        normalization: for a normalized metric, the formula (clean run = 1, corrupted = 0).
        clean, corrupted: for a normalized metric, the base metric's mean on the clean and
            corrupted runs that fix the scale.
    """

    name: str
    linear: bool | None = None
    base: str | None = None
    normalization: str | None = None
    clean: float | None = None
    corrupted: float | None = None

    @property
    def normalized(self) -> bool:
        """Whether the metric is normalized so that the clean run is 1 and the corrupted run 0."""
        return self.normalization is not None

    @classmethod
    def of(cls, metric: Any) -> MetricSpec:
        """The description of a :class:`hookpatch.metrics.Metric` or of a plain callable."""
        describe = getattr(metric, "describe", None)
        if callable(describe):
            return cls.from_dict(describe())
        return cls(name=str(getattr(metric, "__name__", "metric")))

    @classmethod
    def from_dict(cls, data: Any) -> MetricSpec:
        """A spec from a metric's ``describe()`` dict (keys other than the fields are dropped)."""
        if not isinstance(data, dict):
            return cls(name=str(data) if data else "metric")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        for key in ("clean", "corrupted"):
            if values.get(key) is not None:
                values[key] = float(values[key])
        return cls(**{"name": "metric", **values})

    def to_dict(self) -> dict[str, Any]:
        """The non-empty fields, as a metric's ``describe()`` gives them."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in ("name", "linear") or getattr(self, f.name) is not None}


@dataclass(frozen=True)
class GridFacts:
    """The grid a sweep ran over, as asked (the labels on the result name each cell).

    Attributes:
        layers: the layers swept.
        positions: the columns or position names swept (``None``: no position axis).
        heads: the heads swept (``None``: no head axis); query heads, or KV heads for k, v,
            k_input and v_input under grouped-query attention.
        kv_head_feeds: for a grid over KV heads under grouped-query attention, each KV head's label with
            the labels of the query heads it feeds (``(("KV0", ("H0", "H1")), ...)``).
    """

    layers: tuple[int, ...] | None = None
    positions: tuple[int | str, ...] | None = None
    heads: tuple[int, ...] | None = None
    kv_head_feeds: tuple[tuple[str, tuple[str, ...]], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        feeds = None if self.kv_head_feeds is None else [[k, list(v)] for k, v in self.kv_head_feeds]
        return {"layers": _list(self.layers), "positions": _list(self.positions), "heads": _list(self.heads),
                "kv_head_feeds": feeds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridFacts:
        feeds = data.get("kv_head_feeds")
        return cls(layers=_tuple(data.get("layers")), positions=_tuple(data.get("positions")),
                   heads=_tuple(data.get("heads")),
                   kv_head_feeds=None if feeds is None else tuple((str(k), tuple(v)) for k, v in feeds))


@dataclass(frozen=True)
class Provenance:
    """What produced a result, as typed fields (see the module docstring).

    Attributes:
        kind: what the values are (:data:`ResultKind`).
        method: ``"patch"``, ``"path_patch"``, ``"edge_patch"``, ``"ablation"``, ``"attribution"``,
            ``"integrated_gradients"``,
            ``"dla"``, ``"dla_heads"``, ``"dla_neurons"``, ``"logit_lens"`` (or a name of one's
            own for results built by hand).
        metric: what the metric measured.
        component: the component patched, ablated or attributed (``None`` for readouts).
        direction: ``"denoising"`` or ``"noising"`` for patching and attribution, else ``None``.
        ablation: ``"zero"``, ``"mean"`` or ``"resample"`` for ablations, else ``None``.
        seed: the resample ablation's seed (recorded for every ablation), else ``None``.
        steps: attribution's interpolation steps (1: attribution patching; N: integrated gradients).
        passes: attribution's number of gradient passes.
        convention: the logit lens' final-LayerNorm convention (``"final_scale"``, ``"renormalized"``).
        layer: the layer of a per-neuron DLA.
        task: the prompt set's task name.
        prompts_fingerprint: :meth:`hookpatch.PromptSet.fingerprint` of the prompts run.
        model: how the model was loaded (:class:`hookpatch.model._loading.LoadSpec`), if known.
        runner: ``"fast"`` (the direct block runner) or ``"bridge"`` (the bridge's hooks).
        grid: the grid swept (:class:`GridFacts`), for sweeps and attribution.
        receivers: for path and edge patching, the receivers' labels (``"L9H9.q"``,
            ``"logits"``); the senders are the grid.
        semantics: path patching's ``"direct"`` (edges alone) or ``"ioi"`` (other heads frozen).
        freeze_mlps: whether IOI-semantics path patching froze the MLPs.
        receiver_positions: the positions receivers were patched at (``None``: all).
        hookpatch_version: the version that computed the values (``None``: not recorded, a
            file of format version 1).
    """

    kind: ResultKind
    method: str
    metric: MetricSpec = field(default_factory=lambda: MetricSpec("metric"))
    component: str | None = None
    direction: str | None = None
    ablation: str | None = None
    seed: int | None = None
    steps: int | None = None
    passes: int | None = None
    convention: str | None = None
    layer: int | None = None
    task: str | None = None
    prompts_fingerprint: str | None = None
    model: LoadSpec | None = None
    runner: str | None = None
    grid: GridFacts | None = None
    receivers: tuple[str, ...] | None = None
    semantics: str | None = None
    freeze_mlps: bool | None = None
    receiver_positions: tuple[int | str, ...] | None = None
    hookpatch_version: str | None = field(default_factory=_current_version)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HookpatchError(f"kind={self.kind!r}: expected one of {KINDS}.")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise HookpatchError(f"direction={self.direction!r}: expected one of {DIRECTIONS} or None.")
        if not isinstance(self.metric, MetricSpec):
            raise HookpatchError(
                f"metric= must be a MetricSpec; got {type(self.metric).__name__} (use MetricSpec.of(metric))."
            )

    @classmethod
    def unknown(cls) -> Provenance:
        """The record of a result built by hand without one: a readout by an unnamed method."""
        return cls(kind="readout", method="unknown", hookpatch_version=None)

    @property
    def default_baseline(self) -> str:
        """The run a result's effects are read against by default.

        Denoising patching → ``"corrupted"``; noising patching and ablations → ``"clean"``;
        effects, attribution estimates and readouts → ``"none"`` (the values as they are).
        """
        if self.kind != "patched_metric":
            return "none"
        return "corrupted" if self.direction == "denoising" else "clean"

    @property
    def values_are_changes(self) -> bool:
        """Whether the values are already contributions or changes (DLA, attribution)."""
        return self.kind in ("effect", "attribution_estimate")

    @property
    def method_label(self) -> str:
        """``"patch"``, ``"mean ablation"``, ``"attribution"``, ...: the method as one phrase."""
        return f"{self.ablation} ablation" if self.ablation else self.method

    def to_dict(self) -> dict[str, Any]:
        """Plain data (text, numbers, lists, dicts) for a saved file."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (MetricSpec, GridFacts, LoadSpec)):
                value = value.to_dict()
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        """The record :meth:`to_dict` wrote (unknown keys are refused)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HookpatchError(f"provenance has unknown fields {unknown}; it was written by a newer hookpatch.")
        values = dict(data)
        values["metric"] = MetricSpec.from_dict(values.get("metric"))
        if values.get("grid") is not None:
            values["grid"] = GridFacts.from_dict(values["grid"])
        if values.get("model") is not None:
            values["model"] = LoadSpec.from_dict(values["model"])
        for key in ("receivers", "receiver_positions"):
            values[key] = _tuple(values.get(key))
        return cls(**values)


def _list(value: tuple | None) -> list | None:
    return None if value is None else list(value)


def _tuple(value: Any) -> tuple | None:
    return None if value is None else tuple(value)


def run_facts(model: Any, prompts: Any, metric: Any) -> dict[str, Any]:
    """The provenance fields every result shares: metric, task, prompt fingerprint and model."""
    from hookpatch.model._loading import load_spec

    return {"metric": MetricSpec.of(metric), "task": prompts.task, "prompts_fingerprint": prompts.fingerprint(),
            "model": load_spec(model)}


def grid_facts(grid: Any) -> GridFacts:
    """The :class:`GridFacts` of a sweep's checked grid (``hookpatch.sweeps._grid.Grid``)."""
    return GridFacts(
        layers=tuple(grid.layers),
        positions=None if "pos" not in grid.by or grid.positions is None else tuple(grid.positions),
        heads=None if "head" not in grid.by or grid.heads is None else tuple(grid.heads),
        kv_head_feeds=grid.kv_head_feeds(),
    )
