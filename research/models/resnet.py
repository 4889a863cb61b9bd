"""A small residual network with batch norm, for recipes that go past the tutorials' networks.

Stem conv, then one residual block per stage; every stage after the first halves the resolution. With the default
`--widths=32,64,128` on 28x28x1 it has about 0.3 M parameters. Registered with Keras and with `get_config`, so
`.keras` saving can rebuild it.
"""

import tensorflow as tf

from research.models import register

layers = tf.keras.layers


@tf.keras.utils.register_keras_serializable(package="research")
class ResidualBlock(layers.Layer):
    """conv-BN-ReLU-conv-BN plus the input (projected by a strided 1x1 conv when the shape changes), then ReLU."""

    def __init__(self, channels, stride=1, **kwargs):
        super().__init__(**kwargs)
        self.channels, self.stride = channels, stride
        self.conv1 = layers.Conv2D(channels, 3, strides=stride, padding="same", use_bias=False)
        self.bn1 = layers.BatchNormalization()
        self.conv2 = layers.Conv2D(channels, 3, padding="same", use_bias=False)
        self.bn2 = layers.BatchNormalization(gamma_initializer="zeros")  # Each block starts as the identity.
        self.project = None

    def build(self, input_shape):
        if self.stride != 1 or input_shape[-1] != self.channels:
            self.project = layers.Conv2D(self.channels, 1, strides=self.stride, use_bias=False)
            self.project_bn = layers.BatchNormalization()

    def call(self, x, training=False):
        y = tf.nn.relu(self.bn1(self.conv1(x), training=training))
        y = self.bn2(self.conv2(y), training=training)
        shortcut = x if self.project is None else self.project_bn(self.project(x), training=training)
        return tf.nn.relu(y + shortcut)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "stride": self.stride}


@tf.keras.utils.register_keras_serializable(package="research")
class ResNetSmall(tf.keras.Model):
    def __init__(self, widths, num_classes, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.widths, self.num_classes, self.dropout_rate = list(widths), num_classes, dropout
        self.stem = layers.Conv2D(widths[0], 3, padding="same", use_bias=False)
        self.stem_bn = layers.BatchNormalization()
        self.blocks = [ResidualBlock(w, stride=1 if i == 0 else 2) for i, w in enumerate(widths)]
        self.pool = layers.GlobalAveragePooling2D()
        self.dropout = layers.Dropout(dropout) if dropout else None
        self.classifier = layers.Dense(num_classes, dtype="float32")

    def call(self, images, training=False):
        x = tf.nn.relu(self.stem_bn(self.stem(images), training=training))
        for block in self.blocks:
            x = block(x, training=training)
        x = self.pool(x)
        if self.dropout is not None:
            x = self.dropout(x, training=training)
        return self.classifier(x)

    def get_config(self):
        return {**super().get_config(), "widths": self.widths, "num_classes": self.num_classes,
                "dropout": self.dropout_rate}


@register("resnet_small")
def resnet_small(config, dataset):
    return ResNetSmall(config.widths, dataset.num_classes, config.dropout, name="resnet_small")
