"""The files that ship inside the package: the launch profiles and the DeepSpeed configs.

Each lives once in the repository, where users and the docs look for it (`launch/profiles/`,
`ds_configs/`); the two entries beside this file are symbolic links to those folders. A checkout and an
editable install follow the links, and a wheel holds copies (setuptools copies a link's target as package
data), so the code finds the files through importlib.resources in all three cases and never through the
layout of a checkout, which an installed wheel does not have.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal


def shipped_folder(name: Literal["profiles", "ds_configs"]) -> Path:
    """The folder of shipped files called `name` (a plain path: pip always installs a wheel unpacked)."""
    folder = resources.files(__name__).joinpath(name)
    if not isinstance(folder, Path):
        raise RuntimeError(f"mixmae_scale is imported from an archive ({folder}); install it with pip, unpacked")
    return folder
