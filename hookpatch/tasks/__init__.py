"""Prompt sets: clean and corrupted prompts with answers and named positions.

- :func:`pronoun_prompts` — "Mary is a great friend, isn’t" → " she" / " he";
- :func:`ioi_prompts` — indirect object identification, 16 templates, corruptions s2/abc/swap;
- :func:`ioi_tl_demo` — TransformerLens' 8-prompt IOI demo set;
- :func:`make_prompt_set` — your own prompts, checked into a :class:`PromptSet`.
"""

from hookpatch.tasks._ioi import ioi_prompts, ioi_tl_demo
from hookpatch.tasks._promptset import PromptSet, make_prompt_set
from hookpatch.tasks._pronoun import pronoun_prompts

__all__ = ["PromptSet", "ioi_prompts", "ioi_tl_demo", "make_prompt_set", "pronoun_prompts"]
