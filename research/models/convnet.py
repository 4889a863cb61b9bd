"""A plain convolutional network written as a layer string, for recipes that search over architectures.

`--model=convnet --conv_layers=32c3v,32c3v,32c5s2,d,64c3v,64c3v,64c5s2,d,128c4v,d` reads left to right:
  `32c3`   a 3x3 convolution with 32 filters, 'same' padding, then batch norm and ReLU;
  `..s2`   ...with stride 2;  `..v`  ...with 'valid' padding (no border: 28x28 -> 26x26 for 3x3);
  `p`      2x2 max-pooling;   `d`    dropout at --dropout;
then Flatten and a Dense layer to the classes. Batch norm after every convolution is what lets these networks take
large learning rates, which is most of what makes configs/mnist_fast.cfg fast (`--sync_batchnorm`: their statistics
over the global batch rather than each replica's share). Registered with Keras and with
`get_config`, so `.keras` saving can rebuild it.
"""

import re

import tensorflow as tf
from absl import flags

from research import UserError, config as config_lib
from research.config import CHECKPOINT, declare
from research.models._registry import register

declare(CHECKPOINT, flags.DEFINE_list(
    "conv_layers", ["32c5s2v", "64c3s2v", "128c3v"],
    "convnet: its layers, e.g. '32c3v,32c5s2,d,64c3' (see research/models/convnet.py)."),
        only_if=lambda c: c.model == "convnet", when="with --model=convnet")

layers = tf.keras.layers

CONV = re.compile(r"(\d+)c(\d+)(?:s(\d+))?(v?)$")


def parse(spec):
    """The layer string as a list of ("conv", filters, kernel, stride, padding) / ("pool",) / ("dropout",)."""
    parsed = []
    for token in spec:
        match = CONV.match(token)
        if token in ("p", "d"):
            parsed.append(("pool",) if token == "p" else ("dropout",))
        elif match and int(match[1]) > 0 and int(match[2]) > 0 and int(match[3] or 1) > 0:
            parsed.append(("conv", int(match[1]), int(match[2]), int(match[3] or 1), "valid" if match[4] else "same"))
        else:
            raise UserError(f"--conv_layers: cannot read {token!r}; write e.g. 32c3, 64c5s2, 128c4v, p or d")
    if not any(layer[0] == "conv" for layer in parsed):
        raise UserError("--conv_layers needs at least one convolution, e.g. 32c3")
    return parsed


@config_lib.checks
def _check_flags(config):
    parse(config.conv_layers)


@tf.keras.utils.register_keras_serializable(package="research")
class ConvNet(tf.keras.Model):
    def __init__(self, conv_layers, num_classes, dropout=0.0, sync_batchnorm=False, **kwargs):
        super().__init__(**kwargs)
        self.conv_layers, self.num_classes, self.dropout_rate = list(conv_layers), num_classes, dropout
        self.sync_batchnorm = sync_batchnorm
        self.features = []
        for layer in parse(self.conv_layers):
            if layer[0] == "conv":
                _, filters, kernel, stride, padding = layer
                self.features += [layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False),
                                  layers.BatchNormalization(synchronized=sync_batchnorm), layers.ReLU()]
            elif layer[0] == "pool":
                self.features.append(layers.MaxPooling2D())
            elif dropout:
                self.features.append(layers.Dropout(dropout))
        self.flatten = layers.Flatten()
        self.classifier = layers.Dense(num_classes, dtype="float32")

    def call(self, images, training=False):
        x = images
        for layer in self.features:
            x = layer(x, training=training)
        return self.classifier(self.flatten(x))

    def get_config(self):
        return {**super().get_config(), "conv_layers": self.conv_layers, "num_classes": self.num_classes,
                "dropout": self.dropout_rate, "sync_batchnorm": self.sync_batchnorm}


@register("convnet", dropout=lambda config: "d" in config.conv_layers, batch_norm=True)
def convnet(config, dataset):
    """A plain conv stack with batch norm after every convolution, written as a layer string (--conv_layers)."""
    return ConvNet(config.conv_layers, dataset.num_classes, config.dropout, config.sync_batchnorm, name="convnet")
