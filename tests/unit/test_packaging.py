"""What an install gets: dependency ranges that admit the locked stack, one DALI build per CUDA extra, the
profiles and DeepSpeed configs inside the package, one version. The wheel itself, installed and run outside
the checkout, is tests/integration/test_wheel.py."""

from __future__ import annotations

import fnmatch
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import mixmae_scale
from mixmae_scale.cli import main
from mixmae_scale.config.deepspeed_config import DS_CONFIGS_DIR
from mixmae_scale.config.load import PROFILES_DIR, merge_sources
from mixmae_scale.data.errors import DataError

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself runs on 3.10

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and " " not in line, f"constraints.txt: '{line}' is not an exact NAME==VERSION pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_every_range_admits_the_locked_version_and_has_a_lower_bound():
    pins = locked()
    extras = PROJECT["optional-dependencies"]
    for text in PROJECT["dependencies"] + extras["cuda13"] + extras["dev"]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is a dependency but constraints.txt does not pin it"
        assert requirement.specifier.contains(pins[name]), f"{text} does not admit the locked {pins[name]}"
        assert any(spec.operator == ">=" for spec in requirement.specifier), f"{text}: no tested lower bound"
        assert not any(spec.operator == "==" for spec in requirement.specifier), f"{text}: exact pins go in the lock"


def test_each_cuda_extra_brings_its_own_dali_build_and_the_base_install_none():
    def dali(requirements: list[str]) -> list[str]:
        return [Requirement(r).name for r in requirements if Requirement(r).name.startswith("nvidia-dali")]

    extras = PROJECT["optional-dependencies"]
    assert dali(PROJECT["dependencies"]) == []
    assert dali(extras["cuda12"]) == ["nvidia-dali-cuda120"]
    assert dali(extras["cuda13"]) == ["nvidia-dali-cuda130"]
    assert [name for name in locked() if name.startswith("nvidia-dali")] == ["nvidia-dali-cuda130"]


def test_the_shipped_folders_are_inside_the_package_and_the_package_data_covers_them():
    package = Path(mixmae_scale.__file__).parent
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["mixmae_scale._resources"]
    for folder, checkout in ((PROFILES_DIR, REPO / "launch" / "profiles"), (DS_CONFIGS_DIR, REPO / "ds_configs")):
        assert folder.parent == package / "_resources"
        assert folder.resolve() == checkout.resolve()  # one copy in the repository: the link leads there
        files = sorted(p.relative_to(folder.parent).as_posix() for p in folder.iterdir())
        missing = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
        assert files and not missing, f"pyproject.toml's package-data leaves {missing} out of the wheel"


def test_the_launch_templates_ship_and_templates_writes_them_without_replacing_an_edited_copy(tmp_path, capsys):
    """Messages and docs name launch/slurm/*.sbatch and the examples; a pip install has no launch/ folder, so
    `mixmae templates DIR` writes the shipped copies (the wheel's own: tests/integration/test_wheel.py)."""
    from mixmae_scale.cluster.templates import TEMPLATES

    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["mixmae_scale._resources"]
    shipped = sorted(p.relative_to(REPO / "launch").as_posix() for p in (REPO / "launch" / "slurm").iterdir())
    shipped += ["cluster.example.yaml", "hostfile.example"]
    assert sorted(TEMPLATES) == sorted(shipped)  # a new Slurm script is written out too
    assert all(any(fnmatch.fnmatch(f"launch/{name}", pattern) for pattern in patterns) for name in TEMPLATES)

    out = tmp_path / "kit"
    assert main(["templates", str(out)]) == 0
    for name in TEMPLATES:
        written, shipped_text = (out / name).read_text(), (REPO / "launch" / name).read_text()
        assert "launch/" not in written, name  # usage comments name the copy, which a pip install has
        assert written == shipped_text.replace("launch/", f"{out.as_posix()}/"), name  # nothing else changed
    assert f"sbatch {out.as_posix()}/slurm/pretrain.sbatch" in (out / "slurm/pretrain.sbatch").read_text()
    (out / "cluster.example.yaml").write_text("cluster:\n  num_nodes: 16\n")  # the user's edit
    assert main(["templates", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"kept {out / 'cluster.example.yaml'}: it differs" in said
    assert f"unchanged {out / 'hostfile.example'}" in said
    assert (out / "cluster.example.yaml").read_text() == "cluster:\n  num_nodes: 16\n"
    assert main(["templates", str(out), "--force"]) == 0
    assert (out / "cluster.example.yaml").read_text() == (REPO / "launch" / "cluster.example.yaml").read_text().replace(
        "launch/", f"{out.as_posix()}/")
    earlier = (REPO / "launch" / "hostfile.example").read_text()  # as an earlier release wrote it: launch/ paths
    (out / "hostfile.example").write_text(earlier)
    assert main(["templates", str(out)]) == 0
    assert f"wrote {out / 'hostfile.example'}" in capsys.readouterr().out  # replaced, not kept as an edit
    assert (out / "hostfile.example").read_text() == earlier.replace("launch/", f"{out.as_posix()}/")
    (tmp_path / "file").write_text("")
    assert main(["templates", str(tmp_path / "file")]) != 0
    assert "is a file; name a folder" in capsys.readouterr().err


def test_a_profile_given_as_a_path_merges_onto_the_shipped_base(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("run:\n  name: mine\nmodel:\n  size: tiny\n")
    merged, sources = merge_sources(str(mine))
    assert sources == [str(PROFILES_DIR / "base.yaml"), str(mine)]
    assert merged["run"]["name"] == "mine" and merged["data"]["loader"] == "dali"  # the rest from base.yaml


def test_the_version_is_written_once_and_the_cli_says_it(capsys):
    assert PROJECT["dynamic"] == ["version"] and "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mixmae_scale.__version__"}
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"mixmae-scale {mixmae_scale.__version__}"


def test_without_dali_a_command_that_needs_it_names_the_extras_to_install(small_mixmae, tmp_path, monkeypatch,
                                                                          capsys):
    from mixmae_scale.models.convert_official import infer_architecture, save_weights
    from mixmae_scale.shards.convert import ConvertOptions, convert
    from mixmae_scale.shards.demo import build_demo_images

    build_demo_images(tmp_path / "images", train_per_class=1, val_per_class=1, seed=0)
    convert(tmp_path / "images", tmp_path / "shards", ConvertOptions(layout="imagenet", shard_bytes=None))
    state = small_mixmae.state_dict()
    save_weights(tmp_path / "weights.safetensors", state, infer_architecture(state), "encoder+decoder")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as after a plain install, without an extra
    monkeypatch.delitem(sys.modules, "mixmae_scale.data.dali_pipeline", raising=False)
    argv = ["visualize", str(tmp_path / "weights.safetensors"), "--data", str(tmp_path / "shards"), "--images", "2",
            "--out", str(tmp_path / "grid.png")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "mixmae-scale[cuda12]" in error and "mixmae-scale[cuda13]" in error and "data.loader=torch" in error
    assert not (tmp_path / "grid.png").exists()


class _ListedDali:
    """A DALI build as importlib.metadata lists it, its files under `root`."""

    def __init__(self, name: str, root: Path) -> None:
        self.metadata, self.version, self.root = {"Name": name}, "2.4.0", root

    def locate_file(self, path: str) -> Path:
        return self.root / path


@pytest.mark.parametrize("listed, driver, said", [
    ("both", None, "NVIDIA DALI is installed twice (nvidia-dali-cuda120 2.4.0 and nvidia-dali-cuda130 2.4.0): both "
                   "builds write the same nvidia/dali folder, which now holds a mix of them; pip uninstall -y "
                   "nvidia-dali-cuda120 nvidia-dali-cuda130, then pip install 'mixmae-scale[cuda12]'"),
    ("files gone", None, "nvidia-dali-cuda130 2.4.0 is installed, but its files are gone ("),
    ("cuda13", (12, 8), None),  # a CPU run (as here): DALI decodes on the CPU, where its CUDA version plays no part
    ("cuda13", (13, 0), None),  # the build the driver runs: DALI decodes
])
def test_two_dali_builds_or_a_build_without_its_files_are_named_with_the_pip_commands_that_mend_them(
        small_mixmae, tmp_path, monkeypatch, capsys, listed, driver, said):
    """Walked with the wheel: [cuda12] over [cuda13] installs both builds into one nvidia/dali folder (pip check is
    silent), and uninstalling one then deletes the files of the other, which stays listed; `mixmae visualize` then
    ended in an ImportError traceback ("cannot import name 'fn' from 'nvidia.dali'). The [cuda13] build on a CUDA 12
    driver is named before DALI's GPU decoding fails on it."""
    import importlib.metadata

    import nvidia.dali

    from mixmae_scale.engine import distributed
    from mixmae_scale.models.convert_official import infer_architecture, save_weights
    from mixmae_scale.shards.convert import ConvertOptions, convert
    from mixmae_scale.shards.demo import build_demo_images

    build_demo_images(tmp_path / "images", train_per_class=1, val_per_class=1, seed=0)
    convert(tmp_path / "images", tmp_path / "shards", ConvertOptions(layout="imagenet", shard_bytes=None))
    state = small_mixmae.state_dict()
    save_weights(tmp_path / "weights.safetensors", state, infer_architecture(state), "encoder+decoder")
    real_root = Path(nvidia.dali.__file__).parents[2]  # site-packages: where the real build's files are
    root = tmp_path / "emptied" if listed == "files gone" else real_root
    builds = {"nvidia-dali-cuda130": _ListedDali("nvidia-dali-cuda130", root)}
    if listed == "both":
        builds["nvidia-dali-cuda120"] = _ListedDali("nvidia-dali-cuda120", root)
    real = importlib.metadata.distribution

    def distribution(name):
        if name.startswith("nvidia-dali"):
            if name not in builds:
                raise importlib.metadata.PackageNotFoundError(name)
            return builds[name]
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    monkeypatch.setattr(distributed, "driver_cuda_version", lambda: driver)
    if listed == "files gone":  # uninstalling the other build removed nvidia/dali: nothing finds it any more
        import importlib.util

        real_find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None if name == "nvidia.dali"
                            else real_find_spec(name, package))
    capsys.readouterr()  # the conversion's progress
    argv = ["visualize", str(tmp_path / "weights.safetensors"), "--data", str(tmp_path / "shards"), "--images", "2",
            "--out", str(tmp_path / "grid.png")]
    if said is None:
        assert main(argv) == 0 and (tmp_path / "grid.png").exists()
        return
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"mixmae: error: {said}") and error.count("\n") == 1
    assert "data.loader=torch" in error
    if listed == "files gone":
        assert "pip install --force-reinstall --no-deps nvidia-dali-cuda130==2.4.0" in error
    assert not (tmp_path / "grid.png").exists()


def test_a_dali_build_whose_files_are_elsewhere_on_the_path_is_no_build_without_files(tmp_path, monkeypatch):
    """An editable or egg-link install (DALI built from source, `pip install -e`) lists the build in one folder and
    keeps nvidia/dali in another, on sys.path by a .pth file: its files are not beside its metadata, yet DALI imports.
    It was refused as 'installed, but its files are gone' with a --force-reinstall that would replace the user's own
    build by PyPI's. A build whose nvidia/dali imports from nowhere is still refused."""
    import importlib.metadata
    import importlib.util

    from mixmae_scale.data import dali_builds
    from mixmae_scale.engine import distributed

    elsewhere = tmp_path / "dali-src" / "build" / "python"
    (elsewhere / "nvidia" / "dali").mkdir(parents=True)
    (elsewhere / "nvidia" / "dali" / "__init__.py").write_text("")
    listed = _ListedDali("nvidia-dali-cuda120", tmp_path / "site-packages")  # its metadata's folder: no nvidia/dali
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: listed if name == listed.metadata["Name"]
                        else (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(name)))
    monkeypatch.setattr(distributed, "driver_cuda_version", lambda: None)
    real_find_spec = importlib.util.find_spec
    where = {"nvidia.dali": elsewhere / "nvidia" / "dali" / "__init__.py"}

    def find_spec(name, package=None):
        if name in where:
            return None if where[name] is None else importlib.util.spec_from_file_location(name, where[name])
        return real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    dali_builds.require_one_dali_build()  # the editable install: passes
    where["nvidia.dali"] = None  # nothing imports: the files are gone
    with pytest.raises(DataError, match=r"^nvidia-dali-cuda120 2\.4\.0 is installed, but its files are gone"):
        dali_builds.require_one_dali_build()


@pytest.mark.parametrize("gpu", [True, False])
def test_dali_built_for_a_newer_cuda_than_the_driver_is_refused_only_where_dali_decodes_on_the_gpu(monkeypatch, gpu):
    """The [cuda13] build on a 12.x driver fails in DALI's GPU decoding; a run on the CPU (CUDA_VISIBLE_DEVICES="",
    DS_ACCELERATOR=cpu) decodes on the CPU, where DALI's CUDA version plays no part, and was refused all the same."""
    import importlib.metadata

    import nvidia.dali

    from mixmae_scale.data import dali_builds
    from mixmae_scale.engine import distributed

    listed = _ListedDali("nvidia-dali-cuda130", Path(nvidia.dali.__file__).parents[2])
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: listed if name == listed.metadata["Name"]
                        else (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(name)))
    monkeypatch.setattr(distributed, "driver_cuda_version", lambda: (12, 8))
    if not gpu:
        dali_builds.require_one_dali_build(gpu=False)
        return
    with pytest.raises(DataError) as caught:
        dali_builds.require_one_dali_build(gpu=True)
    assert str(caught.value).startswith(
        "nvidia-dali-cuda130 2.4.0 (the [cuda13] extra) is DALI's build for CUDA 13, but this node's NVIDIA driver "
        "runs CUDA up to 12.8: pip uninstall -y nvidia-dali-cuda130, then pip install 'mixmae-scale[cuda12]'; or use "
        "the PyTorch loader")
