"""The tutorials' multilayer perceptrons: Flatten -> Dense(relu)... -> optional Dropout -> Dense(classes)."""

import tensorflow as tf
from absl import flags

from research import UserError, config as config_lib
from research.config import CHECKPOINT, declare
from research.models._registry import register

declare(CHECKPOINT, flags.DEFINE_list(
    "hidden_units", ["128"], "mlp: width of each hidden Dense layer, e.g. '128,128'."),
        only_if=lambda c: c.model == "mlp", when="with --model=mlp")


@config_lib.checks
def _check_flags(config):
    try:
        config.hidden_units = [int(u) for u in config.hidden_units]
    except ValueError:
        raise UserError(f"--hidden_units must be integers, got {','.join(config.hidden_units)}") from None
    if not all(u > 0 for u in config.hidden_units):
        raise UserError("--hidden_units must be positive")


@tf.keras.utils.register_keras_serializable(package="research")
class MLP(tf.keras.Model):
    """Registered, with `get_config`, so that Keras can save and rebuild it (see research/export.py)."""

    def __init__(self, hidden_units, num_classes, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units, self.num_classes, self.dropout_rate = list(hidden_units), num_classes, dropout
        self.flatten = tf.keras.layers.Flatten()
        self.hidden = [tf.keras.layers.Dense(units, activation="relu") for units in hidden_units]
        # The tutorials put dropout after the hidden stack, right before the classifier.
        self.dropout = tf.keras.layers.Dropout(dropout) if dropout else None
        self.classifier = tf.keras.layers.Dense(num_classes, dtype="float32")  # float32 logits under mixed precision

    def call(self, images, training=False):
        x = self.flatten(images)
        for layer in self.hidden:
            x = layer(x)
        if self.dropout is not None:
            x = self.dropout(x, training=training)
        return self.classifier(x)

    def get_config(self):
        return {**super().get_config(), "hidden_units": self.hidden_units, "num_classes": self.num_classes,
                "dropout": self.dropout_rate}


@register("mlp", dropout=True)
def mlp(config, dataset):
    """Flatten, Dense+ReLU layers of --hidden_units, optional dropout, Dense to the classes (the tutorials' MLPs)."""
    return MLP(config.hidden_units, dataset.num_classes, config.dropout, name="mlp")
