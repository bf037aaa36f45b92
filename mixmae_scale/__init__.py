"""mixmae-scale: MixMAE pretraining of hierarchical Vision Transformers on DeepSpeed.

Importing the package has no side effects: no torch, DeepSpeed or DALI import happens until a
submodule that needs them is imported.
"""

__version__ = "0.1.0"
