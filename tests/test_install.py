"""Installs that stay working: bounded dependencies, a constraints file inside the bounds, the
README's test command equal to CI's, and runtime dependencies equal to what runtime code imports."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ("pipeline", "data_tools", "deepencoder", "decoder", "bench", "launch")
# imported only inside a try/except ImportError or behind an option, and documented as optional
OPTIONAL_IMPORTS = {"flash_attn", "jieba"}

pytestmark = pytest.mark.unit


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(group: str | None = None) -> list[Requirement]:
    p = project()
    return [
        Requirement(r) for r in (p["dependencies"] if group is None else p["optional-dependencies"][group])
    ]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin NAME==VERSION"
            pins[canonicalize_name(name)] = version
    return pins


def test_every_dependency_has_an_upper_bound():
    for req in requirements() + requirements("dev"):
        assert any(spec.operator in ("<", "<=", "~=", "==") for spec in req.specifier), (
            f"{req} has no upper bound"
        )


def test_constraints_pin_every_dependency_inside_its_bounds():
    pins = constraints()
    for req in requirements() + requirements("dev"):
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt lacks {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{req.name}=={pins[name]} is outside {req}"
        )
    assert "deepseek-ocr-train" not in pins  # the project itself is not pinned


CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"  # PyTorch's CPU build of torch


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = f'bash launch/install_system_deps.sh && pip install -e ".[dev]" -c constraints.txt {CPU_INDEX} && pytest -q'
    assert command in [line.strip() for line in ci.splitlines()]
    assert f"```bash\n{command}\n```" in readme


def test_quick_start_installs_the_cpu_build_of_torch_as_ci_does():
    readme = (ROOT / "README.md").read_text()
    assert f"```bash\npip install -e . {CPU_INDEX} && dsocr-train\n```" in readme


def third_party_imports() -> set[str]:
    """Top-level modules imported by runtime code, less the standard library and the project."""
    names = set()
    for package in RUNTIME_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in RUNTIME_PACKAGES}


def test_runtime_dependencies_are_what_runtime_code_imports():
    distributions = metadata.packages_distributions()  # import name -> distributions providing it
    imported = set()
    for name in third_party_imports() - OPTIONAL_IMPORTS:
        assert name in distributions, f"runtime code imports {name}, which no installed distribution provides"
        imported |= {canonicalize_name(d) for d in distributions[name]}
    declared = {canonicalize_name(r.name) for r in requirements()}
    assert declared - imported == set(), "declared but never imported by runtime code"
    assert imported - declared == set(), "imported by runtime code but not declared"


def test_optional_imports_are_guarded():
    for name in OPTIONAL_IMPORTS:
        users = [p for pkg in RUNTIME_PACKAGES for p in (ROOT / pkg).rglob("*.py") if re.search(
            rf"^\s*(import {name}\b|from {name}\b)", p.read_text(), re.M)]  # fmt: skip
        assert users, f"{name} is listed as optional but nothing imports it"
        for path in users:
            assert "except ImportError" in path.read_text(), (
                f"{path}: {name} must be imported under try/except"
            )
