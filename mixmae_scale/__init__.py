"""mixmae-scale: MixMAE pretraining of hierarchical Vision Transformers on DeepSpeed.

Importing the package has no side effects: no torch, DeepSpeed or DALI import happens until a
submodule that needs them is imported.
"""

__version__ = "0.1.0"  # the only place the version is written: pyproject.toml and `mixmae --version` read it
