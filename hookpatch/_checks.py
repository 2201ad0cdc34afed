"""Checks of user input shared by every public call: the model, integer indices, the prompt
set and its metric, finite metric values and the device.

Each check raises :class:`HookpatchError` naming the argument, saying what was expected and
what came, and how to fix it, so a wrong input fails at the call, before any forward pass,
rather than as a raw error deep inside one (or, worse, as a silently wrong number).

Integers may be Python ints, numpy integers (``np.arange(2)``) or integer tensors: a
researcher's layer list often comes out of numpy or torch. Floats and bools are refused.
"""

from __future__ import annotations

import functools
import numbers
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hookpatch.errors import HookpatchError

if TYPE_CHECKING:
    from hookpatch.metrics._base import Metric

# Annotations of arguments the checks below accept in several forms; they stay open so the
# check, not a type checker, is what explains a wrong argument to the caller.
IntLike = Any  # an int: Python, numpy or a 0-d integer tensor (see as_int)
IntsLike = Any  # None, one IntLike, a sequence of them, or a 1-d integer array/tensor (see as_ints)


def require_model(model: Any, arg: str = "model") -> None:
    """Raise unless ``model`` is a loaded TransformerBridge (not its name, not something else)."""
    if isinstance(model, (str, os.PathLike)):
        raise HookpatchError(
            f"{arg}= got the name {str(model)!r}, not a model; load it first with "
            f"model = hookpatch.load_model({str(model)!r}) and pass the model."
        )
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "cfg") and hasattr(model, "hook_dict")):
        raise HookpatchError(
            f"{arg}= must be a TransformerBridge from hookpatch.load_model or tiny_model; got "
            f"{type(model).__name__}."
        )


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python, numpy, or a 0-d integer tensor), not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, Tensor):
        return (
            value.ndim == 0 and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
        )
    return isinstance(value, numbers.Integral) and type(value).__name__ != "bool_"


def as_int(value: IntLike, arg: str, *, minimum: int | None = None, hint: str = "") -> int:
    """``value`` as a Python int, checked against ``minimum``; else an error naming ``arg``."""
    if not is_int(value) or (minimum is not None and int(value) < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise HookpatchError(f"{arg}={value!r} must be an integer{bound}{hint}.")
    return int(value)


def as_count(value: IntLike, arg: str, meaning: str) -> int:
    """``value`` as a positive Python int (any integer type); else an error naming ``arg`` and
    saying what it counts (``meaning``)."""
    if not is_int(value) or int(value) < 1:
        raise HookpatchError(f"{arg}={value!r} must be a positive integer: {meaning}.")
    return int(value)


def as_int_list(value: IntsLike, arg: str) -> list[int]:
    """:func:`as_ints` for an argument that has no "all" default: ``None`` is refused."""
    ints = as_ints(value, arg)
    if ints is None:
        raise HookpatchError(f"{arg}=None must be an integer or a list of integers, e.g. {arg}=[0, 1].")
    return ints


def as_ints(value: IntsLike, arg: str) -> list[int] | None:
    """``None``, or ``value`` (one integer or several) as a list of Python ints.

    A single integer is one entry (``layers=1`` means layer 1); numpy arrays and 1-d integer
    tensors are accepted; floats, bools and strings are refused with an error naming ``arg``.
    """
    if value is None:
        return None
    if is_int(value):
        return [int(value)]
    if isinstance(value, Tensor) or type(value).__module__ == "numpy":
        integer = (
            not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
            if isinstance(value, Tensor)
            else getattr(getattr(value, "dtype", None), "kind", "") in ("i", "u")
        )
        if getattr(value, "ndim", None) != 1 or not integer:
            raise HookpatchError(
                f"{arg}= must be one integer or a 1-d integer array; got a "
                f"{getattr(value, 'ndim', '?')}-d array of {getattr(value, 'dtype', '?')}."
            )
        return [int(v) for v in value.tolist()]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence | range):
        raise HookpatchError(f"{arg}={value!r} must be an integer or a list of integers, e.g. {arg}=[0, 1].")
    for v in value:
        if not is_int(v):
            raise HookpatchError(
                f"{arg}= must hold integers; got {v!r} ({type(v).__name__}) in {list(value)!r}."
            )
    return [int(v) for v in value]


def require_prompts(prompts: Any, arg: str = "prompts") -> None:
    """Raise unless ``prompts`` is a :class:`~hookpatch.tasks._promptset.PromptSet` (which is
    never empty: building one with no prompts is refused)."""
    from hookpatch.tasks._promptset import PromptSet

    if not isinstance(prompts, PromptSet):
        raise HookpatchError(
            f"{arg}= must be a PromptSet (from make_prompt_set, pronoun_prompts or ioi_prompts); "
            f"got {type(prompts).__name__}."
        )


def same_prompts(a: Any, b: Any) -> bool:
    """Whether two prompt sets hold the same prompts in the same order (tokens and answers)."""
    if a is b:
        return True
    pairs = [
        (a.clean_tokens, b.clean_tokens),
        (a.corrupted_tokens, b.corrupted_tokens),
        (a.answer_tokens, b.answer_tokens),
        (a.end, b.end),
    ]
    return all(x.shape == y.shape and torch.equal(x.cpu(), y.cpu()) for x, y in pairs)


def require_metric(metric: Any, prompts: Any, arg: str = "metric") -> None:
    """Raise unless ``metric`` is a metric instance (or callable) built on this very ``prompts``.

    A :class:`~hookpatch.metrics._base.Metric` reads each prompt's answers and END position from
    its own prompt set; on another set (even of the same size, in another order) it would
    score every prompt against the wrong answers.
    """
    from hookpatch.metrics._base import Metric

    require_prompts(prompts)
    if isinstance(metric, type):
        raise HookpatchError(
            f"{arg}= got the class {metric.__name__}, not a metric; build one on the prompt set, "
            f"e.g. {metric.__name__}(prompts)."
        )
    if isinstance(metric, Metric):
        if not same_prompts(metric.prompts, prompts):
            raise HookpatchError(
                f"{arg}= was built on another prompt set ({len(metric.prompts)} prompts) than the "
                f"prompts= passed ({len(prompts)} prompts, or the same count with other tokens or "
                "answers), so it would read the wrong answers; build the metric on these prompts, "
                "e.g. LogitDiff(prompts)."
            )
    elif not callable(metric):
        raise HookpatchError(
            f"{arg}= must be a Metric such as LogitDiff(prompts) or a callable logits -> [..., batch]; "
            f"got {type(metric).__name__}."
        )


def as_metric(metric: Any, prompts: Any, arg: str = "metric") -> Metric:
    """``metric`` checked by :func:`require_metric` and, if it is a plain callable, wrapped once
    into a :class:`~hookpatch.metrics._base.CallableMetric`: what every public entry point does
    first, so the code behind it sees one metric protocol (returns a ``Metric``)."""
    from hookpatch.metrics._base import as_metric as wrap

    require_metric(metric, prompts, arg)
    return wrap(metric, prompts)


def metric_name(metric: Any) -> str:
    """A readable name of a metric or metric callable."""
    return str(getattr(metric, "name", None) or getattr(metric, "__name__", None) or type(metric).__name__)


def require_finite(
    values: Tensor, what: str, labels: Callable[[], Sequence[str]], fix: str = ""
) -> None:
    """Raise if ``values`` (``[..., batch]``) holds NaN or inf, naming up to three of the
    offending entries; ``labels()`` gives every entry's label in flat order (built only then)."""
    bad = ~torch.isfinite(values.detach().reshape(-1).cpu())
    if bad.any():
        names = labels()
        where = [names[int(i)] for i in bad.nonzero()[:3, 0]]
        more = f" and {int(bad.sum()) - len(where)} more" if int(bad.sum()) > len(where) else ""
        raise HookpatchError(
            f"{what} is NaN or inf at {', '.join(where)}{more}. "
            + (fix or "Check the metric: a log of zero, a division by zero or an overflow gives this.")
        )


def require_metric_values(values: Any, shape: tuple[int, ...]) -> Tensor:
    """``values`` if the metric returned one value per prompt (a tensor shaped ``shape``)."""
    if not isinstance(values, Tensor) or tuple(values.shape) != shape:
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise HookpatchError(
            f"the metric returned {got} for logits shaped [{', '.join(map(str, shape))}, pos, d_vocab]; "
            f"it must return one value per prompt, [..., batch] (here {list(shape)}). Reduce over "
            "prompts outside the metric."
        )
    return values


def require_finite_result(result: Any, what: str) -> None:
    """Raise if a :class:`~hookpatch.results.SweepResult` holds NaN or inf, naming the cells
    (``"L1 @ 3: friend, prompt 2"``)."""
    n = int(result.values.shape[-1])
    require_finite(
        result.values, what, lambda: [f"{row['label']}, prompt {b}" for _, row in result.cells() for b in range(n)]
    )


def require_finite_runs(metric: Any, runs: dict[str, Tensor]) -> None:
    """Raise if the metric on an unpatched run (``runs``: run name → ``[batch]`` values) is
    NaN or inf, naming the run and the prompts — before any sweep builds on it."""
    for run, values in runs.items():
        require_finite(values, f"the metric {metric_name(metric)} on the unpatched {run} run",
                       functools.partial(_prompt_labels, int(values.shape[-1])))


def _prompt_labels(n: int) -> list[str]:
    return [f"prompt {i}" for i in range(n)]


def check_device(device: Any, arg: str = "device") -> None:
    """Raise unless ``device`` is ``None`` or a device torch knows and this machine has."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise HookpatchError(
            f"{arg}={device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:0'."
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HookpatchError(
            f"{arg}={device!r} but this machine has no CUDA GPU (torch.cuda.is_available() is "
            "False); use device='cpu', or leave it unset to pick CUDA only where there is one."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise HookpatchError(
            f"{arg}={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s); "
            "pick one of them."
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise HookpatchError(f"{arg}={device!r} but MPS is not available here; use device='cpu'.")


def check_n_devices(n_devices: Any, arg: str = "n_devices") -> int | None:
    """``n_devices`` as a Python int (``None`` stays ``None``), checked against this machine.

    ``1`` means one device; ``N > 1`` splits the model's blocks over ``cuda:0..N-1``, which
    needs that many CUDA GPUs here.
    """
    if n_devices is None:
        return None
    count = as_count(n_devices, arg, "how many CUDA GPUs to split the model over (1 = one device)")
    if count == 1:
        return count
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise HookpatchError(
            f"{arg}={count} but this machine has no CUDA GPU (torch.cuda.is_available() is False); "
            f"leave {arg} unset (or pass device='cpu') to load on one device."
        )
    if count > available:
        raise HookpatchError(
            f"{arg}={count} but this machine has {available} CUDA GPU(s) (cuda:0..cuda:{available - 1}); "
            f"pass {arg}= at most {available}, or leave it unset to load on one device."
        )
    return count


def check_device_map(device_map: Any, arg: str = "device_map") -> None:
    """Raise unless ``device_map`` is ``None``, one of HuggingFace's placement strategies
    (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``), a device (``"cpu"``,
    ``"cuda:0"``) or a dict from module names to devices (``"cpu"``, ``"cuda:1"`` or a GPU
    index) that this machine has."""
    if device_map is None:
        return
    strategies = ("auto", "balanced", "balanced_low_0", "sequential")
    if isinstance(device_map, str):
        if device_map not in strategies:
            check_device(device_map, arg)
        return
    if not isinstance(device_map, dict) or not device_map:
        raise HookpatchError(
            f"{arg}= must be a strategy ({', '.join(map(repr, strategies))}), a device such as 'cpu', "
            f"or a non-empty dict from module names to devices, e.g. {{'': 'cpu'}}; got "
            f"{device_map!r}."
        )
    for module, where in device_map.items():
        if not isinstance(module, str):
            raise HookpatchError(f"{arg}= keys must be module names (str); got {module!r}.")
        if isinstance(where, bool) or not isinstance(where, (str, int, torch.device)):
            raise HookpatchError(
                f"{arg}[{module!r}]={where!r} must be a device: 'cpu', 'cuda:0' or a GPU index such as 0."
            )
        check_device(f"cuda:{where}" if isinstance(where, int) else where, f"{arg}[{module!r}]")
