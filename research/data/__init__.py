"""Input data: any image-classification dataset (TFDS by name, or `folder:PATH`), read by index, streamed through
tf.data as a pure function of (seed, step).

The modules, one concern each: `dataset` (what a loaded dataset is: metadata and a source per split), `sources`
(the random-access interface and the registry of dataset kinds), `tfds_source` and `folder_source` (the kinds),
`preprocess` (decoding, resizing, crops, normalization in TF ops), `pipeline` (the train and eval streams), and
`verify` (`python -m research.data.verify`: every unreadable file before a long run).
"""

import importlib
import pkgutil

from research.data import pipeline, preprocess, sources
from research.data.dataset import Dataset, Metadata
from research.data.pipeline import (READ_ERRORS, eval_input_fn, first_eval_examples, train_input_fn,
                                    unreadable_eval_example, unreadable_example)
from research.data.preprocess import to_float

# Every dataset kind registers its opener when imported (`*_source` modules), so adding one touches one file.
for _module in pkgutil.iter_modules(__path__):
    if _module.name.endswith("_source"):
        importlib.import_module(f"{__name__}.{_module.name}")


def load(config):
    """Opens --dataset with --train_split (None: evaluation only) and --eval_split; problems are UserError lines."""
    opener, argument = sources.opener_of(config.dataset)
    return opener(config, argument)


def in_memory(name, class_names, train, eval):
    """A Dataset of decoded uint8 arrays: `train` and `eval` are (images [N, H, W, C], labels [N]) pairs."""
    shape = tuple(train[0].shape[1:])
    prep = preprocess.Preprocessing(shape[:2], shape[2])
    return Dataset(name, shape, list(class_names), sources.ArraySource(*train, f"{name} train"),
                   sources.ArraySource(*eval, f"{name} eval"), prep, shape)


__all__ = ["READ_ERRORS", "Dataset", "Metadata", "eval_input_fn", "first_eval_examples", "in_memory", "load", "pipeline",
           "preprocess", "to_float", "train_input_fn", "unreadable_eval_example", "unreadable_example"]
