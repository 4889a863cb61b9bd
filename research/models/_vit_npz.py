"""Public ViT weights into a built vit_* model: `load(model, path, config)` reads a big_vision .npz file, such as the
"How to train your ViT?" (AugReg) checkpoints, e.g.
`Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz` into
vit_ti16 (S_16 into vit_s16, B_16 into vit_b16, L_16 into vit_l16), from any path TensorFlow opens (gs://, ram://).

What it accepts: flat .npz files of the flax ViT, its arrays named by module path as timm's `_load_weights` reads
them, under no prefix, `params/` or `opt/target/`, in either of two namings:
  - AugReg / google-research/vision_transformer: `Transformer/posembed_input/pos_embedding` [1, 1 + n * n, D], the
    class token's row first, and per block `LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`,
    `MlpBlock_3`;
  - big_vision's vit.py since 2022: `pos_embedding` [1, n * n, D], added before the class token is put in front
    (its row is then zeros here, which computes the same), and `LayerNorm_0`, `MultiHeadDotProductAttention_0`,
    `LayerNorm_1`, `MlpBlock_0`.
Not accepted, each one error line: scanned blocks (`Transformer/encoderblock/...` stacked), big_vision's files of
before 2022 (position embeddings at `Transformer/pos_embedding`: the line names the key it lacks), the MAP head
(`MAPHead_0`), a class token in the file for --vit_pooling=gap or none for --vit_pooling=token, another patch size,
width or depth than the model's, a file that is no ViT, missing arrays or arrays of other shapes (the key and both
shapes named), images of other than the file's 3 channels (research/transfer.py adapts a checkpoint's input
channels; that import would close a cycle once vit.py registers `load`).

What it does to fit the run:
  - position embeddings: made for the file's grid of patches (14x14 at 224 px), resampled to the run's (2x2 at
    32 px) as big_vision does (research/models/vit.py resample_position_embeddings: bilinear, class token kept);
  - pixels: AugReg and big_vision trained on pixels in [-1, 1]; this codebase feeds [0, 1] (--normalize=none) or
    ImageNet-standardised values (--normalize=imagenet), so the affine map from the run's inputs to the file's
    range is folded into the patch embedding (kernel scaled, bias shifted): the network computes what it computed;
  - the head: kept where the file has one of the model's shape (as many classes) and config.init_skip is not
    "head"; otherwise made fresh at zeros, kernel and bias (big_vision's head_zeroinit, the model's own init), as it
    also is where the file has a `pre_logits` layer, which vit_* lacks.
The MLP's GELU is exact here (Keras) where flax trained with its tanh approximation, as timm loads these files.
"""

import io

import numpy as np
import tensorflow as tf

from research import UserError
from research.data.preprocess import NORMALIZATIONS

PREFIXES = ("", "params/", "opt/target/")
BLOCK_NAMES = {  # Naming -> (attention, second LayerNorm, MLP) module names within an encoder block.
    "AugReg": ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
    "big_vision": ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"),
}
POSITION_KEYS = {"AugReg": "Transformer/posembed_input/pos_embedding", "big_vision": "pos_embedding"}


def load(model, path, config):
    """Reads the big_vision ViT .npz file at `path` into `model`, a built vit_* (research/models/vit.py ViT), as
    the module docstring says; returns the line that says what was read and what was made to fit. Every misfit is
    one UserError line, raised before any variable changes."""
    arrays = _read(path)
    prefix = next((p for p in PREFIXES if f"{p}embedding/kernel" in arrays), None)
    if prefix is None:
        raise UserError(f"{path} holds no big_vision ViT: no embedding/kernel among its {len(arrays)} arrays "
                        f"({', '.join(sorted(arrays)[:3])}{', ...' if len(arrays) > 3 else ''})")
    naming = "AugReg" if f"{prefix}Transformer/encoderblock_0/{BLOCK_NAMES['AugReg'][2]}/Dense_0/kernel" in arrays \
        else "big_vision"
    file = _File(arrays, prefix, path)
    _check_architecture(model, file)
    keep_head, head_reason = _head_rule(model, file, config)
    values = [(variable, file.combined(keys, shapes, combine)) for variable, keys, shapes, combine
              in _table(model, naming, keep_head, config.normalize)]
    embeddings, position_note = model.position_embedding_from(_position_embeddings(model, file, naming),
                                                              f"{path} {POSITION_KEYS[naming]}")
    for variable, value in values + [(model.position_embedding, embeddings)]:
        variable.assign(tf.cast(value, variable.dtype))
    notes = [f"its patch embedding takes this run's inputs (--normalize={config.normalize}) for "
             "the pixels in [-1, 1] it was trained on"]
    notes += [position_note] if position_note else []
    notes += [f"not loaded, made fresh (zeros): the head ({head_reason})"] if not keep_head else []
    return f"Initialised weights from {path} (a ViT in {naming} names)" + "".join(f"; {note}" for note in notes)


def _read(path):
    """{key: array} of the .npz file at `path`, every array read (a damaged member fails here, not half-way)."""
    try:
        if not tf.io.gfile.exists(path):
            raise UserError(f"{path}: no such file")
        with tf.io.gfile.GFile(path, "rb") as f:
            content = f.read()
    except tf.errors.OpError as e:
        raise UserError(f"{path}: cannot be read ({e.message.splitlines()[0][:200]})") from None
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as e:  # noqa: BLE001 - not a zip (BadZipFile, ValueError, AttributeError on .npy), a bad member.
        raise UserError(f"{path} is not a readable .npz file of arrays ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else 'unreadable'})") from None


class _File:
    """The arrays of one file under its prefix, each looked up with its shape checked."""

    def __init__(self, arrays, prefix, path):
        self.arrays, self.prefix, self.path = arrays, prefix, path

    def has(self, key):
        return self.prefix + key in self.arrays

    def shape(self, key):
        return list(self.arrays[self.prefix + key].shape)

    def get(self, key, shape=None):
        """The float array `key`, of `shape` if given; one error line if it is missing or of another shape."""
        if not self.has(key):
            raise UserError(f"{self.path} lacks {self.prefix}{key}, which the ViT it seems to hold has")
        value = self.arrays[self.prefix + key]
        if value.dtype.kind != "f":
            raise UserError(f"{self.path}: {self.prefix}{key} holds {value.dtype}, not floating-point numbers")
        if shape is not None and list(value.shape) != list(shape):
            raise UserError(f"{self.path}: {self.prefix}{key} has shape {list(value.shape)}, the model needs "
                            f"{list(shape)}")
        return value

    def combined(self, keys, shapes, combine):
        return combine(*(self.get(key, shape) for key, shape in zip(keys, shapes)))


def _check_architecture(model, file):
    """The file's patch size, width, depth, pooling and input channels against the model's, one line each."""
    kernel = file.shape("embedding/kernel")
    wanted = list(model.patch_embedding.kernel.shape)
    what = f"{file.path} holds a ViT of"
    if len(kernel) != 4 or kernel[:2] != wanted[:2]:
        raise UserError(f"{what} {'x'.join(map(str, kernel[:2]))}-pixel patches (embedding/kernel {kernel}); "
                        f"--model={model.name} has {model.patch_size}-pixel patches")
    if kernel[3] != model.width:
        raise UserError(f"{what} width {kernel[3]} (embedding/kernel {kernel}); --model={model.name} has width "
                        f"{model.width}: choose the vit_* of the file's size")
    if kernel[2] != wanted[2]:
        raise UserError(f"{what} {kernel[2]}-channel images (embedding/kernel {kernel}); the dataset's have "
                        f"{wanted[2]}")
    if file.has("Transformer/encoderblock/LayerNorm_0/scale"):
        raise UserError(f"{file.path} holds a ViT of scanned blocks (Transformer/encoderblock/, stacked); only "
                        "files of one module per block (Transformer/encoderblock_0/, ...) are read")
    depth = 0
    while file.has(f"Transformer/encoderblock_{depth}/LayerNorm_0/scale"):
        depth += 1
    if depth != len(model.blocks):
        raise UserError(f"{what} {depth} encoder blocks (Transformer/encoderblock_*); --model={model.name} has "
                        f"{len(model.blocks)}")
    if file.has("MAPHead_0/probe"):
        raise UserError(f"{what} an attention-pooling head (MAPHead_0), which vit_* lacks")
    if file.has("cls") != (model.class_token is not None):
        raise UserError(f"{what} {'a' if file.has('cls') else 'no'} class token (cls): build vit_* with "
                        f"--vit_pooling={'token' if file.has('cls') else 'gap'} to read it")


def _head_rule(model, file, config):
    """(Whether the file's head is read, the reason where it is not)."""
    kernel = list(model.classifier.kernel.shape)
    if not file.has("head/kernel"):
        return False, "the file has none"
    if file.has("pre_logits/kernel"):
        return False, "the file's head reads its pre_logits layer, which vit_* lacks"
    if file.shape("head/kernel") != kernel:
        return False, f"the file's head/kernel {file.shape('head/kernel')}, the model's {kernel}"
    if config.init_skip == "head":
        return False, "--init_skip=head"
    return True, None


def _table(model, naming, keep_head, normalize):
    """[(the model's variable, the file's keys, the shapes they must have, how their values combine into its value)]:
    every variable of the model but the position embeddings; the head's made of no key where it is made fresh."""
    width, heads = model.width, model.heads
    attention, mlp_norm, mlp = BLOCK_NAMES[naming]
    kernel = model.patch_embedding.kernel
    scale, offset = _input_map(normalize, kernel.shape[2])

    def same(value):
        return value

    def merged(*values):  # query, key, value [D, heads, D / heads] kernels or [heads, D / heads] biases -> qkv.
        return np.concatenate([v.reshape(*v.shape[:-2], width) for v in values], axis=-1)

    def direct(variable, key):
        return variable, [key], [list(variable.shape)], same

    table = [(kernel, ["embedding/kernel"], [list(kernel.shape)], lambda k: k * scale[:, None]),
             (model.patch_embedding.bias, ["embedding/bias", "embedding/kernel"], [[width], list(kernel.shape)],
              lambda b, k: b + np.einsum("hwcd,c->d", k.astype(np.float64), offset))]
    if model.class_token is not None:
        table.append(direct(model.class_token, "cls"))
    for i, block in enumerate(model.blocks):
        at = f"Transformer/encoderblock_{i}/"
        qkv = [f"{at}{attention}/{name}" for name in ("query", "key", "value")]
        table += [
            direct(block.attention_norm.gamma, f"{at}LayerNorm_0/scale"),
            direct(block.attention_norm.beta, f"{at}LayerNorm_0/bias"),
            (block.attention.qkv.kernel, [f"{k}/kernel" for k in qkv], [[width, heads, width // heads]] * 3, merged),
            (block.attention.qkv.bias, [f"{k}/bias" for k in qkv], [[heads, width // heads]] * 3, merged),
            (block.attention.project.kernel, [f"{at}{attention}/out/kernel"], [[heads, width // heads, width]],
             lambda v: v.reshape(width, width)),
            direct(block.attention.project.bias, f"{at}{attention}/out/bias"),
            direct(block.mlp_norm.gamma, f"{at}{mlp_norm}/scale"),
            direct(block.mlp_norm.beta, f"{at}{mlp_norm}/bias"),
        ] + [direct(getattr(layer, name), f"{at}{mlp}/Dense_{j}/{name}")
             for j, layer in enumerate(block.mlp) for name in ("kernel", "bias")]
    table += [direct(model.norm.gamma, "Transformer/encoder_norm/scale"),
              direct(model.norm.beta, "Transformer/encoder_norm/bias")]
    if keep_head:
        table += [direct(model.classifier.kernel, "head/kernel"), direct(model.classifier.bias, "head/bias")]
    else:  # big_vision's head_zeroinit, which is also the model's own initialiser.
        table += [(v, [], [], lambda shape=tuple(v.shape): np.zeros(shape)) for v in model.classifier.variables]
    return table


def _position_embeddings(model, file, naming):
    """The file's position embeddings laid out as the model's: the class token's row first where it has one. A
    big_vision file adds them before putting the class token in front: its row is then zeros."""
    embeddings = file.get(POSITION_KEYS[naming])
    if embeddings.ndim != 3:
        raise UserError(f"{file.path}: {POSITION_KEYS[naming]} has shape {list(embeddings.shape)}, not "
                        "[1, tokens, width]")
    if naming == "big_vision" and model.class_token is not None:
        embeddings = np.concatenate([np.zeros_like(embeddings[:, :1]), embeddings], axis=1)
    return embeddings


def _input_map(normalize, channels):
    """(scale, offset) per channel taking this run's inputs to the pixels in [-1, 1] the file's network was fed: x in
    [0, 1], or (x - mean) / std under --normalize=imagenet, is 2 (input * std + mean) - 1 there. Folded into the patch
    embedding: its kernel times the scale, its bias plus the kernel's sum over the offsets."""
    mean, std = NORMALIZATIONS[normalize] or (0.0, 1.0)
    return (np.broadcast_to(2 * np.asarray(std, np.float64), [channels]),
            np.broadcast_to(2 * np.asarray(mean, np.float64) - 1, [channels]))
