"""Which NVIDIA DALI build is installed, checked before DALI is imported.

DALI comes as one wheel per CUDA major version (the extras [cuda12] and [cuda13]), and both write the same
nvidia/dali folder. pip lets the two coexist (`pip check` is silent): installing the second overwrites the
first's files, so the folder holds one build while both are listed, and uninstalling either then deletes the
files both list, leaving the other listed with nothing behind it. Importing DALI in either state fails far from
the cause (an ImportError traceback, "cannot import name 'fn' from 'nvidia.dali'") or runs a build the user did
not pick; this module says which packages to remove or reinstall instead. Nothing here imports DALI, so a base
install without an extra imports it too.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as metadata
import importlib.util
from pathlib import Path

from mixmae_scale.data.errors import DataError

# Each build: the CUDA major version it is for, and the extra that brings it (pyproject.toml).
EXTRAS = {"nvidia-dali-cuda120": (12, "cuda12"), "nvidia-dali-cuda130": (13, "cuda13")}
BUILDS = tuple(EXTRAS)
PICK_ONE = ("pip install 'mixmae-scale[cuda12]' on a CUDA 12 driver or 'mixmae-scale[cuda13]' on CUDA 13 (nvidia-smi "
            "shows the driver's CUDA version)")
OR_TORCH = "or use the PyTorch loader: --set data.loader=torch, or --loader torch"


def installed_builds() -> list[metadata.Distribution]:
    found = []
    for name in BUILDS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(metadata.distribution(name))
    return found


def _importable_elsewhere() -> bool:
    """Whether nvidia/dali is found on sys.path where its build's metadata does not say: an editable or egg-link
    install (DALI built from source) keeps its files in the source tree, and was refused as a build whose files are
    gone, with a --force-reinstall that would replace the user's build by PyPI's. find_spec locates the package
    without running it (it imports only the `nvidia` namespace package)."""
    try:
        spec = importlib.util.find_spec("nvidia.dali")
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None and Path(spec.origin).is_file()  # a bare folder: namespace


def require_one_dali_build(gpu: bool = True) -> None:
    """Refuses two DALI builds at once, a build whose files are gone, and a build for a newer CUDA major version
    than the node's driver runs (the [cuda13] extra on a 12.x driver: DALI's GPU decoding would fail at the first
    batch with a CUDA error that names neither); no build at all is left to the import (its ModuleNotFoundError
    names the extras: cli/failure_report.py). `gpu`: whether DALI decodes on a GPU; on the CPU (no GPU visible,
    CUDA_VISIBLE_DEVICES="") its CUDA version plays no part, and a CPU run was refused all the same."""
    builds = installed_builds()
    named = [f"{build.metadata['Name']} {build.version}" for build in builds]
    if len(builds) > 1:
        raise DataError(f"NVIDIA DALI is installed twice ({' and '.join(named)}): both builds write the same "
                        "nvidia/dali folder, which now holds a mix of them; pip uninstall -y "
                        f"{' '.join(BUILDS)}, then {PICK_ONE}; {OR_TORCH}")
    for build, name in zip(builds, named, strict=True):
        init = build.locate_file("nvidia/dali/__init__.py")
        if not init.exists() and not _importable_elsewhere():
            raise DataError(f"{name} is installed, but its files are gone ({init} does not exist; uninstalling the "
                            "other DALI build, which shares that folder, removes them): pip install "
                            f"--force-reinstall --no-deps {build.metadata['Name']}=={build.version}; {OR_TORCH}")
    if len(builds) == 1 and gpu:
        from mixmae_scale.engine.distributed import driver_cuda_version

        name = builds[0].metadata["Name"]
        major, extra = EXTRAS[name]
        driver = driver_cuda_version()
        if driver is not None and major > driver[0]:
            fits = next((other_extra for other, other_extra in EXTRAS.values() if other == driver[0]), None)
            way = f"pip uninstall -y {name}, then pip install 'mixmae-scale[{fits}]'" if fits else "update the driver"
            raise DataError(f"{named[0]} (the [{extra}] extra) is DALI's build for CUDA {major}, but this node's "
                            f"NVIDIA driver runs CUDA up to {driver[0]}.{driver[1]}: {way}; {OR_TORCH}")
