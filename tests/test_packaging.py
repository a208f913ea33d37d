"""Packaging: `models/` installs as `jaxdissect.models` and depends only on public modules."""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import tomllib

import setuptools

REPO = pathlib.Path(__file__).resolve().parents[1]
# What models/ may import from the library: the input spec and the weight fingerprints,
# both public (the README's "your own Flax model" uses them) and free of other imports.
MODELS_MAY_IMPORT = {"jaxdissect.preprocess", "jaxdissect.store"}


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute module names imported by `path` (`from a import b` gives `a` and `a.b`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _sources() -> list[pathlib.Path]:
    folders = ("jaxdissect", "models", "experiments", "tests", "benchmarks")
    link = REPO / "jaxdissect" / "models"  # the same files as models/
    return [p for d in folders for p in sorted((REPO / d).rglob("*.py")) if link not in p.parents]


def test_no_bare_models_import():
    bad = [
        f"{p.relative_to(REPO)}: {m}"
        for p in _sources()
        for m in sorted(_imports(p))
        if m == "models" or m.startswith("models.")
    ]
    assert not bad, f"import models through jaxdissect.models: {bad}"


def test_models_import_only_public_library_modules():
    bad = [
        f"{p.relative_to(REPO)}: {m}"
        for p in sorted((REPO / "models").glob("*.py"))
        for m in sorted(_imports(p))
        if m.startswith("jaxdissect.")
        and not m.startswith("jaxdissect.models")
        and not any(m == a or m.startswith(a + ".") for a in MODELS_MAY_IMPORT)
    ]
    assert not bad, bad


def test_public_modules_models_use_import_nothing_of_the_library():
    for name in MODELS_MAY_IMPORT:
        path = REPO / (name.replace(".", "/") + ".py")
        assert not {m for m in _imports(path) if m.startswith("jaxdissect")}, path


def test_wheel_packages():
    """The packages setuptools installs: jaxdissect.models from models/, no top-level models."""
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    packages = set(setuptools.find_packages(str(REPO), **find["find"]))
    assert "jaxdissect.models" in packages and "jaxdissect.data.synthetic" in packages
    assert not {p for p in packages if not p.startswith("jaxdissect")}, packages
    assert (REPO / "jaxdissect" / "models").resolve() == (REPO / "models").resolve()


def test_convert_runs_as_a_module_of_the_package(tmp_path):
    """`python -m jaxdissect.models.convert`, from outside the repository (as from a wheel)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "jaxdissect.models.convert", "--helpshort"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "--arch" in done.stdout, done.stderr  # absl's help (exit status 1, as absl has it)
