"""What the model predicts after a prompt: top-k tokens and the answer's rank, as a table.

TransformerLens' ``utils.test_prompt`` only prints; this returns the numbers (rank, logit,
probability) so code can assert on them or plot them, and prints the same view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hookpatch._checks import IntLike, as_int
from hookpatch.errors import HookpatchError
from hookpatch.model._loading import require_eval
from hookpatch.model._tokens import encode, str_tokens, to_single_token


@dataclass(frozen=True)
class TokenRow:
    """One predicted token: its rank (0 = top), text, id, logit and probability."""

    rank: int
    token: str
    token_id: int
    logit: float
    prob: float


@dataclass(frozen=True)
class Predictions:
    """Top-k next-token predictions after ``prompt``, and the answer's row if one was given."""

    prompt: str
    str_tokens: tuple[str, ...]
    top: tuple[TokenRow, ...]
    answer: TokenRow | None

    def to_dataframe(self) -> Any:
        """The top-k rows as a pandas DataFrame (columns rank, token, token_id, logit, prob)."""
        import pandas as pd

        return pd.DataFrame([row.__dict__ for row in self.top])

    def __str__(self) -> str:
        lines = [f"Tokenized prompt: {list(self.str_tokens)}"]
        if self.answer is not None:
            a = self.answer
            lines.append(f"Answer {a.token!r}: rank {a.rank}, logit {a.logit:.2f}, prob {a.prob:.2%}")
        lines += [
            f"Top {r.rank}: logit {r.logit:6.2f}  prob {r.prob:6.2%}  token {r.token!r}" for r in self.top
        ]
        return "\n".join(lines)


@torch.no_grad()
def predictions(
    model: Any, prompt: str, answer: str | None = None, *, k: IntLike = 10, prepend_bos: bool | None = None
) -> Predictions:
    """Top-``k`` next tokens after ``prompt`` and the rank of ``answer`` (one token).

    Example:
        >>> print(predictions(model, "Mary is a great friend, isn’t", " she"))
    """
    require_eval(model)
    k = as_int(k, "k", minimum=1, hint=": how many top tokens to list")
    if not isinstance(prompt, str):
        raise HookpatchError(f"prompt= must be the prompt text (a str); got {type(prompt).__name__}.")
    ids = encode(model, prompt, prepend_bos=prepend_bos)
    answer_id = None if answer is None else to_single_token(model, answer)
    logits = model(torch.tensor([ids], device=model.cfg.device))[0, -1].float()
    probs = logits.softmax(-1)
    order = logits.argsort(descending=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order), device=order.device)

    def row(token_id: int) -> TokenRow:
        return TokenRow(
            rank=int(ranks[token_id]),
            token=model.tokenizer.decode([token_id]),
            token_id=token_id,
            logit=float(logits[token_id]),
            prob=float(probs[token_id]),
        )

    return Predictions(
        prompt=prompt,
        str_tokens=tuple(str_tokens(model, ids)),
        top=tuple(row(int(i)) for i in order[: min(k, len(order))]),
        answer=None if answer_id is None else row(answer_id),
    )
