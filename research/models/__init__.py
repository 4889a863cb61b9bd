"""Models, looked up by name: `create(config, dataset)` builds `--model` (research/models/_registry.py).

Each module in this package is one family and everything about it lives in that file, so adding a model touches
only its own file:
  - its builders, registered with `@register("name", **capabilities)`: a builder takes the run config and the
    dataset (image shape, number of classes) and returns a subclassed `tf.keras.Model` whose call returns logits
    and which keeps its class count as `num_classes` (its get_config needs it anyway; the train step's mixup reads
    it); the capabilities (research/models/_registry.py Capabilities) say what it supports: dropout, stochastic
    depth, batch norm (hence --sync_batchnorm), a head kept as `classifier` (research/transfer.py makes it fresh
    for a new task and trains it alone for a linear probe), repeated blocks kept in order as `blocks`
    (--layer_decay gives each its rate), the image channels it takes; every flag, check and test that asks what a
    model has reads them (tests/test_models.py checks each declaration against the model built); the first line
    of its docstring is what `python -m research.models --list` shows, with the capabilities;
  - its own absl flags, defined at module level, each declared with its role and when it has an effect
    (`research.config.declare(CHECKPOINT, flags.DEFINE_...(...), only_if=..., when=...)`): research.config then
    treats them as its own (make_config, flags.txt, the resume guard, HParams);
  - optionally a `@research.config.checks` function: checks of its flags (and conversions such as strings to
    integers), one UserError line each.
The flags that several families read (`--dropout`, `--sync_batchnorm`, `--stochastic_depth`) are defined once, in
research/models/_shared.py, and apply to the models that declare the capability.
A model may also have a `no_weight_decay()` method listing variables of rank > 1 that weight decay should skip
when --exclude_bias_and_norm_from_weight_decay is set (research/optim.py; ViT's position embeddings).
A model whose position embeddings follow the image size keeps them as `position_embedding`, with a method
`position_embedding_from(embeddings, source)` that fits another size's to its own (ViT: resampled to its grid of
patches), which --init_checkpoint from a run at another image size calls (research/transfer.py).
Every family module here is imported with the package, so that their flags exist before flags are parsed and
their Keras classes are known to `keras.saving.load_model` as soon as research.models is imported.
"""

import importlib
import pkgutil
import sys

from research import cli

if sys.argv[:1] == ["-m"]:  # Imported on the way to `python -m research.models` (__main__.py, the summary command):
    cli.start()  # that program starts as every program does (research/cli.py), before TensorFlow loads below.

import tensorflow as tf  # noqa: E402

from research.models._registry import (  # noqa: E402, F401 - the package's API.
    NAMED_WEIGHTS, capabilities, create, describe, families, has, having, names, register)
from research.models import _shared  # noqa: E402


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
    if not _module.name.startswith("_"):  # Not families: __main__ (the summary command), _registry, _shared.
        importlib.import_module(f"{__name__}.{_module.name}")
_shared.name_the_models_in_help()
