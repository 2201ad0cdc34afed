"""What runs the model for a sweep, and who runs a sweep's jobs.

- :class:`Runner`, the protocol between the sweep engine and a model: cache the unpatched
  runs, run a chunk of stacked cells. :class:`BridgeRunner` uses the TransformerBridge's own
  hooks (any model); :class:`FastRunner` hookpatch's direct block runner (GPT-2,
  Llama/Qwen2/Mistral, Qwen3/OLMo-2 and Gemma 2/3 families), checked once per model against
  the bridge on a short probe. :func:`runner_for` picks one.
- :class:`Executor`, which runs a sweep's picklable jobs: :class:`InProcessExecutor` by default,
  :class:`RayExecutor` on a Ray cluster (the ``hookpatch[ray]`` extra).
"""

from __future__ import annotations

import warnings
from typing import Any

from hookpatch.errors import HookpatchError
from hookpatch.runners._bridge import BridgeRunner
from hookpatch.runners._executor import Executor, InProcessExecutor, Job, require_executor
from hookpatch.runners._fast_runner import FastRunner, probe
from hookpatch.runners._protocol import CachedRun, Chunk, Runner
from hookpatch.runners._ray import RayExecutor
from hookpatch.runners.fast import FastForward


def runner_for(model: Any, fast: bool | None = None) -> Runner:
    """The runner a sweep uses on ``model``.

    ``fast=None`` (the default) takes the fast runner where the model's family has one and it
    passes the probe (its logits equal the bridge's), else the bridge, warning when the probe
    failed; ``fast=False`` always the bridge; ``fast=True`` the fast runner, or an error where
    the family has none or its probe failed.

    Example:
        >>> runner_for(model).name
        'fast'
    """
    if fast is not None and not isinstance(fast, bool):
        raise HookpatchError(f"fast={fast!r} must be None (choose), True (fast path) or False (bridge hooks).")
    if fast is False:
        return BridgeRunner(model)
    if not FastForward.supports(model):
        if fast:
            raise HookpatchError("fast=True but this model's family has no fast path; pass fast=None.")
        return BridgeRunner(model)
    reason = probe(model)
    if reason is None:
        return FastRunner(model)
    if fast:
        raise HookpatchError(f"fast=True but {reason}; pass fast=None to use the bridge's hooks.")
    warnings.warn(f"hookpatch uses the bridge's hooks instead of the fast path: {reason}.", UserWarning, stacklevel=3)
    return BridgeRunner(model)


__all__ = [
    "BridgeRunner",
    "CachedRun",
    "Chunk",
    "Executor",
    "FastRunner",
    "InProcessExecutor",
    "RayExecutor",
    "Job",
    "Runner",
    "require_executor",
    "runner_for",
]
