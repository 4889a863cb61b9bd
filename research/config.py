"""Every setting of a run, defined once as an absl flag that declares its role where it is defined.

A run's configuration is a plain namespace of resolved flag values. `python -m research.train` builds it from the
command line and flagfiles; tests and other programs build it with `make_config(**overrides)`, which parses each
override through the same flag parser, so both paths accept and reject exactly the same values. The resolved
configuration is written to `model_dir/flags.txt` and is itself a valid `--flagfile`.

This module defines the flags every run has (dataset, splits and where data is, model name, learning rate and its
schedule, loss, length, devices). A module that owns a setting defines its flag itself, with `declare`, and checks it
in a `@checks` function: each model family (research/models), the optimizers (research/optim.py), the augmentations
(research/augment/, research/mix.py), preprocessing and TFDS reading (research/data). This module imports none of
them (absl only): it sits at the bottom of the import graph, and a run's flags are those of the modules its program
imported (research/train_lib.py imports them all).

Roles: every flag says what it is to the rest of the code, and every consumer reads it from here.
  CHECKPOINT  changes what a checkpoint means: its variables, the data stream or the loss being optimised. A resume
              with another value is refused (research/checkpoint.py).
  TUNABLE     what a researcher changes on purpose between a run and its resume: learning rate, run length,
              evaluation and checkpoint cadence, devices, logging. A resume allows it and records the change in
              flags_history.jsonl.
  RUNTIME     how the run is carried out, not what it computes: cadence of loops and checkpoints, devices, XLA,
              determinism, what to do on a NaN. A resume allows it and records the change; not an HParam, not
              compared between runs (TensorBoard's HParams columns and research.compare show what changes results).
  PATH        where files are kept that do not change the run's numbers (the run directory, the data): may change
              on resume (data moved); not an HParam, not compared between runs.
  TOOL        a setting of one program (research.benchmark's timing), not of a run: not in flags.txt.
The CHECKPOINT and TUNABLE flags are the HParams. A flag may also say when it has an effect (`only_if`): a run that
gives it another value than its default where it has none is warned, in one line, that the value is ignored.
"""

import copy
import dataclasses
import types

from absl import flags, logging

from research import UserError

FLAGS = flags.FLAGS

CHECKPOINT, TUNABLE, RUNTIME, PATH, TOOL = "checkpoint", "tunable", "runtime", "path", "tool"
ROLES = (CHECKPOINT, TUNABLE, RUNTIME, PATH, TOOL)
RUN_ROLES = (CHECKPOINT, TUNABLE, RUNTIME, PATH)


@dataclasses.dataclass(frozen=True)
class Declared:
    role: str
    only_if: object = None  # config -> whether the flag has an effect; None: always.
    when: str = ""  # The condition in words, e.g. "with --augment=random_resized_crop".


_DECLARED = {}  # Flag name -> Declared, in the order the flags were declared.
_CHECKS = []  # The flag owners' checks: config -> None, raising UserError.


def declare(role, holder, only_if=None, when=""):
    """Gives the flag that `holder` (what flags.DEFINE_* returns) its role; returns the holder."""
    if role not in ROLES or (only_if is None) != (not when):
        raise ValueError(f"--{holder.name}: declare(role in {ROLES}, holder, [only_if=..., when=...])")
    _DECLARED[holder.name] = Declared(role, only_if, when)
    return holder


def declared(name):
    """The Declared role of flag `name`, or None for a flag nobody declared (absl's and TensorFlow's own)."""
    return _DECLARED.get(name)


def has_effect(name, config):
    """Whether flag `name` has an effect in `config` (its `only_if`; always for a flag that declares none)."""
    only_if = _DECLARED[name].only_if
    return only_if is None or bool(only_if(config))


def names_with(*roles):
    """The names of the flags declared with one of `roles`, in declaration order."""
    return [name for name, d in _DECLARED.items() if d.role in roles]


def checks(function):
    """Decorator: `function(config)` runs in `validate`, raising a one-line UserError for a bad value."""
    _CHECKS.append(function)
    return function


# --- data -------------------------------------------------------------------------------------------------------------
declare(CHECKPOINT, flags.DEFINE_string(
    "dataset", "mnist",
    "TFDS image-classification dataset name (mnist, fashion_mnist, cifar10, tf_flowers, imagenet2012, ...), or "
    "folder:PATH for your own images in PATH/<split>/<class>/ (JPEG, PNG, GIF, BMP, WebP; the classes: the training "
    "split's sorted class folder names)."))
declare(CHECKPOINT, flags.DEFINE_string(
    "train_split", "train",
    "Split to train on (a TFDS split, or a split folder of folder:PATH); TFDS slicing works for "
    "both, e.g. 'train[:90%]'."))
declare(TUNABLE, flags.DEFINE_string(
    "eval_split", "test", "Split to evaluate on, every example exactly once (e.g. test, val)."))
declare(TUNABLE, flags.DEFINE_list(
    "extra_eval", [],
    "More splits evaluated at every evaluation beside --eval_split (e.g. test,train[:2%]), each with its own "
    "TensorBoard run (eval_<split>), metrics.jsonl fields and results; best/ is still picked by --eval_split. A "
    "split that shares only some of its examples with --train_split is refused (a minival carved from training "
    "must not overlap it); one inside the training split measures accuracy on training examples."))
declare(PATH, flags.DEFINE_string(
    "data_dir", None, "Where TFDS keeps prepared datasets (TFDS default: ~/tensorflow_datasets)."),
        only_if=lambda c: not c.dataset.startswith("folder:"), when="for TFDS datasets, not folder:PATH")
declare(PATH, flags.DEFINE_string(
    "tfds_manual_dir", None,
    "Folder holding the dataset's source files fetched by hand (TFDS DownloadConfig(manual_dir=...)), "
    "e.g. ../shared/datasets/mnist. Used only when the dataset is not yet prepared in --data_dir."),
        only_if=lambda c: not c.dataset.startswith("folder:"), when="for TFDS datasets, not folder:PATH")

# --- model ------------------------------------------------------------------------------------------------------------
declare(CHECKPOINT, flags.DEFINE_string(
    "model", "cnn", "Model name from the registry in research/models/ (`python -m research.models "
    "--list`); each model module defines its own flags, e.g. --hidden_units in mlp.py."))

# --- optimization -----------------------------------------------------------------------------------------------------
declare(TUNABLE, flags.DEFINE_float(
    "learning_rate", 1e-3, "Peak learning rate (the initial one for exponential decay)."))
declare(TUNABLE, flags.DEFINE_enum(
    "lr_schedule", "constant", ["constant", "exponential", "cosine"],
    "constant; exponential: lr * decay_rate ** (step / decay_steps); "
    "cosine: linear warmup over --warmup_steps, then cosine decay to 0 at the last step."))
declare(TUNABLE, flags.DEFINE_integer(
    "decay_steps", 2000, "exponential: steps per decay by --decay_rate."),
        only_if=lambda c: c.lr_schedule == "exponential", when="with --lr_schedule=exponential")
declare(TUNABLE, flags.DEFINE_float(
    "decay_rate", 0.9, "exponential: factor applied every --decay_steps."),
        only_if=lambda c: c.lr_schedule == "exponential", when="with --lr_schedule=exponential")
declare(TUNABLE, flags.DEFINE_boolean(
    "staircase", False, "exponential: decay in whole steps of --decay_steps."),
        only_if=lambda c: c.lr_schedule == "exponential", when="with --lr_schedule=exponential")
declare(TUNABLE, flags.DEFINE_integer(
    "warmup_steps", 0, "cosine: steps of linear warmup from 0 to --learning_rate."),
        only_if=lambda c: c.lr_schedule == "cosine", when="with --lr_schedule=cosine")
declare(CHECKPOINT, flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing of the cross-entropy loss."))
declare(TUNABLE, flags.DEFINE_float(
    "clip_grad_norm", 0.0,
    "Clip gradients to this global norm, measured on the gradient summed over all replicas (0 = off)."))
declare(CHECKPOINT, flags.DEFINE_float(
    "ema_decay", 0.0,
    "Keep an exponential moving average of the weights with this decay (e.g. 0.999); evaluation, the "
    "best checkpoint and exports then use the averaged weights (0 = off)."))

# --- length and cadence -----------------------------------------------------------------------------------------------
declare(CHECKPOINT, flags.DEFINE_integer("batch_size", 32, "Global batch size, split evenly over all replicas."))
declare(TUNABLE, flags.DEFINE_integer("train_epochs", None, "Train this many passes over --train_split."))
declare(TUNABLE, flags.DEFINE_integer(
    "train_steps", None, "Train this many steps; overrides --train_epochs when set."))
declare(RUNTIME, flags.DEFINE_integer(
    "steps_per_loop", 100,
    "At most this many steps run inside one tf.function call, the cadence of train logs and "
    "summaries; a loop also ends at each epoch end, evaluation and checkpoint step."))
EPOCH, NEVER = "epoch", "never"  # --eval_every's words.


class _EvalEveryParser(flags.ArgumentParser):
    """--eval_every: a positive number of steps, 'epoch' or 'never'. 0 is read as 'epoch': it was the spelling of
    'epoch' before 'never' existed, and every earlier run's flags.txt holds it, so it must keep its meaning."""

    def parse(self, argument):
        text = str(argument).strip().lower()
        if text in (EPOCH, NEVER):
            return text
        if not (text.isascii() and text.isdigit()):
            raise ValueError("expected a positive number of steps, 'epoch' or 'never'")
        return int(text) or EPOCH

    def flag_type(self):
        return "steps, 'epoch' or 'never'"


declare(TUNABLE, flags.DEFINE(
    _EvalEveryParser(), "eval_every", EPOCH,
    "Evaluate every this many steps and at the end; epoch (the default): at the end of each epoch and at the end "
    "(0, as earlier versions wrote it, means this too); never: not in the training process at all, not even at the "
    "end (results.json then holds no eval numbers until a sidecar, `python -m research.evaluate --model_dir=RUN "
    "--follow`, evaluates each checkpoint and fills them in: --checkpoint_every is then the evaluation cadence).",
    serializer=flags.ArgumentSerializer()))
declare(RUNTIME, flags.DEFINE_integer(
    "checkpoint_every", 1000, "Save a checkpoint every this many steps, and always at the end."))
declare(RUNTIME, flags.DEFINE_integer("keep_checkpoints", 3, "How many recent checkpoints to keep."))

# --- run --------------------------------------------------------------------------------------------------------------
declare(PATH, flags.DEFINE_string(
    "model_dir", None, "Run directory: summaries, checkpoints, flags.txt, metrics.jsonl, results.json."))
declare(CHECKPOINT, flags.DEFINE_integer(
    "seed", 0, "Seed of every random choice: initialisation, shuffling, dropout, augmentation."))
declare(RUNTIME, flags.DEFINE_boolean(
    "deterministic", False, "Turn on TF op determinism (bit-identical reruns; slower on GPU)."))
declare(RUNTIME, flags.DEFINE_enum(
    "strategy", "auto", ["auto", "default", "one_device", "mirrored", "multi_worker_mirrored"],
    "tf.distribute strategy. auto: mirrored over all visible GPUs if more than one, one_device on a "
    "single GPU, default on CPU. multi_worker_mirrored: one process per host, cluster from --cluster."))
declare(RUNTIME, flags.DEFINE_integer(
    "num_gpus", None, "Use only the first N visible GPUs, hiding the others from TensorFlow under "
    "every --strategy (0: none, CPU only; default: all)."))
declare(RUNTIME, flags.DEFINE_enum(
    "cluster", "tf_config", ["tf_config", "slurm"],
    "multi_worker_mirrored: read the cluster from the TF_CONFIG environment variable, or from the SLURM "
    "allocation (one task per host)."),
        only_if=lambda c: c.strategy == "multi_worker_mirrored", when="with --strategy=multi_worker_mirrored")
declare(RUNTIME, flags.DEFINE_boolean(
    "jit_compile", False, "XLA-compile the forward/backward pass (pays on GPUs; slower on CPU)."))
declare(CHECKPOINT, flags.DEFINE_enum(
    "mixed_precision", "float32", ["float32", "mixed_float16", "mixed_bfloat16"],
    "Compute dtype policy; mixed_float16 adds dynamic loss scaling. For GPUs: slower on CPU."))
declare(RUNTIME, flags.DEFINE_integer(
    "histogram_every", 0, "Write weight histograms to TensorBoard every this many steps (0 = off)."))
declare(RUNTIME, flags.DEFINE_boolean(
    "eval_figures", True,
    "Draw each evaluation's figures into TensorBoard (confusion matrix, reliability diagram, most confident "
    "mistakes) and curves.png at the end: a second or more of matplotlib on the training process each time, "
    "which --noeval_figures saves where evaluations are frequent (research.evaluate draws them on demand)."))
declare(RUNTIME, flags.DEFINE_list(
    "profile_steps", [],
    "Capture a TensorBoard profile of the loop of steps containing these steps; 'first' and 'last' "
    "name the first loop after warm-up and the final loop."))
declare(TUNABLE, flags.DEFINE_string(  # A path, but one that changes the run's numbers: an HParam, compared.
    "init_checkpoint", None,
    "Start a new run from the model weights of this checkpoint or run directory (its latest "
    "checkpoint): the raw trained weights, or their moving average with --init_from_average "
    "(optimizer and step start fresh). A head of another shape is made fresh (--init_skip), an input "
    "layer of other channels adapted and a ViT's position embeddings of another image size resampled "
    "(research/transfer.py). Ignored when --model_dir already has a "
    "checkpoint to resume."))
declare(TUNABLE, flags.DEFINE_boolean(
    "init_from_average", False,
    "--init_checkpoint: take the source run's moving average of the weights (a run trained with "
    "--ema_decay) instead of its raw weights."),
        only_if=lambda c: c.init_checkpoint, when="with --init_checkpoint")
declare(RUNTIME, flags.DEFINE_enum(
    "on_nonfinite", "stop", ["stop", "restore"],
    "On a NaN/Inf loss or gradient: stop with an error naming the step, or restore the last "
    "checkpoint's weights and optimizer and go on with the next batch (--max_nonfinite_restores)."))
declare(RUNTIME, flags.DEFINE_integer(
    "max_nonfinite_restores", 3, "--on_nonfinite=restore: give up after this many restores."),
        only_if=lambda c: c.on_nonfinite == "restore", when="with --on_nonfinite=restore")

REQUIRED = ("model_dir",)
FLOAT32_MAX = 3.4028234663852886e38


def run_flags():
    """The flags of a run (every declared flag but the tools'), in declaration order."""
    return [FLAGS[name] for name in names_with(*RUN_ROLES)]


def config_from_flags():
    """The configuration from parsed command-line flags."""
    return validate(types.SimpleNamespace(**{f.name: f.value for f in run_flags()}))


def make_config(**overrides):
    """A configuration from flag defaults plus overrides, each parsed as if given on the command line."""
    values = {f.name: copy.deepcopy(f.default) for f in run_flags()}
    for name, value in overrides.items():
        if name not in values:
            raise UserError(f"unknown flag --{name}")
        values[name] = None if value is None else _parse(FLAGS[name], value)
    return validate(types.SimpleNamespace(**values))


def _parse(flag, value):
    try:
        return flag.parser.parse(value)
    except ValueError as e:
        raise UserError(f"flag --{flag.name}={value!r}: {e}") from None


def need(ok, message):
    """A check: one UserError line unless `ok`."""
    if not ok:
        raise UserError(message)


def validate(config):
    """Checks that hold between flags, then each owner's `@checks`; each failure is one line naming the flag."""
    for name in REQUIRED:
        need(getattr(config, name), f"--{name} is required")
    for name, value in vars(config).items():  # The step computes in float32: 1e300 would be inf, and NaN never ends.
        need(not isinstance(value, float) or abs(value) <= FLOAT32_MAX,
             f"--{name}={value} is not a finite float32 number (at most {FLOAT32_MAX:.4g})")
    need(config.batch_size > 0, f"--batch_size must be positive, got {config.batch_size}")
    need(config.train_steps or config.train_epochs,
         "set the training length with --train_epochs or --train_steps")
    for name in ("train_steps", "train_epochs"):
        need(getattr(config, name) is None or getattr(config, name) > 0, f"--{name} must be positive")
    need(config.steps_per_loop > 0, "--steps_per_loop must be positive")
    need(config.checkpoint_every > 0, "--checkpoint_every must be positive")
    need(config.keep_checkpoints > 0, "--keep_checkpoints must be positive")
    need(config.learning_rate > 0, "--learning_rate must be positive")
    need(0 <= config.label_smoothing < 1, "--label_smoothing must be in [0, 1)")
    need(config.clip_grad_norm >= 0, "--clip_grad_norm must be >= 0")
    need(0 <= config.ema_decay < 1, "--ema_decay must be in [0, 1)")
    need(config.decay_steps > 0, "--decay_steps must be positive")
    need(config.decay_rate > 0, "--decay_rate must be positive")
    need(config.warmup_steps >= 0, "--warmup_steps must be >= 0")
    bad_steps = [s for s in config.profile_steps if s not in ("first", "last") and not (s.isdigit() and int(s) > 0)]
    need(not bad_steps, f"--profile_steps: {','.join(bad_steps)} is not 'first', 'last' or a step number")
    for check in _CHECKS:
        check(config)
    return config


def spelled(value):
    """A flag value as flags.txt spells it (lists comma-joined): what the resume guard and the warnings compare."""
    if isinstance(value, bool):
        return str(value).lower()
    return ",".join(str(v) for v in value) if isinstance(value, list) else str(value)


def ignored(config):
    """`--name=value (only with ...)` for every flag given another value than its default where it has no effect."""
    defaults = make_config(model_dir="unused", train_steps=1)  # Validated as `config` is (some checks convert).
    return [f"--{name}={spelled(getattr(config, name))} (only {d.when})" for name, d in _DECLARED.items()
            if d.only_if is not None and spelled(getattr(config, name)) != spelled(getattr(defaults, name))
            and not has_effect(name, config)]


def warn_ignored(config):
    """One warning line listing the flags whose value has no effect in this configuration."""
    notes = ignored(config)
    if notes:
        logging.warning("these flags have no effect here and are ignored: %s", "; ".join(notes))


def to_flagfile(config):
    """The configuration as flagfile lines (`--name=value`), readable back with --flagfile."""
    lines = []
    for flag in run_flags():
        value = getattr(config, flag.name)
        if isinstance(value, bool):
            lines.append(f"--{'' if value else 'no'}{flag.name}")
        elif value is not None:
            lines.append(f"--{flag.name}={spelled(value)}")
    return "\n".join(lines) + "\n"
