"""Hooks: module-level functions bound with functools.partial to tensors and ints.

- :func:`patch_hook` — copy a source activation into a run at chosen positions and heads;
- :func:`ablate_hook` — zero, mean or resample ablation of a component;
- :func:`activation_mask` — the boolean mask of the entries a hook touches;
- :func:`layer_device`, :func:`unembed_device` — which device a block (or the unembedding)
  of a model split over devices (``load_model(..., n_devices=N)``) lives on: what a tensor
  meeting its activations must be moved to.

Each returns ``(hook_name, hook)`` for ``model.run_with_hooks(fwd_hooks=[...])``; the hook
pickles and never holds a model or a cache.
"""

from hookpatch.hooks._devices import layer_device, unembed_device
from hookpatch.hooks._factory import ablate_hook, patch_hook
from hookpatch.hooks._selection import activation_mask

__all__ = ["ablate_hook", "activation_mask", "layer_device", "patch_hook", "unembed_device"]
