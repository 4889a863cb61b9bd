"""The TFLite forms of an export (research/export.py): `model.tflite` in float32, and with --tflite_quantize a
quantised copy beside it, each checked by `tf.lite.Interpreter` before the export is moved into place.

Each takes what the SavedModel takes at the training size: uint8 images [N, H, W, C] (N free: the interpreter
resizes its input), with the run's evaluation preprocessing inside, and returns `probabilities` and `class_ids`
(signature `serving_default`). Only TFLite's built-in ops are used, so any TFLite runtime runs it (LiteRT's
`ai_edge_litert` interpreter too) without the TensorFlow ops delegate.

  - float32 reproduces the checkpoint's probabilities to FLOAT_TOLERANCE on random images;
  - float16 stores the weights in half precision (half the size; computation stays float32 on CPUs);
  - int8 quantises weights and activations to 8 bits (about a quarter of the size), its activation ranges
    calibrated on CALIBRATION_IMAGES of the run's own training images (the first of its first epoch's order);
    ops without an int8 kernel stay float.
A quantised model is kept only if its accuracy on the run's eval split is within ACCURACY_TOLERANCE of the float32
model's on the same images; both accuracies are printed. Images stored at another size than the model's are
resized whole to it first (bilinear, rounded to uint8), as a client of the export would send them.
"""

import warnings

import numpy as np
import tensorflow as tf

from research import UserError
from research.data import pipeline

QUANTIZATIONS = ("none", "float16", "int8")
FLOAT_FILE = "model.tflite"
CALIBRATION_IMAGES = 300
FLOAT_TOLERANCE = 1e-5  # Largest difference in any probability between the checkpoint and model.tflite.
ACCURACY_TOLERANCE = 0.01  # A quantised model's eval accuracy may differ from float32's by at most 1 point.
BATCH = 256


def file_name(quantize):
    """model.tflite for float32, model.int8.tflite (say) for a quantised copy."""
    return FLOAT_FILE if quantize == "none" else f"model.{quantize}.tflite"


def convert(classify, trackable, prep, quantize="none", calibration=None):
    """The flatbuffer (bytes) of `classify(uint8 images) -> {"probabilities", "class_ids"}` at the model's input
    size; `trackable` holds the variables it reads, `calibration` the uint8 images for int8."""
    function = tf.function(classify, input_signature=[
        tf.TensorSpec([None, *prep.image_size, prep.channels], tf.uint8, name="images")])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()], trackable)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
    try:
        return converter.convert()
    except Exception as e:  # The converter raises its own ConverterError, and others from inside MLIR.
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"the model cannot be converted to TFLite ({quantize if quantize != 'none' else 'float32'})"
                        f": {first.strip()[:300]}; export with --no_tflite to skip it") from None


def interpreter(content):
    """`probabilities(uint8 images [N, H, W, C]) -> [N, classes]` of the TFLite model `content`."""
    with warnings.catch_warnings():  # tf.lite.Interpreter warns that LiteRT's interpreter is its successor.
        warnings.simplefilter("ignore", UserWarning)
        run = tf.lite.Interpreter(model_content=content).get_signature_runner("serving_default")
    return lambda images: np.concatenate([run(images=images[i:i + BATCH])["probabilities"]
                                          for i in range(0, len(images), BATCH)])


def check_float(content, model, prep):
    """Fails unless model.tflite gives the checkpoint's probabilities on random images at the input size."""
    images = np.random.default_rng(0).integers(0, 256, [4, *prep.image_size, prep.channels], dtype=np.uint8)
    expected = tf.nn.softmax(model(prep.eval_images(images), training=False)).numpy()
    difference = float(np.abs(interpreter(content)(images) - expected).max())
    if difference > FLOAT_TOLERANCE:
        raise UserError(f"the exported {FLOAT_FILE} does not reproduce the checkpoint's predictions "
                        f"(probabilities differ by up to {difference:.3g}); nothing was written")


def calibration_images(dataset, config):
    """The first CALIBRATION_IMAGES training images of the run's first epoch (all, for a smaller split)."""
    count = min(CALIBRATION_IMAGES, dataset.num_train)
    order = pipeline.epoch_order(tf.range(count, dtype=tf.int64), config.seed, 0, dataset.num_train).numpy()
    return np.concatenate([images for images, _ in pipeline.images_at_size(dataset.train, dataset.preprocessing,
                                                                           order)])


def check_quantised(quantize, quantised, float_content, dataset):
    """Eval accuracies (quantised, float32) over the whole eval split; fails if they differ by more than
    ACCURACY_TOLERANCE, or by more than one example on an eval split of fewer than 100 (where one is more)."""
    if not len(dataset.eval):
        raise UserError(f"the run's eval split has no examples to check the {quantize} TFLite model on")
    forms = {"quantised": interpreter(quantised), "float32": interpreter(float_content)}
    correct = dict.fromkeys(forms, 0)
    for images, labels in pipeline.images_at_size(dataset.eval, dataset.preprocessing, range(len(dataset.eval))):
        for form, probabilities in forms.items():
            correct[form] += int((probabilities(images).argmax(-1) == labels).sum())
    examples = len(dataset.eval)
    allowed = max(int(ACCURACY_TOLERANCE * examples), 1)
    if abs(correct["quantised"] - correct["float32"]) > allowed:
        raise UserError(f"the {quantize} TFLite model's eval accuracy {correct['quantised'] / examples:.4f} differs "
                        f"from float32's {correct['float32'] / examples:.4f} by more than "
                        f"{100 * allowed / examples:.2g} points ({allowed} of {examples} eval examples); "
                        "nothing was written")
    return correct["quantised"] / examples, correct["float32"] / examples
