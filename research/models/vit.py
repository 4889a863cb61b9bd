"""Vision Transformers (Dosovitskiy et al. 2021): `vit_ti16`, `vit_s16`, `vit_b16`, `vit_l16`.

The image is cut into 16x16 patches, each linearly embedded (a stride-16 convolution); learned position embeddings
are added, with a learned class token in front for `--vit_pooling=token`; then pre-norm encoder blocks (LayerNorm,
multi-head self-attention, residual; LayerNorm, GELU MLP of 4x the width, residual), a final LayerNorm, and a
Dense head on the class token or on the average of the patch tokens (`--vit_pooling=gap`). The layers and their
sizes are timm's / big_vision's, hence their parameter counts (vit_s16 22,050,664 and vit_b16 86,567,656 at
224 px and 1000 classes, class token). Initialisation follows big_vision: Xavier-uniform kernels with zero biases,
a zero head (the first logits are all 0), position embeddings drawn with std 0.02.

The position embeddings are made for the image size the model is built for (the dataset's); called on images of
another size (fine-tuning at a higher resolution, a test), they are resized to the new grid of patches by bicubic
interpolation, the class token's own embedding left as it is. A side that is not a multiple of 16 would lose its
last pixels, as a valid convolution does: building for such images (--image_size=24 would see 56% of each) is an
error.

Weights made for another image size are resampled once, as they are read, to the grid the model is built for
(`ViT.position_embedding_from`, bilinear as big_vision's resample_posemb): another vit_* run's (--init_checkpoint,
research/transfer.py) and a big_vision / AugReg ("How to train your ViT?") .npz file's (research/models/_vit_npz.py:
`_vit_npz.load(model, path, config)`, e.g. `Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz` into
vit_ti16; the file's layer names, what it accepts and its rule for the head are in that module's docstring).
"""

import math

import numpy as np
import tensorflow as tf
from absl import flags

from research import UserError
from research.config import CHECKPOINT, declare
from research.models import _vit_npz
from research.models._registry import NAMED_WEIGHTS, register
from research.models._shared import drop_rates

layers = tf.keras.layers

declare(CHECKPOINT, flags.DEFINE_enum(
    "vit_pooling", "token", ["token", "gap"],
    "vit_*: classify from a learned class token put before the patches (the ViT paper, timm), or from "
    "the average of the patch tokens with no class token (gap: big_vision's plain ViT baseline)."),
        only_if=lambda c: c.model.startswith("vit_"), when="with --model=vit_*")

SIZES = {"ti": (192, 12, 3), "s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}  # Width, depth, heads.
PATCH = 16
EPSILON = 1e-6  # LayerNorm's, as timm and big_vision.


def resize_position_embeddings(embeddings, grid, new_grid):
    """[1, h * w, D] embeddings of an h x w grid of patches -> [1, new_h * new_w, D], resized bicubically."""
    if tuple(grid) == tuple(new_grid):
        return embeddings
    width = embeddings.shape[-1]
    image = tf.reshape(tf.cast(embeddings, tf.float32), [1, *grid, width])
    resized = tf.image.resize(image, new_grid, method="bicubic")
    return tf.cast(tf.reshape(resized, [1, new_grid[0] * new_grid[1], width]), embeddings.dtype)


def resample_position_embeddings(embeddings, new_grid, tokens, source):
    """Weights read from elsewhere: NumPy [1, tokens + n * n, D] position embeddings of a square n x n grid of
    patches after `tokens` rows of their own (1: the class token's, kept as it is; 0) -> those of `new_grid`
    (height, width), and the words that say so. Bilinear with the grid's corners aligned (the corner patches keep
    their embeddings), which is what big_vision's resample_posemb computes with scipy.ndimage.zoom(order=1); timm's
    resample_abs_pos_embed (F.interpolate, half-pixel centres) differs from it slightly. A grid that is not square
    (a model built for non-square images) cannot be told from the length alone: one UserError line naming `source`."""
    patches = embeddings.shape[1] - tokens if embeddings.ndim == 3 else -1
    side = math.isqrt(max(patches, 0))
    if patches < 1 or side * side != patches:
        raise UserError(f"{source}: position embeddings of shape {list(embeddings.shape)} hold no square grid of "
                        f"patches after {tokens} token{'s' * (tokens != 1)} of their own, so they cannot be resampled")
    grid = embeddings[0, tokens:].reshape(side, side, -1).astype(np.float64)
    for axis, size in enumerate(new_grid):  # Separable: along the rows, then along the columns.
        position = np.linspace(0, side - 1, size)  # Output i samples input i * (side - 1) / (size - 1).
        low = np.floor(position).astype(int)
        high, fraction = np.minimum(low + 1, side - 1), (position - low).reshape([-1 if a == axis else 1
                                                                                  for a in range(3)])
        grid = np.take(grid, low, axis) * (1 - fraction) + np.take(grid, high, axis) * fraction
    resampled = np.concatenate([embeddings[:, :tokens], grid.reshape(1, -1, embeddings.shape[-1])], axis=1)
    kept = ", the class token's kept" if tokens else ""
    words = (f"position embeddings resampled from a {side}x{side} grid of patches to {new_grid[0]}x{new_grid[1]} "
             f"(bilinear{kept})")
    return resampled.astype(embeddings.dtype), words


@tf.keras.utils.register_keras_serializable(package="research")
class SelfAttention(layers.Layer):
    """Multi-head self-attention with one fused query/key/value projection; softmax in float32."""

    def __init__(self, width, heads, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads = width, heads
        self.qkv = layers.Dense(3 * width)
        self.project = layers.Dense(width)

    def call(self, x):
        batch, tokens = tf.shape(x)[0], tf.shape(x)[1]
        head_width = self.width // self.heads
        qkv = tf.reshape(self.qkv(x), [batch, tokens, 3, self.heads, head_width])
        query, key, value = tf.unstack(tf.transpose(qkv, [2, 0, 3, 1, 4]))  # Each [batch, heads, tokens, width].
        scores = tf.matmul(query, key, transpose_b=True) * head_width ** -0.5
        weights = tf.cast(tf.nn.softmax(tf.cast(scores, tf.float32)), value.dtype)
        mixed = tf.transpose(tf.matmul(weights, value), [0, 2, 1, 3])
        return self.project(tf.reshape(mixed, [batch, tokens, self.width]))

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads}


@tf.keras.utils.register_keras_serializable(package="research")
class EncoderBlock(layers.Layer):
    """x + attention(norm(x)), then x + MLP(norm(x)); each branch dropped per example at `drop_rate` in training
    (stochastic depth: Dropout with one mask value per example, which also rescales the kept ones)."""

    def __init__(self, width, heads, drop_rate=0.0, **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads, self.drop_rate = width, heads, drop_rate
        self.attention_norm = layers.LayerNormalization(epsilon=EPSILON)
        self.attention = SelfAttention(width, heads)
        self.mlp_norm = layers.LayerNormalization(epsilon=EPSILON)
        self.mlp = [layers.Dense(4 * width, activation="gelu"), layers.Dense(width)]
        self.drop = [layers.Dropout(drop_rate, noise_shape=(None, 1, 1)) for _ in range(2)] if drop_rate else None

    def call(self, x, training=False):
        x = x + self._drop(0, self.attention(self.attention_norm(x)), training)
        y = self.mlp_norm(x)
        for layer in self.mlp:
            y = layer(y)
        return x + self._drop(1, y, training)

    def _drop(self, index, branch, training):
        return branch if self.drop is None else self.drop[index](branch, training=training)

    def get_config(self):
        return {**super().get_config(), "width": self.width, "heads": self.heads, "drop_rate": self.drop_rate}


@tf.keras.utils.register_keras_serializable(package="research")
class ViT(tf.keras.Model):
    """ViT with `depth` blocks of `width` channels and `heads` heads on `patch_size` patches; position embeddings
    made for images of `image_size` (height, width)."""

    def __init__(self, num_classes, width, depth, heads, image_size, patch_size=PATCH, pooling="token",
                 stochastic_depth=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.width, self.depth, self.heads = num_classes, width, depth, heads
        self.image_size, self.patch_size = tuple(image_size), patch_size
        self.pooling, self.stochastic_depth = pooling, stochastic_depth
        self.grid = (self.image_size[0] // patch_size, self.image_size[1] // patch_size)
        self.patch_embedding = layers.Conv2D(width, patch_size, strides=patch_size)
        self.class_token = self.add_weight(shape=(1, 1, width), initializer="zeros",
                                           name="class_token") if pooling == "token" else None
        self.position_embedding = self.add_weight(
            shape=(1, self.grid[0] * self.grid[1] + (pooling == "token"), width),
            initializer=tf.keras.initializers.RandomNormal(stddev=0.02), name="position_embedding")
        self.blocks = [EncoderBlock(width, heads, rate) for rate in drop_rates(stochastic_depth, depth)]
        self.norm = layers.LayerNormalization(epsilon=EPSILON)
        self.classifier = layers.Dense(num_classes, kernel_initializer="zeros", dtype="float32")

    def call(self, images, training=False):
        patches = self.patch_embedding(images)
        new_grid = tuple(patches.shape[1:3])
        x = tf.reshape(patches, [-1, new_grid[0] * new_grid[1], self.width])
        position = tf.cast(self.position_embedding, x.dtype)
        if self.class_token is not None:
            token = tf.cast(self.class_token, x.dtype)
            x = tf.concat([tf.tile(token, [tf.shape(x)[0], 1, 1]), x], axis=1)
            position = tf.concat([position[:, :1], resize_position_embeddings(position[:, 1:], self.grid, new_grid)],
                                 axis=1)
        else:
            position = resize_position_embeddings(position, self.grid, new_grid)
        x = x + position
        for block in self.blocks:
            x = block(x, training=training)
        x = self.norm(x)
        return self.classifier(x[:, 0] if self.class_token is not None else tf.reduce_mean(x, axis=1))

    def position_embedding_from(self, embeddings, source):
        """(Another ViT's position embeddings, NumPy [1, tokens + n * n, D] laid out as this one's, fitted to this
        model, the words that say how): resampled to this model's grid (resample_position_embeddings) where their
        length differs; a width that differs is one UserError line naming `source`."""
        wanted = tuple(self.position_embedding.shape)
        if embeddings.shape == wanted:
            return embeddings, None
        if embeddings.ndim != 3 or embeddings.shape[-1] != wanted[-1]:
            raise UserError(f"{source}: position embeddings of shape {list(embeddings.shape)} do not fit "
                            f"--model={self.name}'s {list(wanted)}")
        return resample_position_embeddings(embeddings, self.grid, int(self.class_token is not None), source)

    def no_weight_decay(self):
        """Neither timm nor big_vision decays the position embeddings and class token."""
        return [self.position_embedding] + ([self.class_token] if self.class_token is not None else [])

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "width": self.width, "depth": self.depth,
                "heads": self.heads, "image_size": list(self.image_size), "patch_size": self.patch_size,
                "pooling": self.pooling, "stochastic_depth": self.stochastic_depth}


def _register_vit(size):
    def build(config, dataset):
        width, depth, heads = SIZES[size]  # Read here, so that tests may make a family member shallow.
        height, width_px = dataset.image_shape[:2]
        if height % PATCH or width_px % PATCH:
            read = (height // PATCH * PATCH) * (width_px // PATCH * PATCH) / (height * width_px)
            raise UserError(f"--model=vit_{size}16 needs images whose sides are multiples of its {PATCH}-pixel "
                            f"patches, not {height}x{width_px} (it would see {read:.0%} of each image): "
                            f"set --image_size to one, e.g. {max(PATCH, round(height / PATCH) * PATCH)}")
        return ViT(dataset.num_classes, width, depth, heads, dataset.image_shape[:2], pooling=config.vit_pooling,
                   stochastic_depth=config.stochastic_depth, name=f"vit_{size}16")
    build.__doc__ = ("ViT-{0}/16: {2} blocks of width {1}, {3} heads; --vit_pooling, --stochastic_depth."
                     .format(size.capitalize(), *SIZES[size]))
    register(f"vit_{size}16", stochastic_depth=True, blocks=True, pretrained=_load_pretrained)(build)


def _load_pretrained(model, source, config):
    """--pretrained for vit_*: a big_vision / AugReg .npz file (research/models/_vit_npz.py); no named weights."""
    if NAMED_WEIGHTS.fullmatch(source):
        raise UserError(f"--pretrained={source}: vit_* models know no named weights; give a big_vision or AugReg "
                        ".npz file, --pretrained=PATH.npz")
    return _vit_npz.load(model, source, config)


for _size in SIZES:
    _register_vit(_size)
