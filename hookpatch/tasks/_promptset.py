"""A prompt set: clean and corrupted prompts, their answers and named positions.

Everything a patching experiment reads about its inputs lives here, tokenized once and
checked: both prompts of a pair have the same length, answers are single tokens, named
positions (``"S2"``, ``"END"``) exist in every prompt. Prompts of different lengths are
right-padded only when asked (``pad=True``); ``END`` is then tracked per prompt and never
assumed to be the last column. Right padding is safe in a causal model: no real token
attends to a pad.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from hookpatch._checks import IntsLike, as_int_list, as_ints, require_model
from hookpatch._summary import clip, listing
from hookpatch.errors import HookpatchError
from hookpatch.model._tokens import encode, prepend_bos_default, str_tokens, to_single_token

END = "END"


@dataclass(frozen=True)
class PromptSet:
    """Clean/corrupted token pairs with answers and named positions, one row per prompt.

    Attributes:
        task: the builder's name (``"pronoun"``, ``"ioi"``, ``"custom"``).
        clean_prompts, corrupted_prompts: the prompt texts.
        clean_tokens, corrupted_tokens: ``[batch, pos]`` token ids (right-padded if ``pad``).
        answers: ``(correct, incorrect)`` answer strings per prompt.
        answer_tokens: ``[batch, 2]`` ids of ``(correct, incorrect)``.
        clean_str_tokens, corrupted_str_tokens: each prompt's tokens as text (unpadded).
        positions: name → ``[batch]`` position per prompt; always contains ``"END"``.
        lengths: ``[batch]`` real (unpadded) length of each prompt.
        pad_token_id: the id used for padding.
    """

    task: str
    clean_prompts: tuple[str, ...]
    corrupted_prompts: tuple[str, ...]
    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    answers: tuple[tuple[str, str], ...]
    answer_tokens: Int[Tensor, "batch 2"]
    clean_str_tokens: tuple[tuple[str, ...], ...]
    corrupted_str_tokens: tuple[tuple[str, ...], ...]
    positions: Mapping[str, Int[Tensor, " batch"]]
    lengths: Int[Tensor, " batch"]
    pad_token_id: int
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("clean_tokens", "corrupted_tokens", "answer_tokens", "lengths"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.is_floating_point() or value.dtype == torch.bool:
                kind = value.dtype if isinstance(value, Tensor) else type(value).__name__
                raise HookpatchError(
                    f"{name}= must be a tensor of integer token ids; got {kind}. Build prompt sets "
                    "with make_prompt_set, or convert with .long() only if the values are whole ids."
                )
        if len(self.clean_prompts) == 0 or self.clean_tokens.shape[0] == 0:
            raise HookpatchError(
                "a prompt set needs at least one prompt; got none (an empty selection or list)."
            )
        if self.clean_tokens.shape != self.corrupted_tokens.shape:
            raise HookpatchError(
                f"clean tokens {tuple(self.clean_tokens.shape)} and corrupted tokens "
                f"{tuple(self.corrupted_tokens.shape)} differ in shape; build the prompt set with "
                "make_prompt_set, which pairs prompts of equal length."
            )

    def __len__(self) -> int:
        return len(self.clean_prompts)

    def headline(self) -> str:
        """One line: ``PromptSet(task='ioi', 16 prompts, n_pos=17, padded)``."""
        padded = ", padded" if self.padded else ""
        return f"PromptSet(task={self.task!r}, {len(self)} prompts, n_pos={self.n_pos}{padded})"

    def __repr__(self) -> str:
        """A few lines: task and sizes, the named positions, prompt 0's pair and answers."""
        correct, incorrect = self.answers[0]
        lines = [
            self.headline()[:-1],
            f"  positions: {listing(self.positions, 8)}",
            f"  prompt 0 clean:     {clip(repr(self.clean_prompts[0]))} → {correct!r} (not {incorrect!r})",
            f"  prompt 0 corrupted: {clip(repr(self.corrupted_prompts[0]))}",
        ]
        if self.padded:
            lines.append(f"  lengths {int(self.lengths.min())} to {self.n_pos} tokens, right-padded")
        if self.metadata:
            lines.append("  metadata: " + clip(", ".join(f"{k}={v!r}" for k, v in self.metadata.items()), 100))
        return "\n".join(lines) + ")"

    @property
    def n_pos(self) -> int:
        """Number of token positions (columns) including padding."""
        return int(self.clean_tokens.shape[1])

    @property
    def end(self) -> Int[Tensor, " batch"]:
        """Each prompt's last real position, where the answer is predicted."""
        return self.positions[END]

    @property
    def padded(self) -> bool:
        """Whether some prompt is shorter than the widest one."""
        return bool((self.lengths < self.n_pos).any())

    @property
    def correct_tokens(self) -> Int[Tensor, " batch"]:
        return self.answer_tokens[:, 0]

    @property
    def incorrect_tokens(self) -> Int[Tensor, " batch"]:
        return self.answer_tokens[:, 1]

    def position(self, name: str) -> Int[Tensor, " batch"]:
        """Per-prompt index of the named position ``name`` (e.g. ``"S2"``)."""
        try:
            return self.positions[name]
        except KeyError:
            raise HookpatchError(
                f"unknown position name {name!r}; this {self.task} prompt set has "
                f"{sorted(self.positions)}."
            ) from None

    def fingerprint(self) -> str:
        """A stable hash of what a run reads: tokens, answers, named positions, lengths, padding.

        Two prompt sets with the same fingerprint give the same numbers in every sweep; the
        texts, task name and metadata are not part of it (they do not reach the model). The
        hash is a sha256 (first 16 hex digits) of the tensors as int64 little-endian bytes,
        so it does not change with the device or the integer dtype the tokens are kept in.
        """
        digest = hashlib.sha256()
        parts = [("clean_tokens", self.clean_tokens), ("corrupted_tokens", self.corrupted_tokens),
                 ("answer_tokens", self.answer_tokens), ("lengths", self.lengths),
                 ("pad_token_id", torch.tensor([self.pad_token_id]))]
        parts += [(f"position {name}", self.positions[name]) for name in sorted(self.positions)]
        for name, tensor in parts:
            data = tensor.detach().to("cpu", torch.int64).contiguous()
            digest.update(f"{name} {tuple(data.shape)};".encode())
            digest.update(data.numpy().astype("<i8").tobytes())
        return digest.hexdigest()[:16]

    def position_labels(self, prompt: int = 0) -> list[str]:
        """Axis labels ``"i: token"`` for every column, from prompt ``prompt``'s tokens.

        Columns that hold a named position in every prompt are labelled with the name too
        (``"3: John (S2)"``), since the token text differs between prompts.
        """
        tokens = self.clean_str_tokens[prompt]
        names = {
            int(pos[0]): name
            for name, pos in self.positions.items()
            if bool((pos == pos[0]).all())
        }
        labels = []
        for i in range(self.n_pos):
            text = tokens[i] if i < len(tokens) else "<pad>"
            labels.append(f"{i}: {text}" + (f" ({names[i]})" if i in names else ""))
        return labels

    def select(self, index: IntsLike | slice) -> PromptSet:
        """The prompt set restricted to the prompts at ``index``."""
        rows = list(range(len(self)))[index] if isinstance(index, slice) else as_ints(index, "index")
        if not rows:
            raise HookpatchError(
                f"index={index!r} selects no prompts; a prompt set needs at least one (pick from "
                f"0..{len(self) - 1})."
            )
        for r in rows:
            if not -len(self) <= r < len(self):
                raise HookpatchError(f"prompt index {r} is out of range for {len(self)} prompts.")
        idx = torch.tensor(rows, dtype=torch.long)
        width = int(self.lengths[idx].max()) if rows else 0
        return PromptSet(
            task=self.task,
            clean_prompts=tuple(self.clean_prompts[r] for r in rows),
            corrupted_prompts=tuple(self.corrupted_prompts[r] for r in rows),
            clean_tokens=self.clean_tokens[idx, :width],
            corrupted_tokens=self.corrupted_tokens[idx, :width],
            answers=tuple(self.answers[r] for r in rows),
            answer_tokens=self.answer_tokens[idx],
            clean_str_tokens=tuple(self.clean_str_tokens[r] for r in rows),
            corrupted_str_tokens=tuple(self.corrupted_str_tokens[r] for r in rows),
            positions={k: v[idx] for k, v in self.positions.items()},
            lengths=self.lengths[idx],
            pad_token_id=self.pad_token_id,
            metadata=dict(self.metadata),
        )

    def to(self, device: str | torch.device) -> PromptSet:
        """A copy with every tensor on ``device``."""
        return PromptSet(
            task=self.task,
            clean_prompts=self.clean_prompts,
            corrupted_prompts=self.corrupted_prompts,
            clean_tokens=self.clean_tokens.to(device),
            corrupted_tokens=self.corrupted_tokens.to(device),
            answers=self.answers,
            answer_tokens=self.answer_tokens.to(device),
            clean_str_tokens=self.clean_str_tokens,
            corrupted_str_tokens=self.corrupted_str_tokens,
            positions={k: v.to(device) for k, v in self.positions.items()},
            lengths=self.lengths.to(device),
            pad_token_id=self.pad_token_id,
            metadata=dict(self.metadata),
        )


def make_prompt_set(
    model: Any,
    clean: Sequence[str],
    corrupted: Sequence[str],
    answers: Sequence[tuple[str, str]],
    *,
    positions: Mapping[str, IntsLike] | None = None,
    pad: bool = False,
    prepend_bos: bool | None = None,
    task: str = "custom",
    metadata: Mapping[str, Any] | None = None,
) -> PromptSet:
    """Tokenize and check clean/corrupted prompt pairs into a :class:`PromptSet`.

    Example:
        >>> ps = make_prompt_set(model, ["Mary is a great friend, isn’t"],
        ...                      ["John is a great friend, isn’t"], [(" she", " he")])

    Args:
        model: the TransformerBridge whose tokenizer defines the tokens.
        clean, corrupted: prompt texts, one corrupted prompt per clean one.
        answers: ``(correct, incorrect)`` per prompt; each must be a single token.
        positions: extra named positions, name → one index per prompt (``END`` is added).
        pad: right-pad prompts of different lengths instead of refusing them.
        prepend_bos: default: the model's convention.
        task: a name carried into results.

    Returns:
        The checked :class:`PromptSet` on the model's device.
    """
    require_model(model)
    for arg, texts in (("clean", clean), ("corrupted", corrupted)):
        if isinstance(texts, str):
            raise HookpatchError(
                f"{arg}= must be a list of prompts; got one string. Wrap it in a list: {arg}=[{texts!r}]."
            )
    n = len(clean)
    if n == 0:
        raise HookpatchError("no prompts given; pass at least one clean prompt.")
    if len(corrupted) != n or len(answers) != n:
        raise HookpatchError(
            f"got {n} clean prompts, {len(corrupted)} corrupted prompts and {len(answers)} "
            "answer pairs; pass one corrupted prompt and one (correct, incorrect) pair per clean prompt."
        )
    if prepend_bos is None:
        prepend_bos = prepend_bos_default(model)
    clean_ids = [encode(model, p, prepend_bos=prepend_bos) for p in clean]
    corrupted_ids = [encode(model, p, prepend_bos=prepend_bos) for p in corrupted]
    for i, (a, b) in enumerate(zip(clean_ids, corrupted_ids, strict=True)):
        if len(a) != len(b):
            raise HookpatchError(
                f"prompt {i}: clean {clean[i]!r} is {len(a)} tokens but corrupted "
                f"{corrupted[i]!r} is {len(b)} tokens; a clean/corrupted pair must have the same "
                f"length so positions line up. Clean tokens: {str_tokens(model, a)}; corrupted "
                f"tokens: {str_tokens(model, b)}."
            )
    lengths = [len(a) for a in clean_ids]
    if len(set(lengths)) > 1 and not pad:
        short, long_ = lengths.index(min(lengths)), lengths.index(max(lengths))
        raise HookpatchError(
            f"prompts have different lengths ({min(lengths)} tokens for prompt {short} "
            f"{clean[short]!r}, {max(lengths)} for prompt {long_} {clean[long_]!r}); pass "
            "pad=True to right-pad them with END tracked per prompt, or use prompts of one length."
        )
    answer_ids = []
    for pair in answers:
        if len(pair) != 2:
            raise HookpatchError(f"answer {pair!r} must be a (correct, incorrect) pair of strings.")
        answer_ids.append([to_single_token(model, word) for word in pair])
    pad_id = _pad_id(model)
    width = max(lengths)

    def matrix(rows: list[list[int]]) -> Tensor:
        return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)

    named: dict[str, Tensor] = {}
    for name, values in (positions or {}).items():
        if name == END:
            raise HookpatchError(f"position name {END!r} is reserved: it is each prompt's last token.")
        values = as_int_list(values, f"positions[{name!r}]")
        if len(values) != n:
            raise HookpatchError(f"position {name!r} has {len(values)} entries for {n} prompts.")
        for i, v in enumerate(values):
            if not 0 <= v < lengths[i]:
                raise HookpatchError(
                    f"position {name!r} = {v} is outside prompt {i} ({lengths[i]} tokens)."
                )
        named[name] = torch.tensor(values, dtype=torch.long)
    named[END] = torch.tensor(lengths, dtype=torch.long) - 1
    device = getattr(model.cfg, "device", None) or "cpu"
    return PromptSet(
        task=task,
        clean_prompts=tuple(clean),
        corrupted_prompts=tuple(corrupted),
        clean_tokens=matrix(clean_ids),
        corrupted_tokens=matrix(corrupted_ids),
        answers=tuple((a, b) for a, b in answers),
        answer_tokens=torch.tensor(answer_ids, dtype=torch.long),
        clean_str_tokens=tuple(tuple(str_tokens(model, r)) for r in clean_ids),
        corrupted_str_tokens=tuple(tuple(str_tokens(model, r)) for r in corrupted_ids),
        positions=named,
        lengths=torch.tensor(lengths, dtype=torch.long),
        pad_token_id=pad_id,
        metadata=dict(metadata or {}),
    ).to(device)


def _pad_id(model: Any) -> int:
    tok = model.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def word_position(model: Any, text: str, word: str, occurrence: int = 0, *, prepend_bos: bool) -> int:
    """Token index of the ``occurrence``-th ``word`` in ``text`` (a word that is one token).

    Found by tokenizing the text up to and including the word, so it agrees with how the
    tokenizer splits the full prompt; checked against the full tokenization.
    """
    hits = [m.start() for m in re.finditer(re.escape(word) + r"(?!\w)", text)]
    if len(hits) <= occurrence:
        raise HookpatchError(f"word {word!r} does not occur {occurrence + 1} times in {text!r}.")
    start = hits[occurrence]
    before = encode(model, text[:start], prepend_bos=prepend_bos) if start or prepend_bos else []
    upto = encode(model, text[: start + len(word)], prepend_bos=prepend_bos)
    full = encode(model, text, prepend_bos=prepend_bos)
    if full[: len(upto)] != upto or upto[: len(before)] != before:
        raise HookpatchError(
            f"{word!r} in {text!r} does not fall on token boundaries; names and position words "
            "must be whole tokens."
        )
    if len(upto) != len(before) + 1:
        raise HookpatchError(
            f"{word!r} in {text!r} is not a single token (it splits into "
            f"{str_tokens(model, upto[len(before):])}); choose a one-token word."
        )
    return len(upto) - 1
