"""Per-example training augmentation, stateless so that it is reproducible and resumable.

Every random choice comes from `tf.random.stateless_*` with a seed derived from (run seed, epoch, position in
epoch), never from a hidden generator: the same example at the same place of the same epoch gets the same
augmentation eagerly or inside `Dataset.map`, at any parallelism, before and after a resume. Images are float32
[H, W, C] in [0, 1]; geometric ops fill with 0 (the black background of digit datasets). `randaugment` is
research/randaugment.py (ImageNet's); the batch-level mixup and cutmix are research/mix.py.
"""

import collections
import math

import tensorflow as tf

from absl import flags

from research import UserError, config as config_lib, randaugment
from research.config import CHECKPOINT, declare

TRANSLATE = 0.1  # Shift up to 10% of height / width each way.
ROTATE_DEGREES = 10.0
ZOOM = 0.1  # Scale in [0.9, 1.1].
CUTOUT = 0.25  # Square hole of a quarter of the image side.

# Applied in the order of `apply`; new ops go at the end of OPS, which fixes each op's seed (an op added in the middle
# would change the augmentation of every run using the ops after it).
OPS = ("translate", "rotate", "zoom", "flip", "crop", "cutout", "randaugment")

RandAugment = collections.namedtuple("RandAugment", "num_ops magnitude")  # How parse() passes on its settings.
PREPROCESS_OPS = ("random_resized_crop",)  # Also accepted by --augment; applied while decoding (research/data/preprocess.py).

declare(CHECKPOINT, flags.DEFINE_list(
    "augment", [],
    "Comma-separated training augmentations applied per example in tf.data, e.g. 'translate,rotate'. "
    "See research/augment.py for the list; random_resized_crop (research/data/preprocess.py) is the "
    "Inception crop made while decoding (--crop_scale, --crop_ratio), and makes evaluation resize the shorter "
    "side and centre-crop (--eval_crop_fraction)."))
declare(CHECKPOINT, flags.DEFINE_integer(
    "randaugment_num_ops", 2, "--augment=randaugment: operations applied to each image."),
        only_if=lambda c: "randaugment" in c.augment, when="with --augment=randaugment")
declare(CHECKPOINT, flags.DEFINE_float(
    "randaugment_magnitude", 10.0,
    "--augment=randaugment: strength of every operation, on RandAugment's scale of 0 to 10 (10 is "
    "the strongest: 30 degree rotations, shear 0.3, translations of 45% of the image)."),
        only_if=lambda c: "randaugment" in c.augment, when="with --augment=randaugment")


@config_lib.checks
def _check_flags(config):
    known = OPS + PREPROCESS_OPS
    unknown = sorted(set(config.augment) - set(known))
    config_lib.need(not unknown, f"--augment: unknown op {', '.join(unknown)}; choose from {', '.join(known)}")
    config_lib.need(config.randaugment_num_ops > 0, "--randaugment_num_ops must be positive")
    config_lib.need(0 <= config.randaugment_magnitude <= 10, "--randaugment_magnitude must be in [0, 10]")


def parse(names, image_shape, randaugment_num_ops=2, randaugment_magnitude=10.0):
    """Op names (already checked by research.config) in canonical order, with `randaugment` as a RandAugment of
    --randaugment_num_ops and --randaugment_magnitude (the defaults here are those flags' defaults)."""
    if len(image_shape) != 3:
        raise UserError(f"--augment needs [H, W, C] images, got shape {image_shape}")
    return tuple(RandAugment(randaugment_num_ops, randaugment_magnitude) if op == "randaugment" else op
                 for op in OPS if op in names)


def apply(ops, image, seed):
    """Augments one float image with the ops from `parse`; `seed` is a list of integers (scalars or tensors)."""
    seeds = tf.random.experimental.stateless_split(_seed_pair(seed), num=len(OPS))
    seed_of = dict(zip(OPS, tf.unstack(seeds)))
    height, width = image.shape[0], image.shape[1]
    geometric = [op for op in ("translate", "rotate", "zoom") if op in ops]
    if geometric:
        image = _affine(image, {op: seed_of[op] for op in geometric})
    if "flip" in ops:
        image = tf.image.stateless_random_flip_left_right(image, seed_of["flip"])
    if "crop" in ops:
        pad = max(1, height // 8)
        padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(padded, tf.shape(image), seed_of["crop"])
    for op in ops:
        if isinstance(op, RandAugment):
            image = randaugment.apply(image, seed_of["randaugment"], op.num_ops, op.magnitude)
    if "cutout" in ops:
        size = max(1, int(CUTOUT * min(height, width)))
        center = tf.random.stateless_uniform([2], seed_of["cutout"], maxval=1.0) * [height, width]
        rows = tf.abs(tf.range(height, dtype=tf.float32) + 0.5 - center[0]) < size / 2
        cols = tf.abs(tf.range(width, dtype=tf.float32) + 0.5 - center[1]) < size / 2
        hole = tf.logical_and(rows[:, None], cols[None, :])
        image = tf.where(hole[:, :, None], tf.zeros_like(image), image)
    return image


def _affine(image, seeds):
    """One resampling for translate/rotate/zoom: maps each output pixel p to input A (p - c) + c + t."""
    height, width = image.shape[0], image.shape[1]

    def uniform(op, limit, shape=()):
        return tf.random.stateless_uniform(shape, seeds[op], -limit, limit) if op in seeds else tf.zeros(shape)

    angle = uniform("rotate", ROTATE_DEGREES * math.pi / 180)
    scale = 1.0 + uniform("zoom", ZOOM)
    shift = uniform("translate", TRANSLATE, [2]) * [width, height]
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    cx, cy = (width - 1) / 2, (height - 1) / 2
    transform = tf.stack([cos, -sin, cx + shift[0] - cos * cx + sin * cy,
                          sin, cos, cy + shift[1] - sin * cx - cos * cy, 0.0, 0.0])
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform[None], output_shape=[height, width], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0]


def _seed_pair(seed):
    """Folds any list of integers into the [2] int64 seed that stateless ops take."""
    seed = tf.cast(tf.stack(seed), tf.int64)
    pair = seed[:2] if seed.shape[0] >= 2 else tf.concat([seed, [0]], 0)
    for extra in tf.unstack(seed[2:]):
        pair = tf.random.experimental.stateless_fold_in(pair, extra)
    return pair
