"""Data: image reading, transforms, batching, COCO-format datasets, synthetic data."""
