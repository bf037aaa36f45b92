"""Seeing what a model learned: reconstruction (pictures of mixed inputs and both decoder streams) and
curves (training curves of one or several runs from their metrics.csv)."""
