"""Carrying a trained network to a new task: `--init_checkpoint` into a model with another head or another number of
input channels (`--init_skip`), published weights by `--pretrained` (the model family's hook), training the head
alone (`--trainable=head`, a linear probe), and a learning rate per layer (`--layer_decay`).

Checkpoints hold `model.variables` by position (research/checkpoint.py). Two networks of one family built for other
data differ in at most three of them: the head (the model's `classifier` layer, research/models/__init__.py), whose
shape follows the number of classes; the input layer's kernel (the first variable named `kernel`), whose input
axis follows the number of image channels; and a ViT's position embeddings (`position_embedding`), whose length
follows the image size: resampled to the model's grid of patches by the model's own `position_embedding_from`
(research/models/vit.py, bilinear as big_vision). Everything else must fit exactly, as for any --init_checkpoint.
"""

import math

import numpy as np
import tensorflow as tf
from absl import flags

from research import UserError, checkpoint, config as config_lib, fs, models, run_dir
from research.config import CHECKPOINT, TUNABLE, declare

declare(TUNABLE, flags.DEFINE_enum(
    "init_skip", "none", ["none", "head"],
    "--init_checkpoint, --pretrained: head makes the head (the final classifier) fresh even when the source's fits "
    "(the same number of classes with other meanings); a head of another shape is always made fresh."),
        only_if=lambda c: c.init_checkpoint or c.pretrained, when="with --init_checkpoint or --pretrained")
declare(CHECKPOINT, flags.DEFINE_enum(
    "trainable", "all", ["all", "head"],
    "What trains: all variables, or the head alone (a linear probe: every other variable, batch-norm statistics "
    "included, keeps the value it starts with, its batch norm running in inference mode)."))
declare(CHECKPOINT, flags.DEFINE_float(
    "layer_decay", 1.0,
    "Layer-wise learning-rate decay (BEiT/MAE), for models built of blocks (" + ", ".join(models.having("blocks"))
    + "): the head and what follows the last block at the full rate, each block below it this factor lower, the "
    "stem or embeddings the lowest; weight decay follows each variable's rate (1 = off)."),
        only_if=lambda c: c.trainable == "all", when="with --trainable=all")

declare(CHECKPOINT, flags.DEFINE_string(
    "pretrained", "",
    "Start a new run from published weights, which the model's family reads (research/models/_registry.py): a word "
    "names weights the family knows (keras/*: imagenet, Keras' ImageNet weights, fetched into ~/.keras/models/ on a "
    "machine with internet), anything else is the path of a weights file, local or on any TensorFlow filesystem "
    "(keras/*: one that keras.applications.<Name>(weights=PATH) loads; vit_*: a big_vision or AugReg .npz file). "
    "The head starts fresh unless the weights have "
    "one for the run's classes; provenance.jsonl records the file's SHA-256. Read at a fresh start only: a resume "
    "continues from its own checkpoint."))

INIT_FLAGS = ("init_checkpoint", "init_from_average", "init_skip")  # What a fresh run starts from; unused on a resume.


@config_lib.checks
def _check_flags(config):
    config_lib.need(0 < config.layer_decay <= 1, f"--layer_decay must be in (0, 1], got {config.layer_decay}")
    if config.model in models.names():  # (An unknown name is research.models' error line.)
        config_lib.need(config.layer_decay == 1 or config.trainable != "all" or models.has(config, "blocks"),
                        f"--layer_decay needs a model built of blocks ({', '.join(models.having('blocks'))}); "
                        f"--model={config.model} has none")
        config_lib.need(models.has(config, "head") or (config.trainable == "all" and not config.init_checkpoint),
                        f"--trainable=head and --init_checkpoint need a model with a head; --model={config.model} "
                        "declares none")
        readers = _listed(models.having("pretrained"))
        config_lib.need(not config.pretrained or models.has(config, "pretrained"),
                        f"--pretrained needs a model that reads pretrained weights ({readers}); --model={config.model} "
                        "reads none")
    config_lib.need(not (config.pretrained and config.init_checkpoint),
                    "--pretrained and --init_checkpoint both say where the weights start: give one of them")


def _listed(names):
    """Model names, those of a family named PREFIX/NAME shown as PREFIX/* (keras/* for every Keras application)."""
    return ", ".join(dict.fromkeys(name.split("/")[0] + "/*" if "/" in name else name for name in names)) or "none"


def load_pretrained(model, config):
    """--pretrained into `model` (built for the run, not yet trained) by its family's hook (the contract:
    research/models/_registry.py). Returns (the line saying what was loaded, what provenance.jsonl records)."""
    load, source = models.capabilities(config.model).pretrained, config.pretrained
    if models.NAMED_WEIGHTS.fullmatch(source):
        note = load(model, source, config)
        return note, {"source": source, "loaded": note}
    fs.check_filesystem(source, "--pretrained")
    if not fs.exists(source):
        raise UserError(f"--pretrained={source}: no such file")
    if fs.isdir(source):
        raise UserError(f"--pretrained={source} is a directory: give the weights file in it")
    digest = fs.sha256(source)
    with fs.local_copy(source) as local:
        note = load(model, local, config)
    return note, {"source": source, "sha256": digest, "loaded": note}


def init_weights(model, config, dataset):
    """--init_checkpoint into `model` (built for `dataset`, research.data's Dataset or Metadata); returns the line
    that says what was read, what was made fresh and what was adapted."""
    notes = []

    def restore(model, path, average):
        notes[:] = _restore(model, path, average, config.init_skip == "head", dataset.image_shape[-1])

    path = checkpoint.restore_init_weights(model, config.init_checkpoint, config.init_from_average, restore)
    if not any(note.startswith("not loaded") for note in notes):
        notes += _renamed_classes(path, dataset.class_names)
    return (f"Initialised weights from {path}{' (its moving average)' if config.init_from_average else ''}"
            + "".join(f"; {note}" for note in notes))


def _renamed_classes(path, class_names):
    """A note where the head was loaded although the source run's classes have other names (as many, so the head
    fits): its outputs then mean the source's classes until training relabels them."""
    owner = checkpoint.owner_run(path)
    theirs = run_dir.recorded_class_names(owner) if owner else None
    if theirs is None or theirs == list(class_names):
        return []
    differing = [f"{a} -> {b}" for a, b in zip(theirs, class_names) if a != b]
    return [f"kept its head although its {len(theirs)} classes are named otherwise ({', '.join(differing[:3])}"
            f"{', ...' if len(differing) > 3 else ''}); --init_skip=head makes it fresh"]


def _restore(model, path, average, skip_head, channels):
    """Reads checkpoint `path` into `model` by position, the head and input kernel as `init_weights` says; returns
    the notes on what was not read as it is. Raises checkpoint.Unreadable, or a UserError naming what does not fit."""
    shapes = checkpoint.read_shapes(path)
    variables = checkpoint.model_state(model)
    # Random-number states (the Keras SeedGenerators of dropout and stochastic depth) are not weights: the new run
    # draws its own, so a source with other or no dropout fits. The weights pair up in order on both sides.
    positions = _weight_positions(path, shapes)
    mine = [i for i, v in enumerate(variables) if not checkpoint.is_random_state(v)]
    source = dict(zip(mine, positions))
    held = {i: shapes.get(_key("model_variables", source[i])) if i in source else None for i in mine}
    head = [i for i in mine if any(variables[i] is w for w in model.classifier.variables)]
    fresh = head if skip_head or any(held[i] != list(variables[i].shape) for i in head) else []
    first_kernel = next((i for i in mine if variables[i].name == "kernel"), None)
    embeddings = next((i for i in mine if variables[i] is getattr(model, "position_embedding", None)), None)
    adapted, resampled, misfits = {}, [], []
    for i in mine:
        v = variables[i]
        if i not in fresh and held[i] != list(v.shape):
            source_channels = _input_channels(held[i], list(v.shape), channels) if i == first_kernel else None
            if source_channels is not None:
                adapted[i] = source_channels
            elif i == embeddings and held[i] is not None and len(held[i]) == 3 and held[i][-1] == v.shape[-1]:
                resampled.append(i)  # Another image size: another number of patches of the same width.
            else:
                misfits.append(f"#{i} {v.path} {list(v.shape)} vs {held[i]}")
    if misfits or len(positions) != len(mine):
        raise UserError(f"checkpoint {path} does not fit --model={model.name}: it holds {len(positions)} model "
                        f"weights, the model has {len(mine)}" + (f"; first misfit {misfits[0]}" if misfits else "")
                        + " (only the head and the input layer's channels may differ, and the number of position "
                        "embeddings)")
    averages = _average_sources(model, shapes, path) if average else {}
    try:
        reader = tf.compat.v1.train.NewCheckpointReader(path)
        values = {i: reader.get_tensor(averages.get(i, _key("model_variables", source[i]))) for i in mine
                  if i not in fresh}
    except Exception as e:  # noqa: BLE001 - the data files can be damaged while the index is whole.
        raise checkpoint.Unreadable(f"checkpoint {path} is unreadable: {str(e).splitlines()[0][:200]}") from None
    how = {}
    for i in resampled:
        values[i], how[i] = model.position_embedding_from(values[i], f"checkpoint {path}")
    for i, value in values.items():
        variables[i].assign(adapt_input_kernel(value, adapted[i], channels) if i in adapted else value)
    notes = [f"not loaded, made fresh: the head ({'--init_skip=head' if skip_head else 'another shape'}): "
             + ", ".join(f"{variables[i].path} {list(variables[i].shape)}"
                         + ("" if held[i] == list(variables[i].shape) else f" (the checkpoint's {held[i]})")
                         for i in fresh)] if fresh else []
    notes += [f"adapted over input channels: {variables[i].path} {held[i]} -> {list(variables[i].shape)}, "
              + _how(source, channels) for i, source in adapted.items()]
    notes += [f"{how[i]}: {variables[i].path} {held[i]} -> {list(variables[i].shape)}" for i in resampled]
    return notes


def _weight_positions(path, shapes):
    """The positions of a checkpoint's model_variables that are weights, not random-number states (int64 [2])."""
    dtypes = tf.compat.v1.train.NewCheckpointReader(path).get_variable_to_dtype_map()
    count = sum(name.startswith("model_variables/") and name.endswith("/.ATTRIBUTES/VARIABLE_VALUE") for name in shapes)
    return [j for j in range(count)
            if not (dtypes.get(_key("model_variables", j)) == tf.int64 and shapes.get(_key("model_variables", j)) == [2])]


def _key(collection, index):
    return f"{collection}/{index}/.ATTRIBUTES/VARIABLE_VALUE"


def _input_channels(held, wanted, channels):
    """The input channels of a checkpoint's input kernel of shape `held`, where the model's, `wanted`, reads
    `channels`; None if the two differ in anything else. A convolution's kernel is [height, width, channels, out];
    a Dense layer's on flattened images [pixels * channels, out]."""
    if held is None or len(held) != len(wanted) or held[-1] != wanted[-1] or len(wanted) not in (2, 4):
        return None
    if len(wanted) == 4:
        return held[2] if held[:2] == wanted[:2] and wanted[2] == channels else None
    # A Dense kernel holds no image size: a source of other pixels whose count happens to divide evenly (784 inputs
    # read as 196 pixels x 4) is not an image of other channels.
    pixels, remainder = divmod(wanted[0], channels)
    source_channels, other = divmod(held[0], pixels)
    return source_channels if not remainder and not other and source_channels in (1, 3) else None


def adapt_input_kernel(kernel, source_channels, channels):
    """timm's adapt_input_conv over the input-channel axis of an input kernel ([..., channels, out] as a
    [-1, channels, out] view, which also reads a Dense kernel on flattened height x width x channels images): summed
    into one channel, or repeated to `channels` and scaled by source_channels / channels, so that an image whose
    channels are all equal gives the first layer the output the source gave for one of them."""
    view = kernel.reshape(-1, source_channels, kernel.shape[-1])
    if channels == 1:
        adapted = view.sum(axis=1, keepdims=True)
    else:
        adapted = np.tile(view, (1, math.ceil(channels / source_channels), 1))[:, :channels] * (
            source_channels / channels)
    return adapted.reshape(*kernel.shape[:-2], -1, kernel.shape[-1]).astype(kernel.dtype)


def _how(source, channels):
    if channels == 1:
        return f"its {source} channels summed"
    return f"its {source} channel{'s' * (source > 1)} repeated to {channels} and scaled by {source}/{channels}"


def _average_sources(model, shapes, path):
    """{position: checkpoint key} of the moving averages to read instead of raw weights. The `ema` list of a run
    is parallel to its trainable variables: every variable created trainable, or the head alone if the run was a
    linear probe (whose other weights never moved from their raw values)."""
    count = sum(name.startswith("ema/") and name.endswith("/.ATTRIBUTES/VARIABLE_VALUE") for name in shapes)
    if not count:
        raise UserError(f"{path} holds no moving average of the weights (its run had no --ema_decay)")
    # Keras keeps each layer's variables created trainable in `_trainable_variables`, whatever --trainable froze.
    created = {id(v) for layer in model._flatten_layers() for v in layer._trainable_variables}
    head = {id(v) for v in model.classifier.variables}
    for averaged in (created, head):
        positions = [i for i, v in enumerate(checkpoint.model_state(model)) if id(v) in averaged]
        if len(positions) == count:
            return {i: _key("ema", j) for j, i in enumerate(positions)}
    raise UserError(f"{path} holds moving averages of {count} variables, neither of all {len(created)} trainable "
                    f"variables of --model={model.name} nor of its head's {len(head)}")


def freeze(model, config):
    """--trainable=head: everything but the head stops training; Keras runs a frozen BatchNormalization layer in
    inference mode, so its statistics stay too. Call on a built model, before building its optimizer."""
    if config.trainable == "all":
        return
    for layer in model.layers:
        if layer is not model.classifier:
            layer.trainable = False
    head = {id(v) for v in model.classifier.variables}
    for v in model.trainable_variables:  # The model's own weights (ViT's class token, position embeddings).
        if id(v) not in head:
            v.trainable = False


def layer_rate_scales(model, config):
    """[(variable, scale of the learning rate)] for `model.trainable_variables` under --layer_decay=F, the BEiT/MAE
    convention (timm's param_groups_layer_decay): with N blocks, the head and what follows the last block at 1,
    block i of 1..N at F ** (N + 1 - i), what precedes the first block (stem, patch and position embeddings, class
    token) at F ** (N + 1)."""
    blocks = model.blocks  # Declared by the model's registration (research.config checked it).
    layer_of = {id(v): i + 1 for i, block in enumerate(blocks) for v in block.variables}
    trainable = {id(v) for v in model.trainable_variables}
    scales, layer = [], 0
    for v in model.variables:  # In the architecture's order: what precedes the blocks, the blocks, what follows.
        layer = layer_of.get(id(v), len(blocks) + 1 if layer else 0)
        if id(v) in trainable:
            scales.append((v, config.layer_decay ** (len(blocks) + 1 - layer)))
    return scales
