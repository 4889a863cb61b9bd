"""Export a run's model for serving: `python -m research.export --model_dir=RUN --output=DIR [--checkpoint=...]`.

DIR becomes a TensorFlow SavedModel whose `serving_default` signature takes uint8 images [N, H, W, C] of any size
(one size per request) and returns {"probabilities": float32 [N, classes], "class_ids": int64 [N]}; the run's
evaluation preprocessing (resize or resize and centre crop, scaling, normalization: research/data/preprocess.py,
recorded in dataset.json) is inside, so clients send raw pixels and a photo is classified as evaluation saw it.
The `serving_encoded` signature takes the JPEG/PNG file bytes instead (`encoded`: string [N]). TF Serving loads it
from a numbered version directory (e.g. --output=exports/mnist/1). The class names travel with it as the string
variable `class_names`.

DIR/model.keras is the same model as a Keras file (preprocessed model inputs in, logits out), for
`keras.saving.load_model(path, safe_mode=True)` once `research.models` is imported (which registers the model
classes with Keras).

The export is staged next to DIR, loaded back both ways and checked to reproduce the checkpoint's predictions,
and only then moved to DIR, so a failed export leaves nothing behind.
"""

import os
import shutil
import sys
import tempfile

from research import cli

PARSER = cli.run_tool_parser("python -m research.export", __doc__)
PARSER.add_argument("--output", required=True, help="New directory for the SavedModel and model.keras.")

if __name__ == "__main__":  # Before TensorFlow loads (seconds): a wrong command line answers at once.
    cli.start()
    _args = cli.parse_args(PARSER)
    cli.check_model_dir(_args.model_dir)
    cli.check_lasting(_args.output, "--output")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from research import UserError, run_dir, runs  # noqa: E402
from research.data import preprocess  # noqa: E402

KERAS_FILE = "model.keras"
TOLERANCE = 1e-5  # Largest difference in any probability between the checkpoint and its reloaded export.


class Serving(tf.Module):
    """What the SavedModel holds: the model, its class names, and the serving functions (uint8 pixels or file
    bytes in)."""

    def __init__(self, model, preprocessing, class_names):
        super().__init__()
        self.model = model
        self.preprocessing = preprocessing
        self.class_names = tf.Variable(class_names, trainable=False, name="class_names")
        channels = preprocessing.channels
        self.serve = tf.function(
            self._serve, input_signature=[tf.TensorSpec([None, None, None, channels], tf.uint8, name="images")])
        self.serve_encoded = tf.function(
            self._serve_encoded, input_signature=[tf.TensorSpec([None], tf.string, name="encoded")])

    def _classify(self, inputs):
        probabilities = tf.nn.softmax(self.model(inputs, training=False))
        return {"probabilities": probabilities, "class_ids": tf.argmax(probabilities, axis=-1)}

    def _serve(self, images):
        return self._classify(self.preprocessing.eval_images(images))

    def _serve_encoded(self, encoded):
        prep = self.preprocessing
        inputs = tf.map_fn(lambda e: prep.eval_images(preprocess.decode(e, prep.channels)), encoded,
                           fn_output_signature=tf.TensorSpec([*prep.image_size, prep.channels], tf.float32))
        return self._classify(inputs)


def export(model_dir, output, checkpoint="latest"):
    """Writes the SavedModel and model.keras to `output` (which must not exist, or be empty); returns the
    checkpoint path exported."""
    restored = runs.load_model(model_dir, checkpoint)
    run_dir.check_filesystem(output, "--output")
    if run_dir.exists(output) and not (run_dir.isdir(output) and not run_dir.listdir(output)):
        raise UserError(f"--output={output} already exists; choose a new directory")
    # Staged on local disk: beside `output`, which it then becomes by a rename; for a URL (an object store, where
    # directories cannot be renamed) in a local temporary directory, copied up once verified.
    if run_dir.is_url(output):
        staging = tempfile.mkdtemp(prefix="export")
    else:
        output = os.path.abspath(output)
        staging = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)  # Left by an export killed with this same process id.
        try:
            os.makedirs(staging)
        except OSError as e:
            raise UserError(f"cannot write {os.path.dirname(output)}: {e.strerror}") from None
    try:
        module = Serving(restored.model, restored.dataset.preprocessing, restored.dataset.class_names)
        tf.saved_model.save(module, staging, signatures={"serving_default": module.serve,
                                                         "serving_encoded": module.serve_encoded})
        _save_keras(restored.model, os.path.join(staging, KERAS_FILE), restored.config.model)
        _verify(staging, restored)
        if run_dir.is_url(output):
            run_dir.copy_tree(staging, output)
        else:
            if os.path.isdir(output):
                os.rmdir(output)
            os.rename(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return restored.checkpoint


def _save_keras(model, path, name):
    try:
        model.save(path)
    except (NotImplementedError, TypeError, ValueError) as e:
        raise UserError(f"--model={name} cannot be saved as a Keras file: its class needs get_config() and "
                        f"@register_keras_serializable (as in research/models/cnn.py): "
                        f"{str(e).strip().splitlines()[0]}") from None


def _verify(directory, restored):
    """Every reloaded form must give the restored model's probabilities on the same (random) images: pixels at
    the model's input size and at another, and the same pixels as PNG files."""
    prep = restored.dataset.preprocessing
    rng = np.random.default_rng(0)
    sizes = [restored.dataset.image_shape[:2], (prep.image_size[0] + 7, prep.image_size[1] * 2)]
    images = [rng.integers(0, 256, [4, *size, prep.channels], dtype=np.uint8) for size in sizes]
    expected = [tf.nn.softmax(restored.model(prep.eval_images(x), training=False)).numpy() for x in images]
    loaded = tf.saved_model.load(directory)
    with runs.float32_policy():  # As the model was rebuilt: Keras builds the reloaded layers under the global policy.
        reloaded = keras.saving.load_model(os.path.join(directory, KERAS_FILE), safe_mode=True)
    encoded = tf.stack([tf.io.encode_png(x) for x in images[1]])
    outputs = {"SavedModel": [loaded.signatures["serving_default"](images=tf.constant(x))["probabilities"].numpy()
                              for x in images],
               "SavedModel, encoded images": [expected[0], loaded.signatures["serving_encoded"](
                   encoded=encoded)["probabilities"].numpy()],
               "Keras file": [tf.nn.softmax(reloaded(prep.eval_images(x), training=False)).numpy() for x in images]}
    for form, probabilities in outputs.items():
        difference = max(float(np.abs(p - e).max()) for p, e in zip(probabilities, expected))
        if difference > TOLERANCE:
            raise UserError(f"the exported {form} does not reproduce the checkpoint's predictions "
                            f"(probabilities differ by up to {difference:.3g}); nothing was written")


def _main(argv):
    args = PARSER.parse_args(argv)
    path = export(args.model_dir, args.output, args.checkpoint)
    print(f"exported {path} to {args.output} (SavedModel, signature serving_default) "
          f"and {run_dir.join(args.output, KERAS_FILE)}")


def main(argv=None):
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
