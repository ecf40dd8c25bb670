"""The model packages stay single-device PyTorch and independent of each other; pipeline/ never
imports bench/ (STYLE.md)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("deepspeed", "torch.distributed", "wandb", "webdataset", "hydra", "pipeline", "data_tools")
MODEL_PACKAGES = {"deepencoder": "decoder", "decoder": "deepencoder"}


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            # `from torch import distributed` imports torch.distributed too
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def violations(package: str) -> list[str]:
    banned = (*FORBIDDEN, MODEL_PACKAGES[package])
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imported_modules(path):
            if any(name == b or name.startswith(b + ".") for b in banned):
                found.append(f"{path.relative_to(ROOT)}: {name}")
    return found


@pytest.mark.unit
@pytest.mark.parametrize("package", sorted(MODEL_PACKAGES))
def test_model_packages_import_only_torch_side(package):
    assert (ROOT / package / "__init__.py").exists(), f"{package} must be an importable package"
    assert violations(package) == []


@pytest.mark.unit
def test_checker_catches_forbidden_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import deepspeed\nfrom torch import distributed\nfrom decoder.model import X\n")
    names = imported_modules(bad)
    assert "deepspeed" in names and "torch.distributed" in names and "decoder.model" in names


@pytest.mark.unit
def test_data_tools_stands_alone():
    for path in sorted((ROOT / "data_tools").rglob("*.py")):
        for name in imported_modules(path):
            assert name.split(".")[0] not in {"pipeline", "deepencoder", "decoder"}, f"{path}: {name}"


@pytest.mark.unit
def test_pipeline_does_not_import_bench():
    """bench/ measures pipeline/ (dsocr-bench is bench.cli); the dependency never points back."""
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for name in imported_modules(path):
            assert name.split(".")[0] != "bench", f"{path}: {name}"
