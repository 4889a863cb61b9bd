"""The classic per-example ops of digit and CIFAR recipes: rotate, zoom and translate (one affine resampling, their
shares drawn in this order), flip, padded crop and cutout. None has flags of its own: their strengths are the
constants below."""

import math

import tensorflow as tf

from research.augment._registry import register

TRANSLATE = 0.1  # Shift up to 10% of height / width each way.
ROTATE_DEGREES = 10.0
ZOOM = 0.1  # Scale in [0.9, 1.1].
CUTOUT = 0.25  # Square hole of a quarter of the image side.


@register("rotate", stream=1, stage="geometry", affine=True)
def rotate(seed, config):
    limit = ROTATE_DEGREES * math.pi / 180
    return {"angle": tf.random.stateless_uniform((), seed, -limit, limit)}


@register("zoom", stream=2, stage="geometry", affine=True)
def zoom(seed, config):
    return {"zoom": tf.random.stateless_uniform((), seed, -ZOOM, ZOOM)}


@register("translate", stream=0, stage="geometry", affine=True)
def translate(seed, config):
    return {"shift": tf.random.stateless_uniform([2], seed, -TRANSLATE, TRANSLATE)}


@register("flip", stream=3, stage="geometry")
def flip(image, seed, config):
    return tf.image.stateless_random_flip_left_right(image, seed)


@register("crop", stream=4, stage="geometry")
def crop(image, seed, config):
    """A crop of the image's size from it padded by an eighth of its height with 0 on every side."""
    pad = max(1, image.shape[0] // 8)
    padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    return tf.image.stateless_random_crop(padded, tf.shape(image), seed)


@register("cutout", stream=5, stage="occlusion")
def cutout(image, seed, config):
    """A square hole of CUTOUT times the shorter side, set to 0, centred anywhere (clipped at the border)."""
    height, width = image.shape[0], image.shape[1]
    size = max(1, int(CUTOUT * min(height, width)))
    center = tf.random.stateless_uniform([2], seed, maxval=1.0) * [height, width]
    rows = tf.abs(tf.range(height, dtype=tf.float32) + 0.5 - center[0]) < size / 2
    cols = tf.abs(tf.range(width, dtype=tf.float32) + 0.5 - center[1]) < size / 2
    hole = tf.logical_and(rows[:, None], cols[None, :])
    return tf.where(hole[:, :, None], tf.zeros_like(image), image)
