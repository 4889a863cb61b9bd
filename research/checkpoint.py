"""Checkpoints of a run directory: save, restore with fallback, best-by-accuracy, and the guards around them.

What a checkpoint holds is everything the rest of the run depends on: the step (from which the data position and
epoch follow, see research/data.py), every variable of the model (weights, batch-norm statistics, the Keras
SeedGenerator states of dropout layers), optimizer slots and step count, and the weight average if any.
TensorFlow writes a checkpoint's files first and then atomically rewrites the `checkpoint` index, so a kill during
a save leaves the previous checkpoint as latest; a checkpoint that is nevertheless unreadable (truncated, corrupt)
is skipped with a warning in favour of the one before it.
"""

import glob
import json
import os
import re
import shutil
import socket

import tensorflow as tf
from absl import logging

from research import UserError, config as config_lib

# Flags whose change makes a checkpoint mean something else: different variables, slots, data order or data position.
MEANING_FLAGS = ("dataset", "train_split", "model", "hidden_units", "widths", "conv_layers", "dropout",
                 "optimizer", "mixed_precision", "ema_decay", "batch_size", "seed", "augment", "image_size",
                 "crop_scale", "crop_ratio", "normalize")
BEST = "best"


def model_state(model):
    """Every variable of the model, by position: what checkpoints hold of it (as `model_variables`).

    Not the model object itself: Keras 3 hides layers kept in Python lists (`self.blocks = [...]`) from
    tf.train.Checkpoint's attribute graph (keras-team/keras#18398), which would silently drop their batch-norm
    statistics, and leaves SeedGenerator states out altogether. `model.variables` has them all, in an order fixed
    by the architecture."""
    return list(model.variables)


class Checkpoints:
    """The rolling checkpoints of `model_dir` (and `model_dir/best`) for one `tf.train.Checkpoint`.

    On multi-worker runs every worker must save (saving is a collective), but only the chief's files are kept:
    the others write to a scratch directory that is deleted after each save.
    """

    def __init__(self, checkpoint, model_dir, keep, is_chief=True, worker_id=0):
        self.checkpoint = checkpoint
        self.model_dir = model_dir
        self.is_chief = is_chief
        directory = model_dir if is_chief else os.path.join(model_dir, f".worker{worker_id}_tmp")
        self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)
        self.best_manager = tf.train.CheckpointManager(
            checkpoint, os.path.join(directory, BEST), max_to_keep=1)

    def candidates(self):
        """Checkpoint prefixes in `model_dir`, newest first, even when the `checkpoint` index file is unreadable."""
        try:
            listed = list(self.manager.checkpoints)
        except Exception:  # noqa: BLE001 - a corrupt index must not stop the fallback to the files themselves.
            listed = []
        found = glob.glob(os.path.join(self.model_dir, "ckpt-*.index"))
        prefixes = set(listed) | {f[: -len(".index")] for f in found}
        return sorted(prefixes, key=lambda p: int(re.search(r"ckpt-(\d+)$", p).group(1)), reverse=True)

    def latest(self):
        """The newest checkpoint of the run: in model_dir, where the chief saves; also for the other workers, whose
        own saves are scratch (multi-host runs need model_dir on a filesystem all workers share, as resuming does)."""
        return tf.train.latest_checkpoint(self.model_dir)

    def restore_latest(self):
        """Restores the newest readable checkpoint; returns its path, or None if there is none."""
        for path in self.candidates():
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
                return path
            except Exception as e:  # noqa: BLE001 - truncation surfaces as OpError, IndexError, ValueError, ...
                logging.warning("checkpoint %s is unreadable (%s); falling back to the previous one",
                                path, str(e).splitlines()[0][:200])
        return None

    def restore(self, path):
        self.checkpoint.restore(path).assert_existing_objects_matched()

    def save(self, step):
        path = self.manager.save(checkpoint_number=step)
        self._drop_scratch()
        return path

    def save_best(self, step, accuracy):
        """Keeps the checkpoint of the highest eval accuracy so far in `model_dir/best`; returns whether it did."""
        record = os.path.join(self.model_dir, BEST, "best.json")
        best = json.load(open(record)) if os.path.exists(record) else {"accuracy": -1.0}
        if accuracy <= best["accuracy"]:
            return False
        self.best_manager.save(checkpoint_number=step)
        self._drop_scratch()
        if self.is_chief:
            _atomic_write(record, json.dumps({"accuracy": accuracy, "step": step}) + "\n")
        return True

    def _drop_scratch(self):
        if not self.is_chief:
            shutil.rmtree(self.manager.directory, ignore_errors=True)


def restore_weights(model, path):
    """`--init_checkpoint`: model weights only, from a run directory (its latest checkpoint) or a checkpoint path."""
    if os.path.isdir(path):
        path = tf.train.latest_checkpoint(path)
        if path is None:
            raise UserError(f"--init_checkpoint: no checkpoint in {path}")
    try:
        tf.train.Checkpoint(model_variables=model_state(model)).restore(path).expect_partial(
        ).assert_existing_objects_matched()
    except (tf.errors.OpError, ValueError, AssertionError) as e:
        raise UserError(f"--init_checkpoint={path} does not fit --model: {str(e).splitlines()[0][:300]}") from None


def check_resume_config(model_dir, config):
    """Refuses to resume with flags that change what the checkpoint means; lists every differing flag in one line."""
    path = os.path.join(model_dir, "flags.txt")
    if not os.path.exists(path):
        return
    old = _read_flagfile(open(path).read())
    new = _read_flagfile(config_lib.to_flagfile(config))
    changed = [f"--{name}: {old.get(name)} -> {new.get(name)}" for name in MEANING_FLAGS
               if name in old and old.get(name) != new.get(name)]
    if changed:
        raise UserError(f"{model_dir} holds a run with other settings ({'; '.join(changed)}); "
                        "use a new --model_dir, or --init_checkpoint to start from its weights")


def _read_flagfile(text):
    values = {}
    for line in text.splitlines():
        if line.startswith("--"):
            name, has_value, value = line[2:].partition("=")
            if not has_value and name.startswith("no"):  # --noflag
                name, value = name[2:], "False"
            values[name] = value if has_value else value or "True"
    return values


class RunLock:
    """One writer per run directory: a LOCK file naming host and pid; a lock left by a dead process is taken over."""

    def __init__(self, model_dir):
        self.path = os.path.join(model_dir, "LOCK")
        self.owner = f"{socket.gethostname()} {os.getpid()}"

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, self.owner.encode())
                os.close(fd)
                return self
            except FileExistsError:
                host, _, pid = open(self.path).read().partition(" ")
                if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                    os.remove(self.path)  # Stale: its process is gone.
                    continue
                raise UserError(f"{os.path.dirname(self.path)} is in use by process {pid or '?'} on {host or '?'}; "
                                f"wait for it, or remove {self.path} if that process is gone") from None
        raise UserError(f"could not take {self.path}")

    def __exit__(self, *exc):
        if os.path.exists(self.path) and open(self.path).read() == self.owner:
            os.remove(self.path)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _atomic_write(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
