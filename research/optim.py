"""Optimizer, learning-rate schedule and loss, from flags.

The optimizers are one table, OPTIMIZERS: a name, its Keras class, the flags of this module it reads beyond the
rate and weight decay, and its own weight decay when --weight_decay is left at 0. The --optimizer choices (checked
against the table, as --model against its registry), its help, and the `only_if` of --momentum, --nesterov and
--exclude_bias_and_norm_from_weight_decay are made from it, so adding an optimizer is one line here.
"""

import dataclasses
import types

import tensorflow as tf
from absl import flags

from research import config as config_lib, transfer
from research.config import CHECKPOINT, TUNABLE, declare

keras = tf.keras


@dataclasses.dataclass(frozen=True)
class Optimizer:
    keras_class: type  # Built with the learning-rate schedule, its weight decay and the `reads` flags' values.
    reads: tuple = ()  # Names of the flags below it takes as constructor arguments (momentum, nesterov).
    weight_decay: float = None  # Its decoupled weight decay when --weight_decay is 0 (None: none).


OPTIMIZERS = {
    "adam": Optimizer(keras.optimizers.Adam),
    "adamax": Optimizer(keras.optimizers.Adamax),
    "adamw": Optimizer(keras.optimizers.AdamW, weight_decay=0.004),  # Keras' default.
    "lamb": Optimizer(keras.optimizers.Lamb),  # You et al. 2020: Adam with a per-layer trust ratio.
    "lion": Optimizer(keras.optimizers.Lion),  # Chen et al. 2023: sign updates; takes a rate 3-10x lower than Adam's.
    "rmsprop": Optimizer(keras.optimizers.RMSprop, reads=("momentum",)),
    "sgd": Optimizer(keras.optimizers.SGD, reads=("momentum", "nesterov")),
}


def _only_for(flag):
    """The `only_if` and `when` of a flag that only the optimizers whose entry `reads` it take."""
    names = [name for name, entry in OPTIMIZERS.items() if flag in entry.reads]
    return dict(only_if=lambda c: flag in OPTIMIZERS[c.optimizer].reads,
                when=f"with --optimizer={' or '.join(names)}")


def _with_own_weight_decay():
    return {name: entry.weight_decay for name, entry in OPTIMIZERS.items() if entry.weight_decay}


declare(CHECKPOINT, flags.DEFINE_string(
    "optimizer", "rmsprop", "Optimizer, one of research/optim.py's OPTIMIZERS (Keras' class of that name): "
    + ", ".join(name + (f" (--{', --'.join(entry.reads)})" if entry.reads else "")
                for name, entry in OPTIMIZERS.items()) + "."))
declare(CHECKPOINT, flags.DEFINE_float("momentum", 0.0, "Momentum, of the optimizers that take it (--optimizer)."),
        **_only_for("momentum"))
declare(TUNABLE, flags.DEFINE_boolean("nesterov", False, "Nesterov momentum, where --optimizer takes it."),
        **_only_for("nesterov"))
declare(TUNABLE, flags.DEFINE_float(
    "weight_decay", 0.0, "Decoupled weight decay for any optimizer (" + ", ".join(
        f"{name}: {decay} if left at 0" for name, decay in _with_own_weight_decay().items()) + ")."))
declare(TUNABLE, flags.DEFINE_boolean(
    "exclude_bias_and_norm_from_weight_decay", False,
    "Decay only the weights of rank >= 2 (kernels, embeddings), skipping biases, batch/layer-norm "
    "scales and offsets, and what a model lists in no_weight_decay() (ViT's class token and position "
    "embeddings), as ImageNet recipes do."),
        only_if=lambda c: c.weight_decay > 0 or OPTIMIZERS[c.optimizer].weight_decay is not None,
        when=f"with --weight_decay or {' or '.join(_with_own_weight_decay())}")


@config_lib.checks
def _check_flags(config):
    config_lib.need(config.optimizer in OPTIMIZERS,
                    f"--optimizer={config.optimizer} is unknown; choose from {', '.join(OPTIMIZERS)}")
    config_lib.need(0 <= config.momentum < 1, "--momentum must be in [0, 1)")
    config_lib.need(config.weight_decay >= 0, "--weight_decay must be >= 0")


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
    not. Under mixed_float16 the optimizer is wrapped in Keras' dynamic loss scaler. With --layer_decay each
    variable trains at its own share of the rate (RateScales)."""
    layer_rates = config.layer_decay != 1 and config.trainable == "all"
    optimizer = _optimizer(config, total_steps, transfer.layer_rate_scales(model, config) if layer_rates else None)
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


def _optimizer(config, total_steps, rate_scales):
    entry = OPTIMIZERS[config.optimizer]
    optimizer_class = entry.keras_class
    options = dict(weight_decay=config.weight_decay or entry.weight_decay,
                   **{flag: getattr(config, flag) for flag in entry.reads})
    if rate_scales is None:
        return optimizer_class(learning_rate(config, total_steps), **options)
    optimizer_class = type(f"{optimizer_class.__name__}WithRateScales", (RateScales, optimizer_class), {})
    optimizer = optimizer_class(learning_rate(config, total_steps), **options)
    optimizer.set_rate_scales(rate_scales)
    return optimizer


class RateScales:
    """Mixin for a Keras optimizer class: each variable trains at the schedule's rate times a scale of its own
    (--layer_decay). The scale enters `update_step`, where Keras hands the optimizer its rate: scaling gradients
    instead would be undone by Adam's, Adamax's and RMSprop's normalisation by their magnitude. Decoupled weight
    decay follows each variable's scaled rate too, as in timm's and BEiT's parameter groups (Keras itself decays
    every variable at the unscaled rate, before the updates; per variable, decay then update is the same)."""

    def set_rate_scales(self, scales):
        """`scales`: [(variable, scale)] for every variable the optimizer trains. Call before building it."""
        self._rate_scales = types.MappingProxyType({self._var_key(v): float(s) for v, s in scales})

    def rate_scale(self, variable):
        return self._rate_scales[self._var_key(variable)]

    def update_step(self, gradient, variable, learning_rate):
        rate = learning_rate * self.rate_scale(variable)
        if self.weight_decay is not None and self._use_weight_decay(variable):
            self.assign_sub(variable, variable * tf.cast(self.weight_decay, variable.dtype)
                            * tf.cast(rate, variable.dtype))
        super().update_step(gradient, variable, rate)

    def _apply_weight_decay(self, variables):
        """Nothing: update_step decays each variable at its own rate."""


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
