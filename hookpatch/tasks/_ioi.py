"""Indirect-object identification prompts: "When John and Mary went to the shops, John gave
the bag to" → " Mary" (the indirect object, IO) rather than " John" (the subject, S).

Orders: ABBA (IO first) and BABA (S first), alternating. Corruptions:

- ``"s2"``: the second subject mention becomes the IO name ("John gave" → "Mary gave");
- ``"abc"``: all three names replaced by three other distinct names;
- ``"swap"``: TransformerLens' demo — prompts come in pairs that differ only in S2, and each
  prompt's corrupted run is its partner (adjacent-pair swap).

Named positions: ``IO``, ``S1``, ``S1+1``, ``S2``, ``END``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from hookpatch.errors import HookpatchError
from hookpatch.model._tokens import prepend_bos_default
from hookpatch.tasks import _vocab as vocab
from hookpatch.tasks._promptset import PromptSet, make_prompt_set, word_position

CORRUPTIONS = ("s2", "abc", "swap")
_SLOTS = ("{A}", "{B}", "{S}")


def ioi_prompts(
    model: Any,
    n: int = 16,
    *,
    corruption: str = "s2",
    templates: Sequence[str] = vocab.IOI_TEMPLATES,
    names: Sequence[str] = vocab.FEMALE_NAMES + vocab.MALE_NAMES,
    places: Sequence[str] = vocab.IOI_PLACES,
    objects: Sequence[str] = vocab.IOI_OBJECTS,
    seed: int = 0,
    pad: bool = True,
) -> PromptSet:
    """``n`` IOI prompts, deterministic for a seed, ABBA and BABA alternating.

    Example:
        >>> ps = ioi_prompts(model, 8, corruption="abc")
        >>> ps.position("S2")        # per-prompt index of the second subject mention

    Args:
        model: the TransformerBridge whose tokenizer is used.
        n: number of prompts (even for ``"swap"``, which builds them in pairs).
        corruption: ``"s2"``, ``"abc"`` or ``"swap"`` (see module docstring).
        templates: frames with ``{A}``, ``{B}``, ``{S}`` and optional ``{place}``/``{object}``.
        names: first names; each must be one token after a space.
        places, objects: fillers for the frames.
        seed: seed of the draw.
        pad: right-pad prompts of different token lengths (the frames differ in length, so
            this is on by default); ``False`` refuses such a set. Pass one template to get
            prompts of one length.

    Returns:
        A :class:`PromptSet`; answers are ``(" IO", " S")``.
    """
    if corruption not in CORRUPTIONS:
        raise HookpatchError(f"unknown corruption {corruption!r}; expected one of {CORRUPTIONS}.")
    if n < 1:
        raise HookpatchError(f"n={n}: ask for at least one prompt.")
    if corruption == "swap" and n % 2:
        raise HookpatchError(f"n={n}: the 'swap' corruption builds prompts in pairs; pass an even n.")
    min_names = 5 if corruption == "abc" else 2
    if len(set(names)) < min_names:
        raise HookpatchError(f"the {corruption!r} corruption needs at least {min_names} distinct names.")
    for t in templates:
        missing = [slot for slot in _SLOTS if slot not in t]
        if missing:
            raise HookpatchError(f"IOI template {t!r} lacks the slots {missing}.")
    rng = random.Random(seed)
    abc_rng = random.Random(f"{seed}-abc")  # its own draws, so every corruption has the same clean prompts
    clean: list[str] = []
    corrupted: list[str] = []
    answers: list[tuple[str, str]] = []
    roles: list[tuple[str, str, str, str, str]] = []
    i = 0
    while len(clean) < n:
        template = templates[i % len(templates)] if i < len(templates) else rng.choice(templates)
        order = "ABBA" if (i // (2 if corruption == "swap" else 1)) % 2 == 0 else "BABA"
        io, s = rng.sample(list(names), 2)
        fill = {"place": rng.choice(places), "object": rng.choice(objects)}
        a, b = (io, s) if order == "ABBA" else (s, io)
        text = template.format(A=a, B=b, S=s, **fill)
        if corruption == "swap":
            partner = template.format(A=a, B=b, S=io, **fill)
            clean += [text, partner]
            corrupted += [partner, text]
            answers += [(" " + io, " " + s), (" " + s, " " + io)]
            roles += [(a, b, io, s, s), (a, b, s, io, io)]
        else:
            if corruption == "s2":
                bad = template.format(A=a, B=b, S=io, **fill)
            else:
                x, y, z = abc_rng.sample([m for m in names if m not in (io, s)], 3)
                bad = template.format(A=x, B=y, S=z, **fill)
            clean.append(text)
            corrupted.append(bad)
            answers.append((" " + io, " " + s))
            roles.append((a, b, io, s, s))
        i += 1
    return _with_positions(model, clean, corrupted, answers, roles, pad, {"corruption": corruption, "seed": seed})


def ioi_tl_demo(model: Any) -> PromptSet:
    """TransformerLens' 8-prompt IOI demo set with its adjacent-pair swap corruption.

    Prompts 2k and 2k+1 differ only in the second subject mention; the corrupted run of
    each is the other. The reference numbers of TransformerLens' demo are on this set.
    """
    clean, answers, roles = [], [], []
    for template, first, second in vocab.TL_DEMO_IOI:
        a, b = first.strip(), second.strip()
        for s2, io in ((first, second), (second, first)):
            clean.append(template.format(s2))
            answers.append((io, s2))
            roles.append((a, b, io.strip(), s2.strip(), s2.strip()))
    corrupted = [clean[i ^ 1] for i in range(len(clean))]
    return _with_positions(model, clean, corrupted, answers, roles, False, {"corruption": "swap"})


def _with_positions(
    model: Any,
    clean: list[str],
    corrupted: list[str],
    answers: list[tuple[str, str]],
    roles: list[tuple[str, str, str, str, str]],
    pad: bool,
    metadata: dict,
) -> PromptSet:
    """Attach IO/S1/S1+1/S2 positions, found from each name's occurrences in the text."""
    bos = prepend_bos_default(model)
    pos: dict[str, list[int]] = {"IO": [], "S1": [], "S1+1": [], "S2": []}
    for text, (a, b, io, _s, s2) in zip(clean, roles, strict=True):
        first_a = word_position(model, text, " " + a, prepend_bos=bos)
        first_b = word_position(model, text, " " + b, prepend_bos=bos)
        io_pos, s1_pos = (first_a, first_b) if io == a else (first_b, first_a)
        pos["IO"].append(io_pos)
        pos["S1"].append(s1_pos)
        pos["S1+1"].append(s1_pos + 1)
        pos["S2"].append(word_position(model, text, " " + s2, 1 if s2 in (a, b) else 0, prepend_bos=bos))
    return make_prompt_set(
        model, clean, corrupted, answers, positions=pos, pad=pad, task="ioi", metadata=metadata
    )
