"""docs/layout.md's Layout block names exactly the package's modules: a module added or removed without the map
changing fails here, not in a reader's search for a file that is not where the map says."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mixmae_scale"


def package_modules() -> set[str]:
    """Every module of the library, as a path under mixmae_scale/; the CLI's own modules (one per command group,
    the map says so in one line) and package files aside."""
    return {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
            if p.stem not in ("__init__", "__main__") and "cli" not in p.relative_to(PACKAGE).parts}


def layout_modules(readme: str) -> set[str]:
    """The .py names under mixmae_scale/ in the Layout block: a line at column 0 opens a top-level folder, one
    indented by two spaces opens a subpackage, deeper lines continue the last one."""
    block = re.search(r"## Layout\s*```(.*?)```", readme, re.S)
    assert block, "docs/layout.md has no ## Layout code block"
    listed, folder = set(), None
    for line in block.group(1).splitlines():
        if re.match(r"\S", line):
            folder = "" if line.startswith("mixmae_scale/") else None
        elif re.match(r"  \w+/", line):
            folder = line.split()[0] if folder is not None else None
        if folder is not None:
            listed.update(folder + name for name in re.findall(r"\b(\w+\.py)\b", line))
    return listed


def test_the_layout_doc_lists_exactly_the_package_modules():
    listed, actual = layout_modules((ROOT / "docs" / "layout.md").read_text()), package_modules()
    assert not actual - listed, f"modules missing from docs/layout.md's Layout block: {sorted(actual - listed)}"
    assert not listed - actual, f"docs/layout.md lists modules that do not exist: {sorted(listed - actual)}"


def test_the_layout_reader_sees_folders_and_continuation_lines():
    readme = ("## Layout\n\n```\nmixmae_scale/   lib; atomic_file.py\n  engine/   loop.py, a.py,\n"
              "                  b.py\n  data/   c.py\nlaunch/   x.py\n```\n")
    assert layout_modules(readme) == {"atomic_file.py", "engine/loop.py", "engine/a.py", "engine/b.py", "data/c.py"}


def layout_benchmarks(readme: str) -> set[str]:
    """The script names on the Layout block's benchmarks/ line and its continuation lines."""
    block = re.search(r"## Layout\s*```(.*?)```", readme, re.S)
    listed, inside = set(), False
    for line in block.group(1).splitlines():
        if re.match(r"\S", line):
            inside = line.startswith("benchmarks/")
        if inside:
            listed.update(re.findall(r"\b(\w+\.(?:py|sh))\b", line))
    return listed


def test_the_layout_doc_lists_every_benchmark_script():
    """scaling_c_check_coverage.py and scaling_isoflop_placement.py were added to benchmarks/ (and its README)
    without the map; benchmarks/gpu/ is named as a folder."""
    actual = {p.name for p in (ROOT / "benchmarks").iterdir() if p.suffix in (".py", ".sh")}
    listed = layout_benchmarks((ROOT / "docs" / "layout.md").read_text())
    assert not actual - listed, f"benchmark scripts missing from docs/layout.md's Layout: {sorted(actual - listed)}"
    assert not listed - actual, f"docs/layout.md lists benchmark scripts that do not exist: {sorted(listed - actual)}"
