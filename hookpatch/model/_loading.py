"""Load a model as a TransformerBridge in compatibility mode, ready for causal experiments.

``load_model`` accepts TransformerLens aliases (``"gpt2-small"``), HuggingFace ids
(``"Qwen/Qwen3-0.6B"``), local checkpoint directories and ``"organism"`` (the small trained
model shipped with hookpatch). It applies the processing that TransformerLens' GPT-2 small
analyses and their published numbers assume (``fold_ln``,
``center_writing_weights``, ``center_unembed``) and returns the model in eval mode. Without
a network, a hub name that is not in the local cache fails at once with a message saying what
to pass instead, not after half a minute of retries.

A model too large for one device is split over several: ``n_devices=N`` spreads its blocks
evenly over ``cuda:0..N-1`` (accelerate's ``"balanced"`` placement), ``device_map=`` places
modules exactly as a HuggingFace device map says. Every sweep, readout and attribution then
moves what meets an activation to that activation's device (:mod:`hookpatch.hooks._devices`).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hookpatch._checks import IntLike, check_device, check_device_map, check_n_devices
from hookpatch.errors import HookpatchError

ORGANISM = "organism"
_ORGANISM_DIR = Path(__file__).resolve().parent.parent / "organism" / "checkpoint"
_HUB_HOST = "huggingface.co"


@dataclass(frozen=True)
class LoadSpec:
    """How a model was loaded: enough to load the same model again, e.g. on another worker.

    ``load_model`` and ``tiny_model`` attach one to every model they return, as
    ``model.hookpatch_load_spec`` (see :func:`load_spec`); results copy it into their
    provenance, so a saved result says which model produced it.

    Attributes:
        loader: ``"load_model"`` or ``"tiny_model"`` (the function to call again).
        name: what was passed: ``"organism"``, an alias, a hub id, a directory, or the tiny
            family (``"gpt2"``).
        source: where the weights came from: a local directory or a hub id;
            ``"write_tiny_checkpoint"`` for a tiny model (its seeded weights are rebuilt from
            ``options``).
        options: the other arguments, as ``(name, value)`` pairs of plain values (dtype and
            device as text, e.g. ``("dtype", "torch.float32")``); an object passed in (a
            tokenizer) is recorded by its class name only, and :meth:`load` refuses it.
    """

    loader: str
    name: str
    source: str
    options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def option(self, name: str, default: Any = None) -> Any:
        """One recorded argument (``default`` when it was not recorded)."""
        return dict(self.options).get(name, default)

    def load(self, **overrides: Any) -> Any:
        """Load the model again with the recorded arguments (``overrides`` replace some, e.g. ``device``).

        Example:
            >>> same = load_spec(model).load(device="cpu")
        """
        options = dict(self.options)
        if _PLACEMENT & overrides.keys():  # a new placement replaces the recorded one whole
            options = {k: v for k, v in options.items() if k not in _PLACEMENT}
        options.update(overrides)
        objects = [k for k, v in options.items() if isinstance(v, dict) and _OBJECT in v]
        if objects:
            raise HookpatchError(
                f"this model was loaded with {objects[0]}= an object ({options[objects[0]][_OBJECT]}) that "
                f"was recorded by class name only; pass it again: load_spec(model).load({objects[0]}=...)."
            )
        if isinstance(options.get("dtype"), str):
            options["dtype"] = getattr(torch, options["dtype"].removeprefix("torch."))
        if self.loader == "tiny_model":
            from hookpatch.model._tiny import tiny_model

            return tiny_model(self.name, **options)
        if self.loader != "load_model":
            raise HookpatchError(f"loader={self.loader!r}: expected 'load_model' or 'tiny_model'.")
        return load_model(self.name, **options)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, bool, int, float, None, lists) for saving."""
        return {"loader": self.loader, "name": self.name, "source": self.source,
                "options": [[k, v] for k, v in self.options]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadSpec:
        """The record :meth:`to_dict` wrote."""
        return cls(loader=str(data["loader"]), name=str(data["name"]), source=str(data["source"]),
                   options=tuple((str(k), v) for k, v in data["options"]))


def _plain(value: Any) -> Any:
    """A load argument as plain data: dtype/device as text, a tokenizer by its class name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return {_OBJECT: type(value).__name__}  # an object (a tokenizer): its class name only


_OBJECT = "object recorded by class name"
_PLACEMENT = frozenset({"device", "device_map", "n_devices"})  # where the model goes: exclusive options


def record_load_spec(model: Any, loader: str, name: str, source: str, **options: Any) -> LoadSpec:
    """Attach a :class:`LoadSpec` to ``model`` as ``model.hookpatch_load_spec`` and return it."""
    spec = LoadSpec(loader=loader, name=name, source=source,
                    options=tuple((k, _plain(v)) for k, v in options.items()))
    model.hookpatch_load_spec = spec
    return spec


def load_spec(model: Any) -> LoadSpec | None:
    """How ``model`` was loaded (``None`` for a model built without ``load_model``/``tiny_model``)."""
    spec = getattr(model, "hookpatch_load_spec", None)
    return spec if isinstance(spec, LoadSpec) else None


def organism_path() -> Path:
    """Directory of the shipped model organism checkpoint."""
    return _ORGANISM_DIR


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: Any = None,  # None, a strategy, a device or a dict; checked by check_device_map
    n_devices: IntLike = None,  # None or a positive int; checked by check_n_devices
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    refactor_factored_attn_matrices: bool = False,
    tokenizer: Any = None,
) -> Any:
    """Load ``name_or_path`` as a TransformerBridge in compatibility mode, in eval mode.

    Example:
        >>> model = load_model("organism")          # offline, shipped with hookpatch
        >>> model = load_model("gpt2-small")        # needs a network or the HF cache
        >>> model = load_model("Qwen/Qwen3-8B", n_devices=2)  # blocks split over cuda:0, cuda:1

    Args:
        name_or_path: ``"organism"``, a TransformerLens alias, a HuggingFace id or a local
            directory holding ``config.json``, weights and a tokenizer.
        device: where to put the model; default CUDA when available, else CPU.
        dtype: parameter dtype (float32 by default; checkpoints stored in fp16 are cast).
        device_map: HuggingFace-style placement across devices: a strategy (``"balanced"``,
            ``"auto"``, ...), one device, or a dict from module names to devices, e.g.
            ``{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1}``. Exclusive
            with ``device`` and ``n_devices``. TransformerBridge refuses maps that mix CPU (or
            disk) offload with GPUs, and weight processing (``fold_ln``, ...) on offloaded
            modules: use GPUs only, or a single device.
        n_devices: split the blocks evenly over this many CUDA GPUs, ``cuda:0..n_devices-1``
            (accelerate's ``"balanced"`` map, with memory limits on exactly those GPUs);
            ``1`` is one device (as ``device=None``). Exclusive with ``device`` and ``device_map``.
        fold_ln, center_writing_weights, center_unembed, refactor_factored_attn_matrices:
            TransformerLens' weight processing (HookedTransformer's defaults).
        tokenizer: a tokenizer to use instead of the checkpoint's own.

    Returns:
        A ``TransformerBridge`` with HookedTransformer hook names, folded-LayerNorm numerics,
        ``run_with_hooks`` and ``run_with_cache``.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise HookpatchError(
            f"name_or_path= must be a model name or a checkpoint directory; got "
            f"{type(name_or_path).__name__} (an already loaded model needs no load_model)."
        )
    check_device(device)
    check_device_map(device_map)
    n_devices = check_n_devices(n_devices)
    if device is not None and device_map is not None:
        raise HookpatchError(
            "pass either device= or device_map=, not both: device_map places the model itself."
        )
    if n_devices is not None and (device is not None or device_map is not None):
        other = "device" if device is not None else "device_map"
        raise HookpatchError(
            f"pass either n_devices= or {other}=, not both: n_devices={n_devices} places the model "
            f"itself (over cuda:0..cuda:{n_devices - 1}); drop one of them."
        )
    if str(name_or_path) == ORGANISM:  # name a damaged file or an option it cannot honour
        from hookpatch.organism import check_load_options, verify_checkpoint

        check_load_options(dtype=dtype, tokenizer=tokenizer)
        verify_checkpoint(_ORGANISM_DIR)
    source = _resolve_source(name_or_path)
    passed_tokenizer, passed_device = tokenizer, device
    if tokenizer is None and Path(source).is_dir():
        tokenizer = _local_tokenizer(Path(source))
    split = n_devices is not None and n_devices > 1
    if device is None and device_map is None and not split:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    placement = {"device_map": device_map} if device_map is not None else {}
    placement.update({"n_devices": n_devices} if split else {})
    try:
        model = TransformerBridge.boot_transformers(
            str(source), device=device, dtype=dtype, tokenizer=tokenizer, **placement
        )
    except OSError as err:
        raise HookpatchError(f"could not load {name_or_path!r} from {source}: {err}") from err
    except ValueError as err:
        if not placement:
            raise
        raise HookpatchError(
            f"could not place {name_or_path!r} with {_placement_text(placement)}: {err} Use a map "
            "over GPUs only (or n_devices=), or one device (device=)."
        ) from err
    try:
        model.enable_compatibility_mode(
            disable_warnings=True,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )
    except RuntimeError as err:
        if not placement:
            raise
        raise HookpatchError(
            f"{_placement_text(placement)} offloads modules, and TransformerBridge cannot process "
            f"offloaded weights (fold_ln, center_writing_weights, center_unembed): {err}"
        ) from err
    model.eval()
    record_load_spec(
        model, "load_model", str(name_or_path), str(source), device=passed_device, dtype=dtype, device_map=device_map,
        n_devices=n_devices, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
        center_unembed=center_unembed, refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        tokenizer=passed_tokenizer,
    )
    return model


def _placement_text(placement: dict[str, Any]) -> str:
    """``device_map={...}`` or ``n_devices=2``, for an error message."""
    return ", ".join(f"{k}={v!r}" for k, v in placement.items())


def _resolve_source(name_or_path: str | os.PathLike) -> str:
    """A local directory to load from, or a hub id that can be reached (cache or network)."""
    name = str(name_or_path)
    if name == ORGANISM:
        if not (_ORGANISM_DIR / "config.json").is_file():
            raise HookpatchError(
                f"the shipped model organism is missing from {_ORGANISM_DIR}; reinstall "
                "hookpatch or pass the path of a local checkpoint directory."
            )
        return str(_ORGANISM_DIR)
    path = Path(name).expanduser()
    if path.is_dir():
        missing = [f for f in ("config.json",) if not (path / f).is_file()]
        if missing:
            raise HookpatchError(
                f"{path} is not a model checkpoint directory: {missing[0]} is missing. Pass a "
                "directory saved with save_pretrained (config.json, weights, tokenizer files)."
            )
        return str(path)
    if os.sep in name and not name.count("/") == 1:
        raise HookpatchError(f"no checkpoint directory at {name!r}.")
    repo = _official_name(name)
    cached = _cached_snapshot(repo)
    if cached is not None:
        return cached
    if os.environ.get("HF_HUB_OFFLINE") or not _hub_reachable():
        raise HookpatchError(
            f"cannot load {name!r}: there is no network to download it from the HuggingFace hub "
            f"and it is not in the local cache. Pass a local checkpoint directory, or "
            f"load_model({ORGANISM!r}) for the small model shipped with hookpatch."
        )
    return repo


def _official_name(name: str) -> str:
    """The HuggingFace id behind a TransformerLens alias such as ``gpt2-small``."""
    try:
        from transformer_lens.tools.model_registry.registry_io import resolve_model_alias
    except ImportError:  # pragma: no cover - registry layout changed
        return name
    return resolve_model_alias(name) or name


def _cached_snapshot(repo: str) -> str | None:
    """The local snapshot directory of ``repo`` if its config and weights are cached."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return None
    has_weights = any(Path(path).glob("*.safetensors")) or any(Path(path).glob("*.bin"))
    return path if (Path(path) / "config.json").is_file() and has_weights else None


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the HuggingFace hub's host resolves and accepts a connection."""
    try:
        with socket.create_connection((_HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _local_tokenizer(path: Path) -> Any:
    """The checkpoint's own ``tokenizer.json`` when it declares a generic fast tokenizer.

    transformers' AutoTokenizer picks the tokenizer class from the *model* type for some
    families (a Qwen2 config yields ``Qwen2Tokenizer``), which mangles a custom
    ``tokenizer.json``; loading the generic class keeps the file's own rules.
    """
    cfg_file = path / "tokenizer_config.json"
    if not (path / "tokenizer.json").is_file() or not cfg_file.is_file():
        return None
    declared = json.loads(cfg_file.read_text()).get("tokenizer_class")
    if declared not in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))


def require_eval(model: Any) -> None:
    """Raise unless ``model`` is a loaded model with every module in eval mode.

    One sub-module left in train mode (``model.blocks[0].train()``) is enough for dropout to
    make every patch a random draw, so all modules are checked, not just the top one.
    """
    from hookpatch._checks import require_model

    require_model(model)
    modules = model.named_modules(remove_duplicate=False)  # a shared module under each of its names
    training = sorted((name.count("."), name or "the model") for name, m in modules if m.training)
    if training:  # name the outermost module in train mode
        raise HookpatchError(
            f"model= is in train mode ({training[0][1]!r}{' and more' if len(training) > 1 else ''}): "
            "dropout is active, so results would be random; call model.eval() first."
        )
