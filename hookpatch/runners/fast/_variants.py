"""The architecture variants the fast path runs, and which one a bridge is.

Each variant module describes its models as data (:class:`~._weights.ModelWeights`); adding a
family is one new module here and a row in :data:`VARIANTS`. A bridge runs on the first
variant whose component layout it has and that reproduces all of it; otherwise the fast path
refuses it with the reason of the variant whose layout it has (or the first one's).
"""

from __future__ import annotations

from typing import Any

from hookpatch.runners.fast import _gemma2, _gpt2, _llama, _qwen3
from hookpatch.runners.fast._support import Variant, bad_bridge

VARIANTS: tuple[Variant, ...] = (_gpt2.VARIANT, _llama.VARIANT, _qwen3.VARIANT, _gemma2.VARIANT)


def variant_of(model: Any) -> tuple[Variant | None, str | None]:
    """The variant that runs ``model`` (None and the reason when none does)."""
    reason = bad_bridge(model)
    if reason is not None:
        return None, reason
    claimed = [v for v in VARIANTS if v.claims(model)]
    for variant in claimed:
        reason = variant.reason(model)
        if reason is None:
            return variant, None
    if claimed:
        return None, claimed[0].reason(model)
    block = model.blocks[0] if len(model.blocks) else None
    attn = getattr(block, "attn", None)
    return None, (
        f"no fast-path variant ({', '.join(v.name for v in VARIANTS)}) has this layout: block "
        f"submodules {sorted(getattr(block, 'submodules', {}))}, attention submodules "
        f"{sorted(getattr(attn, 'submodules', {}))}, positions "
        f"{getattr(model.cfg, 'positional_embedding_type', None)!r}"
    )


def unsupported_reason(model: Any) -> str | None:
    """Why the fast path cannot reproduce ``model``'s forward, or None when it can."""
    return variant_of(model)[1]
