"""Fine-tuning and transfer: a new head, other input channels, a linear probe, layer-wise rates, exact resume."""

import os
import types

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import make_config
from mock_train import mocked
from research import UserError, data, distribute, models, optim, runs, train_lib, trainer, transfer
from research.data import tfds_source
from test_resume import kill_resume_and_compare

RESNET = dict(model="resnet_small", widths="4,8")
VIT = dict(model="vit_ti16", image_size=16)


def write_colour_folder(root, classes=3, per_class=(8, 4), size=28, seed=0):
    """Random colour PNGs in root/<train|test>/<class>/: a 3-channel dataset of `classes` classes."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for c in range(classes):
            os.makedirs(root / split / f"class{c}")
            for i in range(count):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.png")
    return f"folder:{root}"


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    return write_colour_folder(tmp_path_factory.mktemp("colour"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """name -> a source of weights: "resnet" a short run on mocked MNIST (1 channel, 10 classes); "mlp" and
    "mlp_colour" checkpoint prefixes of an mlp built (seeded otherwise than the tests' models) for MNIST and for the
    colour folder (3 channels, 3 classes)."""
    root = tmp_path_factory.mktemp("pretrained")
    with pytest.MonkeyPatch.context() as patch, mocked():
        patch.setattr(tfds_source, "ensure_downloadable", lambda builder, manual_dir: None)
        trainer.train_and_evaluate(make_config(root / "resnet", train_steps=2, eval_every=2, **RESNET))
    sources = {"resnet": str(root / "resnet")}
    tf.keras.utils.set_random_seed(1)
    for name, image_shape, classes in (("mlp", (28, 28, 1), 10), ("mlp_colour", (28, 28, 3), 3)):
        dataset = types.SimpleNamespace(num_classes=classes, image_shape=image_shape)
        model = models.create(make_config("unused"), dataset)
        model(tf.zeros([1, *image_shape]))
        sources[name] = tf.train.Checkpoint(model_variables=list(model.variables)).write(str(root / name / "ckpt"))
    return sources


def latest_values(source):
    """model.variables of a checkpoint prefix, or of a run's latest checkpoint, by position."""
    source = str(source)
    prefix = source if os.path.exists(source + ".index") else tf.train.latest_checkpoint(source)
    reader = tf.train.load_checkpoint(prefix)
    count = sum(n.startswith("model_variables/") for n in reader.get_variable_to_shape_map())
    return [reader.get_tensor(f"model_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE") for i in range(count)]


def initialised(config):
    """(model, the line init_weights printed, a model built fresh by the same config) for `config`."""
    dataset = data.load(config)
    strategy = distribute.create_strategy(config)
    fresh = train_lib.build(config, dataset, strategy, 10)[0]
    model = train_lib.build(config, dataset, strategy, 10)[0]
    return model, transfer.init_weights(model, config, dataset), fresh


def head_positions(model):
    return [i for i, v in enumerate(model.variables) if any(v is w for w in model.classifier.variables)]


@pytest.mark.parametrize("source, into_colour, channels", [("resnet", True, (1, 3)), ("mlp_colour", False, (3, 1))],
                         ids=["resnet_1_to_3_channels", "mlp_3_to_1_channels"])
def test_a_new_head_on_another_class_count_and_the_input_kernel_adapted(
        mock_tfds, pretrained, colour, tmp_path, source, into_colour, channels):
    """Mocked MNIST (10 classes, 1 channel) into the colour folder (3 classes, 3 channels) and back; a convolution's
    kernel and a Dense kernel on flattened images."""
    flags = dict(RESNET, dataset=colour, image_size=28) if into_colour else {}
    model, line, fresh = initialised(make_config(tmp_path, init_checkpoint=pretrained[source], **flags))
    held, values = latest_values(pretrained[source]), [v.numpy() for v in model.variables]
    head = head_positions(model)
    assert held[head[0]].shape[-1] != values[head[0]].shape[-1]  # 10 classes <-> 3.
    assert ("not loaded, made fresh: the head (another shape): " + ", ".join(
        f"{model.variables[i].path} {list(values[i].shape)} (the checkpoint's {list(held[i].shape)})"
        for i in head)) in line
    assert f"adapted over input channels: {model.variables[0].path} {list(held[0].shape)}" in line
    for i in head:
        np.testing.assert_array_equal(values[i], fresh.variables[i].numpy())
    source_view = held[0].reshape(-1, channels[0], held[0].shape[-1])
    expected = np.repeat(source_view / 3, 3, axis=1) if channels == (1, 3) else source_view.sum(1, keepdims=True)
    np.testing.assert_allclose(values[0], expected.reshape(values[0].shape), rtol=1e-6)
    for i in set(range(1, len(values))) - set(head):
        np.testing.assert_array_equal(values[i], held[i])


def test_init_skip_head_makes_a_fresh_head_of_the_same_shape(mock_tfds, pretrained, tmp_path):
    kept, line, _ = initialised(make_config(tmp_path / "kept", init_checkpoint=pretrained["mlp"]))
    assert "fresh" not in line and "adapted" not in line
    skipped, line, fresh = initialised(make_config(tmp_path / "skip", init_checkpoint=pretrained["mlp"],
                                                   init_skip="head"))
    assert "not loaded, made fresh: the head (--init_skip=head): mlp/" in line and "checkpoint's" not in line
    held, head = latest_values(pretrained["mlp"]), head_positions(skipped)
    for i, (a, b) in enumerate(zip(kept.variables, skipped.variables)):
        np.testing.assert_array_equal(a.numpy(), held[i])
        np.testing.assert_array_equal(b.numpy(), fresh.variables[i].numpy() if i in head else held[i])


def test_a_misfit_beyond_the_head_and_input_channels_is_an_error(mock_tfds, pretrained, tmp_path):
    with pytest.raises(UserError, match=r"does not fit --model=mlp: .* first misfit #0 mlp/dense.*/kernel "
                                        r"\[784, 32\] vs \[784, 16\] \(only the head and the input layer's"):
        initialised(make_config(tmp_path, init_checkpoint=pretrained["mlp"], hidden_units="32"))
    # 28x28 gray digits at 14x14: 784 inputs would divide into 196 pixels x 4 "channels"; they are other pixels.
    with pytest.raises(UserError, match=r"first misfit #0 mlp/dense.*/kernel \[196, 16\] vs \[784, 16\]"):
        initialised(make_config(tmp_path, init_checkpoint=pretrained["mlp"], image_size="14"))


def test_a_linear_probe_leaves_every_other_variable_bit_identical(mock_tfds, pretrained, tmp_path):
    """Batch norm (its statistics included) and a moving average of the head, which evaluation reads."""
    trainer.train_and_evaluate(make_config(tmp_path, init_checkpoint=pretrained["resnet"], init_skip="head",
                                           trainable="head", train_steps=8, ema_decay=0.5, **RESNET))
    held, probed = latest_values(pretrained["resnet"]), latest_values(tmp_path)
    restored = runs.load_model(str(tmp_path))  # The run's model as evaluation rebuilds it, its average read.
    head = head_positions(restored.model)
    assert [v.trainable for v in restored.model.trainable_variables] and len(restored.model.trainable_variables) == 2
    for i in range(len(held)):
        if i in head:
            assert not np.array_equal(probed[i], held[i])
        else:
            np.testing.assert_array_equal(probed[i], held[i], err_msg=restored.model.variables[i].path)
    # From the probe's moving average: the head's average, the other weights raw.
    model, _, _ = initialised(make_config(tmp_path / "next", init_checkpoint=str(tmp_path), init_from_average=True,
                                          **RESNET))
    average = tf.train.load_checkpoint(tf.train.latest_checkpoint(tmp_path))
    for j, i in enumerate(head):
        np.testing.assert_array_equal(model.variables[i].numpy(),
                                      average.get_tensor(f"ema/{j}/.ATTRIBUTES/VARIABLE_VALUE"))
    np.testing.assert_array_equal(model.variables[0].numpy(), held[0])


@pytest.mark.slow
def test_a_probed_vit_trains_its_head_alone():
    """ViT's own weights (class token, position embeddings) freeze with its layers."""
    config = make_config("unused", trainable="head", **VIT)
    model = models.create(config, types.SimpleNamespace(num_classes=10, image_shape=(16, 16, 3)))
    model(tf.zeros([1, 16, 16, 3]))
    transfer.freeze(model, config)
    assert [v.path for v in model.trainable_variables] == [v.path for v in model.classifier.variables]
    assert not model.class_token.trainable and not model.position_embedding.trainable


@pytest.mark.parametrize("name, image_shape", [("resnet18", (32, 32, 3)), ("vit_ti16", (32, 32, 3))])
def test_layer_decay_gives_each_layer_its_rate(name, image_shape):
    """Each variable's rate as the optimizer reports it and as one SGD step with unit gradients moves it, weight
    decay following the same rate: BEiT/MAE's head at 1, block i of N at F ** (N + 1 - i), the stem F ** (N + 1)."""
    decay, rate, weight_decay = 0.8, 0.1, 0.5
    config = make_config("unused", model=name, optimizer="sgd", learning_rate=rate, layer_decay=decay,
                         weight_decay=weight_decay)
    model = models.create(config, types.SimpleNamespace(num_classes=10, image_shape=image_shape))
    model(tf.zeros([1, *image_shape]))
    optimizer = optim.create_optimizer(config, 10, model)
    optimizer.build(model.trainable_variables)
    depth = len(model.blocks)
    after_blocks = model.classifier.variables + (model.norm.variables if name.startswith("vit") else [])
    expected = {}
    for v in model.trainable_variables:
        block = next((i + 1 for i, b in enumerate(model.blocks) if any(v is w for w in b.variables)), None)
        layer = block or (depth + 1 if any(v is w for w in after_blocks) else 0)
        expected[v.path] = decay ** (depth + 1 - layer)
    scales = {v.path: optimizer.rate_scale(v) for v in model.trainable_variables}
    assert scales == pytest.approx(expected)
    assert sorted(set(np.round(list(scales.values()), 9))) == sorted(np.round([decay ** k for k in range(depth + 2)],
                                                                              9))  # Every level has its variables.
    before = [v.numpy() for v in model.trainable_variables]
    optimizer.apply_gradients([(tf.ones_like(v), v) for v in model.trainable_variables])
    for value, v in zip(before, model.trainable_variables):
        step = rate * scales[v.path]
        np.testing.assert_allclose(value - v.numpy(), step * (1 + weight_decay * value), rtol=2e-3, atol=1e-8,
                                   err_msg=v.path)


def test_layer_decay_needs_a_model_of_blocks(mock_tfds, tmp_path):
    with pytest.raises(UserError, match=r"--layer_decay needs a model built of blocks .*--model=mlp has none"):
        trainer.train_and_evaluate(make_config(tmp_path, layer_decay=0.7))


@pytest.mark.slow
def test_a_fine_tuning_run_killed_with_sigkill_resumes_exactly(pretrained, tmp_path):
    """A linear probe on a fresh head: its optimizer and moving average hold the head's variables alone."""
    kill_resume_and_compare(tmp_path, f"--init_checkpoint={pretrained['mlp']}", "--init_skip=head", "--trainable=head",
                            "--ema_decay=0.9")
