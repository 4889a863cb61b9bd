"""Per-example training augmentation (`--augment=op,op,...`), stateless so that it is reproducible and resumable.

Ops register like models: each module in this package is one or more ops, each registered with `@register(name,
stream, stage)` beside its own flags (declared `only_if` it is in --augment) and checks; its function takes the
image, its seed and the run config and reads its settings from the config itself. Every module here is imported
with the package, so adding an op touches only its own file. research/data/preprocess.py registers the one op made
while decoding (`register_decoding`: random_resized_crop). The batch-level mixup and cutmix are research/mix.py.

Every random choice comes from `tf.random.stateless_*` with a seed derived from (run seed, epoch, position in
epoch), never from a hidden generator: the same example at the same place of the same epoch gets the same
augmentation eagerly or inside `Dataset.map`, at any parallelism, before and after a resume. An op's seed is the
`stream`-th of the example's seeds, a number it keeps for good (an op added later takes a new one, so that no run's
augmentation changes; `stateless_split`'s first seeds do not depend on how many are drawn). Ops apply by stage
(STAGES), then in the order they registered: rotate, zoom and translate (`affine`) in one resampling, then the
other geometric ops, RandAugment, then what blanks part of the image (cutout, erase), so that nothing moves a hole
afterwards. (The order of the ops in a file is part of the augmentation: TensorFlow's graph optimisations may round
differently when the same ops are created in another order.) Images are float32 [H, W, C] in [0, 1].
"""

import importlib
import pkgutil

import tensorflow as tf
from absl import flags

from research import config as config_lib
from research.augment._registry import (  # noqa: F401 - the package's API.
    STAGES, decoding, names, only_with, ops, register, register_decoding)
from research.config import CHECKPOINT, declare

DECODING_SEED_SALT = 0x5EED  # Folded into the example's seed for the op made while decoding, apart from the others.

declare(CHECKPOINT, flags.DEFINE_list(
    "augment", [],
    "Comma-separated training augmentations applied per example in tf.data, e.g. 'translate,rotate': the ops "
    "registered in research/augment/ (and the crop made while decoding, research/data/preprocess.py); each op's "
    "own flags are named after it. An unknown name's error line lists them all."))


@config_lib.checks
def _check_flags(config):
    unknown = sorted(set(config.augment) - set(names()))
    config_lib.need(not unknown, f"--augment: unknown op {', '.join(unknown)}; choose from {', '.join(names())}")


def decoding_seed(seed):
    """The seed of the op made while decoding, for the example of `seed` (a list of integers)."""
    return seed_pair([*seed, DECODING_SEED_SALT])


def apply(config, image, seed):
    """One float image with the --augment ops of `config`; `seed` is a list of integers (scalars or tensors)."""
    chosen = [op for op in ops() if op.name in config.augment]
    if not chosen:
        return image
    streams = max(op.stream for op in ops()) + 1
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed_pair(seed), streams))
    warp = {}
    for op in chosen:
        if op.affine:
            warp.update(op.function(seeds[op.stream], config))
            continue
        if warp:  # The affine ops so far as one resampling, before the next op.
            image, warp = _warp(image, warp), {}
        image = op.function(image, seeds[op.stream], config)
    return _warp(image, warp) if warp else image


def _warp(image, warp):
    """One resampling for the affine ops' shares: maps each output pixel p to input A (p - c) + c + t, A rotating
    by `angle` and scaling by 1 / (1 + `zoom`), t `shift` times (width, height); filled with 0 (the black
    background of digit datasets)."""
    height, width = image.shape[0], image.shape[1]
    angle, scale = warp.get("angle", tf.zeros(())), 1.0 + warp.get("zoom", tf.zeros(()))
    shift = warp.get("shift", tf.zeros([2])) * [width, height]
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    cx, cy = (width - 1) / 2, (height - 1) / 2
    transform = tf.stack([cos, -sin, cx + shift[0] - cos * cx + sin * cy,
                          sin, cos, cy + shift[1] - sin * cx - cos * cy, 0.0, 0.0])
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform[None], output_shape=[height, width], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0]


def seed_pair(seed):
    """Folds any list of integers into the [2] int64 seed that stateless ops take."""
    seed = tf.cast(tf.stack(seed), tf.int64)
    pair = seed[:2] if seed.shape[0] >= 2 else tf.concat([seed, [0]], 0)
    for extra in tf.unstack(seed[2:]):
        pair = tf.random.experimental.stateless_fold_in(pair, extra)
    return pair


for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):  # Not ops: _registry.
        importlib.import_module(f"{__name__}.{_module.name}")
