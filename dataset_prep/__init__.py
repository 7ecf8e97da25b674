"""Amazon review files -> RecBole atomic files + item feature files for recbole-speeder.

The run script calls :func:`ensure_dataset`; ``python -m dataset_prep --help`` is the command line.
"""

from dataset_prep.errors import DatasetPrepError, MalformedLineError
from dataset_prep.features import FeatureOptions, build_features, build_text_features
from dataset_prep.prepare import DATASETS, PrepOptions, PrepResult, ensure_dataset, prepare_dataset
from dataset_prep.readers import AmazonReader, GenericReader

__all__ = [
    "DATASETS",
    "AmazonReader",
    "DatasetPrepError",
    "FeatureOptions",
    "GenericReader",
    "MalformedLineError",
    "PrepOptions",
    "PrepResult",
    "build_features",
    "build_text_features",
    "ensure_dataset",
    "prepare_dataset",
]
