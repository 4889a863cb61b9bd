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

DIR/model.tflite is the SavedModel's `serving_default` for TFLite at the training size (uint8 images [N, H, W, C]
in, float32; research/tflite.py); `--tflite_quantize=float16|int8` adds model.float16.tflite or model.int8.tflite,
which need the run's data (int8 calibrates on its training images; both are checked on its eval split).

The export is staged next to DIR, loaded back every way (`tf.saved_model.load`; the session loader that
`saved_model_cli run` and TF Serving use; Keras; the TFLite interpreter) and checked to reproduce the checkpoint's
predictions, and only then moved to DIR, so a failed export leaves nothing behind.
"""

import os
import shutil
import sys
import tempfile

from research import UserError, cli, fs

PARSER = cli.run_tool_parser("python -m research.export", __doc__)
PARSER.add_argument("--output", required=True,
                    help="New directory for the SavedModel, model.keras and the TFLite models (model.tflite unless "
                         "--no_tflite, and the quantised one of --tflite_quantize).")
# The choices are research/tflite.py's QUANTIZATIONS (which imports TensorFlow, not yet loaded here).
PARSER.add_argument("--tflite_quantize", default="none", choices=("none", "float16", "int8"),
                    help="Also write a quantised model.float16.tflite (half-precision weights) or model.int8.tflite "
                         "(8-bit weights and activations, calibrated on 300 of the run's training images), kept "
                         "only if its eval accuracy is within 1 point of float32's (default none: model.tflite, "
                         "float32, alone).")
PARSER.add_argument("--no_tflite", action="store_true",
                    help="Write no TFLite model (converting resnet18 or vit_ti16 takes 10-25 s on a CPU).")
cli.add_data_location(PARSER, "the data --tflite_quantize reads")

def check_output(output):
    """--output must name a directory to create or an empty one: never, say, the current directory by an empty
    value."""
    if not output or not output.strip():
        raise UserError("--output is empty: give the path of a new directory for the export")


if __name__ == "__main__":  # Before TensorFlow loads (seconds): a wrong command line answers at once.
    cli.start()
    _args = cli.parse_args(PARSER)
    cli.check_model_dir(_args.model_dir)
    cli.before_tensorflow(check_output, _args.output)
    cli.before_tensorflow(cli.check_lasting, _args.output, "--output")

import collections  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from research import runs, tflite  # noqa: E402
from research.data import preprocess  # noqa: E402

KERAS_FILE = "model.keras"
TOLERANCE = 1e-5  # Largest difference in any probability between the checkpoint and its reloaded export.
# What export() did: the checkpoint exported, and [(TFLite file name, bytes, eval accuracy or None, float32's)].
Exported = collections.namedtuple("Exported", "checkpoint tflite")


class Serving(tf.Module):
    """What the SavedModel holds: the serving functions (uint8 pixels or file bytes in), the variables they read,
    and the class names.

    The variables are the plain tf.Variables the functions capture, tracked here directly (as Keras' own
    `model.export()` does), and not the Keras model: Keras 3 wraps each tf.Variable in a keras.Variable whose
    SavedModel form is a *copy* of it, so the saved graph's restore op would fill the copies while the functions
    read the originals. `tf.saved_model.load` rebinds the functions by object and never notices; the session
    loader (saved_model_cli, TF Serving) runs the restore op and then fails with `Could not find variable`."""

    def __init__(self, model, preprocessing, class_names):
        super().__init__()
        self._model = lambda inputs: model(inputs, training=False)  # A function: no tracking of the model.
        self._preprocessing = preprocessing
        self.class_names = tf.Variable(class_names, trainable=False, name="class_names")
        channels = preprocessing.channels
        self.serve = tf.function(
            self.classify_images,
            input_signature=[tf.TensorSpec([None, None, None, channels], tf.uint8, name="images")])
        self.serve_encoded = tf.function(
            self._serve_encoded, input_signature=[tf.TensorSpec([None], tf.string, name="encoded")])
        self.model_variables = _captured_variables(self.serve, self.serve_encoded)

    def _classify(self, inputs):
        probabilities = tf.nn.softmax(self._model(inputs))
        return {"probabilities": probabilities, "class_ids": tf.argmax(probabilities, axis=-1)}

    def classify_images(self, images):
        """uint8 images [N, H, W, C] -> {"probabilities", "class_ids"} (also what the TFLite models compute)."""
        return self._classify(self._preprocessing.eval_images(images))

    def _serve_encoded(self, encoded):
        prep = self._preprocessing
        inputs = tf.map_fn(lambda e: prep.eval_images(preprocess.decode(e, prep.channels)), encoded,
                           fn_output_signature=tf.TensorSpec([*prep.image_size, prep.channels], tf.float32))
        return self._classify(inputs)


def _captured_variables(*functions):
    """The variables the functions read (traced here, for their single input signature), each once."""
    found = {}
    for function in functions:
        found.update((id(v), v) for v in function.get_concrete_function().variables)
    return list(found.values())


def export(model_dir, output, checkpoint="latest", tflite_quantize="none", write_tflite=True, data_dir=None,
           tfds_manual_dir=None, dataset=None):
    """Writes the SavedModel, model.keras and the TFLite models to `output` (which must not exist, or be empty);
    returns Exported(checkpoint path, TFLite files). `data_dir`, `tfds_manual_dir` and `dataset` say where the
    data that --tflite_quantize reads is now (runs.data_location)."""
    if tflite_quantize not in tflite.QUANTIZATIONS:
        raise UserError(f"--tflite_quantize={tflite_quantize}: choose from {', '.join(tflite.QUANTIZATIONS)}")
    if tflite_quantize != "none" and not write_tflite:
        raise UserError(f"--tflite_quantize={tflite_quantize} writes a TFLite model, which --no_tflite refuses")
    check_output(output)
    restored = runs.load_model(model_dir, checkpoint)
    fs.check_filesystem(output, "--output")
    if fs.exists(output) and not (fs.isdir(output) and not fs.listdir(output)):
        raise UserError(f"--output={output} already exists; choose a new directory")
    overrides = runs.data_location(model_dir, data_dir=data_dir, tfds_manual_dir=tfds_manual_dir, dataset=dataset)
    dataset = runs.load_dataset(model_dir, restored, **overrides) if tflite_quantize != "none" else None
    # Staged on local disk: beside `output`, which it then becomes by a rename; for a URL (an object store, where
    # directories cannot be renamed) in a local temporary directory, copied up once verified.
    if fs.is_url(output):
        staging = tempfile.mkdtemp(prefix="export")
    else:
        output = os.path.realpath(output)  # Staged on the filesystem of the directory it fills, even through a link.
        staging = os.path.join(os.path.dirname(output), f".{os.path.basename(output)}.tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)  # Left by an export killed with this same process id.
        try:
            os.makedirs(staging)
        except OSError as e:
            raise UserError(f"cannot write {os.path.dirname(output)}: {e.strerror}") from None
    try:
        return Exported(restored.checkpoint, _stage(staging, output, restored, tflite_quantize, write_tflite, dataset))
    except (tf.errors.OpError, OSError) as e:  # A full disk, no permission: whatever was staged goes.
        reason = cli.op_error_line(e) if isinstance(e, tf.errors.OpError) else f"{e.strerror}: {e.filename}"
        raise UserError(f"cannot write the export to {output}: {reason}; nothing was written") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stage(staging, output, restored, tflite_quantize, write_tflite, dataset):
    """Writes the export into `staging`, verifies it, and moves or copies it to `output`; returns the TFLite files."""
    module = Serving(restored.model, restored.dataset.preprocessing, restored.dataset.class_names)
    tf.saved_model.save(module, staging, signatures={"serving_default": module.serve,
                                                     "serving_encoded": module.serve_encoded})
    _save_keras(restored.model, os.path.join(staging, KERAS_FILE), restored.config.model)
    _verify(staging, restored)
    written = _write_tflite(staging, module, restored, tflite_quantize, dataset) if write_tflite else []
    if fs.is_url(output):
        fs.copy_tree(staging, output)
    elif os.path.isdir(output):  # An empty directory the user made (or a link to one) stays, and is filled.
        for name in os.listdir(staging):
            os.rename(os.path.join(staging, name), os.path.join(output, name))
    else:
        os.rename(staging, output)
    return written


def _write_tflite(directory, module, restored, quantize, dataset):
    """model.tflite, checked against the checkpoint, and the `quantize`d copy, checked on the eval split."""
    prep = restored.dataset.preprocessing
    content = tflite.convert(module.classify_images, module, prep)
    tflite.check_float(content, restored.model, prep)
    written = [(fs.write(os.path.join(directory, tflite.FLOAT_FILE), content), len(content), None, None)]
    if quantize != "none":
        calibration = tflite.calibration_images(dataset, restored.config) if quantize == "int8" else None
        quantised = tflite.convert(module.classify_images, module, prep, quantize, calibration)
        accuracy, float_accuracy = tflite.check_quantised(quantize, quantised, content, dataset)
        written.append((fs.write(os.path.join(directory, tflite.file_name(quantize)), quantised),
                        len(quantised), accuracy, float_accuracy))
    return [(os.path.basename(path), size, accuracy, float_accuracy)
            for path, size, accuracy, float_accuracy in written]


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
    encoded = tf.stack([tf.io.encode_png(x) for x in images[1]]).numpy()
    session = _session_outputs(directory, [("serving_default", {"images": x}) for x in images]
                               + [("serving_encoded", {"encoded": encoded})])
    outputs = {"SavedModel": [loaded.signatures["serving_default"](images=tf.constant(x))["probabilities"].numpy()
                              for x in images],
               "SavedModel, encoded images": [expected[0], loaded.signatures["serving_encoded"](
                   encoded=tf.constant(encoded))["probabilities"].numpy()],
               "SavedModel in the session loader (saved_model_cli, TF Serving)": session[:2],
               "SavedModel in the session loader, encoded images": [expected[0], session[2]],
               "Keras file": [tf.nn.softmax(reloaded(prep.eval_images(x), training=False)).numpy() for x in images]}
    for form, probabilities in outputs.items():
        difference = max(float(np.abs(p - e).max()) for p, e in zip(probabilities, expected))
        if difference > TOLERANCE:
            raise UserError(f"the exported {form} does not reproduce the checkpoint's predictions "
                            f"(probabilities differ by up to {difference:.3g}); nothing was written")


def _session_outputs(directory, requests):
    """The probabilities that TensorFlow's session-based loader computes, as `saved_model_cli run` and TF Serving
    load a SavedModel (a graph, its restore op, then session runs): one array for each (signature, {input: array})
    of `requests`."""
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        logger, level = tf.get_logger(), tf.get_logger().level
        logger.setLevel("ERROR")  # Its one line that the loader is deprecated (for TF2 code) says nothing here.
        try:
            meta_graph = tf.compat.v1.saved_model.loader.load(session, [tf.saved_model.SERVING], directory)
            results = []
            for key, inputs in requests:
                signature = meta_graph.signature_def[key]
                results.append(session.run(signature.outputs["probabilities"].name,
                                           {signature.inputs[name].name: value for name, value in inputs.items()}))
            return results
        except tf.errors.OpError as e:
            lines = [line.strip() for line in e.message.splitlines()]
            reason = next((line for line in lines if line and line != "Graph execution error:"), type(e).__name__)
            raise UserError(f"the exported SavedModel fails in the session loader (saved_model_cli, TF Serving): "
                            f"{reason.split('. ')[0][:300]}; nothing was written") from None
        finally:
            logger.setLevel(level)


def _main(argv):
    args = PARSER.parse_args(argv)
    exported = export(args.model_dir, args.output, args.checkpoint, args.tflite_quantize, not args.no_tflite,
                      args.data_dir, args.tfds_manual_dir, args.dataset)
    print(f"exported {exported.checkpoint} to {args.output} (SavedModel, signatures serving_default and "
          f"serving_encoded) and {fs.join(args.output, KERAS_FILE)}")
    for name, size, accuracy, float_accuracy in exported.tflite:
        line = f"{fs.join(args.output, name)}: {size / 1e6:.3f} MB"
        if accuracy is not None:
            line += (f", eval accuracy {accuracy:.4f} (float32 {float_accuracy:.4f}, "
                     f"{100 * (accuracy - float_accuracy):+.2f} points)")
        print(line)


def main(argv=None):
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
