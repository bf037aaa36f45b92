"""The package as a cluster user gets it: a wheel built from this checkout, installed into a fresh virtual
environment and used from a folder outside the checkout, with PYTHONPATH unset.

The fresh environment borrows its dependencies from the one running the tests through a .pth line naming
that site-packages, so nothing is downloaded. Python processes no .pth file inside a folder that a .pth
line adds, so the test environment's editable install of this checkout stays out: the only mixmae_scale
the fresh environment can import is the wheel's, and the first test checks that it does.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from free_port import free_port

import mixmae_scale

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BUILD_INPUTS = ("pyproject.toml", "README.md", "mixmae_scale", "launch", "ds_configs")


class Installed:
    def __init__(self, venv: Path, work: Path) -> None:
        self.venv, self.work = venv, work
        self.python = venv / "bin" / "python"
        self.site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
        self.env = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "OMP_NUM_THREADS": "1",
                    "DS_ACCELERATOR": "cpu"}

    def run(self, *args: str | Path, timeout: int = 300) -> str:
        """The command's stdout; it must succeed. Its own process group, so that a timeout ends the
        launcher's ranks too."""
        with subprocess.Popen([str(a) for a in args], cwd=self.work, env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) as process:
            try:
                out, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                out, err = process.communicate()
                raise AssertionError(f"{args}: no result in {timeout} s\n{out[-3000:]}\n{err[-3000:]}") from None
        assert process.returncode == 0, f"{args}: exit {process.returncode}\n{out[-3000:]}\n{err[-3000:]}"
        return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    assert not root.is_relative_to(REPO)
    source = root / "source"  # a copy of what the build reads, so that building leaves nothing in the checkout
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():  # symlinks kept: mixmae_scale/_resources links to launch/ and ds_configs/
            shutil.copytree(REPO / name, source / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (root / "dist").glob("mixmae_scale-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    installed = Installed(root / "venv", root / "work")
    installed.site.mkdir(parents=True, exist_ok=True)
    (installed.site / "borrowed_stack.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed.work.mkdir()
    # pip itself is borrowed too; --ignore-installed: the borrowed editable install is not this venv's to replace.
    installed.run(installed.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--ignore-installed",
                  wheel)
    return installed


def test_the_wheel_is_what_the_fresh_environment_imports_and_it_says_its_version(installed):
    where = installed.run(installed.python, "-c", "import mixmae_scale; print(mixmae_scale.__file__)")
    assert Path(where.strip()).is_relative_to(installed.site)
    expected = f"mixmae-scale {mixmae_scale.__version__}"
    assert installed.run(installed.venv / "bin" / "mixmae", "--version").strip() == expected
    assert installed.run(installed.python, "-m", "mixmae_scale", "--version").strip() == expected


# Run by the fresh environment's python on the wheel's METADATA (argv[1]): its Requires-Dist lines, then one line
# for each that the packages this environment imports do not satisfy (missing, or outside the range). A requirement
# of an extra counts where its distribution is installed: cuda12 and cuda13 bring two DALI builds, one at most.
UNSATISFIED = """
import importlib.metadata as metadata, json, sys
from email.parser import Parser
from packaging.requirements import Requirement
lines = Parser().parsestr(open(sys.argv[1]).read()).get_all("Requires-Dist") or []
print(json.dumps(lines))
for line in lines:
    requirement = Requirement(line)
    extra = requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        if not extra:
            print(f"{line}: not installed")
        continue
    if not requirement.specifier.contains(version, prereleases=True):
        print(f"{line}: {version} is installed")
"""


def test_the_wheels_requirements_are_pyprojects_and_the_installed_stack_satisfies_them(installed):
    """The wheel is installed with --no-deps onto a borrowed stack, so pip never read its Requires-Dist: a dependency
    lost by the build, or one the stack does not satisfy, passed every other test here. The wheel's lines must be
    pyproject.toml's dependencies and extras, and the fresh environment's packages must satisfy them (the base ones
    all; an extra's where its distribution is installed)."""
    import json

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself runs on 3.10

    (metadata_file,) = installed.site.glob("mixmae_scale-*.dist-info/METADATA")
    shown = installed.run(installed.python, "-c", UNSATISFIED, metadata_file).splitlines()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(f"{text}; extra == '{extra}'" for extra, texts in
                                            project["optional-dependencies"].items() for text in texts)]
    assert sorted(str(Requirement(line)) for line in json.loads(shown[0])) == \
        sorted(str(Requirement(line)) for line in declared)
    assert not shown[1:], "the installed stack does not satisfy the wheel: " + "; ".join(shown[1:])


def test_a_profile_name_is_found_inside_the_installed_wheel(installed):
    shown = yaml.safe_load(installed.run("mixmae", "config", "show", "--profile", "swin_h"))
    assert shown["run"]["name"] == "mixmae-h"
    shipped = installed.site / "mixmae_scale" / "_resources" / "profiles"
    assert shown["sources"] == [str(shipped / "base.yaml"), str(shipped / "swin_h.yaml")]
    assert shown["deepspeed_config"]["zero_optimization"]["stage"] == 1


def test_the_slurm_scripts_and_examples_the_messages_name_are_written_out_from_the_wheel(installed):
    """A pip install has no launch/ folder; the wheel carries its templates and `mixmae templates` writes them."""
    from mixmae_scale.cluster.templates import TEMPLATES

    installed.run("mixmae", "templates", "kit")
    for name in TEMPLATES:  # the shipped files, their usage comments naming kit/ for launch/
        expected = (REPO / "launch" / name).read_text().replace("launch/", "kit/")
        assert (installed.work / "kit" / name).read_text() == expected, name


@pytest.fixture(scope="module")
def pretrained(installed) -> Path:
    """Demo shards and two pretraining steps on 2 CPU ranks through the deepspeed launcher of the fresh
    environment, with a profile given as a path: the shipped tiny profile, copied out and edited as a user
    would, merged onto the shipped base."""
    installed.run("mixmae", "shards", "demo", "--out", "demo", "--train-per-class", "4", "--val-per-class", "2",
                  "--samples-per-shard", "16", "--workers", "1")
    profile = yaml.safe_load((installed.site / "mixmae_scale/_resources/profiles/tiny.yaml").read_text())
    profile["data"].update(shards="demo/shards", shuffle_buffer=16)
    profile["batch"]["micro"] = 4
    profile["logging"].update(every_steps=1, heldout_batches=1, visualize_every_steps=0)
    profile["precision"] = {"dtype": "fp32"}
    (installed.work / "my_tiny.yaml").write_text(yaml.safe_dump(profile))
    installed.run(installed.python, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                  str(free_port()), "--module", "mixmae_scale.cli", "pretrain", "--profile", "my_tiny.yaml",
                  "--run-dir", "run", "--max-steps", "2", timeout=600)
    return installed.work / "run"


def test_two_ranks_pretrain_from_the_wheel_with_a_profile_given_as_a_path(installed, pretrained):
    with (pretrained / "metrics.csv").open() as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [1, 2]
    resolved = yaml.safe_load((pretrained / "config.yaml").read_text())
    assert resolved["sources"][:2] == [str(installed.site / "mixmae_scale/_resources/profiles/base.yaml"),
                                       "my_tiny.yaml"]
    assert resolved["derived"]["world_size"] == 2

