"""Fine-tuning and evaluation: pretrained (weights from any source), layer_decay (optimizer groups),
evaluate (exact distributed top-1/top-5), probe (linear probing), train (the fine-tuning job)."""
