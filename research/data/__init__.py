"""Input data: any image-classification dataset (TFDS by name, or `folder:PATH`), read by index, streamed through
tf.data as a pure function of (seed, step).

The modules, one concern each: `dataset` (what a loaded dataset is: metadata and a source per split), `sources`
(the random-access interface and the registry of dataset kinds), `tfds_source` and `folder_source` (the kinds),
`preprocess` (decoding, resizing, crops, normalization in TF ops), `pipeline` (the train and eval streams), and
`verify` (`python -m research.data.verify`: every unreadable file before a long run).
"""

import importlib
import pkgutil
import sys

from research import cli

if sys.argv[:1] == ["-m"]:  # Imported on the way to `python -m research.data.verify` (or .input_benchmark): that
    cli.start()  # program starts as every program does (research/cli.py), before TensorFlow loads below.

from research import UserError, run_dir  # noqa: E402
from research.data import pipeline, preprocess, sources  # noqa: E402
from research.data.dataset import Dataset, Metadata  # noqa: E402
from research.data.pipeline import (READ_ERRORS,  # noqa: E402
                                    eval_examples, eval_input_fn, train_input_fn,
                                    unreadable_eval_example, unreadable_example)
from research.data.preprocess import to_float  # noqa: E402

# Every dataset kind registers its opener when imported (`*_source` modules), so adding one touches one file.
for _module in pkgutil.iter_modules(__path__):
    if _module.name.endswith("_source"):
        importlib.import_module(f"{__name__}.{_module.name}")


def load(config):
    """Opens --dataset with --train_split (None: evaluation only) and --eval_split; problems are UserError lines.

    Loading never writes to the run directory; where it holds a run, the dataset must have the run's classes
    (dataset.json), in the run's order: a resume on other classes would shift every label against the checkpoint."""
    for flag in ("train_split", "eval_split"):
        value = getattr(config, flag)
        if value is not None and not value.strip():
            example = "train" if flag == "train_split" else "test"
            raise UserError(f"--{flag} is empty: name a split (e.g. --{flag}={example})")
    opener, argument = sources.opener_of(config.dataset)
    dataset = opener(config, argument)
    _check_apart(config, dataset)
    recorded = run_dir.recorded_class_names(config.model_dir) if run_dir.is_run(config.model_dir) else None
    if recorded is not None and list(recorded) != list(dataset.class_names):
        raise UserError(f"{config.dataset} has {len(dataset.class_names)} classes ({_few(dataset.class_names)}), not "
                        f"the {len(recorded)} {config.model_dir} was trained on ({_few(recorded)}): every label would "
                        "shift against its checkpoint; use a new --model_dir")
    return dataset


def _check_apart(config, dataset):
    """Refuses an eval split that shares some but not all of its examples with the training split: a minival carved
    from training that overlaps it. One wholly inside training measures training accuracy, as asked."""
    if dataset.train is None:
        return
    for flag, split, source in [("eval_split", config.eval_split, dataset.eval),
                                *(("extra_eval", split, source) for split, source in dataset.extra_eval)]:
        shared = sources.shared_examples(dataset.train, source)
        if shared and shared < len(source):
            raise UserError(f"--{flag}={split} shares {shared} of its {len(source)} examples with --train_split="
                            f"{config.train_split}: a held-out split must not overlap training (e.g. "
                            f"--train_split=train[:98%] with train[98%:])")


def _few(names, shown=5):
    return ", ".join(map(str, names[:shown])) + (", ..." if len(names) > shown else "")


def in_memory(name, class_names, train, eval):
    """A Dataset of decoded uint8 arrays: `train` and `eval` are (images [N, H, W, C], labels [N]) pairs."""
    shape = tuple(train[0].shape[1:])
    prep = preprocess.Preprocessing(shape[:2], shape[2])
    return Dataset(name, shape, list(class_names), sources.ArraySource(*train, f"{name} train"),
                   sources.ArraySource(*eval, f"{name} eval"), prep, shape)


__all__ = ["READ_ERRORS", "Dataset", "Metadata", "eval_examples", "eval_input_fn", "in_memory", "load",
           "pipeline", "preprocess", "to_float", "train_input_fn", "unreadable_eval_example", "unreadable_example"]
