"""Checkpoints of a run directory: save, restore with fallback, best-by-accuracy, and the guards around them.

What a checkpoint holds is everything the rest of the run depends on: the step (from which the data position and
epoch follow, see research/data/pipeline.py), every variable of the model (weights, batch-norm statistics, the Keras
SeedGenerator states of dropout layers), optimizer slots and step count, and the weight average if any.
TensorFlow writes a checkpoint's files first and then atomically rewrites the `checkpoint` index, so a kill during
a save leaves the previous checkpoint as latest; a checkpoint that is nevertheless unreadable (truncated, corrupt)
is skipped with a warning in favour of the one before it.
"""

import posixpath
import re

import tensorflow as tf
from absl import logging

from research import UserError, cli, config as config_lib, fs, run_dir

def model_state(model):
    """Every variable of the model, by position: what checkpoints hold of it (as `model_variables`).

    Not the model object itself: Keras 3 hides layers kept in Python lists (`self.blocks = [...]`) from
    tf.train.Checkpoint's attribute graph (keras-team/keras#18398), which would silently drop their batch-norm
    statistics, and leaves SeedGenerator states out altogether. `model.variables` has them all, in an order fixed
    by the architecture."""
    return list(model.variables)


def is_random_state(variable):
    """Whether a model variable is a Keras SeedGenerator's state (dropout, stochastic depth), not a weight."""
    return "seed_generator_state" in variable.path


class Checkpoints:
    """The rolling checkpoints of `model_dir` (and `model_dir/best`) for one `tf.train.Checkpoint`.

    On multi-worker runs every worker must save (saving is a collective), but only the chief's files are kept:
    the others write to a scratch directory that is deleted after each save.
    """

    def __init__(self, checkpoint, model_dir, keep, is_chief=True, worker_id=0):
        self.checkpoint = checkpoint
        self.model_dir = model_dir
        self.is_chief = is_chief
        directory = model_dir if is_chief else fs.join(model_dir, f".worker{worker_id}_tmp")
        if is_chief:
            _repair_index(model_dir)
        self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)
        self.best_manager = tf.train.CheckpointManager(
            checkpoint, fs.join(directory, run_dir.BEST_DIR), max_to_keep=1)

    def candidates(self):
        """Checkpoint prefixes in `model_dir`, newest first, even when the `checkpoint` index file is unreadable."""
        return candidates(self.model_dir)

    def latest(self):
        """The newest checkpoint of the run: in model_dir, where the chief saves; also for the other workers, whose
        own saves are scratch (multi-host runs need model_dir on a filesystem all workers share, as resuming does)."""
        return tf.train.latest_checkpoint(self.model_dir)

    def restore_latest(self, model_name):
        """Restores the newest readable checkpoint; returns its path, or None if there is none. Finding none readable
        is an error, and so is one that holds another model (a run resumed with other flags after its flags.txt was
        lost)."""
        def restore(path):
            check_fits(self.checkpoint.model_variables, path, model_name)
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            except Exception as e:  # noqa: BLE001 - truncation surfaces as OpError, IndexError, ValueError, ...
                raise Unreadable(f"checkpoint {path} is unreadable ({str(e).splitlines()[0][:200]})") from None
        return first_readable(self.candidates(), restore)

    def restore(self, path):
        self.checkpoint.restore(path).assert_existing_objects_matched()

    def save(self, step):
        path = _saved(self.manager, step, self.latest())
        self._drop_scratch()
        return path

    def save_best(self, step, evaluation):
        """Keeps the checkpoint of the highest --eval_split accuracy so far in `model_dir/best` (beats_best); returns
        whether it did. `evaluation` holds the accuracy, split and examples."""
        if not beats_best(self.model_dir, step, evaluation):
            return False
        _saved(self.best_manager, step, self.latest())
        self._drop_scratch()
        if self.is_chief:
            run_dir.write_best(self.model_dir, _best_record(step, evaluation))
        return True

    def _drop_scratch(self):
        if not self.is_chief:
            fs.remove_tree(self.manager.directory)


def beats_best(model_dir, step, evaluation):
    """Whether an evaluation at `step` (its accuracy, split and examples) is to replace best/: a higher accuracy
    than best.json's on the same split and size. best/ only ranks evaluations of the same split and size, so a
    resume that changed --eval_split (or a folder split that changed) starts best/ anew, saying so."""
    best = run_dir.read_best(model_dir)
    measured = {key: evaluation[key] for key in ("split", "examples")}
    comparable = all(best.get(key, value) == value for key, value in measured.items())  # (Older runs: no split.)
    if comparable and evaluation["accuracy"] <= best["accuracy"]:
        return False
    if not comparable:
        logging.warning("best/ held step %s's accuracy %.4f on %s (%s examples); this run now evaluates %s (%d "
                        "examples), which is not ranked against it: best/ starts anew at step %d", best["step"],
                        best["accuracy"], best.get("split"), best.get("examples"), measured["split"],
                        measured["examples"], step)
    return True


def _best_record(step, evaluation):
    return {"accuracy": evaluation["accuracy"], "step": step, "split": evaluation["split"],
            "examples": evaluation["examples"]}


def keep_as_best(model_dir, prefix, step, evaluation):
    """save_best for a process that holds the checkpoint's files, not its objects (a --follow sidecar): copies
    checkpoint `prefix`'s files (wherever they are) into best/ as best/ckpt-`step`, the same files training's
    best/ would hold, if the evaluation beats best/ (beats_best); returns whether it did. Written as the checkpoint
    manager writes: the files, then best/'s index, then the older best removed, then best.json."""
    if not beats_best(model_dir, step, evaluation):
        return False
    best_dir, name = fs.join(model_dir, run_dir.BEST_DIR), f"ckpt-{step}"
    try:
        fs.makedirs(best_dir)
        for source in fs.glob(f"{prefix}.*"):  # ckpt-N.index, ckpt-N.data-00000-of-00001, ...
            suffix = posixpath.basename(source)[len(posixpath.basename(prefix)):]
            fs.gfile().copy(source, fs.join(best_dir, name + suffix), overwrite=True)
        fs.write(fs.join(best_dir, "checkpoint"),  # The index as the manager writes it (a CheckpointState proto).
                 f'model_checkpoint_path: "{name}"\nall_model_checkpoint_paths: "{name}"\n')
    except tf.errors.OpError as e:
        raise UserError(f"cannot write {best_dir}: {cli.op_error_line(e)}") from None
    for older in candidates(best_dir):
        if posixpath.basename(older) != name:
            for path in fs.glob(f"{older}.*"):
                fs.remove(path)
    run_dir.write_best(model_dir, _best_record(step, evaluation))
    return True


def _saved(manager, step, latest):
    """`manager.save(step)`'s path. A save that fails (a full disk, no permission) is one line naming it: what it
    wrote so far is removed, the `checkpoint` index still names the last whole checkpoint, which a rerun resumes."""
    try:
        return manager.save(checkpoint_number=step)
    except tf.errors.OpError as e:
        prefix = fs.join(manager.directory, f"ckpt-{step}")
        for leftover in fs.glob(f"{prefix}.*") + fs.glob(f"{prefix}_temp*"):
            if fs.isdir(leftover):
                fs.remove_tree(leftover)
            else:
                fs.remove(leftover)
        raise UserError(f"cannot save checkpoint {prefix}: {cli.op_error_line(e)}; the last checkpoint, "
                        f"{latest or 'none'}, is intact: rerun the same command to resume from it") from None


def _repair_index(directory):
    """A `checkpoint` index file that TensorFlow cannot read (emptied, overwritten) is rewritten from the checkpoint
    files it lists: it is derived data, and CheckpointManager would otherwise fail on it with a traceback."""
    index = fs.join(directory, "checkpoint")
    if not fs.exists(index):
        return
    try:
        tf.train.get_checkpoint_state(directory)
        return
    except Exception:  # noqa: BLE001 - ValueError, UnicodeDecodeError, a protobuf ParseError, ...
        pass
    found = candidates(directory)
    fs.remove(index)
    if found:
        tf.compat.v1.train.update_checkpoint_state(directory, found[0], all_model_checkpoint_paths=found[::-1])
    logging.warning("%s was unreadable: rewritten from the %d checkpoints found beside it", index, len(found))


def candidates(directory):
    """The checkpoint prefixes in `directory` (`ckpt-300`, ...), newest first: those its `checkpoint` index names and
    those whose files are there, so that an unreadable index hides none."""
    try:
        state = tf.train.get_checkpoint_state(directory)
        listed = list(state.all_model_checkpoint_paths) if state else []
    except Exception:  # noqa: BLE001 - a corrupt index must not stop the fallback to the files themselves.
        listed = []
    found = [f[: -len(".index")] for f in fs.glob(fs.join(directory, "*-*.index"))]
    numbered = {p for p in set(listed) | set(found) if re.search(r"-(\d+)$", p)}
    return sorted(numbered, key=lambda p: int(re.search(r"-(\d+)$", p).group(1)), reverse=True)


def check_fits(variables, path, model_name):
    """Checks, from the checkpoint's index alone, that checkpoint `path` holds exactly `variables` (a model_state)
    by shape; returns {name: shape} of everything it holds. Raises Unreadable, or a UserError naming a misfit."""
    shapes = read_shapes(path)
    wanted = [(f"model_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE", v) for i, v in enumerate(variables)]
    misfits = [f"#{i} {v.path} {list(v.shape)} vs {shapes.get(key)}" for i, (key, v) in enumerate(wanted)
               if shapes.get(key) != list(v.shape)]
    held = sum(name.startswith("model_variables/") for name in shapes)
    if misfits or held != len(wanted):
        raise UserError(f"checkpoint {path} does not fit --model={model_name}: it holds {held} model variables, "
                        f"the model has {len(wanted)}" + (f"; first misfit {misfits[0]}" if misfits else ""))
    return shapes


def read_shapes(path):
    """{name: shape} of every value checkpoint `path` holds, from its index alone; raises Unreadable."""
    try:  # The reader itself: tf.train.list_variables takes a prefix for a directory on filesystems such as ram://.
        return tf.compat.v1.train.NewCheckpointReader(path).get_variable_to_shape_map()
    except Exception as e:  # noqa: BLE001 - a damaged index surfaces as OpError, IndexError, ValueError, ...
        raise Unreadable(f"checkpoint {path} is unreadable: {str(e).splitlines()[0][:200]}") from None


class Unreadable(UserError):
    """A checkpoint whose files are missing, truncated or corrupt (as opposed to one of another model)."""


def restore_weights(model, path, average=False):
    """Restores into `model` the weights of checkpoint `path`, and nothing else: with `average`, the moving average
    of its trainable weights (a run with --ema_decay checkpoints it as `ema`, one per `model.trainable_variables`),
    read into stand-ins and copied over the raw weights. Raises Unreadable, or a UserError saying what does not fit.

    The shapes are compared first, from the checkpoint's index: a restore that fails half-way through leaves
    TensorFlow to warn, line by line, of every value it did not restore."""
    shapes = check_fits(model_state(model), path, model.name)
    objects = {"model_variables": model_state(model)}
    if average:
        if not any(name.startswith("ema/") for name in shapes):
            raise UserError(f"{path} holds no moving average of the weights (its run had no --ema_decay)")
        objects["ema"] = [tf.Variable(tf.zeros_like(v), trainable=False) for v in model.trainable_variables]
    try:  # expect_partial: the optimizer's values stay unread on purpose.
        tf.train.Checkpoint(**objects).restore(path).expect_partial().assert_existing_objects_matched()
    except Exception as e:  # noqa: BLE001 - as above: the data files can be damaged while the index is whole.
        raise Unreadable(f"checkpoint {path} is unreadable: {str(e).splitlines()[0][:200]}") from None
    for moving_average, variable in zip(objects.get("ema", []), model.trainable_variables):
        variable.assign(moving_average)


def restore_init_weights(model, path, average, restore=restore_weights):
    """`--init_checkpoint=path`: a run directory (its newest readable checkpoint) or a checkpoint prefix, read by
    `restore(model, path, average)` (research/transfer.py's reads one of another task). Returns the checkpoint it
    restored."""
    return restore_newest_readable(model, named_by(path, "--init_checkpoint"), average, restore)


def named_by(path, flag, kind="a run directory"):
    """The checkpoints that `flag`=`path` names, newest first: a checkpoint prefix (RUN/ckpt-300) alone, or those
    in a directory (`kind`: what the flag expects such a directory to be)."""
    fs.check_filesystem(path, flag)
    if fs.exists(path + ".index"):
        return [path]
    if not fs.isdir(path):
        raise UserError(f"{flag}={path} is neither {kind} nor a checkpoint prefix such as RUN/ckpt-300")
    found = candidates(path)
    if not found:
        raise UserError(f"{flag}={path}: that directory holds no checkpoint")
    return found


def owner_run(path):
    """The run directory a checkpoint prefix was saved in (RUN for RUN/ckpt-300 and RUN/best/ckpt-200), or None
    where that directory holds no run."""
    directory = posixpath.dirname(path)
    if posixpath.basename(directory) == run_dir.BEST_DIR:
        directory = posixpath.dirname(directory)
    return directory if run_dir.is_run(directory) else None


def restore_newest_readable(model, paths, average, restore=restore_weights):
    """Restores, by `restore(model, path, average)`, the weights of the first readable checkpoint of `paths` (e.g.
    named_by's), as training resumes (first_readable); returns its path. A checkpoint of another model is an error
    at once, and so is finding none readable."""
    return first_readable(paths, lambda p: restore(model, p, average))


def first_readable(paths, restore):
    """Calls `restore(path)` on `paths` (newest first) in turn until one does not raise Unreadable, and returns
    that path, with a warning for each newer one skipped (truncated or corrupt); None if `paths` is empty. If none
    is readable, one error line says so and why the newest is not, with no warnings before it."""
    skipped = []
    for path in paths:
        try:
            restore(path)
        except Unreadable as e:
            skipped.append(str(e))
            continue
        for reason in skipped:
            logging.warning("%s; fell back to %s", reason, path)
        return path
    if skipped:
        older = len(skipped) - 1
        more = "" if not older else " (as is the older one)" if older == 1 else f" (as are the {older} older ones)"
        raise UserError(f"no checkpoint is readable: {skipped[0]}{more}; nothing was changed")
    return None


def check_resume_config(model_dir, config, without_effect=()):
    """Compares the flags of a resume (or of a rerun of a run that died before its first checkpoint) with those the
    run recorded (flags.txt), judging each by its effect, as the fresh run's ignored-flag warning does.

    A change of a flag declared CHECKPOINT (research/config.py) that has an effect, under the recorded flags or the
    new ones, is refused, every such flag listed in one line; one without effect in either (--momentum with adam)
    is allowed, and so are the flags in `without_effect`, which the caller found to change nothing here (the
    trainer: --image_size where the model input is the recorded one, --dataset where a folder moved). A flag
    unset at the start and set now (--train_steps after --train_epochs) is a change like any other; a flag newer
    than the run had its default; a recorded value is read as this code reads it (--eval_every=0 is 'epoch').
    Returns every allowed change, {name: (old, new)} as flags.txt spells them (None: unset), for the run's flags
    history."""
    if not run_dir.is_run(model_dir):
        return {}
    recorded = run_dir.read_flags(model_dir)
    old = {name: _respelled(name, recorded.get(name, _spelled_default(name)))
           for name in config_lib.names_with(*config_lib.RUN_ROLES)}
    new = run_dir.parse_flagfile(config_lib.to_flagfile(config), "the flags")
    changes = {name: (value, new.get(name)) for name, value in old.items() if value != new.get(name)}
    try:
        old_config = config_lib.make_config(**{name: value for name, value in old.items() if value is not None})
    except UserError:  # Flags of an older version of this code: judged by the new flags alone.
        old_config = config
    refused = [f"--{name}: {a} -> {b}" for name, (a, b) in changes.items()
               if config_lib.declared(name).role == config_lib.CHECKPOINT and name not in without_effect
               and (config_lib.has_effect(name, old_config) or config_lib.has_effect(name, config))]
    if refused:
        raise SettingsDiffer(refused, model_dir)
    return {name: change for name, change in changes.items() if name != "model_dir"}  # (A moved run is the same.)


class SettingsDiffer(UserError):
    """A run directory holds a run whose settings differ from these: `differences` lists them (--name: old -> new)."""

    def __init__(self, differences, model_dir):
        super().__init__(f"{model_dir} holds a run with other settings ({'; '.join(differences)}); "
                         "use a new --model_dir, or --init_checkpoint to start from its weights")
        self.differences = differences


def _respelled(name, recorded):
    """A recorded value as this code reads it, spelled as it now writes it: a value an earlier version spelled
    otherwise (--eval_every=0, now 'epoch') is the same value, no change. One it cannot read stays as it was."""
    try:
        return recorded if recorded is None else config_lib.spelled(config_lib.FLAGS[name].parser.parse(recorded))
    except (ValueError, TypeError):
        return recorded


def _spelled_default(name):
    default = config_lib.FLAGS[name].default
    return None if default is None else config_lib.spelled(default)
