"""The files that ship inside the package: the launch profiles, the DeepSpeed configs and the launch templates.

Each lives once in the repository, where users and the docs look for it (`launch/profiles/`,
`ds_configs/`, `launch/slurm/` and the examples in `launch/`); the entries beside this file are symbolic links
to those folders (pyproject.toml's package-data picks the templates out of `launch/`). A checkout and an
editable install follow the links, and a wheel holds copies (setuptools copies a link's target as package
data), so the code finds the files through importlib.resources in all three cases and never through the
layout of a checkout, which an installed wheel does not have.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal


def shipped_folder(name: Literal["profiles", "ds_configs", "launch"]) -> Path:
    """The folder of shipped files called `name` (a plain path: pip always installs a wheel unpacked)."""
    folder = resources.files(__name__).joinpath(name)
    if not isinstance(folder, Path):
        raise RuntimeError(f"mixmae_scale is imported from an archive ({folder}); install it with pip, unpacked")
    return folder
