"""Hooks: module-level functions bound with functools.partial to tensors and ints.

- :func:`patch_hook` — copy a source activation into a run at chosen positions and heads;
- :func:`ablate_hook` — zero, mean or resample ablation of a component;
- :func:`activation_mask` — the boolean mask of the entries a hook touches.

Each returns ``(hook_name, hook)`` for ``model.run_with_hooks(fwd_hooks=[...])``; the hook
pickles and never holds a model or a cache.
"""

from hookpatch.hooks._factory import ablate_hook, patch_hook
from hookpatch.hooks._selection import activation_mask

__all__ = ["ablate_hook", "activation_mask", "patch_hook"]
