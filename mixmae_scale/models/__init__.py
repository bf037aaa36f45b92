"""MixMAE models. Import submodules directly (`mixmae_scale.models.mixmae`); this package file stays
empty so that `models.sizes` can be read without importing torch."""
