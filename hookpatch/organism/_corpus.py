"""Training corpus of the model organism: seeded sentences from templates, and the held-out split.

The organism is a small language model trained on next-token loss over whole sentences of a
toy English built from the words of :mod:`hookpatch.tasks._vocab`. The corpus mixes

* **IOI** sentences (indirect-object identification, ABBA and BABA orders), e.g.
  ``"When John and Mary went to the shops, John gave the bag to Mary."``;
* **pronoun** sentences, e.g. ``"Mary is a great friend, isn’t she?"`` and
  ``"The ring is a great gift, isn’t it?"``;
* **name-copy** sentences that repeat a single name, over *all* names (held-out ones too),
  e.g. ``"Then, Kevin went to the park, and the bag was given to Kevin."``;
* **gender** sentences over all names (``"Helen said that she wanted a cake."``), so the
  gender of a held-out name is known without the pronoun frames;
* **filler** sentences over the same vocabulary, including sentences that use every word
  of the held-out frames, so every evaluation word is seen in training;

and puts a random short filler sentence before about 30 % of examples, so circuits are not
tied to absolute positions.

Held out from the *task* sentences (IOI and pronoun frames), never from the vocabulary:
:data:`HELDOUT_NAMES` (16 names), :data:`HELDOUT_IOI_TEMPLATES` (4 of the 16 frames of
``vocab.IOI_TEMPLATES``) and :data:`HELDOUT_PRONOUN_FRAMES` (adjective/noun pairs, two of
them frames of ``vocab.PRONOUN_TEMPLATES``). :func:`heldout_ioi_prompts` and :func:`heldout_pronoun_prompts`
build the evaluation sets used by the tests and the model card.

The tokenizer's vocabulary is frozen data, :data:`VOCABULARY_FILE` (read by
:func:`vocabulary`), not derived from :mod:`hookpatch.tasks._vocab`: the sentences here may use
only its words, which the tokenizer builder checks on :func:`sample_texts` and the training
loop on every example.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hookpatch.errors import HookpatchError
from hookpatch.tasks import _vocab as vocab

APOS = "’"  # the curly apostrophe of vocab.PRONOUN_TEMPLATES ("isn’t")

# ---------------------------------------------------------------------------------------------
# Names and the split
# ---------------------------------------------------------------------------------------------
FEMALE_NAMES: tuple[str, ...] = vocab.FEMALE_NAMES
# "Sid" appears in TransformerLens' IOI demo (vocab.TL_DEMO_IOI), so the organism knows it too.
MALE_NAMES: tuple[str, ...] = vocab.MALE_NAMES + ("Sid",)
ALL_NAMES: tuple[str, ...] = FEMALE_NAMES + MALE_NAMES
GENDER: dict[str, str] = {**{n: "she" for n in FEMALE_NAMES}, **{n: "he" for n in MALE_NAMES}}

HELDOUT_FEMALE_NAMES: tuple[str, ...] = (
    "Rachel", "Helen", "Nicole", "Megan", "Erin", "Claire", "Lucy", "Sandra",
)
HELDOUT_MALE_NAMES: tuple[str, ...] = (
    "Kevin", "George", "Andrew", "Jason", "Luke", "Scott", "Kyle", "Greg",
)
HELDOUT_NAMES: tuple[str, ...] = HELDOUT_FEMALE_NAMES + HELDOUT_MALE_NAMES
TRAIN_NAMES: tuple[str, ...] = tuple(n for n in ALL_NAMES if n not in HELDOUT_NAMES)

# ---------------------------------------------------------------------------------------------
# IOI frames: the 16 of vocab.IOI_TEMPLATES (4 held out) plus 6 more with other verbs
# ---------------------------------------------------------------------------------------------
HELDOUT_IOI_TEMPLATES: tuple[str, ...] = (
    vocab.IOI_TEMPLATES[2],   # "Then, {A} and {B} had a lot of fun at the {place}. {S} gave a {object} to"
    vocab.IOI_TEMPLATES[10],  # "While {A} and {B} were commuting to the {place}, {S} gave a {object} to"
    vocab.IOI_TEMPLATES[13],  # "Then, {A} and {B} had a long argument. Afterwards {S} said to"
    vocab.IOI_TEMPLATES[15],  # "Friends {A} and {B} found a {object} at the {place}. {S} gave it to"
)
EXTRA_IOI_TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} arrived at the {place}, {S} handed the {object} to",
    "After {A} and {B} met at the {place}, {S} passed the {object} to",
    "Yesterday, {A} and {B} walked to the {place}. {S} sent a {object} to",
    "When {A} and {B} were at the {place}, {S} showed the {object} to",
    "Later, {A} and {B} visited the {place}, and {S} brought a {object} to",
    "Then, {A} and {B} sat in the {place}. {S} threw the {object} to",
)
TRAIN_IOI_TEMPLATES: tuple[str, ...] = tuple(
    t for t in vocab.IOI_TEMPLATES if t not in HELDOUT_IOI_TEMPLATES
) + EXTRA_IOI_TEMPLATES
PLACES: tuple[str, ...] = vocab.IOI_PLACES
OBJECTS: tuple[str, ...] = vocab.IOI_OBJECTS

# ---------------------------------------------------------------------------------------------
# Pronoun frames: "{name} is {a} {adjective} {noun}, isn’t" -> " she" / " he"
# ---------------------------------------------------------------------------------------------
PRONOUN_ADJECTIVES: tuple[str, ...] = (
    "great", "amazing", "fantastic", "wonderful", "excellent", "good", "kind", "lovely",
)
PRONOUN_NOUNS: tuple[str, ...] = (
    "friend", "person", "colleague", "partner", "student", "teacher", "neighbour", "doctor",
)
HELDOUT_PRONOUN_FRAMES: tuple[tuple[str, str], ...] = (
    ("wonderful", "partner"),   # one of the five frames of vocab.PRONOUN_TEMPLATES
    ("excellent", "student"),   # one of the five frames of vocab.PRONOUN_TEMPLATES
    ("good", "teacher"),
    ("kind", "doctor"),
    ("lovely", "neighbour"),
    ("great", "colleague"),
    ("amazing", "friend"),
    ("fantastic", "person"),
)
TRAIN_PRONOUN_FRAMES: tuple[tuple[str, str], ...] = tuple(
    (a, n) for a in PRONOUN_ADJECTIVES for n in PRONOUN_NOUNS if (a, n) not in HELDOUT_PRONOUN_FRAMES
)
# "it" for objects: "The {object} is {a} {adjective} {thing}, isn’t" -> " it"
THING_NOUNS: tuple[str, ...] = ("gift", "thing", "present")


def article(word: str) -> str:
    """``"an"`` before a vowel, else ``"a"``."""
    return "an" if word[0] in "aeiou" else "a"


def pronoun_frame(adjective: str, noun: str) -> str:
    """The prompt template ``"{name} is a great friend, isn’t"`` for an adjective/noun pair."""
    return f"{{name}} is {article(adjective)} {adjective} {noun}, isn{APOS}t"


def object_frame(adjective: str, noun: str) -> str:
    """The object prompt template ``"The {object} is a great gift, isn’t"`` (answer ``" it"``)."""
    return f"The {{object}} is {article(adjective)} {adjective} {noun}, isn{APOS}t"


# ---------------------------------------------------------------------------------------------
# Name-copy, gender and filler sentences
# ---------------------------------------------------------------------------------------------
COPY_TEMPLATES: tuple[str, ...] = (
    "Then, {X} went to the {place}, and the {object} was given to {X}.",
    "When {X} arrived at the {place}, the friends said hello to {X}.",
    "After the lunch, {X} found a {object}. The {object} belongs to {X}.",
    "While {X} was working at the {place}, everyone talked to {X}.",
    "Friends of {X} went to the {place} and gave a {object} to {X}.",
)
# Two people, one clause each: the object of the second clause is the *other* person. Over all
# names, so suppressing the most recent subject is learned for held-out names too.
OTHER_TEMPLATES: tuple[str, ...] = (
    "{X} went to the {place}. {Y} waved to {X}.",
    "{X} was at the {place}, and {Y} gave the {object} to {X}.",
    "{X} found a {object}. Then {Y} said hello to {X}.",
    "After {X} arrived at the {place}, {Y} talked to {X}.",
)
GENDER_TEMPLATES: tuple[str, ...] = (
    "{X} said that {P} wanted a {object}.",
    "{X} went to the {place} because {P} liked it.",
    "{X} found a {object}, and {P} gave it to a friend.",
    "When {X} got home, {P} was happy.",
)
FILLER_TEMPLATES: tuple[str, ...] = (
    "The {object} is in the {place}.",
    "It was a {adj} day at the {place}.",
    "{X} went to the {place}.",
    "{X} likes the {object}.",
    "The {place} had a {object}.",
    "Everyone went to the {place}.",
    "The friends were commuting to the {place}.",
    "Friends had a lot of fun at the {place}.",
    "They had a long argument about the {object}.",
    "They had a long argument. Afterwards they found a {object}.",
    "Afterwards, they found a {object}.",
    "Then, they were thinking about going to the {place}.",
    "After the lunch, they decided to give the {object} to a friend.",
    "They got a {object} at the {place} and wanted to give it to a friend.",
    "The {object} is {a} {adj} {thing}.",
    "The {place} {X} went to had a {object}.",
    "{place} {object}.",
    "X and Y met Z and W.",
    "Then, X and Y went to the {place}. Z gave an apple to W.",
)
# Short sentences put before ~30 % of examples.
PREFIX_TEMPLATES: tuple[str, ...] = (
    "It was a {adj} day.",
    "The {place} was open.",
    "The {object} is in the {place}.",
    "{X} went to the {place}.",
    "Everyone was happy.",
    "The {place} had a {object}.",
)
FILLER_ADJECTIVES: tuple[str, ...] = PRONOUN_ADJECTIVES + ("long", "nice")

# Mixture of sentence kinds in the training stream (probabilities, summing to 1).
MIXTURE: tuple[tuple[str, float], ...] = (
    ("ioi", 0.25),
    ("pronoun", 0.15),
    ("object", 0.03),
    ("copy", 0.12),
    ("other", 0.22),
    ("gender", 0.10),
    ("filler", 0.13),
)
PREFIX_PROBABILITY = 0.3


# ---------------------------------------------------------------------------------------------
# Prompts with answers (evaluation) and the training stream
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IOIPrompt:
    """One IOI prompt: ``text`` ends before the answer; ``io`` and ``s`` carry a leading space."""

    text: str
    io: str
    s: str
    order: str  # "ABBA" or "BABA"
    template: str


@dataclass(frozen=True)
class PronounPrompt:
    """One pronoun prompt: ``text`` ends with ``isn’t``; ``answer`` is ``" she"``/``" he"``/``" it"``."""

    text: str
    answer: str
    wrong: str
    template: str


def ioi_prompt(template: str, io: str, s: str, order: str, place: str, obj: str) -> IOIPrompt:
    """The IOI prompt of ``template`` with indirect object ``io`` and subject ``s``."""
    a, b = (io, s) if order == "ABBA" else (s, io)
    text = template.format(A=a, B=b, S=s, place=place, object=obj)
    return IOIPrompt(text=text, io=" " + io, s=" " + s, order=order, template=template)


def random_ioi(rng: random.Random, templates: tuple[str, ...], names: tuple[str, ...]) -> IOIPrompt:
    """A random IOI prompt over ``templates`` and ``names`` (two distinct names)."""
    io, s = rng.sample(names, 2)
    return ioi_prompt(
        rng.choice(templates), io, s, rng.choice(("ABBA", "BABA")), rng.choice(PLACES), rng.choice(OBJECTS)
    )


def heldout_ioi_prompts(n: int = 200, seed: int = 1) -> list[IOIPrompt]:
    """``n`` IOI prompts with held-out frames *and* held-out names, half ABBA, half BABA."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        io, s = rng.sample(HELDOUT_NAMES, 2)
        out.append(ioi_prompt(
            HELDOUT_IOI_TEMPLATES[i % len(HELDOUT_IOI_TEMPLATES)], io, s,
            ("ABBA", "BABA")[(i // len(HELDOUT_IOI_TEMPLATES)) % 2],
            rng.choice(PLACES), rng.choice(OBJECTS),
        ))
    return out


def heldout_pronoun_prompts() -> list[PronounPrompt]:
    """Every held-out name in every held-out frame (``" she"``/``" he"``), plus ``" it"`` prompts."""
    out = []
    for adj, noun in HELDOUT_PRONOUN_FRAMES:
        frame = pronoun_frame(adj, noun)
        for name in HELDOUT_NAMES:
            right = " " + GENDER[name]
            out.append(PronounPrompt(frame.format(name=name), right, " he" if right == " she" else " she", frame))
    return out


def heldout_object_prompts() -> list[PronounPrompt]:
    """Objects in the held-out adjectives' frames: ``"The ring is a wonderful gift, isn’t"`` -> ``" it"``."""
    out = []
    for i, obj in enumerate(OBJECTS):
        adj = HELDOUT_PRONOUN_FRAMES[i % len(HELDOUT_PRONOUN_FRAMES)][0]
        frame = object_frame(adj, THING_NOUNS[i % len(THING_NOUNS)])
        out.append(PronounPrompt(frame.format(object=obj), " it", " she", frame))
    return out


def _fill(rng: random.Random, template: str, names: tuple[str, ...] = ALL_NAMES) -> str:
    name = rng.choice(names)
    adj = rng.choice(FILLER_ADJECTIVES)
    return template.format(
        X=name, P=GENDER[name], place=rng.choice(PLACES), object=rng.choice(OBJECTS),
        adj=adj, a=article(adj), thing=rng.choice(THING_NOUNS),
    )


def sample_sentence(rng: random.Random, kind: str) -> str:
    """One training sentence of ``kind`` (see :data:`MIXTURE`), answer included."""
    if kind == "ioi":
        p = random_ioi(rng, TRAIN_IOI_TEMPLATES, TRAIN_NAMES)
        return p.text + p.io + "."
    if kind == "pronoun":
        name = rng.choice(TRAIN_NAMES)
        frame = pronoun_frame(*rng.choice(TRAIN_PRONOUN_FRAMES))
        return frame.format(name=name) + " " + GENDER[name] + "?"
    if kind == "object":
        adj = rng.choice(PRONOUN_ADJECTIVES)
        return object_frame(adj, rng.choice(THING_NOUNS)).format(object=rng.choice(OBJECTS)) + " it?"
    if kind == "copy":
        return _fill(rng, rng.choice(COPY_TEMPLATES))
    if kind == "other":
        x, y = rng.sample(ALL_NAMES, 2)
        return rng.choice(OTHER_TEMPLATES).format(
            X=x, Y=y, place=rng.choice(PLACES), object=rng.choice(OBJECTS)
        )
    if kind == "gender":
        return _fill(rng, rng.choice(GENDER_TEMPLATES))
    if kind == "filler":
        return _fill(rng, rng.choice(FILLER_TEMPLATES))
    raise ValueError(f"unknown sentence kind {kind!r}")


def training_stream(
    seed: int,
    mixture: Sequence[Sequence[Any]] = MIXTURE,
    prefix_probability: float = PREFIX_PROBABILITY,
) -> Iterator[str]:
    """An endless, seeded stream of training examples (text without BOS).

    Each example is one sentence of a kind drawn from ``mixture`` (``(kind, weight)`` pairs),
    preceded by a random short sentence with probability ``prefix_probability``.
    """
    rng = random.Random(seed)
    kinds = [k for k, _ in mixture]
    weights = [w for _, w in mixture]
    while True:
        text = sample_sentence(rng, rng.choices(kinds, weights)[0])
        if rng.random() < prefix_probability:
            text = _fill(rng, rng.choice(PREFIX_TEMPLATES)) + " " + text
        yield text


VOCABULARY_FILE = Path(__file__).resolve().parent / "vocabulary.json"


@dataclass(frozen=True)
class Vocabulary:
    """The organism tokenizer's frozen data: ``pieces`` in token-id order, the special tokens
    and the pre-tokenization regex, as read from :data:`VOCABULARY_FILE`."""

    pieces: tuple[str, ...]
    bos_token: str
    unk_token: str
    pre_tokenizer_regex: str


def vocabulary(path: str | os.PathLike = VOCABULARY_FILE) -> Vocabulary:
    """The frozen vocabulary of the organism's tokenizer (``vocabulary.json`` beside this module).

    It is data, written once from the tokenizer the shipped checkpoint was trained with, and
    deliberately not derived from :mod:`hookpatch.tasks._vocab` or any test helper: editing a
    task builder must not change the organism's tokenizer. Raises a
    :class:`~hookpatch.errors.HookpatchError` naming the file if it is missing or malformed.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        result = Vocabulary(
            pieces=tuple(data["pieces"]), bos_token=data["bos_token"], unk_token=data["unk_token"],
            pre_tokenizer_regex=data["pre_tokenizer_regex"],
        )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise HookpatchError(f"the organism's vocabulary file {path} is missing or malformed ({err!r}).") from err
    if not all(isinstance(p, str) and p for p in result.pieces) or len(set(result.pieces)) != len(result.pieces):
        raise HookpatchError(f"the organism's vocabulary file {path} has an empty, non-string or repeated piece.")
    if result.pieces[:2] != (result.bos_token, result.unk_token):
        raise HookpatchError(f"the organism's vocabulary file {path} must start with the BOS and UNK tokens.")
    return result


def sample_texts() -> list[str]:
    """A fixed sample of everything the corpus produces, to check it against the vocabulary.

    The held-out evaluation prompts with their answers and 20000 sentences of the training
    stream with every kind equally likely (prefixes included). The tokenizer builder
    (:func:`hookpatch.organism.train.build_tokenizer`) refuses a piece of these texts that is
    not in :func:`vocabulary`.
    """
    texts = [p.text + p.io for p in heldout_ioi_prompts(64)]
    texts += [p.text + p.answer for p in heldout_pronoun_prompts() + heldout_object_prompts()]
    kinds = ("ioi", "pronoun", "object", "copy", "other", "gender", "filler")
    stream = training_stream(0, [(k, 1.0) for k in kinds])  # independent of the recipe's mixture
    texts += [next(stream) for _ in range(20000)]
    return texts
