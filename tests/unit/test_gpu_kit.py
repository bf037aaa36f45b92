"""The offline wheel kit for GPU machines (benchmarks/gpu/): split into pieces, each travelling alone,
then joined, checked and installed without an index. Tested with a small wheel built here, installed
into a scratch target with this interpreter (the real kit holds Python 3.12 wheels for the GPU machine)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def kit(tmp_path):
    package = tmp_path / "src" / "kitprobe"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("ANSWER = 42\n" + "# padding\n" * 3000)  # a wheel of several pieces
    (tmp_path / "src" / "pyproject.toml").write_text(
        '[project]\nname = "kitprobe"\nversion = "1.0"\n[build-system]\nrequires = ["setuptools"]\n'
        'build-backend = "setuptools.build_meta"\n')
    wheels = tmp_path / "kit" / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(tmp_path / "src")], check=True, capture_output=True)
    result = subprocess.run(["bash", str(REPO / "benchmarks/gpu/split_kit.sh"), str(tmp_path / "kit")], check=True,
                            capture_output=True, text=True, env={**os.environ, "PIECE": "2K"})
    assert re.search(r"kit: [2-9] pieces of", result.stdout) and not wheels.exists()
    return tmp_path / "kit"


def install(kit: Path, target: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KIT": str(kit), "TARGET": str(target), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "benchmarks/gpu/install_wheels.sh")], env=env, capture_output=True,
                          text=True)


def test_pieces_join_check_and_install_offline(kit, tmp_path):
    parts = sorted(kit.glob("part-*"))
    assert len(parts) >= 2 and all((p / "piece").stat().st_size <= 2048 for p in parts)
    result = install(kit, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    probe = subprocess.run([sys.executable, "-c", "import kitprobe; print(kitprobe.ANSWER)"], capture_output=True,
                           text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert probe.stdout.strip() == "42", probe.stderr


def test_a_missing_or_damaged_piece_is_named_before_anything_installs(kit, tmp_path):
    parts = sorted(kit.glob("part-*"))
    with (parts[0] / "piece").open("r+b") as handle:
        handle.write(b"X")
    result = install(kit, tmp_path / "site")
    assert result.returncode != 0 and f"{parts[0].name}/piece is damaged" in result.stderr
    assert not (tmp_path / "site").exists()
    import shutil

    shutil.rmtree(parts[-1])
    result = install(kit, tmp_path / "site")
    assert result.returncode != 0 and f"has {len(parts) - 1} of {len(parts)} pieces" in result.stderr
