"""Random erasing (Zhong et al. 2017): `--augment=erase`, with probability --erase_prob, replaces one random
rectangle of the image with noise.

The rectangle is timm's (`RandomErasing`, its `--reprob` recipes): an area of 2% to 1/3 of the image and an aspect
ratio (height / width) between 0.3 and 3.3, drawn log-uniformly; of 10 tries the first that fits inside the image
is erased (none fits: the image is left as it is). The rectangle is filled with per-pixel noise, uniform in [0, 1]
for every channel, as the paper fills it with random values (timm's `--remode=pixel` draws normal noise after
normalisation instead; here the op runs on [0, 1] pixels, before --normalize). Every draw comes from the op's seed,
so erasing resumes exactly; it runs last, with cutout, so that no other op moves the hole.
"""

import math

import tensorflow as tf
from absl import flags

from research import config as config_lib
from research.augment._registry import only_with, register
from research.config import CHECKPOINT, declare

AREA = (0.02, 1 / 3)  # Of the image.
ASPECT = (0.3, 3.3)  # Height / width.
TRIES = 10

declare(CHECKPOINT, flags.DEFINE_float(
    "erase_prob", 0.25,
    "--augment=erase: the probability that an image gets a random rectangle of noise (DeiT's 0.25)."),
        **only_with("erase"))


@config_lib.checks
def _check_flags(config):
    config_lib.need(0 <= config.erase_prob <= 1, f"--erase_prob must be in [0, 1], got {config.erase_prob}")


@register("erase", stream=7, stage="occlusion", probability="erase_prob")
def erase(image, seed, config):
    height, width = image.shape[0], image.shape[1]
    chance, area_seed, aspect_seed, place_seed, noise_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 5))
    area = height * width * tf.random.stateless_uniform([TRIES], area_seed, *AREA)
    aspect = tf.exp(tf.random.stateless_uniform([TRIES], aspect_seed, math.log(ASPECT[0]), math.log(ASPECT[1])))
    heights, widths = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
    fits = (heights < height) & (widths < width)
    first = tf.argmax(tf.cast(fits, tf.int32))  # The first try that fits (0 when none does: then no erasing).
    box = tf.cast(tf.stack([heights[first], widths[first]]), tf.int32)
    corner = tf.cast(tf.random.stateless_uniform([2], place_seed) * tf.cast([height, width] - box + 1, tf.float32),
                     tf.int32)
    rows = (tf.range(height) >= corner[0]) & (tf.range(height) < corner[0] + box[0])
    cols = (tf.range(width) >= corner[1]) & (tf.range(width) < corner[1] + box[1])
    erased = rows[:, None] & cols[None, :] & fits[first] & (tf.random.stateless_uniform([], chance) < config.erase_prob)
    return tf.where(erased[:, :, None], tf.random.stateless_uniform(tf.shape(image), noise_seed), image)
