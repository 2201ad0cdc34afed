"""Default words of the built-in tasks: names, pronoun frames, IOI templates, places, objects.

Names are common first names that GPT-2's tokenizer keeps as one token (with a leading space
mid-sentence, without one at the start of a prompt). The shipped model organism and the
small test tokenizers are built over these words, so every default prompt is in vocabulary.
"""

from __future__ import annotations

FEMALE_NAMES: tuple[str, ...] = (
    "Mary", "Amy", "Sarah", "Emily", "Lisa", "Laura", "Rachel", "Anna", "Kate", "Jessica",
    "Rebecca", "Michelle", "Jennifer", "Elizabeth", "Susan", "Linda", "Karen", "Emma", "Alice",
    "Julia", "Helen", "Nancy", "Carol", "Sandra", "Ashley", "Megan", "Nicole", "Heather",
    "Amanda", "Stephanie", "Lauren", "Katie", "Erin", "Kelly", "Rose", "Grace", "Anne", "Claire",
    "Jane", "Lucy",
)
MALE_NAMES: tuple[str, ...] = (
    "John", "Dan", "James", "Michael", "David", "Robert", "Tom", "Mark", "Paul", "Steven",
    "Kevin", "Brian", "Eric", "Peter", "George", "Richard", "Thomas", "Daniel", "Andrew",
    "Matthew", "Joseph", "Charles", "Chris", "Jason", "Ryan", "Adam", "Sam", "Jack", "Luke",
    "Henry", "Frank", "Scott", "Jacob", "Kyle", "Sean", "Alex", "Greg", "Tim", "Martin", "Jeff",
)

# The pronoun task of TransformerLens' GPT-2 small case study: five frames, pronoun " she"/" he"
# after "isn’t".
# The apostrophe is the curly one of the original prompts: its published numbers depend on it.
PRONOUN_TEMPLATES: tuple[str, ...] = (
    "{name} is a great friend, isn’t",
    "{name} is an amazing person, isn’t",
    "{name} is a fantastic colleague, isn’t",
    "{name} is a wonderful partner, isn’t",
    "{name} is an excellent student, isn’t",
)
# That study's four names, in its order (so per-prompt numbers line up), with the correct pronoun.
PRONOUN_NAMES: tuple[tuple[str, str], ...] = (
    ("Mary", " she"),
    ("John", " he"),
    ("Dan", " he"),
    ("Amy", " she"),
)

# IOI templates: {A} and {B} are the first two names (ABBA puts the indirect object first,
# BABA the subject), {S} is the second mention of the subject. 16 frames.
IOI_TEMPLATES: tuple[str, ...] = (
    "When {A} and {B} went to the {place}, {S} gave the {object} to",
    "Then, {A} and {B} went to the {place}. {S} gave a {object} to",
    "Then, {A} and {B} had a lot of fun at the {place}. {S} gave a {object} to",
    "Then, {A} and {B} were working at the {place}. {S} decided to give a {object} to",
    "Then, {A} and {B} were thinking about going to the {place}. {S} wanted to give a {object} to",
    "Then, {A} and {B} had a long argument, and afterwards {S} said to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give the {object} to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "While {A} and {B} were commuting to the {place}, {S} gave a {object} to",
    "After the lunch, {A} and {B} went to the {place}. {S} gave a {object} to",
    "Afterwards, {A} and {B} went to the {place}. {S} gave a {object} to",
    "Then, {A} and {B} had a long argument. Afterwards {S} said to",
    "The {place} {A} and {B} went to had a {object}. {S} gave it to",
    "Friends {A} and {B} found a {object} at the {place}. {S} gave it to",
)
IOI_PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
    "park", "shops", "beach", "library", "market", "church", "bank",
)
IOI_OBJECTS: tuple[str, ...] = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack", "bag",
    "ball", "book", "letter", "flower", "cake", "bottle",
)

# TransformerLens' IOI demo: four templates x two name pairs, each prompt followed by its
# S2-swapped partner (the "adjacent-pair swap" corruption pairs prompt 2i with 2i+1).
TL_DEMO_IOI: tuple[tuple[str, str, str], ...] = (
    ("When John and Mary went to the shops,{} gave the bag to", " John", " Mary"),
    ("When Tom and James went to the park,{} gave the ball to", " Tom", " James"),
    ("When Dan and Sid went to the shops,{} gave an apple to", " Dan", " Sid"),
    ("After Martin and Amy went to the park,{} gave a drink to", " Martin", " Amy"),
)
