"""Optimizer, learning-rate schedule and loss, from flags."""

import tensorflow as tf

keras = tf.keras


class Constant(keras.optimizers.schedules.LearningRateSchedule):
    """A constant rate as a schedule: Keras keeps a plain float rate in an optimizer variable that a checkpoint
    restore would bring back, and a rate given by the flags at resume must win."""

    def __init__(self, rate):
        self.rate = rate

    def __call__(self, step):
        return tf.constant(self.rate, tf.float32)

    def get_config(self):
        return {"rate": self.rate}


def learning_rate(config, total_steps):
    """The schedule, a function of the optimizer's step count (never saved in checkpoints: flags decide it)."""
    if config.lr_schedule == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(
            config.learning_rate, config.decay_steps, config.decay_rate, staircase=config.staircase)
    if config.lr_schedule == "cosine":
        warmup = min(config.warmup_steps, total_steps - 1)
        return keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else config.learning_rate, decay_steps=total_steps - warmup,
            warmup_target=config.learning_rate if warmup else None, warmup_steps=warmup)
    return Constant(config.learning_rate)


def create_optimizer(config, total_steps, model):
    """Create inside `strategy.scope()`, after building `model`. Gradient clipping is not set here: the train step
    clips on the norm of the gradient summed over replicas, which Keras' own clipnorm (applied per replica) would
    not. Under mixed_float16 the optimizer is wrapped in Keras' dynamic loss scaler."""
    optimizer = _optimizer(config, total_steps)
    if config.exclude_bias_and_norm_from_weight_decay:
        optimizer.exclude_from_weight_decay(var_list=weight_decay_exempt(model))
    if config.mixed_precision == "mixed_float16":
        return keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def apply_summed_gradients(optimizer):
    """Makes `optimizer` apply, in a replica context, the gradients it is given as they are, instead of summing them
    over the replicas first as Keras 3 always does (with no switch to skip it); returns the optimizer.

    For research/train_lib.py's step, which sums the gradient over replicas itself, once, so that the norm it clips
    and checks is the global batch's: Keras' own sum would be a second all-reduce of every gradient on every step.
    Keras 3.15 sums in TFOptimizer._all_reduce_sum_gradients (keras/src/backend/tensorflow/optimizer.py), called
    by every apply (a LossScaleOptimizer's too, through its inner optimizer): that method is replaced on this
    object. A Keras without it is an error here, not a silent second sum; tests/test_large_batch.py counts the
    all-reduces of the traced step. Not for an optimizer that Keras fit drives (it passes per-replica gradients).
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not callable(getattr(type(inner), "_all_reduce_sum_gradients", None)):
        raise RuntimeError(f"this Keras ({keras.__version__}) has no TFOptimizer._all_reduce_sum_gradients to "
                           "skip: update research/optim.py apply_summed_gradients")
    inner._all_reduce_sum_gradients = list  # (grads, variables) pairs in, the same pairs out.
    return optimizer


def weight_decay_exempt(model):
    """The variables ImageNet recipes leave undecayed: every one of rank <= 1 (biases, batch/layer-norm scales and
    offsets), and what the model lists in `no_weight_decay()` (research/models: ViT's position embeddings)."""
    listed = {id(v) for v in getattr(model, "no_weight_decay", list)()}
    return [v for v in model.trainable_variables if len(v.shape) <= 1 or id(v) in listed]


def _optimizer(config, total_steps):
    lr = learning_rate(config, total_steps)
    decay = config.weight_decay or None
    if config.optimizer == "adam":
        return keras.optimizers.Adam(lr, weight_decay=decay)
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=config.weight_decay or 0.004)
    if config.optimizer == "adamax":
        return keras.optimizers.Adamax(lr, weight_decay=decay)
    if config.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(lr, momentum=config.momentum, weight_decay=decay)
    return keras.optimizers.SGD(lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=decay)


def per_example_loss(targets, logits, label_smoothing=0.0):
    """Softmax cross-entropy from logits, shape [batch]. `targets` are class ids [batch], or class probabilities
    [batch, classes] (mixup/cutmix, research/mix.py); label smoothing mixes either with the uniform distribution:
    (1 - label_smoothing) * targets + label_smoothing / classes."""
    if targets.shape.rank == 1 and not label_smoothing:
        return tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
    num_classes = tf.shape(logits)[-1]
    if targets.shape.rank == 1:
        targets = tf.one_hot(targets, num_classes)
    targets = targets * (1.0 - label_smoothing) + label_smoothing / tf.cast(num_classes, tf.float32)
    return tf.nn.softmax_cross_entropy_with_logits(targets, logits)
