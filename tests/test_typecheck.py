"""The jaxtyping shape annotations are checked under pytest, not just read.

pyproject's ``addopts = "--jaxtyping-packages=hookpatch,beartype.beartype"`` makes jaxtyping's
pytest plugin decorate every function of hookpatch, as it is imported, with a beartype check of
its annotations: a named axis (``batch``) must have one size across all the arguments and the
return value. Without that option the annotations are documentation only, and these tests fail.
Users run without the check (see ``without_type_checker`` in test_bad_input.py).
"""

from __future__ import annotations

import jaxtyping
import pytest
import torch

from hookpatch.metrics._base import gather_answers


def test_a_named_axis_of_two_sizes_raises_a_type_check_error():
    logits = torch.zeros(2, 5, 10)  # [*lead=2, batch=5, d_vocab=10]
    tokens = torch.zeros(3, dtype=torch.long)  # [batch=3]: another batch size
    with pytest.raises(jaxtyping.TypeCheckError, match=r"gather_answers"):
        gather_answers(logits, tokens)


def test_a_wrong_dtype_raises_a_type_check_error():
    logits = torch.zeros(5, 10)  # [batch=5, d_vocab=10]
    tokens = torch.zeros(5)  # float, where Int[Tensor, " batch"] is annotated
    with pytest.raises(jaxtyping.TypeCheckError, match=r"gather_answers"):
        gather_answers(logits, tokens)


def test_consistent_shapes_pass_the_check():
    logits = torch.arange(30.0).reshape(3, 10)  # [batch=3, d_vocab=10]
    tokens = torch.tensor([1, 2, 3])  # [batch=3]
    assert gather_answers(logits, tokens).tolist() == [1.0, 12.0, 23.0]
