"""From what a source stores (decoded uint8 pixels or encoded JPEG/PNG bytes) to what the model takes, in TF ops.

Why TF ops: they run in tf.data's parallel maps and inside the exported SavedModel, so training, evaluation,
`research.predict` and serving transform an image the same way. Two ways to size images:
  - by default training and evaluation resize the whole image to --image_size (a fixed-size dataset at its own
    size is left untouched), so that a folder of small images learns without tuning;
  - `--augment=random_resized_crop`: the Inception crop for training (a random box of --crop_scale of the area and
    --crop_ratio aspect, JPEGs decoded only inside the box by the fused `decode_and_crop_jpeg`), and for evaluation
    the shorter side resized to image_size / --eval_crop_fraction and the centre cropped.
Pixels then go to float [0, 1], through the other --augment ops (research/augment/) and --normalize.
Randomness is stateless, seeded by (seed, epoch, position in epoch) as research/augment/ seeds its ops; the crop is
the augmentation op made while decoding (registered here with research.augment.register_decoding).
"""

import dataclasses
import functools
import re

import numpy as np
import tensorflow as tf
from absl import flags

from research import UserError, augment, cli, config as config_lib
from research.config import CHECKPOINT, TUNABLE, declare

RANDOM_RESIZED_CROP = "random_resized_crop"
NORMALIZATIONS = {"none": None, "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}  # mean, std (RGB)
MAX_IMAGE_PIXELS = 2**26  # 67 million pixels (8192 x 8192): a larger image file is refused (see within_pixel_budget).

declare(CHECKPOINT, flags.DEFINE_integer(
    "image_size", 0,
    "Height and width of the model's input (0: the dataset's own, when all its images have one "
    "size; required when sizes vary). Images are resized to it, the same way for training and "
    "evaluation unless --augment=random_resized_crop."))
declare(CHECKPOINT, flags.DEFINE_list(
    "crop_scale", ["0.08", "1.0"],
    "random_resized_crop: the range of the crop's share of the image area."),
        **augment.only_with(RANDOM_RESIZED_CROP))
declare(CHECKPOINT, flags.DEFINE_list(
    "crop_ratio", ["0.75", "1.3333333"],
    "random_resized_crop: the range of the crop's aspect ratio (width / height)."),
        **augment.only_with(RANDOM_RESIZED_CROP))
declare(TUNABLE, flags.DEFINE_float(
    "eval_crop_fraction", 0.875,
    "With --augment=random_resized_crop: evaluation resizes the shorter side to "
    "image_size / this and takes the central image_size square."),
        **augment.only_with(RANDOM_RESIZED_CROP))
declare(CHECKPOINT, flags.DEFINE_enum(
    "normalize", "none", ["none", "imagenet"],
    "none: model inputs in [0, 1]; imagenet: then minus ImageNet's per-channel mean, divided by its "
    "standard deviation (colour images)."))


@config_lib.checks
def _check_flags(config):
    config_lib.need(0 <= config.image_size <= 4096, "--image_size must be in [0, 4096] (0: the dataset's own size)")
    config_lib.need(0 < config.eval_crop_fraction <= 1, "--eval_crop_fraction must be in (0, 1]")
    for name, low, high in (("crop_scale", 0, 1), ("crop_ratio", 0, float("inf"))):
        try:
            values = [float(v) for v in getattr(config, name)]
        except ValueError:
            values = []
        config_lib.need(len(values) == 2 and low < values[0] <= values[1] <= high,
                        f"--{name} must be two increasing numbers in ({low}, {high}], "
                        f"got {','.join(map(str, getattr(config, name)))}")
        setattr(config, name, values)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What turns a stored image into a model input; recorded in dataset.json for predict, export and evaluate."""
    image_size: tuple  # (height, width) of the model input.
    channels: int
    eval_crop_fraction: float = None  # None: resize the whole image; else resize the shorter side and centre-crop.
    normalize: str = "none"

    def to_json(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record):
        return cls(tuple(record["image_size"]), record["channels"], record.get("eval_crop_fraction"),
                   record.get("normalize", "none"))

    def eval_images(self, images):
        """uint8 images [..., H, W, C] of any size (a batch shares one) -> float model inputs [..., h, w, C]."""
        if self.eval_crop_fraction is None:
            resized = _resize(images, self.image_size)
        else:
            resized = _resize_and_centre_crop(images, self.image_size, self.eval_crop_fraction)
        return self.normalized(resized)

    def normalized(self, float_images):
        """[0, 1] floats [..., h, w, C] -> model inputs (--normalize): x / std - mean / std, with the per-channel
        factors spread over the whole image (broadcasting a [C] vector over the innermost axis costs 5x more)."""
        if NORMALIZATIONS[self.normalize] is None:
            return float_images
        scale, offset = self._normalizer
        return float_images * scale + offset

    @functools.cached_property
    def _normalizer(self):
        mean, std = (np.array(v, np.float32) for v in NORMALIZATIONS[self.normalize])
        shape = (*self.image_size, self.channels)
        return np.broadcast_to(1 / std, shape).copy(), np.broadcast_to(-mean / std, shape).copy()

    def for_display(self, inputs):
        """Model inputs -> [0, 1] floats, for image grids."""
        if NORMALIZATIONS[self.normalize] is None:
            return inputs
        mean, std = NORMALIZATIONS[self.normalize]
        return tf.clip_by_value(inputs * std + mean, 0.0, 1.0)


def preprocessing(config, stored_shape, channels):
    """The run's Preprocessing for a dataset whose images are `stored_shape` ([H, W, C], None where sizes vary)."""
    height, width = stored_shape[0], stored_shape[1]
    if config.image_size:
        size = (config.image_size, config.image_size)
    elif height is None or width is None:
        raise UserError(f"--dataset={config.dataset} has images of varying size: set the model's input size "
                        "with --image_size (e.g. 224)")
    else:
        size = (height, width)
    if NORMALIZATIONS[config.normalize] is not None and channels != 3:
        raise UserError(f"--normalize={config.normalize} needs colour images; {config.dataset} has {channels} channel")
    crop = config.eval_crop_fraction if RANDOM_RESIZED_CROP in config.augment else None
    return Preprocessing(size, channels, crop, config.normalize)


def to_float(images):
    """uint8 [0, 255] -> float32 [0, 1], as the tutorials scale."""
    return tf.cast(images, tf.float32) / 255.0


def decode(encoded, channels):
    """JPEG/PNG (also GIF, BMP, WebP, JPEG XL) bytes -> uint8 [H, W, channels]; grayscale, RGBA and 16-bit files
    converted. An image over MAX_IMAGE_PIXELS is an InvalidArgumentError (a read error naming the file)."""
    with tf.control_dependencies([within_pixel_budget(_header_size(encoded))]):
        image = tf.io.decode_image(encoded, channels=channels, dtype=tf.uint8, expand_animations=False)
    shape = tf.shape(image, out_type=tf.int64)
    with tf.control_dependencies([within_pixel_budget(shape[:2])]):  # Formats whose header is not read above.
        image = tf.identity(image)
    image.set_shape([None, None, channels])
    return image


def decode_error_line(error):
    """Why `decode` (or reading the file) failed, in one line: TensorFlow's message, or the pixel budget's own text as
    eager and graph execution word an assertion."""
    message = cli.op_error_line(error)
    asserted = re.search(r"Summarized data: b'(.*)'$|assertion failed: \[(.*)\]$", message)
    return (next(filter(None, asserted.groups())) if asserted else message) or type(error).__name__


def within_pixel_budget(size):
    """An assertion that an image of `size` (int64 [height, width]) is within MAX_IMAGE_PIXELS. Why a budget: one
    20000 x 20000 PNG decodes to 1.2 GB and its float copy to 4.8 GB, per parallel call: the run dies of memory
    where it should say which file is too large."""
    pixels = size[0] * size[1]
    return tf.debugging.Assert(pixels <= MAX_IMAGE_PIXELS, [tf.strings.format(
        "image of {} x {} pixels (height x width), over the budget of {} pixels: downscale it",
        (size[0], size[1], MAX_IMAGE_PIXELS))], name="pixel_budget")


def _header_size(encoded):
    """[height, width] from the header of a JPEG, PNG, GIF or BMP file; [0, 0] for others, and for files too short
    to hold a header (decoding them fails with its own error)."""
    head = tf.cast(tf.io.decode_raw(tf.strings.substr(encoded + b"\0" * 26, 0, 26), tf.uint8), tf.int64)

    def number(first, size, big_endian=False, signed=False):
        digits = [head[first + i] for i in range(size)]
        value = sum(d * 256 ** i for i, d in enumerate(reversed(digits) if big_endian else digits))
        return tf.abs(value - 2 ** (8 * size) * tf.cast(value >= 2 ** (8 * size - 1), tf.int64)) if signed else value

    magic = tf.strings.substr(encoded, 0, 4)
    formats = [(tf.equal(magic, b"\x89PNG"), lambda: tf.stack([number(20, 4, True), number(16, 4, True)])),
               (tf.equal(tf.strings.substr(magic, 0, 3), b"GIF"), lambda: tf.stack([number(8, 2), number(6, 2)])),
               (tf.equal(tf.strings.substr(magic, 0, 2), b"BM"),
                lambda: tf.stack([number(22, 4, signed=True), number(18, 4, signed=True)])),
               (tf.io.is_jpeg(encoded), lambda: tf.cast(tf.io.extract_jpeg_shape(encoded)[:2], tf.int64))]
    return tf.case(formats, default=lambda: tf.zeros([2], tf.int64), exclusive=False)


class Transform:
    """Per-example training and evaluation transforms for one run (config + Preprocessing)."""

    def __init__(self, config, prep, stored_shape):
        self.config, self.prep = config, prep
        self.decoding_op = augment.decoding(config)  # The op that crops while decoding, or None.
        # Pixels stored at the model's size need no resizing: exactly the dataset's own pixels (MNIST as ever).
        self.stored_at_size = tuple(stored_shape[:2]) == prep.image_size

    @property
    def per_example(self):
        """Whether training needs a per-example map (else whole batches are converted at once)."""
        return bool(self.config.augment)

    def _stored(self, payload, encoded):
        """The stored image as uint8 pixels, of static shape where the dataset's images have one size."""
        image = decode(payload, self.prep.channels) if encoded else payload
        return tf.ensure_shape(image, [*self.prep.image_size, self.prep.channels]) if self.stored_at_size else image

    def train_batch(self, images):
        """Decoded uint8 images [N, H, W, C] of one size, no per-example randomness: the batch at once."""
        return self.prep.eval_images(images) if not self.stored_at_size else self.prep.normalized(to_float(images))

    def train_example(self, payload, encoded, seed):
        """One stored image (uint8 [H, W, C], or bytes if `encoded`) -> a model input; `seed` is [seed, epoch,
        position] as research.augment takes it."""
        if self.decoding_op:
            image = self.decoding_op(payload, encoded, self.prep, self.config, augment.decoding_seed(seed))
        else:
            image = self._stored(payload, encoded)
            image = to_float(image) if self.stored_at_size else _resize(image, self.prep.image_size)
        return self.prep.normalized(augment.apply(self.config, image, seed))

    def eval_example(self, payload, encoded):
        image = self._stored(payload, encoded)
        if self.stored_at_size and self.prep.eval_crop_fraction is None:
            return self.prep.normalized(to_float(image))
        return self.prep.eval_images(image)


@augment.register_decoding(RANDOM_RESIZED_CROP)
def _random_resized_crop_op(payload, encoded, prep, config, seed):
    return random_resized_crop(payload, encoded, prep.image_size, prep.channels, tuple(config.crop_scale),
                               tuple(config.crop_ratio), seed)


def random_resized_crop(payload, encoded, size, channels, scale, ratio, seed):
    """Inception-style crop to float [size, C]: a random box of `scale` of the area and `ratio` aspect (the whole
    image when 10 tries find none), resized bilinearly. JPEG bytes are decoded only inside the box."""

    def box_of(shape):
        begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape, tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed, min_object_covered=0.0, aspect_ratio_range=ratio,
            area_range=scale, max_attempts=10, use_image_if_no_bounding_boxes=True)
        return begin, box_size

    def crop_decoded(image):
        begin, box_size = box_of(tf.shape(image))
        return tf.slice(image, begin, box_size)

    if not encoded:
        crop = crop_decoded(payload)
    else:
        def jpeg():
            shape = tf.io.extract_jpeg_shape(payload)
            with tf.control_dependencies([within_pixel_budget(tf.cast(shape[:2], tf.int64))]):
                begin, box_size = box_of(tf.identity(shape))
            window = tf.stack([begin[0], begin[1], box_size[0], box_size[1]])
            return tf.io.decode_and_crop_jpeg(payload, window, channels=channels)

        crop = tf.cond(tf.io.is_jpeg(payload), jpeg, lambda: crop_decoded(decode(payload, channels)))
    crop.set_shape([None, None, channels])
    return _resize(crop, size)


def _resize(images, size):
    """uint8 -> float [0, 1] at `size`, bilinear (half-pixel centres); images already of that size untouched."""
    if tuple(images.shape[-3:-1]) == tuple(size):
        return to_float(images)
    return tf.image.resize(to_float(images), size, method="bilinear")


def _resize_and_centre_crop(images, size, crop_fraction):
    """Shorter side to size / crop_fraction, then the central `size` box: the ImageNet evaluation crop."""
    shape = tf.shape(images)
    height, width = tf.cast(shape[-3], tf.float32), tf.cast(shape[-2], tf.float32)
    target = max(size) / crop_fraction
    factor = target / tf.minimum(height, width)
    new_height = tf.maximum(tf.cast(tf.round(height * factor), tf.int32), size[0])
    new_width = tf.maximum(tf.cast(tf.round(width * factor), tf.int32), size[1])
    resized = tf.image.resize(to_float(images), tf.stack([new_height, new_width]), method="bilinear")
    top, left = (new_height - size[0]) // 2, (new_width - size[1]) // 2
    cropped = resized[..., top:top + size[0], left:left + size[1], :]
    return tf.ensure_shape(cropped, [*images.shape[:-3], *size, images.shape[-1]])
