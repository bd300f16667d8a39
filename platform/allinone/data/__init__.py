"""The data's journey from source folders to training batches: images, sources, degradations,
WebDataset shards, and the Ray Data stream that feeds the workers."""
