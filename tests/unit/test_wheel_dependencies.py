"""The wheel's declared dependencies cover what the package imports. tests/integration/test_wheel.py installs the
wheel with --no-deps, so nothing else checks that `pip install mixmae-scale` brings every package the code
imports. Here every module's imports are read with ast (nothing is imported or built), mapped to the
distributions installed here that provide them, and held to pyproject.toml: the base dependencies for what the
package always needs, the extra the code names for what it imports only when asked to."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself runs on 3.10

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "mixmae_scale"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

# Imports the base install does not provide: import name -> {extra: the distribution that extra brings}, and the
# module whose guard names those extras to the user when the import is missing.
OPTIONAL = {
    "wandb": {"wandb": "wandb"},
    "nvidia.dali": {"cuda12": "nvidia-dali-cuda120", "cuda13": "nvidia-dali-cuda130"},
}
GUARDS = {"wandb": "config/derive.py", "nvidia.dali": "cli/failure_report.py"}
# The modules that need an optional package as soon as they are imported; every other module imports them, and
# the optional packages, only inside the function that needs them, so the base install imports everything else.
NEEDS_AN_EXTRA_TO_IMPORT = {"data/dali_pipeline.py", "data/rand_augment.py"}
# Declared but never imported by the package: needed through another package's import, named here.
USED_THROUGH = {"tensorboard": "torch.utils.tensorboard"}


@dataclass(frozen=True)
class Imported:
    module: str  # the importing file, relative to mixmae_scale/
    name: str  # the dotted name imported
    line: int
    eager: bool  # runs when the module is imported (not inside a function, not under TYPE_CHECKING)

    @property
    def where(self) -> str:
        return f"mixmae_scale/{self.module}:{self.line}"


def _dotted(node: ast.AST, module: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        return [node.module]
    package = ["mixmae_scale", *Path(module).parent.parts]  # a relative import: resolved against its package
    base = package[:len(package) - (node.level - 1)]
    return [".".join([*base, node.module] if node.module else base)]


def _imports_of(tree: ast.AST, module: str, eager: bool) -> list[Imported]:
    found = []
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.Import | ast.ImportFrom):
            found += [Imported(module, name, child.lineno, eager) for name in _dotted(child, module)]
            if isinstance(child, ast.ImportFrom) and child.level == 0 and child.module == "mixmae_scale":
                found += [Imported(module, f"mixmae_scale.{a.name}", child.lineno, eager) for a in child.names]
        lazy = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) or (
            isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
        found += _imports_of(child, module, eager and not lazy)
    return found


@cache
def package_imports() -> tuple[Imported, ...]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = path.relative_to(PACKAGE).as_posix()
        found += _imports_of(ast.parse(path.read_text(), str(path)), module, eager=True)
    return tuple(found)


def third_party(name: str) -> bool:
    top = name.split(".")[0]
    return top not in sys.stdlib_module_names and top != "mixmae_scale"


def optional_key(name: str) -> str | None:
    return next((key for key in OPTIONAL if name == key or name.startswith(key + ".")), None)


@cache
def installed_packages() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@cache
def distributions_of(name: str) -> frozenset[str]:
    """The installed distributions that provide `name`. A namespace shared by several (nvidia.*) is narrowed to
    those with files under the imported name's own folder."""
    candidates = installed_packages().get(name.split(".")[0], [])
    parts = name.split(".")
    for depth in range(len(parts) if len(set(candidates)) > 1 else 1, 1, -1):
        prefix = "/".join(parts[:depth])
        owners = {d for d in candidates if any(str(f).startswith((prefix + "/", prefix + "."))
                                                for f in metadata.distribution(d).files or ())}
        if owners:
            return frozenset(canonicalize_name(d) for d in owners)
    return frozenset(canonicalize_name(d) for d in candidates)


def requirements(texts: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(Requirement(t).name): Requirement(t) for t in texts}


BASE = requirements(PROJECT["dependencies"])
EXTRAS = {extra: requirements(texts) for extra, texts in PROJECT["optional-dependencies"].items()}


def test_every_third_party_package_the_code_imports_is_a_declared_dependency():
    """What the base install must bring: every import outside the standard library and the optional ones."""
    undeclared = []
    for imported in package_imports():
        if not third_party(imported.name) or optional_key(imported.name):
            continue
        distributions = distributions_of(imported.name)
        assert distributions, f"{imported.where} imports {imported.name}, which no installed distribution provides"
        if not distributions & BASE.keys():
            undeclared.append(f"{imported.where}: {imported.name} ({', '.join(sorted(distributions))})")
    assert not undeclared, "imported but not in pyproject.toml's dependencies: " + "; ".join(undeclared)


def test_every_declared_dependency_is_imported_by_the_package_or_needed_by_an_import_it_makes():
    """A dependency nothing imports is a download every cluster pays for (webdataset was one: only the tests use it,
    so it moved to dev)."""
    imported = set()
    for i in package_imports():
        if third_party(i.name) and not optional_key(i.name):
            imported |= distributions_of(i.name)
    for name, through in USED_THROUGH.items():
        assert any(i.name == through or i.name.startswith(through + ".") for i in package_imports()), \
            f"nothing imports {through} any more: {name} may be unused"
    unused = set(BASE) - imported - set(USED_THROUGH)
    assert not unused, f"declared in pyproject.toml's dependencies but imported nowhere in mixmae_scale: {unused}"


@pytest.mark.parametrize("name", sorted(OPTIONAL))
def test_each_optional_import_is_in_the_extras_its_guard_names_and_not_in_the_base_install(name):
    """An optional package belongs to an extra, and the message that stops a run without it names that extra: what
    the user is told to install must be what pyproject.toml provides."""
    assert any(optional_key(i.name) == name for i in package_imports()), f"{name} is no longer imported"
    guard = (PACKAGE / GUARDS[name]).read_text()
    for extra, distribution in OPTIONAL[name].items():
        assert distribution in EXTRAS.get(extra, {}), f"the extra [{extra}] does not bring {distribution}"
        assert distribution not in BASE, f"{distribution} is optional, but the base dependencies bring it"
        assert f"mixmae-scale[{extra}]" in guard, f"mixmae_scale/{GUARDS[name]} does not name the extra [{extra}]"
    installed = distributions_of(name)  # empty where no extra is installed
    assert installed <= set(OPTIONAL[name].values()), f"{name} comes from {sorted(installed)} here"


def _eager_closure(module: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += graph.get(current, ())
    return seen


def _module_file(name: str) -> list[str]:
    """The files importing `name` runs: its packages' __init__.py files, then the module itself."""
    parts = name.split(".")[1:]
    files = ["/".join([*parts[:i], "__init__.py"]) for i in range(len(parts))]
    module = "/".join(parts)
    if (PACKAGE / f"{module}.py").exists():
        files.append(f"{module}.py")
    elif (PACKAGE / module / "__init__.py").exists():
        files.append(f"{module}/__init__.py")
    return files


def test_optional_packages_are_imported_only_when_they_are_needed():
    """Without an extra, every module but the DALI pipeline's own imports: the optional packages are imported at
    module level only by the modules listed in NEEDS_AN_EXTRA_TO_IMPORT, and those only inside functions, so that
    a base install runs the PyTorch loader and the CLI can name the missing extra instead of failing on import."""
    graph: dict[str, set[str]] = {}
    optional_at_import: set[str] = set()
    for imported in package_imports():
        if not imported.eager:
            continue
        if optional_key(imported.name):
            optional_at_import.add(imported.module)
        elif not third_party(imported.name):
            graph.setdefault(imported.module, set()).update(_module_file(imported.name))
    modules = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")]
    needing = {m for m in modules if _eager_closure(m, graph) & optional_at_import}
    assert needing == NEEDS_AN_EXTRA_TO_IMPORT, (
        f"modules that need an optional package as soon as they are imported: {sorted(needing)}")


def test_every_locked_version_of_a_declared_dependency_is_in_its_declared_range():
    """constraints.txt is what CI installs, pyproject.toml what a user's pip resolves: a pin outside the range would
    test a stack no install can get."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    outside, checked = [], set()
    for requirement_set in (BASE, *EXTRAS.values()):
        for name, requirement in requirement_set.items():
            if name in pins:
                checked.add(name)
                if not requirement.specifier.contains(pins[name], prereleases=True):
                    outside.append(f"{requirement} does not admit the locked {name}=={pins[name]}")
    assert BASE.keys() <= checked, f"constraints.txt pins no version of {sorted(BASE.keys() - checked)}"
    assert not outside, "; ".join(outside)
