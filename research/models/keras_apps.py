"""Every keras.applications image classifier as a model here: `--model=keras/<its Keras name>` (keras/ResNet50,
keras/EfficientNetV2S, keras/ConvNeXtTiny, ...), registered from the table ARCHITECTURES, one row per Keras module,
so that adding an application is one row (or one name in its row).

Each is `KerasApplication`: the application's network without its top (`include_top=False`, built by Keras itself
for the run's image size, which Keras checks against the network's minimum: 32 px for most, 71 for Xception, 75
for the Inceptions), then global average pooling, --dropout and a Dense head kept as `classifier`, which starts at
zero (big_vision's head_zeroinit: a fresh head gives every class the same probability, so a probe starts at the
chance loss). The model owns the application's input preprocessing: it takes images as the data pipeline gives
them (floats in [0, 1], --normalize=none), scales them to Keras' [0, 255] and applies the module's own
`keras.applications.<module>.preprocess_input` (caffe's BGR mean subtraction for ResNet and VGG, torch's mean and
deviation for DenseNet, [-1, 1] for Inception, Xception, MobileNet and NASNet, and nothing where the network
rescales inside, as EfficientNet, ConvNeXt and MobileNetV3 do), so that prediction, export, TFLite and serving all
carry it. Grayscale images are repeated to the three channels every backbone takes.

Capabilities, as `register` declares them (tests/test_keras_apps.py checks each against the model built):
  - dropout: --dropout before the head (ours; the Keras tops' own dropout goes with the top);
  - stochastic_depth: where the application has it. EfficientNet (v1 and v2) drops its residual branches at a rate
    rising over the blocks, which Keras builds at `drop_connect_rate=0.2`: rescaled here so that it reaches
    --stochastic_depth instead (Keras' default, 0.2, is what its ImageNet training used). ConvNeXt's
    `drop_path_rate` is set to --stochastic_depth, its branches dropped by Keras Dropout layers of one value per
    example (Keras' own StochasticDepth draws from the global generator, which checkpoints do not hold: a resumed
    run would drop others). The other applications have none;
  - batch_norm: all but ConvNeXt (layer norm) and VGG (no normalisation); --sync_batchnorm switches every
    batch-norm layer of the application to Keras' synchronized statistics;
  - blocks (--layer_decay): the application's layers grouped by the block their Keras name gives (`conv3_block2_`,
    `block3a_`, `stage_2_block_1_`, NASNet's cell ids); a layer without one (DenseNet's transitions, Xception's
    shortcuts) joins the block before it, those before the first block are the stem and those after the last
    (EfficientNet's top_conv, ResNetV2's post_bn) go with the head. The Inceptions name their convolutions by
    number alone, so their blocks are the layers between the concatenations that end each one (`mixed3`,
    `block17_5_conv`), and their first block goes with the stem;
  - head, and the channels they take: 1 or 3;
  - pretrained: --pretrained=imagenet or a Keras weights file (research/models/_keras_weights.py).
"""

import dataclasses
import functools
import inspect
import re
import sys
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from keras.src import layers as keras_layers

from research import UserError, config as config_lib
from research.models import _keras_weights
from research.models._registry import register

layers = tf.keras.layers
PREFIX = "keras/"


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One Keras module's networks and what this code needs to know of them."""
    module: str  # keras.applications.<module>: its networks and their preprocess_input.
    names: tuple  # Its networks (keras.applications.<name>), smallest first.
    blocks: str  # A regular expression on layer names: its groups name the block a layer is in.
    blocks_end: bool = False  # The expression matches instead the layer that ends each block.
    batch_norm: bool = True
    stochastic_depth: object = None  # (constructor, rate, **arguments) -> the network, dropping at `rate`.
    head: str = None  # The Keras top's Dense layer on globally pooled features, kept by --pretrained (None: not).
    imagenet_differs: object = None  # network -> None: makes it what Keras builds for weights="imagenet".


def _imagenet_rescaling(network):
    """EfficientNet (v1) built for ImageNet weights divides its normalised input once more by the square root of
    ImageNet's standard deviation (a layer Keras adds for weights="imagenet" alone: tensorflow#49930), which this
    network, built without weights, lacks: folded into its Normalization layer's variance, (x - mean) / sqrt(var)
    / sqrt(std) = (x - mean) / sqrt(var * std)."""
    module = sys.modules[keras.applications.EfficientNetB0.__module__]
    normalization = next(layer for layer in network.layers if isinstance(layer, layers.Normalization))
    variance = next(w for w in normalization.weights if w.path.endswith("variance"))
    variance.assign(variance.numpy() * np.array(module.IMAGENET_STDDEV_RGB, "float32"))


def _drop_connect(constructor, rate, base, **arguments):
    """EfficientNet's network, its drop-connect rates (built at the `base` function's default drop_connect_rate)
    scaled to reach `rate` (0: off; the layers stay, so that the variables are the same either way)."""
    network = constructor(**arguments)
    built_at = inspect.signature(getattr(sys.modules[constructor.__module__], base)).parameters[
        "drop_connect_rate"].default
    for layer in network.layers:
        if isinstance(layer, layers.Dropout) and layer.noise_shape is not None:
            layer.rate *= rate / built_at
    return network


def _drop_path(constructor, rate, **arguments):
    """ConvNeXt's network built with `drop_path_rate=rate`, each residual branch dropped by a Dropout of one value
    per example, seeded by its own SeedGenerator (a model variable: checkpointed, so a resume drops the same)."""
    module, build = sys.modules[constructor.__module__], sys.modules[constructor.__module__].ConvNeXt
    with mock.patch.object(module, "ConvNeXt", lambda **kwargs: build(**{**kwargs, "drop_path_rate": rate})), \
            mock.patch.object(module, "StochasticDepth", lambda drop_path_rate, name=None: layers.Dropout(
                drop_path_rate, noise_shape=(None, 1, 1, 1), name=name)):
        return constructor(**arguments)


ARCHITECTURES = (  # MobileNetV3 first: the smallest, what the tests of every family train (models.families()).
    Architecture("mobilenet_v3", ("MobileNetV3Small", "MobileNetV3Large"), r"^expanded_conv(_\d+)?_"),
    Architecture("convnext", ("ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtXLarge"),
                 r"_stage_(\d+)_block_(\d+)_", batch_norm=False, stochastic_depth=_drop_path),
    Architecture("densenet", ("DenseNet121", "DenseNet169", "DenseNet201"), r"^conv(\d+)_block(\d+)_",
                 head="predictions"),
    Architecture("efficientnet", tuple(f"EfficientNetB{i}" for i in range(8)), r"^block(\d+)([a-z])_",
                 stochastic_depth=functools.partial(_drop_connect, base="EfficientNet"), head="predictions",
                 imagenet_differs=_imagenet_rescaling),
    Architecture("efficientnet_v2", ("EfficientNetV2B0", "EfficientNetV2B1", "EfficientNetV2B2", "EfficientNetV2B3",
                                     "EfficientNetV2S", "EfficientNetV2M", "EfficientNetV2L"), r"^block(\d+)([a-z])_",
                 stochastic_depth=functools.partial(_drop_connect, base="EfficientNetV2"), head="predictions"),
    Architecture("inception_resnet_v2", ("InceptionResNetV2",), r"^(mixed_\w+|block\d+_\d+_conv)$", blocks_end=True,
                 head="predictions"),
    Architecture("inception_v3", ("InceptionV3",), r"^mixed\d+$", blocks_end=True, head="predictions"),
    Architecture("mobilenet", ("MobileNet",), r"^conv_(?:dw|pw|pad)_(\d+)", head="conv_preds"),
    Architecture("mobilenet_v2", ("MobileNetV2",), r"^(?:block_(\d+)|expanded_conv)_", head="predictions"),
    Architecture("nasnet", ("NASNetMobile", "NASNetLarge"), r"(?:normal|reduction|adjust)\w*?_((?:stem_|reduce_)?\d+)$",
                 head="predictions"),
    Architecture("resnet", ("ResNet50", "ResNet101", "ResNet152"), r"^conv(\d+)_block(\d+)_", head="predictions"),
    Architecture("resnet_v2", ("ResNet50V2", "ResNet101V2", "ResNet152V2"), r"^conv(\d+)_block(\d+)_",
                 head="predictions"),
    Architecture("vgg16", ("VGG16",), r"^block(\d+)_", batch_norm=False),  # Keras' top: Flatten and three Dense.
    Architecture("vgg19", ("VGG19",), r"^block(\d+)_", batch_norm=False),
    Architecture("xception", ("Xception",), r"^block(\d+)_", head="predictions"),
)
ARCHITECTURE = {name: architecture for architecture in ARCHITECTURES for name in architecture.names}


@tf.keras.utils.register_keras_serializable(package="research")
class LiveNormalization(layers.Normalization):
    """Keras' Normalization, computing with its mean and variance variables as they are at each call. Keras' own
    computes with copies it takes when built and after its own loads (finalize_state), so that weights assigned by
    --pretrained, or restored from a checkpoint, would not reach its computation (EfficientNet's input
    normalisation: a resumed run would compute with the initial zero mean and unit variance)."""

    def call(self, inputs):
        if self.input_mean is not None:  # Constants given to the constructor (EfficientNetV2, ConvNeXt): Keras'.
            return super().call(inputs)
        inputs = tf.cast(inputs, self.compute_dtype)
        mean = tf.cast(tf.reshape(self.adapt_mean, self._broadcast_shape), self.compute_dtype)
        variance = tf.cast(tf.reshape(self.adapt_variance, self._broadcast_shape), self.compute_dtype)
        return (inputs - mean) / tf.maximum(tf.sqrt(variance), keras.config.epsilon())


def network(application, image_shape, stochastic_depth=0.0, sync_batchnorm=False):
    """keras.applications.<application> without its top, for images of `image_shape` (three channels), untrained."""
    architecture, constructor = ARCHITECTURE[application], getattr(keras.applications, application)
    arguments = dict(include_top=False, weights=None, input_shape=(*image_shape[:2], 3))
    try:
        with mock.patch.object(keras_layers, "Normalization", LiveNormalization):  # What the applications call.
            if architecture.stochastic_depth:
                built = architecture.stochastic_depth(constructor, stochastic_depth, **arguments)
            else:
                built = constructor(**arguments)
    except ValueError as e:  # Keras' own checks: the image size below the network's minimum, mostly.
        raise UserError(f"--model={PREFIX}{application} does not fit {image_shape[0]}x{image_shape[1]} images: "
                        f"{str(e).strip().splitlines()[0]}") from None
    for layer in built._flatten_layers():
        if isinstance(layer, layers.BatchNormalization):
            layer.synchronized = sync_batchnorm  # Read at each call (keras.ops.moments(synchronized=...)).
    return built


class Block:
    """A group of the application's layers, for --layer_decay (research/transfer.py reads `variables`)."""

    def __init__(self, layer_list):
        self.variables = [v for layer in layer_list for v in layer.variables]


def blocks_of(built, architecture):
    """The network's layers grouped into blocks, in order (see the module docstring)."""
    pattern, all_layers = re.compile(architecture.blocks), built.layers
    matched = [i for i, layer in enumerate(all_layers) if pattern.search(layer.name)]
    if not matched:
        return []
    if architecture.blocks_end:  # A block ends at each match; up to the first: the stem; after the last: the top.
        groups = [all_layers[start + 1:end + 1] for start, end in zip(matched, matched[1:])]
    else:  # Keyed by the name's groups (NASNet's cells interleave); unnamed layers join the block before them.
        keyed, key = {}, None
        for i in range(matched[0], matched[-1] + 1):
            found = pattern.search(all_layers[i].name)
            key = (found.groups() or found.group(0)) if found else key
            keyed.setdefault(key, []).append(all_layers[i])
        groups = list(keyed.values())
    blocks = [Block(group) for group in groups]
    return [block for block in blocks if block.variables]


@tf.keras.utils.register_keras_serializable(package="research")
class KerasApplication(tf.keras.Model):
    """The application's preprocessing, its network without top, global average pooling, dropout, a zero head."""

    def __init__(self, application, image_shape, num_classes, dropout=0.0, stochastic_depth=0.0,
                 sync_batchnorm=False, **kwargs):
        super().__init__(**kwargs)
        self.application, self.image_shape, self.num_classes = application, tuple(image_shape), num_classes
        self.dropout_rate, self.stochastic_depth, self.sync_batchnorm = dropout, stochastic_depth, sync_batchnorm
        self.backbone = network(application, image_shape, stochastic_depth, sync_batchnorm)
        self.pool = layers.GlobalAveragePooling2D()
        self.dropout = layers.Dropout(dropout) if dropout else None
        self.classifier = layers.Dense(num_classes, kernel_initializer="zeros", dtype="float32")

    @property
    def architecture(self):
        return ARCHITECTURE[self.application]

    @property
    def blocks(self):
        return blocks_of(self.backbone, self.architecture)

    def features(self, images, training=False):
        """The pooled features of images in [0, 1] ([..., H, W, 1 or 3]): what the head reads."""
        if images.shape[-1] == 1:
            images = tf.repeat(images, 3, axis=-1)
        preprocess = getattr(keras.applications, self.architecture.module).preprocess_input
        return self.pool(self.backbone(preprocess(images * 255.0), training=training))

    def call(self, images, training=False):
        x = self.features(images, training=training)
        if self.dropout is not None:
            x = self.dropout(x, training=training)
        return self.classifier(x)

    def get_config(self):
        return {**super().get_config(), "application": self.application, "image_shape": list(self.image_shape),
                "num_classes": self.num_classes, "dropout": self.dropout_rate,
                "stochastic_depth": self.stochastic_depth, "sync_batchnorm": self.sync_batchnorm}


def _register(application):
    architecture = ARCHITECTURE[application]

    def build(config, dataset):
        return KerasApplication(application, dataset.image_shape, dataset.num_classes, config.dropout,
                                config.stochastic_depth, config.sync_batchnorm, name=f"keras_{application}")

    def pretrained(model, source, config):
        return _keras_weights.load(model, source, config, architecture)

    build.__doc__ = (f"keras.applications.{application} without its top ({architecture.module} preprocessing "
                     "inside), pooling, a zero-initialised head.")
    register(PREFIX + application, dropout=True, stochastic_depth=architecture.stochastic_depth is not None,
             batch_norm=architecture.batch_norm, blocks=True, channels=(1, 3), pretrained=pretrained)(build)


for _application in ARCHITECTURE:
    _register(_application)


@config_lib.checks
def _check_flags(config):
    normalize = getattr(config, "normalize", "none")  # (research/data's flag: absent where it is not imported.)
    config_lib.need(not config.model.startswith(PREFIX) or normalize == "none",
                    f"--model={config.model} preprocesses its inputs itself, as its Keras application expects: "
                    f"use --normalize=none, not --normalize={normalize}")
