"""ResNet v1.5 and ViT: the reference implementations' sizes, forward and backward passes, ViT's position embeddings
at another image size; the model summary command; model flags in config and checkpoints. (Their bfloat16 training
and export: tests/test_export.py.)

Sizes are counted at 224 px and 1000 classes on models built by a 32 px call: ResNet's variables do not depend on
the image size, and ViT's position embeddings are made for the dataset's size, whatever size it is called on.
"""

import os
import types

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_config
from research import UserError, checkpoint, cli, config as config_lib, models, trainer
from research.models import __main__ as summary, vit
from test_configs import REPO, _flagfile_values

STANDARD = [name for name in models.names() if name.startswith(("resnet1", "resnet3", "resnet5", "vit_"))]
# The Keras applications are one family of 40 networks: its first here, each architecture in test_keras_apps.py.
OWN = [name for name in models.names() if not name.startswith("keras/")] + [models.families()["keras_apps"]]


@pytest.fixture(autouse=True)
def float32_policy():
    """train_lib.build sets the global precision policy; models built directly afterwards must not inherit it."""
    yield
    tf.keras.mixed_precision.set_global_policy("float32")


def _build(name, shape=(32, 32, 3), classes=10, call_shape=None, **flags):
    model = models.create(make_config("unused", model=name, **flags),
                          types.SimpleNamespace(image_shape=shape, num_classes=classes))
    model(tf.zeros([1, *(call_shape or shape)]))
    return model


def _trainable(model):
    return sum(int(tf.size(v)) for v in model.trainable_variables)


@pytest.mark.slow
@pytest.mark.parametrize("name, flags, params", [
    ("resnet18", {}, 11_689_512),  # torchvision.models.resnet18().
    ("resnet50", {}, 25_557_032),
    ("vit_s16", {}, 22_050_664),  # timm vit_small_patch16_224.
    ("vit_b16", {}, 86_567_656),
    ("vit_s16", {"vit_pooling": "gap"}, 22_050_664 - 2 * 384),  # No class token, nor its position embedding.
])
def test_parameter_counts_equal_the_reference_implementations(name, flags, params):
    assert _trainable(_build(name, (224, 224, 3), 1000, call_shape=(32, 32, 3), **flags)) == params


@pytest.mark.slow
@pytest.mark.parametrize("name", STANDARD)
def test_forward_and_backward_at_a_small_image_size(name):
    flags = {"stochastic_depth": "0.1"}  # Both families drop residual branches.
    model = _build(name, **flags)
    images, labels = tf.random.uniform([2, 32, 32, 3], seed=1), tf.constant([3, 7])
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
    grads = tape.gradient(loss, model.trainable_variables)
    assert logits.shape == (2, 10) and np.isfinite(loss.numpy())
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
    assert any(np.any(g.numpy() != 0) for g in grads)  # (ViT's zero head stops the rest of its first gradient.)


def test_zero_init_residual_starts_every_block_as_the_identity():
    for zero_init, gamma in ((True, 0.0), (False, 1.0)):
        model = _build("resnet18", zero_init_residual=str(zero_init))
        assert all(np.all(block.norms[-1].gamma.numpy() == gamma) for block in model.blocks)


@pytest.mark.slow
def test_vit_position_embeddings_are_resized_for_another_image_size():
    model = _build("vit_ti16")  # Made for 32 px: a 2x2 grid of patches, plus the class token.
    assert model.position_embedding.shape == (1, 5, 192)
    assert model(tf.zeros([2, 48, 48, 3])).shape == (2, 10)  # A 3x3 grid.
    embeddings = tf.random.normal([1, 4, 192], seed=2)
    assert vit.resize_position_embeddings(embeddings, (2, 2), (2, 2)) is embeddings
    resized = vit.resize_position_embeddings(embeddings, (2, 2), (3, 3)).numpy().reshape(3, 3, 192)
    corners = resized[::2, ::2].reshape(4, 192)  # Bicubic: the corners of the new grid lie near the old ones.
    assert np.corrcoef(corners.ravel(), embeddings.numpy().ravel())[0, 1] > 0.9
    constant = vit.resize_position_embeddings(tf.ones([1, 4, 192]), (2, 2), (4, 4))
    np.testing.assert_allclose(constant.numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", OWN)
def test_every_model_has_what_its_registration_declares(shallow_models, capsys, name):
    """The declaration (research/models/_registry.py Capabilities) is what flags, checks and tests read: it must
    match the model built with every capability switched on that its flags switch on; --list shows it."""
    overrides = dict(dropout="0.1", stochastic_depth="0.1", **{"conv_layers": "8c3,d"} if name == "convnet" else {})
    config, model = make_config("unused", model=name, **overrides), _build(name, **overrides)
    layers = list(model._flatten_layers())
    dropouts = [layer for layer in layers if isinstance(layer, tf.keras.layers.Dropout)]
    assert models.has(config, "batch_norm") == any(isinstance(layer, tf.keras.layers.BatchNormalization)
                                                   for layer in layers)
    assert models.has(config, "dropout") == any(layer.noise_shape is None for layer in dropouts)
    assert models.has(config, "stochastic_depth") == any(layer.noise_shape is not None for layer in dropouts)
    assert models.has(config, "blocks") == bool(getattr(model, "blocks", None))
    assert models.has(config, "head") == isinstance(getattr(model, "classifier", None), tf.keras.layers.Dense)
    assert models.capabilities(name).channels == ((1, 3) if name.startswith("keras/") else None)  # Keras': RGB.
    summary.main(["--list"])
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.split()[0] == name]
    assert line.endswith(f"[{models.capabilities(name).summary()}]")


@pytest.mark.parametrize("name", models.families().values())
def test_every_family_trains_the_real_loop(mock_tfds, shallow_models, tmp_path, name):
    """Each family of the registry (its first model), two steps on 32 px mock CIFAR-10 through train_and_evaluate."""
    results = trainer.train_and_evaluate(make_config(tmp_path, model=name, dataset="cifar10", train_steps=2,
                                                     steps_per_loop=1, eval_every=2, checkpoint_every=2))
    assert results["step"] == 2 and np.isfinite(results["train"]["loss"]) and results["train"]["grad_norm"] > 0


NEW_RECIPES = ["imagenet_resnet50", "imagenet_vit_s16", "smoke_resnet18", "smoke_vit_ti16"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW_RECIPES)
def test_new_recipes_train_on_small_mock_images(mock_tfds, shallow_models, tmp_path, monkeypatch, name):
    """Each recipe as written (its crop, normalization, RandAugment, mixup), on 32 px mock CIFAR-10 in place of
    ImageNet or a folder (the models made shallow)."""
    monkeypatch.chdir(REPO)
    values = _flagfile_values(os.path.join(REPO, "configs", f"{name}.cfg"))
    values.update(model_dir=str(tmp_path), dataset="cifar10", train_split="train", eval_split="test",
                  image_size=32, train_steps=2, steps_per_loop=1, eval_every=2, batch_size=8, warmup_steps=1)
    results = trainer.train_and_evaluate(config_lib.make_config(**values))
    assert results["step"] == 2 and np.isfinite(results["train"]["loss"])


@pytest.fixture
def unparse_flags():
    """The summary command parses model flags into the global absl FLAGS: reset them afterwards."""
    yield
    config_lib.FLAGS.unparse_flags()


@pytest.mark.slow
def test_summary_prints_parameters_and_multiply_adds(capsys, unparse_flags):
    assert summary.main(["--model=resnet50", "--image_size=224", "--num_classes=1000"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters  25,557,032" in out and "total parameters      25,610,152" in out
    macs = float(out.split("multiply-adds")[1].split()[0])
    assert 4.0 < macs < 4.2  # ResNet-50's 4.1 GMACs.
    assert summary.main(["--list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing] == models.names() and all(len(line.split()) > 1 for line in listing)


@pytest.mark.parametrize("args, message", [
    (["--model=resnet9000"], "--model=resnet9000 is unknown"),
    (["--model=resnet18", "--image_size=0"], "--image_size must be positive, got 0"),
    (["--model=vit_ti16", "--image_size=8"], "multiples of its 16-pixel patches, not 8x8"),
    (["--model=vit_ti16", "--vit_pooling=max"], "vit_pooling"),
    (["--image_size=32"], "--model is required"),
    (["--model=resnet18", "resnet50"], "unexpected arguments: resnet50"),
])
def test_summary_mistakes_are_one_error_line(capsys, unparse_flags, args, message):
    assert cli.run(summary.main, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_model_flags_are_run_flags_and_guard_resume(tmp_path):
    """Defined in their model modules, they reach make_config, flags.txt and the checkpoint guard like any flag."""
    assert {"hidden_units", "widths", "conv_layers", "zero_init_residual", "vit_pooling",
            "stochastic_depth", "sync_batchnorm"} <= set(config_lib.names_with(config_lib.CHECKPOINT))
    config = make_config(tmp_path, model="vit_ti16", vit_pooling="gap", stochastic_depth="0.2")
    assert "--vit_pooling=gap\n" in config_lib.to_flagfile(config)
    (tmp_path / "flags.txt").write_text(config_lib.to_flagfile(config))
    with pytest.raises(UserError, match=r"--stochastic_depth: 0.2 -> 0.0; --vit_pooling: gap -> token"):
        checkpoint.check_resume_config(str(tmp_path), make_config(tmp_path, model="vit_ti16"))
    with pytest.raises(UserError, match="--widths must be integers"):
        make_config(tmp_path, widths="8,x")
    with pytest.raises(UserError, match=r"--stochastic_depth must be in \[0, 1\), got 1.0"):
        make_config(tmp_path, stochastic_depth="1")
