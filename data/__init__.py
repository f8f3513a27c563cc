"""Data: image-caption folders, aspect-ratio buckets, cached features, and the synthetic shapes set."""
