"""The model organism: a small GPT-2-architecture model trained on a toy corpus with known circuits.

``hookpatch.model._loading.load_model("organism")`` loads the shipped checkpoint (in
``hookpatch/organism/checkpoint/``, described by its ``MODEL_CARD.md``);
:mod:`hookpatch.organism._corpus` generates the training sentences and holds the
train/held-out split as data; ``python -m hookpatch.organism.train --out DIR`` reproduces the
checkpoint and ``python -m hookpatch.organism.analysis [DIR]`` recomputes the model card's
measurements.

:func:`verify_checkpoint` and :func:`check_load_options` turn a damaged checkpoint or an
option the organism cannot honour into a :class:`~hookpatch.errors.HookpatchError` naming the
file or the option, before TransformerLens gets to fail with a less helpful message.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from hookpatch.errors import HookpatchError

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
REQUIRED_FILES: tuple[str, ...] = (
    "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
)
# training_config.json records the sha256 of these files when the checkpoint is written.
HASHED_FILES: tuple[str, ...] = REQUIRED_FILES

__all__ = ["check_load_options", "file_sha256", "verify_checkpoint"]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def verify_checkpoint(path: str | os.PathLike = CHECKPOINT_DIR) -> Path:
    """Check that ``path`` holds a complete, undamaged organism checkpoint; return it.

    Checks that every file of :data:`REQUIRED_FILES` exists, that the JSON files parse, that
    ``model.safetensors`` has a readable header, and, when ``training_config.json`` records
    checksums, that every file still matches its checksum. Raises a
    :class:`~hookpatch.errors.HookpatchError` naming the first bad file.
    """
    path = Path(path)
    fix = "reinstall hookpatch, or rebuild it with `python -m hookpatch.organism.train --out DIR`."
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise HookpatchError(f"the model organism checkpoint is incomplete: {path / name} is missing; {fix}")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        try:
            json.loads((path / name).read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise HookpatchError(f"the model organism file {path / name} is corrupted ({err}); {fix}") from err
    try:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            list(f.keys())
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise HookpatchError(
            f"the model organism file {path / 'model.safetensors'} is corrupted ({err}); {fix}"
        ) from err
    record_file = path / "training_config.json"
    if record_file.is_file():
        try:
            expected = json.loads(record_file.read_text()).get("sha256", {})
        except ValueError as err:
            raise HookpatchError(f"the model organism file {record_file} is corrupted ({err}); {fix}") from err
        for name, digest in expected.items():
            if file_sha256(path / name) != digest:
                raise HookpatchError(
                    f"the model organism file {path / name} does not match the checksum recorded "
                    f"in training_config.json (it was modified or damaged); {fix}"
                )
    return path


def check_load_options(*, dtype: Any = None, tokenizer: Any = None) -> None:
    """Refuse loading options the organism cannot honour, naming the option.

    The organism only works with its own word-level tokenizer (``tokenizer`` must be
    ``None``) and with floating-point parameters.
    """
    import torch

    if tokenizer is not None:
        raise HookpatchError(
            "load_model('organism') does not take tokenizer=: the organism only understands its "
            "own word-level tokenizer, which is loaded with it. Leave tokenizer unset."
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise HookpatchError(
            f"load_model('organism') got dtype={dtype!r}; pass a floating-point torch dtype "
            "such as torch.float32 (the default)."
        )
