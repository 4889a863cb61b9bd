"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019): batch-level augmentation with soft targets.

Why in the train step and not in tf.data: a mix pairs examples of one batch, and the batch a replica trains on is
only known there. Each replica's batch is paired with itself rolled by one (example i with i - 1, as big_vision
pairs them), with one weight per batch, drawn from Beta(alpha, alpha); the targets are the same blend of the two
one-hot labels and go to the cross-entropy as class probabilities (research/optim.py per_example_loss, where label
smoothing applies to them as to plain labels). Every random choice comes from `batch_seed(run seed, step,
replica)`: stateless, so the same batch at the same step is mixed the same eagerly, inside the traced step, and
after a resume (the step is checkpointed). On another number of replicas the pairs differ, as batch-norm statistics do.
"""

import tensorflow as tf
from absl import flags

from research import config as config_lib
from research.config import CHECKPOINT, declare

STREAM = 0x6D6978  # "mix": keeps these seeds apart from research.augment's per-example (seed, epoch) pairs.

declare(CHECKPOINT, flags.DEFINE_float(
    "mixup_alpha", 0.0,
    "Mixup (0 = off): each replica's batch is blended with itself rolled by one, by a weight drawn "
    "from Beta(alpha, alpha) per batch; the targets are blended the same way (research/mix.py)."))
declare(CHECKPOINT, flags.DEFINE_float(
    "cutmix_alpha", 0.0,
    "CutMix (0 = off): a box of each replica's batch is pasted from the batch rolled by one, of "
    "area 1 - Beta(alpha, alpha); targets weighted by area. With --mixup_alpha too, each batch uses "
    "one of the two, with even odds."))


@config_lib.checks
def _check_flags(config):
    config_lib.need(config.mixup_alpha >= 0 and config.cutmix_alpha >= 0,
                    "--mixup_alpha and --cutmix_alpha must be >= 0")


def batch_seed(seed, step, replica):
    """The [2] seed of one replica's batch at `step`."""
    pair = tf.stack([tf.cast(seed, tf.int64), tf.constant(STREAM, tf.int64)])
    pair = tf.random.experimental.stateless_fold_in(pair, tf.cast(step, tf.int64))
    return tf.random.experimental.stateless_fold_in(pair, tf.cast(replica, tf.int64))


def mix(images, labels, num_classes, mixup_alpha, cutmix_alpha, seed):
    """(mixed images, targets [batch, classes] summing to 1) for a batch of float images [batch, H, W, C] and
    integer labels [batch]. With both alphas > 0, each batch is mixed one way or the other with even odds."""
    choice_seed, mixup_seed, cutmix_seed, box_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=4))
    targets = tf.one_hot(labels, num_classes)
    partner_images, partner_targets = tf.roll(images, 1, axis=0), tf.roll(targets, 1, axis=0)

    def mixup():
        weight = _beta(mixup_alpha, mixup_seed)
        return weight * images + (1.0 - weight) * partner_images, weight

    def cutmix():
        box = _box(tf.shape(images)[1], tf.shape(images)[2], 1.0 - _beta(cutmix_alpha, cutmix_seed), box_seed)
        weight = 1.0 - tf.reduce_mean(tf.cast(box, tf.float32))  # The area actually pasted, after clipping.
        return tf.where(box[None, :, :, None], partner_images, images), weight

    if mixup_alpha and cutmix_alpha:
        mixed, weight = tf.cond(tf.random.stateless_uniform([], choice_seed) < 0.5, cutmix, mixup)
    else:
        mixed, weight = cutmix() if cutmix_alpha else mixup()
    return mixed, weight * targets + (1.0 - weight) * partner_targets


def _beta(alpha, seed):
    """One draw from Beta(alpha, alpha), as the ratio of two Gamma(alpha) draws."""
    first, second = tf.unstack(tf.random.stateless_gamma([2], seed, alpha))
    return first / (first + second)


def _box(height, width, area, seed):
    """A [height, width] boolean mask: a box of `area` (fraction of the image) with the image's aspect ratio,
    centred uniformly at random and clipped at the border."""
    centre = tf.random.stateless_uniform([2], seed) * tf.cast([height, width], tf.float32)
    half = tf.sqrt(area) * tf.cast([height, width], tf.float32) / 2
    rows = tf.abs(tf.range(height, dtype=tf.float32) + 0.5 - centre[0]) < half[0]
    cols = tf.abs(tf.range(width, dtype=tf.float32) + 0.5 - centre[1]) < half[1]
    return tf.logical_and(rows[:, None], cols[None, :])
