"""The tutorials' convolutional networks.

Each class is registered with Keras and has `get_config`, so that `model.save("x.keras")` and
`keras.saving.load_model` (research/export.py) can rebuild it: Keras 3 cannot infer the constructor arguments of a
subclassed Model."""

import tensorflow as tf

from research.models._registry import register

layers = tf.keras.layers


@tf.keras.utils.register_keras_serializable(package="research")
class CNN(tf.keras.Model):
    """Conv32-Pool-Conv64-Pool-Conv128-Flatten-Dense(classes): 104,202 parameters on 28x28x1 with 10 classes."""

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.features = [
            layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(),
            layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(),
            layers.Conv2D(128, 3, activation="relu"), layers.Flatten(),
        ]
        self.classifier = layers.Dense(num_classes, dtype="float32")

    def call(self, images, training=False):
        x = images
        for layer in self.features:
            x = layer(x)
        return self.classifier(x)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


@tf.keras.utils.register_keras_serializable(package="research")
class CNNRGB(tf.keras.Model):
    """Conv32-Pool-Conv64-Pool-Flatten-Dense128-Dense(classes), for colour images of any size."""

    def __init__(self, num_classes, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.dropout_rate = num_classes, dropout
        self.features = [
            layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(),
            layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(),
            layers.Flatten(), layers.Dense(128, activation="relu"),
        ]
        self.dropout = layers.Dropout(dropout) if dropout else None
        self.classifier = layers.Dense(num_classes, dtype="float32")

    def call(self, images, training=False):
        x = images
        for layer in self.features:
            x = layer(x)
        if self.dropout is not None:
            x = self.dropout(x, training=training)
        return self.classifier(x)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "dropout": self.dropout_rate}


@register("cnn")
def cnn(config, dataset):
    """The Keras tutorial CNN: three convolutions, two max-pools, Dense (104,202 parameters on MNIST)."""
    return CNN(dataset.num_classes, name="cnn")


@register("cnn_rgb", dropout=True)
def cnn_rgb(config, dataset):
    """The colour-image tutorial CNN: two convolutions and pools, Dense 128, --dropout, Dense; any image size."""
    return CNNRGB(dataset.num_classes, config.dropout, name="cnn_rgb")
