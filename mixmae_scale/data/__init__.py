"""Loading shards for training: manifest (files and counts), dali_pipeline, torch_pipeline, loader."""
