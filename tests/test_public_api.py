"""The documented public surface: every exported name exists and says what it does."""

from __future__ import annotations

import importlib

import pytest

import hookpatch

PACKAGES = ["hookpatch", "hookpatch.metrics", "hookpatch.sweeps", "hookpatch.readouts", "hookpatch.attribution",
            "hookpatch.views"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_is_documented(package):
    module = importlib.import_module(package)
    assert module.__doc__
    for name in module.__all__:
        obj = getattr(module, name)
        assert obj.__doc__, f"{package}.{name} has no docstring"


def test_top_level_surface_is_small():
    assert 15 <= len(hookpatch.__all__) <= 30
    assert len(set(hookpatch.__all__)) == len(hookpatch.__all__)
