"""The tutorials' multilayer perceptrons: Flatten -> Dense(relu)... -> optional Dropout -> Dense(classes)."""

import tensorflow as tf

from research.models import register


class MLP(tf.keras.Model):
    def __init__(self, hidden_units, num_classes, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
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


@register("mlp")
def mlp(config, dataset):
    return MLP(config.hidden_units, dataset.num_classes, config.dropout, name="mlp")
