"""Semantic-segmentation fine-tuning: the dense backbone under a UperNet head, trained on the shared loop
(`mixmae segment`), and its mIoU evaluation (`mixmae eval` on a segmentation export)."""
