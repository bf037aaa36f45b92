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

from mixmae_scale.data.errors import DataError

BUILDS = ("nvidia-dali-cuda120", "nvidia-dali-cuda130")  # the extras [cuda12] and [cuda13] (pyproject.toml)
PICK_ONE = ("pip install 'mixmae-scale[cuda12]' on a CUDA 12 driver or 'mixmae-scale[cuda13]' on CUDA 13 (nvidia-smi "
            "shows the driver's CUDA version)")
OR_TORCH = "or use the PyTorch loader: --set data.loader=torch, or --loader torch"


def installed_builds() -> list[metadata.Distribution]:
    found = []
    for name in BUILDS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(metadata.distribution(name))
    return found


def require_one_dali_build() -> None:
    """Refuses two DALI builds at once, and a build whose files are gone; no build at all is left to the import
    (its ModuleNotFoundError names the extras: cli/failure_report.py)."""
    builds = installed_builds()
    named = [f"{build.metadata['Name']} {build.version}" for build in builds]
    if len(builds) > 1:
        raise DataError(f"NVIDIA DALI is installed twice ({' and '.join(named)}): both builds write the same "
                        "nvidia/dali folder, which now holds a mix of them; pip uninstall -y "
                        f"{' '.join(BUILDS)}, then {PICK_ONE}; {OR_TORCH}")
    for build, name in zip(builds, named, strict=True):
        init = build.locate_file("nvidia/dali/__init__.py")
        if not init.exists():
            raise DataError(f"{name} is installed, but its files are gone ({init} does not exist; uninstalling the "
                            "other DALI build, which shares that folder, removes them): pip install "
                            f"--force-reinstall --no-deps {build.metadata['Name']}=={build.version}; {OR_TORCH}")
