"""Residual networks: `resnet_small` for MNIST-sized recipes, and ResNet v1.5 (`resnet18` ... `resnet152`).

resnet_small: stem conv, then one residual block per stage; every stage after the first halves the resolution.
With the default `--widths=32,64,128` on 28x28x1 it has about 0.3 M parameters.

Both take `--sync_batchnorm` (batch statistics over the global batch) and `--stochastic_depth` (each block's
residual branch dropped per example, at a rate rising linearly over the blocks: research/models/_shared.py), as
their registrations declare.

ResNet v1.5 is torchvision's ResNet (He et al. 2016 with the stride of each downsampling bottleneck on its 3x3
convolution rather than its first 1x1, the variant every ImageNet benchmark reports): the same layers, padding,
He (fan-out) initialisation and batch-norm settings, hence exactly torchvision's parameter counts (resnet18
11,689,512 and resnet50 25,557,032 at 1000 classes). All classes are registered with Keras and have `get_config`,
so `.keras` saving can rebuild them.
"""

import tensorflow as tf
from absl import flags

from research import UserError, config as config_lib
from research.config import CHECKPOINT, declare
from research.models._registry import register
from research.models._shared import drop_rates

layers = tf.keras.layers

declare(CHECKPOINT, flags.DEFINE_list(
    "widths", ["32", "64", "128"],
    "resnet_small: channels of the stem/first stage and of each later stage (each halves resolution)."),
        only_if=lambda c: c.model == "resnet_small", when="with --model=resnet_small")
declare(CHECKPOINT, flags.DEFINE_boolean(
    "zero_init_residual", True,
    "resnet18-152: start the last batch-norm scale of every residual block at 0, so that each block "
    "starts as the identity (Goyal et al. 2017, used by most ImageNet recipes); "
    "--nozero_init_residual starts it at 1, as torchvision does by default."),
        only_if=lambda c: c.model in {f"resnet{depth}" for depth in DEPTHS}, when="with --model=resnet18-152")

# Blocks per stage, and whether a block is the two-3x3 "basic" one or the 1x1-3x3-1x1 bottleneck (4x wider out).
DEPTHS = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)), 50: (True, (3, 4, 6, 3)),
          101: (True, (3, 4, 23, 3)), 152: (True, (3, 8, 36, 3))}
STAGE_WIDTHS = (64, 128, 256, 512)
# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"); batch norm with momentum 0.1 (Keras 0.9), eps 1e-5.
HE_NORMAL = tf.keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def _batch_norm(synchronized, **kwargs):
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=synchronized, **kwargs)



@config_lib.checks
def _check_flags(config):
    try:
        config.widths = [int(w) for w in config.widths]
    except ValueError:
        raise UserError(f"--widths must be integers, got {','.join(config.widths)}") from None
    if not (config.widths and all(w > 0 for w in config.widths)):
        raise UserError("--widths must be positive")


def drop_path(rate):
    """Stochastic depth's drop of a residual branch, for whole examples: Dropout with one mask value per example
    (which also rescales the kept ones by 1 / (1 - rate)), seeded by its Keras SeedGenerator, whose state is a
    model variable (checkpointed: a resumed run draws the same masks); None at rate 0."""
    return layers.Dropout(rate, noise_shape=(None, 1, 1, 1)) if rate else None


def _residual(branch, drop, training):
    return branch if drop is None else drop(branch, training=training)


@tf.keras.utils.register_keras_serializable(package="research")
class ResidualBlock(layers.Layer):
    """conv-BN-ReLU-conv-BN (dropped per example at `drop_rate` in training) plus the input (projected by a strided
    1x1 conv when the shape changes), then ReLU."""

    def __init__(self, channels, stride=1, sync_batchnorm=False, drop_rate=0.0, **kwargs):
        super().__init__(**kwargs)
        self.channels, self.stride, self.sync_batchnorm, self.drop_rate = channels, stride, sync_batchnorm, drop_rate
        self.conv1 = layers.Conv2D(channels, 3, strides=stride, padding="same", use_bias=False)
        self.bn1 = layers.BatchNormalization(synchronized=sync_batchnorm)
        self.conv2 = layers.Conv2D(channels, 3, padding="same", use_bias=False)
        self.bn2 = layers.BatchNormalization(gamma_initializer="zeros",  # Each block starts as the identity.
                                             synchronized=sync_batchnorm)
        self.drop = drop_path(drop_rate)
        self.project = None

    def build(self, input_shape):
        if self.stride != 1 or input_shape[-1] != self.channels:
            self.project = layers.Conv2D(self.channels, 1, strides=self.stride, use_bias=False)
            self.project_bn = layers.BatchNormalization(synchronized=self.sync_batchnorm)

    def call(self, x, training=False):
        y = tf.nn.relu(self.bn1(self.conv1(x), training=training))
        y = _residual(self.bn2(self.conv2(y), training=training), self.drop, training)
        shortcut = x if self.project is None else self.project_bn(self.project(x), training=training)
        return tf.nn.relu(y + shortcut)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "stride": self.stride,
                "sync_batchnorm": self.sync_batchnorm, "drop_rate": self.drop_rate}


@tf.keras.utils.register_keras_serializable(package="research")
class ResNetSmall(tf.keras.Model):
    def __init__(self, widths, num_classes, dropout=0.0, sync_batchnorm=False, stochastic_depth=0.0, **kwargs):
        super().__init__(**kwargs)
        self.widths, self.num_classes, self.dropout_rate = list(widths), num_classes, dropout
        self.sync_batchnorm, self.stochastic_depth = sync_batchnorm, stochastic_depth
        self.stem = layers.Conv2D(widths[0], 3, padding="same", use_bias=False)
        self.stem_bn = layers.BatchNormalization(synchronized=sync_batchnorm)
        self.blocks = [ResidualBlock(w, 1 if i == 0 else 2, sync_batchnorm, rate)
                       for i, (w, rate) in enumerate(zip(widths, drop_rates(stochastic_depth, len(widths))))]
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
                "dropout": self.dropout_rate, "sync_batchnorm": self.sync_batchnorm,
                "stochastic_depth": self.stochastic_depth}


@register("resnet_small", dropout=True, stochastic_depth=True, batch_norm=True, blocks=True)
def resnet_small(config, dataset):
    """A small ResNet with batch norm: stem conv and one residual block per --widths stage."""
    return ResNetSmall(config.widths, dataset.num_classes, config.dropout, config.sync_batchnorm,
                       config.stochastic_depth, name="resnet_small")


def _conv(filters, kernel, stride=1):
    """A bias-free, He-initialised convolution padded by kernel // 2 on every side, as torchvision pads: Keras'
    'same' would pad a strided convolution on the bottom and right only, sampling other pixels. One layer either
    way (a Sequential for padding + convolution), as SavedModel export tracks no variables in nested lists."""
    conv = layers.Conv2D(filters, kernel, strides=stride, use_bias=False, kernel_initializer=HE_NORMAL)
    return tf.keras.Sequential([layers.ZeroPadding2D(kernel // 2), conv]) if kernel > 1 else conv


@tf.keras.utils.register_keras_serializable(package="research")
class ResNetBlock(layers.Layer):
    """One v1.5 residual block: basic (3x3-3x3) or bottleneck (1x1-3x3 strided-1x1 at 4x width), each conv
    followed by batch norm, ReLU after all but the last (this branch dropped per example at `drop_rate` in
    training); plus the input, projected by a strided 1x1 conv and batch norm when the shape changes; then ReLU."""

    def __init__(self, width, stride=1, bottleneck=False, zero_init_residual=True, sync_batchnorm=False,
                 drop_rate=0.0, **kwargs):
        super().__init__(**kwargs)
        self.width, self.stride, self.bottleneck = width, stride, bottleneck
        self.zero_init_residual, self.sync_batchnorm, self.drop_rate = zero_init_residual, sync_batchnorm, drop_rate
        self.out_channels = 4 * width if bottleneck else width
        shapes = [(width, 1, 1), (width, 3, stride), (self.out_channels, 1, 1)] if bottleneck else [
            (width, 3, stride), (width, 3, 1)]
        self.convs = [_conv(*shape) for shape in shapes]
        self.norms = [_batch_norm(sync_batchnorm) for _ in shapes[:-1]] + [
            _batch_norm(sync_batchnorm, gamma_initializer="zeros" if zero_init_residual else "ones")]
        self.drop = drop_path(drop_rate)
        self.project = None

    def build(self, input_shape):
        if self.stride != 1 or input_shape[-1] != self.out_channels:
            self.project = layers.Conv2D(self.out_channels, 1, strides=self.stride, use_bias=False,
                                         kernel_initializer=HE_NORMAL)
            self.project_bn = _batch_norm(self.sync_batchnorm)

    def call(self, x, training=False):
        y = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            y = norm(conv(y), training=training)
            if i < len(self.convs) - 1:
                y = tf.nn.relu(y)
        shortcut = x if self.project is None else self.project_bn(self.project(x), training=training)
        return tf.nn.relu(_residual(y, self.drop, training) + shortcut)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "stride": self.stride, "bottleneck": self.bottleneck,
                "zero_init_residual": self.zero_init_residual, "sync_batchnorm": self.sync_batchnorm,
                "drop_rate": self.drop_rate}


@tf.keras.utils.register_keras_serializable(package="research")
class ResNet(tf.keras.Model):
    """ResNet v1.5 of `depth` 18, 34, 50, 101 or 152: 7x7/2 stem conv, batch norm, ReLU, 3x3/2 max-pool, four
    stages of 64, 128, 256 and 512 channels (each after the first starts with a stride-2 block), global average
    pooling, Dense to the classes (float32 logits under mixed precision)."""

    def __init__(self, depth, num_classes, zero_init_residual=True, sync_batchnorm=False, stochastic_depth=0.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.depth, self.num_classes, self.zero_init_residual = depth, num_classes, zero_init_residual
        self.sync_batchnorm, self.stochastic_depth = sync_batchnorm, stochastic_depth
        bottleneck, counts = DEPTHS[depth]
        self.stem = _conv(64, 7, 2)
        self.stem_bn = _batch_norm(sync_batchnorm)
        self.stem_pool = [layers.ZeroPadding2D(1), layers.MaxPooling2D(3, 2)]  # After ReLU, 0 pads as -inf does.
        shapes = [(width, 2 if stage and not i else 1)
                  for stage, (width, count) in enumerate(zip(STAGE_WIDTHS, counts)) for i in range(count)]
        self.blocks = [ResNetBlock(width, stride, bottleneck, zero_init_residual, sync_batchnorm, rate)
                       for (width, stride), rate in zip(shapes, drop_rates(stochastic_depth, len(shapes)))]
        self.pool = layers.GlobalAveragePooling2D()
        self.classifier = layers.Dense(num_classes, dtype="float32")

    def call(self, images, training=False):
        x = tf.nn.relu(self.stem_bn(self.stem(images), training=training))
        for layer in self.stem_pool:
            x = layer(x)
        for block in self.blocks:
            x = block(x, training=training)
        return self.classifier(self.pool(x))

    def get_config(self):
        return {**super().get_config(), "depth": self.depth, "num_classes": self.num_classes,
                "zero_init_residual": self.zero_init_residual, "sync_batchnorm": self.sync_batchnorm,
                "stochastic_depth": self.stochastic_depth}


def _register_resnet(depth):
    def build(config, dataset):
        return ResNet(depth, dataset.num_classes, config.zero_init_residual, config.sync_batchnorm,
                      config.stochastic_depth, name=f"resnet{depth}")
    build.__doc__ = (f"ResNet-{depth} v1.5 ({'bottleneck' if DEPTHS[depth][0] else 'basic'} blocks "
                     f"{'-'.join(map(str, DEPTHS[depth][1]))}), torchvision's layout; --zero_init_residual, "
                     "--stochastic_depth.")
    register(f"resnet{depth}", stochastic_depth=True, batch_norm=True, blocks=True)(build)


for _depth in DEPTHS:
    _register_resnet(_depth)
