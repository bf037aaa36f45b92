"""MixMAE pretraining as a job on the shared training loop: job (model, masks, step loss, the run's summary) and
heldout_loss (the reconstruction loss on images training never reads, comparable across runs)."""
