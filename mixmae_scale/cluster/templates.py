"""The launch templates a user edits for their cluster: the Slurm scripts and the cluster-file and hostfile
examples, shipped inside the package and written out by `mixmae templates DIR`.

Messages and docs name them by their place in the repository (`launch/slurm/pretrain.sbatch`); a `pip install`
has no such folder, so the same files are written under DIR with the same relative paths (`DIR/slurm/...`), and
their comments' usage lines name where they were written: a copy that said `sbatch launch/slurm/pretrain.sbatch`
sent the user to a path that a pip install does not have.
An edited copy is never replaced unasked: a file that differs from the shipped one is kept and reported, and
`--force` replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mixmae_scale._resources import shipped_folder
from mixmae_scale.atomic_file import write_text

TEMPLATES = ("slurm/pretrain.sbatch", "slurm/pretrain_srun.sbatch", "cluster.example.yaml", "hostfile.example")
HINT = "`mixmae templates DIR` writes it out where the package was installed without the repository"


@dataclass
class Written:
    """What `write_templates` did with each template (relative paths)."""

    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # an edited copy already there, not replaced


def write_templates(out: Path, force: bool = False) -> Written:
    """Copy the shipped templates under `out`, each atomically; a differing file already there is kept unless
    `force`."""
    source = shipped_folder("launch")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; name a folder for the templates")
    done = Written()
    for name in TEMPLATES:
        shipped = (source / name).read_text()
        text = for_folder(shipped, out)
        target = out / name
        if target.is_file() and target.read_text() == text:
            done.unchanged.append(name)
            continue
        # A copy an earlier release wrote (its comments naming launch/) is the shipped file, not the user's edit.
        if target.exists() and not force and not (target.is_file() and target.read_text() == shipped):
            done.kept.append(name)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text(target, text)
        done.written.append(name)
    return done


def for_folder(text: str, out: Path) -> str:
    """A template's text with the repository's `launch/` in its comment lines replaced by the folder it is written
    to, as the user named it (relative names stay relative: sbatch runs from where `mixmae templates` did)."""
    where = out.as_posix().rstrip("/") + "/"
    return "".join(line.replace("launch/", where) if line.lstrip().startswith("#") else line
                   for line in text.splitlines(keepends=True))
