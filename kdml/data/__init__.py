"""Data: sources -> class split -> tf.data pipelines of class-balanced batches."""

from kdml.data.augmentation import AUGMENTATIONS, Augmentation
from kdml.data.image_set import DatasetSplits, ImageSet, split_classes
from kdml.data.pipeline import (eval_dataset, feature_eval_dataset, feature_train_dataset,
                                steps_per_epoch, train_dataset, unaugmented_dataset)
from kdml.data.sampler import class_balanced_batches
from kdml.data.sources import SOURCES, load_dataset

__all__ = [
    "AUGMENTATIONS", "Augmentation", "DatasetSplits", "ImageSet", "SOURCES",
    "class_balanced_batches", "eval_dataset", "feature_eval_dataset", "feature_train_dataset",
    "load_dataset", "split_classes", "steps_per_epoch", "train_dataset", "unaugmented_dataset",
]
