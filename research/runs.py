"""Reading a run directory written by research/train.py, finished or still running: its flags, its dataset's
metadata, its evaluation history, its checkpoints, and its model restored from one of them.

Evaluation, prediction, export and plots all start from a run directory alone, so that what they use is exactly
what the run trained: its flags come back typed and validated through research.config (the same parser as the
command line), and the model is rebuilt by the same registry from those flags. Nothing here writes to the run.
"""

import collections
import contextlib
import dataclasses
import glob
import json
import os
import re

import tensorflow as tf
from absl import flags

from research import UserError, checkpoint as checkpoint_lib, config as config_lib, models
from research.data import preprocess

FLAGFILE = "flags.txt"
DATASET_FILE = "dataset.json"
METRICS_FILE = "metrics.jsonl"
BEST_DIR = "best"

Restored = collections.namedtuple("Restored", "model config dataset checkpoint step")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model builder, predict and export need to know of the dataset (research.data.Dataset without its
    sources): the model's input shape, the class names, and how a stored image becomes a model input."""
    name: str
    image_shape: tuple
    class_names: list
    preprocessing: preprocess.Preprocessing = None

    @property
    def num_classes(self):
        return len(self.class_names)


def check_run_dir(model_dir):
    """Fails with one line unless `model_dir` holds a run (train.py writes flags.txt before the first step)."""
    if not os.path.isdir(model_dir):
        raise UserError(f"--model_dir={model_dir} does not exist")
    if not os.path.exists(os.path.join(model_dir, FLAGFILE)):
        raise UserError(f"--model_dir={model_dir} is not a run directory: it has no {FLAGFILE}")


def read_config(model_dir, **overrides):
    """The run's configuration from `model_dir/flags.txt`, with `overrides` (flag name -> value) on top.

    `model_dir` itself always overrides the recorded one, so that a run that was moved or copied still reads and
    writes where it now is.
    """
    check_run_dir(model_dir)
    path = os.path.join(model_dir, FLAGFILE)
    values = _parse_flagfile(open(path).read(), path)
    try:
        return config_lib.make_config(**{**values, **overrides, "model_dir": model_dir})
    except UserError as e:
        raise UserError(f"{path}: {e} (was the run written by another version of this code?)") from None


def _parse_flagfile(text, path):
    """`--name=value`, `--flag` and `--noflag` lines -> {name: value as text}, as research.config writes them."""
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("--"):
            raise UserError(f"{path} line {number}: expected --name=value, got {line!r}")
        name, equals, value = line[2:].partition("=")
        if not equals:
            name, value = _boolean(name)
        values[name] = value
    return values


def _boolean(name):
    """`--flag` -> (flag, 'true'), `--noflag` -> (flag, 'false'); other names go on to be rejected as unknown."""
    if name.startswith("no") and name[2:] in flags.FLAGS and isinstance(flags.FLAGS[name[2:]], flags.BooleanFlag):
        return name[2:], "false"
    return name, "true"


def read_dataset_info(model_dir):
    """The dataset metadata train.py records in `model_dir/dataset.json` (name, image_shape, class_names,
    preprocessing; runs written before preprocessing was recorded resized whole images, unnormalized)."""
    path = os.path.join(model_dir, DATASET_FILE)
    if not os.path.exists(path):
        raise UserError(f"{model_dir} has no {DATASET_FILE}: its training has not got past loading the data")
    try:
        info = json.load(open(path))
        shape = tuple(info["image_shape"])
        prep = preprocess.Preprocessing.from_json(info["preprocessing"]) if "preprocessing" in info else \
            preprocess.Preprocessing(shape[:2], shape[2])
        return DatasetInfo(info["name"], shape, list(info["class_names"]), prep)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is unreadable: {e}") from None


def read_metrics(model_dir):
    """The evaluations of `model_dir/metrics.jsonl`, one dict per step in step order ([] if none yet).

    A step evaluated twice (a run resumed from a checkpoint older than its last evaluation) keeps its latest
    line; a last line still being written by a running run is left out.
    """
    path = os.path.join(model_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    by_step = {}
    lines = open(path).read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_step[record["step"]] = record
        except (ValueError, KeyError, TypeError):
            if number == len(lines):  # No newline yet: the writer is mid-line.
                continue
            raise UserError(f"{path} line {number} is not a JSON record with a step") from None
    return [by_step[step] for step in sorted(by_step)]


def checkpoint_path(model_dir, checkpoint="latest"):
    """The checkpoint prefix that `--checkpoint` names: 'latest' or 'best' of the run, a directory holding
    checkpoints (its latest), or a prefix such as RUN/ckpt-300."""
    if checkpoint in ("latest", "best"):
        directory = model_dir if checkpoint == "latest" else os.path.join(model_dir, BEST_DIR)
        path = _newest(directory)
        if path is None:
            when = "it saves one every --checkpoint_every steps" if checkpoint == "latest" else \
                "it is saved at the run's first evaluation"
            raise UserError(f"{model_dir} has no {checkpoint} checkpoint yet ({when})")
        return path
    if os.path.isdir(checkpoint):
        path = _newest(checkpoint)
        if path is None:
            raise UserError(f"--checkpoint={checkpoint}: no checkpoint in that directory")
        return path
    if not os.path.exists(checkpoint + ".index"):
        raise UserError(f"--checkpoint={checkpoint} is not 'latest', 'best', a directory of checkpoints or a "
                        "checkpoint prefix such as RUN/ckpt-300")
    return checkpoint


def _newest(directory):
    """The newest checkpoint in `directory` by its `checkpoint` index file (rewritten atomically after each save,
    so never naming a half-written one) or, where the index is missing or unreadable, by the files' numbers."""
    try:
        path = tf.train.latest_checkpoint(directory)
    except (ValueError, tf.errors.OpError):
        path = None
    if path:
        return path
    prefixes = [f[: -len(".index")] for f in glob.glob(os.path.join(directory, "*-*.index"))]
    numbered = [(checkpoint_step(p), p) for p in prefixes if checkpoint_step(p) is not None]
    return max(numbered)[1] if numbered else None


def checkpoint_step(path):
    """The step a checkpoint was saved at, from its name (ckpt-300 -> 300), or None for other names."""
    match = re.search(r"-(\d+)$", path)
    return int(match.group(1)) if match else None


def build_model(config, dataset):
    """The run's model with its variables created, computing in float32 whatever --mixed_precision trained it:
    the weights are float32 either way, and inference at full precision is the faithful reading of them."""
    with _float32_policy():
        model = models.create(config, dataset)
        model(tf.zeros([1, *dataset.image_shape]))
    return model


@contextlib.contextmanager
def _float32_policy():
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("float32")
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


def restore_inference_weights(model, path, config):
    """Restores from checkpoint `path` the weights that inference should use into `model`, and nothing else.

    research/train.py checkpoints the model as `model_variables`, every variable in `model.variables` order
    (research.checkpoint.model_state says why). For a run with --ema_decay > 0 the weights are the moving averages,
    which the run also evaluated and kept as best: they are checkpointed as `ema`, one per variable of
    `model.trainable_variables`, read here into stand-ins and copied over the raw weights.
    """
    objects = {"model_variables": checkpoint_lib.model_state(model)}
    if config.ema_decay:
        objects["ema"] = [tf.Variable(tf.zeros_like(v), trainable=False) for v in model.trainable_variables]
    checkpoint = tf.train.Checkpoint(**objects)
    try:
        checkpoint.restore(path).expect_partial().assert_existing_objects_matched()
    except (tf.errors.OpError, ValueError, AssertionError) as e:
        raise UserError(f"checkpoint {path} does not fit the run's model: {str(e).splitlines()[0][:300]}") from None
    for average, variable in zip(objects.get("ema", []), model.trainable_variables):
        variable.assign(average)


def load_model(model_dir, checkpoint="latest", **overrides):
    """Rebuilds the run's model and restores it from `checkpoint` ('latest', 'best' or a path).

    Returns Restored(model, config, dataset info, checkpoint path, step); `overrides` go to `read_config`.
    """
    config = read_config(model_dir, **overrides)
    dataset = read_dataset_info(model_dir)
    path = checkpoint_path(model_dir, checkpoint)
    model = build_model(config, dataset)
    restore_inference_weights(model, path, config)
    return Restored(model, config, dataset, path, checkpoint_step(path))
