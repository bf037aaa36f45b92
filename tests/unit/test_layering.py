"""The package layering stays one-way: the model library imports nothing of the configuration or the
training code (usable alone, as open_clip's model code), and the engine never imports visualisation."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mixmae_scale"


def imported_modules(folder: Path) -> dict[str, set[str]]:
    found = {}
    for path in folder.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(PACKAGE))] = names
    return found


def test_models_import_no_configuration_or_training_code():
    for path, names in imported_modules(PACKAGE / "models").items():
        outside = {n for n in names if n.startswith("mixmae_scale.") and not n.startswith("mixmae_scale.models")
                   and n != "mixmae_scale.atomic_file"}
        assert not outside, f"{path} imports {outside}"


def test_engine_does_not_import_visualisation():
    for path, names in imported_modules(PACKAGE / "engine").items():
        assert not {n for n in names if n.startswith("mixmae_scale.visualize")}, path
