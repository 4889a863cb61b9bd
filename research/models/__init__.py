"""Models, looked up by name: `create(config, dataset)` builds `--model`.

Each module in this package is one family and everything about it lives in that file, so adding a model touches
only its own file:
  - its builders, registered with `@register("name")`: a builder takes the run config and the dataset (image
    shape, number of classes) and returns a subclassed `tf.keras.Model` whose call returns logits and which keeps
    its class count as `num_classes` (its get_config needs it anyway; the train step's mixup reads it); the first
    line of its docstring is what `python -m research.models --list` shows;
  - its own absl flags, defined at module level, each declared with its role and when it has an effect
    (`research.config.declare(CHECKPOINT, flags.DEFINE_...(...), only_if=..., when=...)`): research.config then
    treats them as its own (make_config, flags.txt, the resume guard, HParams);
  - optionally a `@research.config.checks` function: checks of its flags (and conversions such as strings to
    integers), one UserError line each.
The few flags that several families read (`--sync_batchnorm`, `--stochastic_depth`) are defined here, once.
A model may also have a `no_weight_decay()` method listing variables of rank > 1 that weight decay should skip
when --exclude_bias_and_norm_from_weight_decay is set (research/optim.py; ViT's position embeddings).
Every module here is imported with the package, so that their flags exist before flags are parsed and their Keras
classes are known to `keras.saving.load_model` as soon as research.models is imported.
"""

import importlib
import pkgutil
import sys

from research import UserError, cli, config as config_lib

if sys.argv[:1] == ["-m"]:  # Imported on the way to `python -m research.models` (__main__.py, the summary command):
    cli.start()  # that program starts as every program does (research/cli.py), before TensorFlow loads below.

import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

from research.config import CHECKPOINT, declare  # noqa: E402

declare(CHECKPOINT, flags.DEFINE_boolean(
    "sync_batchnorm", False,
    "resnet* and convnet: batch-norm statistics over the global batch, all-reduced over the replicas at every "
    "batch-norm layer (Keras BatchNormalization(synchronized=True)), instead of over each replica's share; "
    "for large models at small per-replica batches. One replica: the same statistics either way."),
        only_if=lambda c: c.model.startswith("resnet") or c.model == "convnet", when="with --model=resnet* or convnet")
declare(CHECKPOINT, flags.DEFINE_float(
    "stochastic_depth", 0.0,
    "vit_* and resnet*: stochastic depth (0 = off): each residual branch (ViT: attention and MLP; ResNet: the "
    "block's convolutions) is dropped for whole examples, at a rate rising linearly from 0 at the first block "
    "to this at the last; seeded as dropout is."),
        only_if=lambda c: c.model.startswith(("vit_", "resnet")), when="with --model=vit_* or resnet*")

_BUILDERS = {}
_MODULES = []


def register(name):
    def decorate(builder):
        _BUILDERS[name] = builder
        return builder
    return decorate


def names():
    return sorted(_BUILDERS)


def describe(name):
    """The builder's one-line description (the first line of its docstring)."""
    doc = (_BUILDERS[name].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def create(config, dataset):
    if config.model not in _BUILDERS:
        raise UserError(f"--model={config.model} is unknown; choose from {', '.join(names())}")
    return _BUILDERS[config.model](config, dataset)


@config_lib.checks
def _check_model(config):
    config_lib.need(config.model in _BUILDERS, f"--model={config.model} is unknown; choose from {', '.join(names())}")
    config_lib.need(0 <= config.stochastic_depth < 1,
                    f"--stochastic_depth must be in [0, 1), got {config.stochastic_depth}")


def drop_rates(rate, blocks):
    """Stochastic depth's drop rate of each of `blocks` residual blocks: rising linearly from 0 at the first to
    `rate` at the last (Huang et al. 2016; timm's and big_vision's schedule)."""
    return [rate * i / max(1, blocks - 1) for i in range(blocks)]


def forward_flops(model, image_shape):
    """Floating-point operations of one image's forward pass (inference mode), counted on its graph by TF's
    profiler, which counts a multiply-add as 2 (so multiply-adds are about half: the convolutions and matrix
    products dominate); the model must be built."""
    forward = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, *image_shape], tf.float32))
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")  # The profiler's shape helpers log v1 deprecation warnings.
    try:
        return tf.compat.v1.profiler.profile(forward.graph, options=options).total_float_ops
    finally:
        logger.setLevel(level)


for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):  # __main__ is the summary command, not a family.
        _MODULES.append(importlib.import_module(f"{__name__}.{_module.name}"))
