"""Training machinery: optimizer groups, the DeepSpeed engine, checkpoints, metrics, the pretraining loop,
export of the encoder."""
