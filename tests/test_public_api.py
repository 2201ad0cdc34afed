"""The documented public surface: every exported name exists and says what it does."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import hookpatch

PACKAGES = ["hookpatch", "hookpatch.model", "hookpatch.organism", "hookpatch.tasks", "hookpatch.metrics",
            "hookpatch.hooks", "hookpatch.sweeps", "hookpatch.readouts", "hookpatch.attribution", "hookpatch.views",
            "hookpatch.runners", "hookpatch.circuits"]
README = Path(__file__).resolve().parent.parent / "README.md"
# Backticked words in README's "What is in it" that are not Python names of the module the
# bullet names: TransformerLens options and functions, position names, corruption names.
NOT_NAMES = {"fold_ln", "center_writing_weights", "center_unembed", "NAME", "IO", "S1", "S2", "END", "s2", "abc",
             "swap", "run_with_hooks", "patching"}


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_is_documented(package):
    module = importlib.import_module(package)
    assert module.__doc__
    for name in module.__all__:
        obj = getattr(module, name)
        assert obj.__doc__, f"{package}.{name} has no docstring"


def test_implementation_modules_are_private():
    """Public modules are the packages, the top-level modules a user imports or runs, and the
    organism's two scripts; every other module is private (``_name.py``), reached through its
    package's ``__init__``, so it can move without breaking anyone's imports."""
    modules = {m.name for m in pkgutil.walk_packages(hookpatch.__path__, "hookpatch.")}
    public = {m for m in modules if not any(part.startswith("_") for part in m.split("."))}
    packages = {m for m in modules if hasattr(importlib.import_module(m), "__path__")}
    scripts = {"hookpatch.cli", "hookpatch.errors", "hookpatch.report", "hookpatch.results",
               "hookpatch.organism.analysis", "hookpatch.organism.train"}
    assert public - packages == scripts
    assert len(modules - public) >= 50  # the walk found the private modules too


def test_top_level_surface_is_small():
    assert 15 <= len(hookpatch.__all__) <= 30
    assert len(set(hookpatch.__all__)) == len(hookpatch.__all__)


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _documented() -> list[tuple[str, str]]:
    """``(module, name)`` for every backticked Python name in README's "What is in it" bullets,
    under the module the bullet names (``hookpatch.results.SweepResult``: the class's methods)."""
    pairs = []
    for bullet in re.split(r"\n- ", _section("What is in it")):
        if not bullet.strip():
            continue
        module = re.search(r"\(`(hookpatch[.\w]*)`\)", bullet)
        assert module, f"a README bullet names no module: {bullet[:80]!r}"
        for word in re.findall(r"`([^`]+)`", bullet):
            dotted = re.search(r"hookpatch(\.\w+)+", word)
            if dotted:
                if dotted.group(0) != module.group(1):
                    pairs.append((dotted.group(0), ""))  # a submodule (python -m hookpatch.organism.train)
                continue
            if word.endswith("/"):  # a folder of the repository (benchmarks/)
                continue
            for part in word.split("/"):  # `save()`/`load()` are two names
                name = re.fullmatch(r"([A-Za-z_]\w*)(\(.*\))?", part.strip())
                if name and name.group(1) not in NOT_NAMES:
                    pairs.append((module.group(1), name.group(1)))
    return pairs


def test_readme_names_are_importable_from_the_module_it_names():
    documented = _documented()
    assert len(documented) >= 30
    for module_name, name in documented:
        try:
            owner = importlib.import_module(module_name)
        except ModuleNotFoundError:  # a class: hookpatch.results.SweepResult
            path, _, cls = module_name.rpartition(".")
            owner = getattr(importlib.import_module(path), cls)
        if name:
            assert hasattr(owner, name), f"README documents {module_name}.{name}; it does not import"
            exported = getattr(owner, "__all__", None)
            assert exported is None or name in exported, f"{module_name}.__all__ lacks {name}"
    names = {name for _, name in documented}
    for name in ("patch_hook", "ablate_hook", "ioi_tl_demo", "load_model", "tiny_model", "model_facts", "compare"):
        assert name in names  # the parser sees the bullets (a broken regex finds nothing)


def test_readme_example_names_exist():
    """Every ``hp.x`` and ``views.x`` of README's example is a public name."""
    import hookpatch.views as views

    code = _section("Example")
    for prefix, module in (("hp", hookpatch), ("views", views)):
        used = set(re.findall(rf"\b{prefix}\.(\w+)", code))
        assert used, prefix
        assert used <= set(module.__all__), f"README's example uses {sorted(used - set(module.__all__))}"


def test_readme_example_runs_on_the_organism(capsys):
    """README's example, as written, runs end to end (on the shipped model, offline)."""
    code = re.search(r"```python\n(.*?)```", _section("Example"), re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    prompts, resid = namespace["prompts"], namespace["resid"]
    assert prompts.padded and resid.labels["pos"] == ("IO", "S1", "S1+1", "S2", "END")
    printed = capsys.readouterr().out
    assert "PromptSet(task='ioi', 16 prompts" in printed and "SweepResult(patch resid_pre" in printed
