"""Image classification research codebase: TFDS input, Keras models, a hand-written tf.distribute loop."""

import os

# TensorFlow's C++ INFO lines (oneDNN notices, CPU feature banners) drown the training log; warnings still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


class UserError(Exception):
    """A mistake in flags, files or data that the user can fix: reported as one line, exit status 2."""
