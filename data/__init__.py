"""Data: image-caption folders, aspect-ratio buckets, cached features, and the synthetic shapes set."""

from data.buckets import BucketBatchSampler, assign_buckets, group_by_bucket
from data.edges import canny
from data.features import FeatureDataset, collate, prepare_image, read_index
from data.folder import DataError, ImageCaptionFolder, Problem, Record, load_image

__all__ = [
    "BucketBatchSampler", "DataError", "FeatureDataset", "ImageCaptionFolder", "Problem", "Record", "assign_buckets",
    "canny", "collate", "group_by_bucket", "load_image", "prepare_image", "read_index",
]
