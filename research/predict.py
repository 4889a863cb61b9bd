"""Classify image files with a run's model: `python -m research.predict --model_dir=RUN [--top_k=3] IMAGE...`.

Prints one line per image, `PATH: NAME PROBABILITY, ...` with the top-k classes. Any image file TensorFlow decodes
(JPEG, PNG, GIF, BMP, WebP, JPEG XL), grayscale, colour or 16-bit, of any size, is decoded to the model's channels
and preprocessed exactly as the run's evaluation and its export do (research/data/preprocess.py, as recorded in the
run's dataset.json: resized, or resized and centre-cropped, scaled and normalized), so the probabilities are the
served model's. The images are taken as they are: a model trained on MNIST expects a light digit on a dark
background.

An image that cannot be read gets one `error: ...` line on stderr and the others are still classified; the exit
status is then 1. A problem with the run itself (or the arguments) is one line and exit status 2.
"""

import os
import sys

from research import cli

PARSER = cli.run_tool_parser("python -m research.predict", __doc__)
PARSER.add_argument("--top_k", type=int, default=3, help="How many of the most probable classes to show.")
PARSER.add_argument("images", nargs="+", metavar="IMAGE", help="Image files.")

if __name__ == "__main__":  # Before TensorFlow loads (seconds): a wrong command line answers at once.
    cli.start()
    cli.check_model_dir(cli.parse_args(PARSER).model_dir)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from research import UserError, runs  # noqa: E402
from research.data import preprocess  # noqa: E402

BATCH = 256


def read_image(path, channels):
    """The file as uint8 [H, W, channels] at its own size, decoded by the very function (research/data/preprocess.py)
    that evaluation and the exported model decode with; a UserError names what is wrong."""
    if channels not in (1, 3):
        raise UserError(f"the model takes {channels}-channel images; only 1 (grayscale) or 3 (RGB) can be read")
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path}: empty file")
    try:
        return preprocess.decode(tf.io.read_file(path), channels).numpy()
    except tf.errors.InvalidArgumentError as e:  # Not an image, truncated or corrupt, or over the pixel budget.
        raise UserError(f"{path}: {preprocess.decode_error_line(e)}") from None


def top_k(model, inputs, k):
    """[(class ids, probabilities)] of the k most probable classes of each model input, most probable first."""
    probabilities = np.concatenate([tf.nn.softmax(model(inputs[i:i + BATCH], training=False))
                                    for i in range(0, len(inputs), BATCH)])
    best = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return [(ids, probs[ids]) for ids, probs in zip(best, probabilities)]


def predict(restored, paths, k=3):
    """Classifies the files at `paths` with a `runs.load_model` result.

    Returns ([(path, [(class name, probability)]) for each readable file], [error line for each other one]).
    """
    if k < 1:
        raise UserError(f"--top_k must be at least 1, got {k}")
    images, readable, errors = [], [], []
    prep = restored.dataset.preprocessing
    for path in paths:
        try:
            images.append(prep.eval_images(read_image(path, prep.channels)).numpy())
            readable.append(path)
        except UserError as e:
            errors.append(str(e))
    if not images:
        return [], errors
    names = restored.dataset.class_names
    return [(path, [(names[i], float(p)) for i, p in zip(ids, probs)])
            for path, (ids, probs) in zip(readable, top_k(restored.model, np.stack(images), k))], errors


def _main(argv):
    args = PARSER.parse_args(argv)
    restored = runs.load_model(args.model_dir, args.checkpoint)
    results, errors = predict(restored, args.images, args.top_k)
    for path, classes in results:
        print(f"{path}: " + ", ".join(f"{name} {probability:.4f}" for name, probability in classes))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if errors else 0


def main(argv=None):
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
