"""Every setting of a run, defined once as an absl flag.

A run's configuration is a plain namespace of resolved flag values. `python -m research.train` builds it from the
command line and flagfiles; tests and other programs build it with `make_config(**overrides)`, which parses each
override through the same flag parser, so both paths accept and reject exactly the same values. The resolved
configuration is written to `model_dir/flags.txt` and is itself a valid `--flagfile`.
"""

import copy
import types

from absl import flags

from research import UserError

FLAGS = flags.FLAGS

# --- data -------------------------------------------------------------------------------------------------------
flags.DEFINE_string(
    "dataset", "mnist",
    "TFDS image-classification dataset name (mnist, fashion_mnist, cifar10, tf_flowers, imagenet2012, ...), or "
    "folder:PATH for your own images in PATH/<split>/<class>/ (JPEG, PNG, GIF, BMP, WebP; the classes: the training "
    "split's sorted class folder names).")
flags.DEFINE_string("train_split", "train",
                    "Split to train on (a TFDS split, or a split folder of folder:PATH); TFDS slicing works for "
                    "both, e.g. 'train[:90%]'.")
flags.DEFINE_string("eval_split", "test", "Split to evaluate on, every example exactly once (e.g. test, val).")
flags.DEFINE_string("data_dir", None, "Where TFDS keeps prepared datasets (TFDS default: ~/tensorflow_datasets).")
flags.DEFINE_string(
    "tfds_manual_dir", None,
    "Folder holding the dataset's source files fetched by hand (TFDS DownloadConfig(manual_dir=...)), "
    "e.g. ../shared/datasets/mnist. Used only when the dataset is not yet prepared in --data_dir.")
flags.DEFINE_enum(
    "tfds_read", "auto", ["auto", "memory", "array_record"],
    "How a TFDS dataset is read: memory decodes fixed-size splits into RAM (fastest for small datasets; cached "
    "as arrays-*.npz beside the prepared files); array_record streams examples by index from the prepared "
    "ArrayRecord files (any size, any number of examples); auto: memory for fixed-size images whose decoded "
    "training split is under 1 GiB, else array_record. Both give the same batches.")
flags.DEFINE_integer("image_size", 0,
                     "Height and width of the model's input (0: the dataset's own, when all its images have one "
                     "size; required when sizes vary). Images are resized to it, the same way for training and "
                     "evaluation unless --augment=random_resized_crop.")
flags.DEFINE_list(
    "augment", [],
    "Comma-separated training augmentations applied per example in tf.data, e.g. 'translate,rotate'. "
    "See research/augment.py for the list; random_resized_crop (research/data/preprocess.py) is the "
    "Inception crop made while decoding (--crop_scale, --crop_ratio), and makes evaluation resize the shorter "
    "side and centre-crop (--eval_crop_fraction).")
flags.DEFINE_integer("randaugment_num_ops", 2, "--augment=randaugment: operations applied to each image.")
flags.DEFINE_float("randaugment_magnitude", 10.0,
                   "--augment=randaugment: strength of every operation, on RandAugment's scale of 0 to 10 (10 is "
                   "the strongest: 30 degree rotations, shear 0.3, translations of 45% of the image).")
flags.DEFINE_float("mixup_alpha", 0.0,
                   "Mixup (0 = off): each replica's batch is blended with itself rolled by one, by a weight drawn "
                   "from Beta(alpha, alpha) per batch; the targets are blended the same way (research/mix.py).")
flags.DEFINE_float("cutmix_alpha", 0.0,
                   "CutMix (0 = off): a box of each replica's batch is pasted from the batch rolled by one, of "
                   "area 1 - Beta(alpha, alpha); targets weighted by area. With --mixup_alpha too, each batch uses "
                   "one of the two, with even odds.")
flags.DEFINE_list("crop_scale", ["0.08", "1.0"],
                  "random_resized_crop: the range of the crop's share of the image area.")
flags.DEFINE_list("crop_ratio", ["0.75", "1.3333333"],
                  "random_resized_crop: the range of the crop's aspect ratio (width / height).")
flags.DEFINE_float("eval_crop_fraction", 0.875,
                   "With --augment=random_resized_crop: evaluation resizes the shorter side to "
                   "image_size / this and takes the central image_size square.")
flags.DEFINE_enum("normalize", "none", ["none", "imagenet"],
                  "none: model inputs in [0, 1]; imagenet: then minus ImageNet's per-channel mean, divided by its "
                  "standard deviation (colour images).")

# --- model ------------------------------------------------------------------------------------------------------
flags.DEFINE_string("model", "cnn", "Model name from the registry in research/models/ (`python -m research.models "
                    "--list`); each model module defines its own flags, e.g. --hidden_units in mlp.py.")
flags.DEFINE_float("dropout", 0.0, "Dropout rate (0 = off): mlp, cnn_rgb and resnet_small apply it "
                   "before the classifier, convnet at each 'd' of --conv_layers; cnn, resnet18-152 and vit_* have "
                   "none (vit_*: --stochastic_depth).")

# --- optimization -----------------------------------------------------------------------------------------------
flags.DEFINE_enum("optimizer", "rmsprop", ["adam", "adamax", "rmsprop", "sgd", "adamw"], "Optimizer.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (the initial one for exponential decay).")
flags.DEFINE_enum("lr_schedule", "constant", ["constant", "exponential", "cosine"],
                  "constant; exponential: lr * decay_rate ** (step / decay_steps); "
                  "cosine: linear warmup over --warmup_steps, then cosine decay to 0 at the last step.")
flags.DEFINE_integer("decay_steps", 2000, "exponential: steps per decay by --decay_rate.")
flags.DEFINE_float("decay_rate", 0.9, "exponential: factor applied every --decay_steps.")
flags.DEFINE_boolean("staircase", False, "exponential: decay in whole steps of --decay_steps.")
flags.DEFINE_integer("warmup_steps", 0, "cosine: steps of linear warmup from 0 to --learning_rate.")
flags.DEFINE_float("momentum", 0.0, "sgd and rmsprop: momentum.")
flags.DEFINE_boolean("nesterov", False, "sgd: Nesterov momentum.")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay for any optimizer (adamw: 0.004 if left at 0).")
flags.DEFINE_boolean("exclude_bias_and_norm_from_weight_decay", False,
                     "Decay only the weights of rank >= 2 (kernels, embeddings), skipping biases, batch/layer-norm "
                     "scales and offsets, and what a model lists in no_weight_decay() (ViT's class token and position "
                     "embeddings), as ImageNet recipes do.")
flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing of the cross-entropy loss.")
flags.DEFINE_float("clip_grad_norm", 0.0,
                   "Clip gradients to this global norm, measured on the gradient summed over all replicas (0 = off).")
flags.DEFINE_float("ema_decay", 0.0,
                   "Keep an exponential moving average of the weights with this decay (e.g. 0.999); evaluation, the "
                   "best checkpoint and exports then use the averaged weights (0 = off).")

# --- length and cadence -----------------------------------------------------------------------------------------
flags.DEFINE_integer("batch_size", 32, "Global batch size, split evenly over all replicas.")
flags.DEFINE_integer("train_epochs", None, "Train this many passes over --train_split.")
flags.DEFINE_integer("train_steps", None, "Train this many steps; overrides --train_epochs when set.")
flags.DEFINE_integer("steps_per_loop", 100,
                     "At most this many steps run inside one tf.function call, the cadence of train logs and "
                     "summaries; a loop also ends at each epoch end, evaluation and checkpoint step.")
flags.DEFINE_integer("eval_every", 0, "Evaluate every this many steps (0 = at the end of each epoch) and at the end.")
flags.DEFINE_integer("checkpoint_every", 1000, "Save a checkpoint every this many steps, and always at the end.")
flags.DEFINE_integer("keep_checkpoints", 3, "How many recent checkpoints to keep.")

# --- run --------------------------------------------------------------------------------------------------------
flags.DEFINE_string("model_dir", None, "Run directory: summaries, checkpoints, flags.txt, metrics.jsonl, results.json.")
flags.DEFINE_integer("seed", 0, "Seed of every random choice: initialisation, shuffling, dropout, augmentation.")
flags.DEFINE_boolean("deterministic", False, "Turn on TF op determinism (bit-identical reruns; slower on GPU).")
flags.DEFINE_enum("strategy", "auto", ["auto", "default", "one_device", "mirrored", "multi_worker_mirrored"],
                  "tf.distribute strategy. auto: mirrored over all visible GPUs if more than one, one_device on a "
                  "single GPU, default on CPU. multi_worker_mirrored: one process per host, cluster from --cluster.")
flags.DEFINE_integer("num_gpus", None, "Use only the first N visible GPUs, hiding the others from TensorFlow under "
                     "every --strategy (0: none, CPU only; default: all).")
flags.DEFINE_enum("cluster", "tf_config", ["tf_config", "slurm"],
                  "multi_worker_mirrored: read the cluster from the TF_CONFIG environment variable, or from the SLURM "
                  "allocation (one task per host).")
flags.DEFINE_boolean("jit_compile", False, "XLA-compile the forward/backward pass (pays on GPUs; slower on CPU).")
flags.DEFINE_enum("mixed_precision", "float32", ["float32", "mixed_float16", "mixed_bfloat16"],
                  "Compute dtype policy; mixed_float16 adds dynamic loss scaling. For GPUs: slower on CPU.")
flags.DEFINE_integer("histogram_every", 0, "Write weight histograms to TensorBoard every this many steps (0 = off).")
flags.DEFINE_list("profile_steps", [],
                  "Capture a TensorBoard profile of the loop of steps containing these steps; 'first' and 'last' "
                  "name the first loop after warm-up and the final loop.")

flags.DEFINE_string("init_checkpoint", None,
                    "Start a new run from the model weights of this checkpoint or run directory (its latest "
                    "checkpoint): the raw trained weights, or their moving average with --init_from_average "
                    "(optimizer and step start fresh). Ignored when --model_dir already has a checkpoint to resume.")
flags.DEFINE_boolean("init_from_average", False,
                     "--init_checkpoint: take the source run's moving average of the weights (a run trained with "
                     "--ema_decay) instead of its raw weights.")
flags.DEFINE_enum("on_nonfinite", "stop", ["stop", "restore"],
                  "On a NaN/Inf loss or gradient: stop with an error naming the step, or restore the last "
                  "checkpoint's weights and optimizer and go on with the next batch (--max_nonfinite_restores).")
flags.DEFINE_integer("max_nonfinite_restores", 3, "--on_nonfinite=restore: give up after this many restores.")

REQUIRED = ("model_dir",)


def run_flags():
    """The flags of a run: this module's, then each model module's (research/models/*.py define their own), in
    definition order (absl keeps them per defining module)."""
    from research import models  # Here, not at the top: it loads TensorFlow, and this module loads before it.
    return [flag for module in (__name__, *models.flag_modules()) for flag in FLAGS.get_flags_for_module(module)]


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


def validate(config):
    """Checks that hold between flags; each failure is one line naming the flag."""
    from research import augment, models  # Here, not at the top: they load TensorFlow, and this module loads before it.

    def need(ok, message):
        if not ok:
            raise UserError(message)

    for name in REQUIRED:
        need(getattr(config, name), f"--{name} is required")
    need(config.batch_size > 0, f"--batch_size must be positive, got {config.batch_size}")
    need(config.train_steps or config.train_epochs,
         "set the training length with --train_epochs or --train_steps")
    for name in ("train_steps", "train_epochs"):
        need(getattr(config, name) is None or getattr(config, name) > 0, f"--{name} must be positive")
    need(config.steps_per_loop > 0, "--steps_per_loop must be positive")
    need(config.checkpoint_every > 0, "--checkpoint_every must be positive")
    need(config.keep_checkpoints > 0, "--keep_checkpoints must be positive")
    need(config.eval_every >= 0, "--eval_every must be >= 0")
    need(config.learning_rate > 0, "--learning_rate must be positive")
    need(0 <= config.dropout < 1, "--dropout must be in [0, 1)")
    need(0 <= config.label_smoothing < 1, "--label_smoothing must be in [0, 1)")
    need(config.clip_grad_norm >= 0, "--clip_grad_norm must be >= 0")
    need(config.randaugment_num_ops > 0, "--randaugment_num_ops must be positive")
    need(0 <= config.randaugment_magnitude <= 10, "--randaugment_magnitude must be in [0, 10]")
    need(config.mixup_alpha >= 0 and config.cutmix_alpha >= 0, "--mixup_alpha and --cutmix_alpha must be >= 0")
    bad_steps = [s for s in config.profile_steps if s not in ("first", "last") and not (s.isdigit() and int(s) > 0)]
    need(not bad_steps, f"--profile_steps: {','.join(bad_steps)} is not 'first', 'last' or a step number")
    models.validate(config)
    need(config.model in models.names(), f"--model={config.model} is unknown; choose from {', '.join(models.names())}")
    known_ops = augment.OPS + augment.PREPROCESS_OPS
    unknown_ops = sorted(set(config.augment) - set(known_ops))
    need(not unknown_ops, f"--augment: unknown op {', '.join(unknown_ops)}; choose from {', '.join(known_ops)}")
    need(0 <= config.image_size <= 4096, "--image_size must be in [0, 4096] (0: the dataset's own size)")
    need(0 < config.eval_crop_fraction <= 1, "--eval_crop_fraction must be in (0, 1]")
    for name, low, high in (("crop_scale", 0, 1), ("crop_ratio", 0, float("inf"))):
        try:
            values = [float(v) for v in getattr(config, name)]
        except ValueError:
            values = []
        need(len(values) == 2 and low < values[0] <= values[1] <= high,
             f"--{name} must be two increasing numbers in ({low}, {high}], got {','.join(getattr(config, name))}")
        setattr(config, name, values)
    return config


def to_flagfile(config):
    """The configuration as flagfile lines (`--name=value`), readable back with --flagfile."""
    lines = []
    for flag in run_flags():
        value = getattr(config, flag.name)
        if value is None:
            continue
        if isinstance(value, bool):
            lines.append(f"--{'' if value else 'no'}{flag.name}")
        elif isinstance(value, list):
            lines.append(f"--{flag.name}={','.join(str(v) for v in value)}")
        else:
            lines.append(f"--{flag.name}={value}")
    return "\n".join(lines) + "\n"
