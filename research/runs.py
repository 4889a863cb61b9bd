"""A run's model, rebuilt from its directory alone (finished or still running): its flags typed and validated, its
dataset's metadata, its checkpoints, and the model restored from one of them. The files themselves are read
through research/run_dir.py.

Evaluation, prediction, export and plots all start from a run directory alone, so that what they use is exactly
what the run trained: its flags come back typed and validated through research.config (the same parser as the
command line), and the model is rebuilt by the same registry from those flags. Nothing here writes to the run.
"""

import collections
import contextlib
import posixpath
import re

import tensorflow as tf

from research import UserError, checkpoint as checkpoint_lib, config as config_lib, data, fs, models, run_dir, transfer
from research import train_lib  # noqa: F401 - it imports every module that defines a flag of flags.txt.

Restored = collections.namedtuple("Restored", "model config dataset checkpoint step")


def read_config(model_dir, **overrides):
    """The run's configuration from `model_dir/flags.txt`, with `overrides` (flag name -> value) on top.

    `model_dir` itself always overrides the recorded one, so that a run that was moved or copied still reads and
    writes where it now is.
    """
    run_dir.check_run(model_dir)
    try:
        return config_lib.make_config(**{**run_dir.read_flags(model_dir), **overrides, "model_dir": model_dir})
    except UserError as e:
        raise UserError(f"{fs.join(model_dir, run_dir.FLAGS_FILE)}: {e} "
                        "(was the run written by another version of this code?)") from None


DATA_LOCATION = ("dataset", "data_dir", "tfds_manual_dir")  # What a tool may say anew of where a run's data is.


def data_location(model_dir, **given):
    """{flag: value} of the DATA_LOCATION flags given (not None) to a tool, to override the run's: where its TFDS
    data is prepared, or where its folder dataset moved (--dataset=folder:NEW_PLACE, which must hold every file the
    run recorded; another dataset is refused in one line)."""
    location = {name: value for name, value in given.items() if value is not None}
    moved = location.get("dataset")
    if moved is not None:
        recorded = read_config(model_dir).dataset
        if not (moved.startswith("folder:") and recorded.startswith("folder:")):
            raise UserError(f"--dataset={moved}: a tool reads the data its run trained on ({recorded}); --dataset "
                            "only says where a folder dataset moved (folder:NEW_PLACE)")
    return location


def read_dataset_info(model_dir):
    """The dataset metadata (research.data.Metadata) that the run recorded in `model_dir/dataset.json`."""
    try:
        return data.Metadata.from_json(run_dir.read_dataset_info(model_dir))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{fs.join(model_dir, run_dir.DATASET_FILE)} is unreadable: {e}") from None


def checkpoint_paths(model_dir, checkpoint="latest"):
    """The checkpoint prefixes that `--checkpoint` names, newest first: 'latest' or 'best' of the run, a directory
    holding checkpoints, or one prefix such as RUN/ckpt-300."""
    if checkpoint in ("latest", "best"):
        found = checkpoint_lib.candidates(model_dir if checkpoint == "latest" else
                                          fs.join(model_dir, run_dir.BEST_DIR))
        if not found:
            when = "it saves one every --checkpoint_every steps" if checkpoint == "latest" else \
                "it is saved at the run's first evaluation, by research.evaluate --follow after --eval_every=never"
            raise UserError(f"{model_dir} has no {checkpoint} checkpoint yet ({when})")
        return found
    return checkpoint_lib.named_by(checkpoint, "--checkpoint", "'latest', 'best', a directory of checkpoints")


def _check_same_classes(model_dir, dataset, path):
    """A checkpoint of another run (--checkpoint=OTHER/ckpt-N) must have been trained on this run's classes, or its
    outputs would be read with the wrong names; its own run's dataset.json says what it was trained on."""
    owner = checkpoint_lib.owner_run(path)
    if owner is None or posixpath.normpath(owner) == posixpath.normpath(model_dir):
        return
    theirs = run_dir.recorded_class_names(owner)
    if theirs is not None and theirs != list(dataset.class_names):
        raise UserError(f"--checkpoint={path} belongs to the run {owner}, trained on other classes "
                        f"({_classes(theirs)}) than {model_dir} ({_classes(dataset.class_names)}); "
                        f"use --model_dir={owner}")


def _classes(names):
    return f"{len(names)}: {', '.join(map(str, names[:4]))}{', ...' if len(names) > 4 else ''}"


def checkpoint_step(path):
    """The step a checkpoint was saved at, from its name (ckpt-300 -> 300), or None for other names."""
    match = re.search(r"-(\d+)$", path)
    return int(match.group(1)) if match else None


def build_model(config, dataset):
    """The run's model with its variables created, computing in float32 whatever --mixed_precision trained it:
    the weights are float32 either way, and inference at full precision is the faithful reading of them."""
    with float32_policy():
        model = models.create(config, dataset)
        model(tf.zeros([1, *dataset.image_shape]))
    transfer.freeze(model, config)  # Its trainable variables are those the run's moving average (if any) follows.
    return model


@contextlib.contextmanager
def float32_policy():
    """Within the block Keras builds layers in float32, whatever policy a training in this process set."""
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


def load_model(model_dir, checkpoint="latest", **overrides):
    """Rebuilds the run's model and restores it from `checkpoint` ('latest', 'best' or a path).

    Returns Restored(model, config, dataset info, checkpoint path, step); `overrides` go to `read_config`.
    """
    config = read_config(model_dir, **overrides)
    dataset = read_dataset_info(model_dir)
    paths = checkpoint_paths(model_dir, checkpoint)
    _check_same_classes(model_dir, dataset, paths[0])
    model = build_model(config, dataset)
    # The weights inference should use: for a run with --ema_decay the moving averages, which the run also
    # evaluated and kept as best. A truncated or corrupt newest checkpoint is skipped, as training skips it.
    path = checkpoint_lib.restore_newest_readable(model, paths, average=bool(config.ema_decay))
    return Restored(model, config, dataset, path, checkpoint_step(path))


def load_dataset(model_dir, restored, **overrides):
    """The run's dataset opened again, by its flags with `overrides` on top (e.g. another --data_dir, or
    train_split=None where only the eval split is read), and checked to be what `restored` trained on."""
    dataset = data.load(read_config(model_dir, **overrides))
    if tuple(dataset.image_shape) != restored.dataset.image_shape or \
            list(dataset.class_names) != restored.dataset.class_names:
        raise UserError(f"{restored.config.dataset} as loaded now differs from what {model_dir} trained on "
                        f"(image shape {dataset.image_shape}, {dataset.num_classes} classes)")
    return dataset
