"""Pronoun prediction prompts: "Mary is a great friend, isn’t" → " she" (not " he").

The task of TransformerLens' GPT-2 small pronoun case study: each frame with each name; the
corruption swaps the name for one of the other gender, so the clean answer becomes the wrong one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from hookpatch.errors import HookpatchError
from hookpatch.model._tokens import prepend_bos_default
from hookpatch.tasks import _vocab as vocab
from hookpatch.tasks._promptset import PromptSet, make_prompt_set, word_position


def pronoun_prompts(
    model: Any,
    *,
    templates: Sequence[str] = vocab.PRONOUN_TEMPLATES,
    names: Sequence[tuple[str, str]] = vocab.PRONOUN_NAMES,
    n: int | None = None,
    seed: int = 0,
    pad: bool = False,
) -> PromptSet:
    """Every template with every name (template-major, the case study's order), or ``n`` of them.

    Example:
        >>> ps = pronoun_prompts(model)      # 5 frames x 4 names = 20 prompts
        >>> ps.clean_prompts[0], ps.answers[0]
        ('Mary is a great friend, isn’t', (' she', ' he'))

    Args:
        model: the TransformerBridge whose tokenizer is used.
        templates: frames with a ``{name}`` slot.
        names: ``(name, pronoun)`` pairs with exactly two distinct pronouns. The corrupted
            prompt of the k-th name of one pronoun uses the k-th (cyclically) of the other.
        n: draw ``n`` prompts at random (seeded) instead of all of them.
        seed: seed for the draw.
        pad: right-pad prompts of different token lengths instead of refusing them.

    Returns:
        A :class:`PromptSet` with named positions ``NAME`` and ``END``.
    """
    pronouns = list(dict.fromkeys(p for _, p in names))
    if len(pronouns) != 2:
        raise HookpatchError(
            f"names must use exactly two pronouns (e.g. ' she' and ' he'); got {pronouns}."
        )
    by_pronoun = {p: [name for name, q in names if q == p] for p in pronouns}
    for t in templates:
        if "{name}" not in t:
            raise HookpatchError(f"template {t!r} has no {{name}} slot.")
    rows = []
    for template in templates:
        for name, pronoun in names:
            other = pronouns[1 - pronouns.index(pronoun)]
            k = by_pronoun[pronoun].index(name)
            swap = by_pronoun[other][k % len(by_pronoun[other])]
            rows.append((template, name, swap, pronoun, other))
    if n is not None:
        if not 1 <= n <= len(rows):
            raise HookpatchError(
                f"n={n} but there are {len(rows)} distinct prompts ({len(templates)} templates x "
                f"{len(names)} names); pass 1 <= n <= {len(rows)} or more templates/names."
            )
        rows = random.Random(seed).sample(rows, n)
    bos = prepend_bos_default(model)
    clean = [t.format(name=name) for t, name, _, _, _ in rows]
    corrupted = [t.format(name=swap) for t, _, swap, _, _ in rows]
    name_pos = [
        word_position(model, text, name if text.startswith(name) else " " + name, prepend_bos=bos)
        for text, (_, name, _, _, _) in zip(clean, rows, strict=True)
    ]
    return make_prompt_set(
        model,
        clean,
        corrupted,
        [(p, o) for _, _, _, p, o in rows],
        positions={"NAME": name_pos},
        pad=pad,
        task="pronoun",
    )
