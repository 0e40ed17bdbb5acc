"""Data: image sources by spec string (:mod:`.sources`), client partitioning (:mod:`.partition`) and model
preprocessing (:mod:`.preprocess`). The names below are the package's public API."""

from .partition import PARTITION_SCHEMES, partition
from .preprocess import preprocess
from .sources import (
    DATASET_FORMS,
    DataError,
    ImageDataset,
    ImageSource,
    load_dataset,
    server_root,
    subsample,
    take,
)

__all__ = [
    "DATASET_FORMS",
    "DataError",
    "ImageDataset",
    "ImageSource",
    "PARTITION_SCHEMES",
    "take",
    "load_dataset",
    "partition",
    "preprocess",
    "server_root",
    "subsample",
]
