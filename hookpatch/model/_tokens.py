"""Tokenization with checks: single-token answers, unknown words, context length.

TransformerLens' ``to_tokens`` silently truncates at ``n_ctx`` and a word-level tokenizer
silently maps unknown words to ``<unk>``; both would corrupt an experiment without a sound,
so every prompt hookpatch builds goes through :func:`encode`, which refuses them.
"""

from __future__ import annotations

from typing import Any

from hookpatch.errors import HookpatchError


def prepend_bos_default(model: Any) -> bool:
    """Whether the model's prompts start with BOS by default (``cfg.default_prepend_bos``)."""
    return bool(getattr(model.cfg, "default_prepend_bos", True))


def encode(model: Any, text: str, *, prepend_bos: bool | None = None) -> list[int]:
    """Token ids of ``text`` as the model sees it, refusing unknown words and over-long prompts.

    Args:
        model: a TransformerBridge (anything with ``to_tokens``, ``tokenizer`` and ``cfg``).
        text: the prompt.
        prepend_bos: defaults to the model's own convention.

    Returns:
        A list of ``pos`` token ids.
    """
    if model.tokenizer is None:
        raise HookpatchError("the model has no tokenizer; load it with one (load_model does).")
    if prepend_bos is None:
        prepend_bos = prepend_bos_default(model)
    ids = model.to_tokens(text, prepend_bos=prepend_bos, truncate=False, move_to_device=False)[0].tolist()
    unk = model.tokenizer.unk_token_id
    if unk is not None and unk in ids:
        words = [
            piece
            for piece, i in zip(model.tokenizer.convert_ids_to_tokens(ids), ids, strict=True)
            if i == unk
        ]
        unknown = _unknown_words(model, text)
        raise HookpatchError(
            f"prompt {text!r} has words outside the model's vocabulary: {unknown or words}. "
            "They would be read as <unk>; rephrase the prompt with words the tokenizer knows."
        )
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and len(ids) > n_ctx:
        raise HookpatchError(
            f"prompt {text!r} is {len(ids)} tokens long but the model's context is {n_ctx} tokens; "
            "shorten the prompt (it would otherwise be cut silently)."
        )
    return ids


def _unknown_words(model: Any, text: str) -> list[str]:
    """The pre-tokenized pieces of ``text`` that the tokenizer maps to ``<unk>``."""
    tok = model.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        return []
    unk = tok.unk_token_id
    pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    return [p for p in pieces if tok.convert_tokens_to_ids(p) == unk]


def to_single_token(model: Any, word: str) -> int:
    """The id of ``word`` (e.g. ``" she"``), which must be exactly one token.

    Raises a :class:`HookpatchError` naming the word and the tokens it splits into.
    """
    ids = encode(model, word, prepend_bos=False)
    if len(ids) != 1:
        pieces = model.tokenizer.convert_ids_to_tokens(ids)
        hint = (
            " Note the leading space: answers after a word are usually written ' word'."
            if not word.startswith(" ")
            else ""
        )
        raise HookpatchError(
            f"answer {word!r} is not a single token: it tokenizes to {len(ids)} tokens {pieces}. "
            f"Choose an answer word that is one token in this model's vocabulary.{hint}"
        )
    return ids[0]


def str_tokens(model: Any, ids: list[int]) -> list[str]:
    """Each token id decoded on its own (as TransformerLens' ``to_str_tokens``)."""
    return [model.tokenizer.decode([i]) for i in ids]
