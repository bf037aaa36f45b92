"""launch/install.sh, the README's set-up, on a Python the pinned stack cannot install into (a stand-in `python`
that says it is 3.10: no second interpreter is installed here)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _fake_python(path: Path, version: str) -> Path:
    major, minor = version.split(".")[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""#!/usr/bin/env bash
if [ "$1" = "--version" ]; then echo "Python {version}"; exit 0; fi
if [ "$1" = "-c" ]; then [ {int(major) * 100 + int(minor)} -ge 311 ]; exit $?; fi  # install.sh's version check
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "PIP_CONSTRAINT=${{PIP_CONSTRAINT:-}} $*" > "${{0%/*}}/pip-call"; fi
exit 3
""")
    path.chmod(0o755)
    return path


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "launch").mkdir(parents=True)
    for name in ("launch/install.sh", "pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, root / name)
    return root


def _install(root: Path, python: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"} | ({"PYTHON": str(python)} if python else {})
    return subprocess.run(["bash", "launch/install.sh"], cwd=root, env=env, capture_output=True, text=True)


def test_a_python_older_than_the_pinned_stack_is_refused_naming_it_before_a_venv_is_made(tmp_path):
    root = _checkout(tmp_path)
    result = _install(root, _fake_python(tmp_path / "bin" / "python3.10", "3.10.12"))
    assert result.returncode == 1 and not (root / ".venv").exists()
    assert "is Python 3.10.12: the pinned stack (constraints.txt) needs Python 3.11 or newer; run again with " \
           "PYTHON=python3.11" in result.stderr


def test_a_new_enough_python_passes_the_check_and_makes_the_venv(tmp_path):
    root = _checkout(tmp_path)
    result = _install(root, _fake_python(tmp_path / "bin" / "python3.11", "3.11.9"))
    assert "[install] creating .venv with Python 3.11.9" in result.stdout and "3.11 or newer" not in result.stderr
    assert (root / ".venv" / "bin" / "python").exists()  # the stand-in's pip then fails: nothing more is asked


def test_the_build_backend_is_pinned_too_through_pip_constraint(tmp_path):
    """pip's `-c` does not reach the isolated environment where it builds the package; PIP_CONSTRAINT does
    (checked by hand with the venv's pip 23.2.1, `pip wheel --no-deps -v .`: the build environment got the pinned
    packaging 26.3 with it and the newest, 26.4, without). The stand-in pip records how install.sh called it."""
    import tomllib
    from packaging.requirements import Requirement

    root = _checkout(tmp_path)
    _install(root, _fake_python(tmp_path / "bin" / "python3.11", "3.11.9"))
    call = (root / ".venv" / "bin" / "pip-call").read_text()
    assert call.startswith(f"PIP_CONSTRAINT={root / 'constraints.txt'} -m pip install"), call
    pinned = {line.partition("==")[0].lower() for line in (root / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    backend = tomllib.loads((root / "pyproject.toml").read_text())["build-system"]["requires"]
    assert {Requirement(r).name.lower() for r in backend} <= pinned


def test_a_venv_left_on_an_older_python_is_named_with_the_way_out(tmp_path):
    root = _checkout(tmp_path)
    _fake_python(root / ".venv" / "bin" / "python", "3.10.12")
    result = _install(root)
    assert result.returncode == 1
    assert ".venv has Python 3.10.12; the pinned stack needs Python 3.11 or newer: remove it (rm -rf .venv)" \
        in result.stderr


def test_the_install_docs_pin_torch_whatever_form_pip_lists_it_in():
    """`pip freeze` writes a torch installed from a wheel file or a cluster's own build as `torch @ file:///...`,
    which `grep "^torch=="` misses, so the constraint was empty and pip could replace the cluster's torch.
    `pip list --format=freeze` always writes `name==version`."""
    text = (REPO / "docs" / "install.md").read_text()
    assert "pip freeze |" not in text and 'pip list --format=freeze | grep -iE "^(torch|torchvision|numpy)=="' in text


def test_quickstart_expands_a_possibly_empty_array_safely():
    """`"${RANKS[@]}"` of an empty array is an unbound-variable error under `set -u` in bash before 4.4 (still the
    system bash of some clusters and of macOS); `${RANKS[@]+"${RANKS[@]}"}` is not. Only read here: this machine's
    bash is 5.2, where both work."""
    text = (REPO / "launch" / "quickstart.sh").read_text()
    bare = re.findall(r'(?<![+])"\$\{(\w+)\[@\]\}"', text)
    assert not bare, bare
