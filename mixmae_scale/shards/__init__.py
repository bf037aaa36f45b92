"""Image folders to WebDataset shards: sources (layouts, labels), jpeg_check, writer, convert, verify, demo."""
