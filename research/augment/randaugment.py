"""RandAugment (Cubuk et al. 2020) as timm implements it for ImageNet recipes, stateless like every op of
research/augment/: `--augment=randaugment`, with --randaugment_num_ops and --randaugment_magnitude.

Each image gets `num_ops` operations, each drawn uniformly from OPS and applied with probability 0.5, all at one
`magnitude` on the paper's 0-10 scale. Where timm's ops take a random direction (rotation, shear, translation,
the enhancement factors), the sign is drawn too; posterize and solarize grow stronger with the magnitude (timm's
"increasing" variants, which the paper's magnitude sweep assumes). Every random choice is drawn from the seed
that research.augment hands over, so an image is augmented the same eagerly, in `Dataset.map` and after a resume.
Images are float32 [H, W, C] in [0, 1], C = 1 or 3; geometric ops fill with grey (0.5), as timm fills with 128.
"""

import math

import tensorflow as tf
from absl import flags

from research import config as config_lib
from research.augment._registry import only_with, register
from research.config import CHECKPOINT, declare

OPS = ("auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
       "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y")
ROTATE_DEGREES = 30.0  # At magnitude 10, as are the limits below.
SHEAR = 0.3
TRANSLATE = 0.45  # Of the image side (timm's 'TranslateXRel').
ENHANCE = 0.9  # Colour, contrast, brightness and sharpness factors in 1 +- 0.9.
POSTERIZE_BITS_REMOVED = 4
SOLARIZE_ADD = 110 / 255
FILL = 0.5

declare(CHECKPOINT, flags.DEFINE_integer(
    "randaugment_num_ops", 2, "--augment=randaugment: operations applied to each image."), **only_with("randaugment"))
declare(CHECKPOINT, flags.DEFINE_float(
    "randaugment_magnitude", 10.0,
    "--augment=randaugment: strength of every operation, on RandAugment's scale of 0 to 10 (10 is "
    "the strongest: 30 degree rotations, shear 0.3, translations of 45% of the image)."), **only_with("randaugment"))


@config_lib.checks
def _check_flags(config):
    config_lib.need(config.randaugment_num_ops > 0, "--randaugment_num_ops must be positive")
    config_lib.need(0 <= config.randaugment_magnitude <= 10, "--randaugment_magnitude must be in [0, 10]")


@register("randaugment", stream=6, stage="policy")
def randaugment(image, seed, config):
    return apply(image, seed, config.randaugment_num_ops, config.randaugment_magnitude)


def apply(image, seed, num_ops, magnitude):
    """`image` with `num_ops` random operations at `magnitude` (0-10); `seed` is a [2] integer tensor."""
    level = magnitude / 10.0
    choices = tf.random.stateless_uniform([num_ops], seed, 0, len(OPS), dtype=tf.int32)
    applied, signs = tf.unstack(tf.random.stateless_uniform(
        [2, num_ops], tf.random.experimental.stateless_fold_in(seed, 1)) < 0.5)
    shape = image.shape
    for i in range(num_ops):
        sign = tf.where(signs[i], -1.0, 1.0)
        branches = [lambda op=op: _op(op, image, level, sign) for op in OPS]
        image = tf.cond(applied[i], lambda: tf.switch_case(choices[i], branches), lambda: image)
        image = tf.ensure_shape(image, shape)
    return image


def _op(op, image, level, sign):
    if op == "auto_contrast":  # Each channel stretched to [0, 1].
        low = tf.reduce_min(image, axis=[0, 1])
        high = tf.reduce_max(image, axis=[0, 1])
        return tf.where(high > low, (image - low) / tf.maximum(high - low, 1e-6), image)
    if op == "equalize":
        return _equalize(image)
    if op == "invert":
        return 1.0 - image
    if op == "rotate":
        return _rotate(image, sign * level * ROTATE_DEGREES * math.pi / 180)
    if op == "posterize":  # Keep the top 8 - 4 * level bits of each 8-bit value.
        shift = tf.cast(round(POSTERIZE_BITS_REMOVED * level), tf.int32)
        values = tf.cast(tf.round(image * 255), tf.int32)
        return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(values, shift), shift), tf.float32) / 255
    if op == "solarize":  # Invert the values at or above the threshold 1 - level.
        return tf.where(image >= 1.0 - level, 1.0 - image, image)
    if op == "solarize_add":
        return tf.where(image < 0.5, tf.minimum(image + level * SOLARIZE_ADD, 1.0), image)
    if op in ("color", "contrast", "brightness", "sharpness"):
        return _blend(_degenerate(op, image), image, 1.0 + sign * level * ENHANCE)
    height, width = image.shape[0], image.shape[1]
    if op == "shear_x":  # Input x = x + s * y.
        return _transform(image, [1.0, sign * level * SHEAR, 0.0, 0.0, 1.0, 0.0])
    if op == "shear_y":
        return _transform(image, [1.0, 0.0, 0.0, sign * level * SHEAR, 1.0, 0.0])
    if op == "translate_x":
        return _transform(image, [1.0, 0.0, sign * level * TRANSLATE * width, 0.0, 1.0, 0.0])
    return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, sign * level * TRANSLATE * height])  # translate_y


def _degenerate(op, image):
    """What the enhancement ops blend towards (PIL's ImageEnhance): grey image, mean grey, black, blurred."""
    grey = tf.image.rgb_to_grayscale(image) if image.shape[-1] == 3 else image
    if op == "color":
        return tf.broadcast_to(grey, tf.shape(image))
    if op == "contrast":
        return tf.fill(tf.shape(image), tf.reduce_mean(grey))
    if op == "brightness":
        return tf.zeros_like(image)
    # sharpness: PIL's 3x3 smoothing kernel inside, the original pixels on the border.
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, image.shape[-1], 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
    inside = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
    return inside * tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]) + (1.0 - inside) * image


def _blend(degenerate, image, factor):
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 1.0)


def _equalize(image):
    """Histogram equalisation of each channel's 8-bit values, as PIL's ImageOps.equalize."""
    values = tf.cast(tf.round(image * 255), tf.int32)
    channels = []
    for channel in tf.unstack(values, axis=-1):
        histogram = tf.math.bincount(channel, minlength=256, maxlength=256)
        step = (tf.reduce_sum(histogram) - tf.gather(histogram, tf.reduce_max(channel))) // 255
        lookup = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
        lookup = tf.clip_by_value(tf.concat([[0], lookup[:-1]], 0), 0, 255)
        channels.append(tf.where(step > 0, tf.gather(lookup, channel), channel))
    return tf.cast(tf.stack(channels, axis=-1), tf.float32) / 255


def _rotate(image, angle):
    """Rotation by `angle` radians about the image centre."""
    height, width = image.shape[0], image.shape[1]
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    return _transform(image, [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy])


def _transform(image, affine):
    """Maps each output pixel (x, y) to input (a0 x + a1 y + a2, a3 x + a4 y + a5), bilinear, grey outside."""
    transform = tf.cast(tf.stack([*affine, 0.0, 0.0]), tf.float32)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform[None], output_shape=tf.shape(image)[:2], fill_value=FILL,
        interpolation="BILINEAR", fill_mode="CONSTANT")[0]
