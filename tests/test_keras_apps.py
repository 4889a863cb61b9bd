"""The Keras applications as models (research/models/keras_apps.py) and --pretrained (research/transfer.py,
research/models/_keras_weights.py): every keras.applications classifier registered from the table; each
architecture built with what it declares and reading a Keras weights file into the same features and logits as the
application itself computes, every other network built with Keras' parameter count; ImageNet weights offline; the
mistakes, one line each; a linear probe, layer-wise rates, evaluation, export and exact resume through the real
loop.

Weights files are made here: the application built with weights=None, its weights jittered (so that two layers of
one shape never hold the same values, and a weight read into the wrong layer shows), its batch-norm statistics
those of random images, and saved by save_weights."""

import hashlib
import json
import os
import types

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend import config as keras_config
from keras.src.legacy.saving import legacy_h5_format
from keras.src.utils import file_utils

from conftest import make_config
from research import UserError, evaluate, export, models, optim, trainer, transfer
from research.models import keras_apps
from test_resume import stop_resume_and_compare

SMALLEST = [architecture.names[0] for architecture in keras_apps.ARCHITECTURES]
MINIMUM_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}  # Keras' own minimums; 32 for the rest.


@pytest.fixture(autouse=True)
def float32_policy():
    yield
    tf.keras.mixed_precision.set_global_policy("float32")


def _size(name):
    return MINIMUM_SIZE.get(name, 32)


def _model(name, classes=10, channels=3, **flags):
    """(config, keras/<name> built for `channels`-channel images at the network's minimum size)."""
    size = _size(name)
    config = make_config("unused", model=f"keras/{name}", **flags)
    model = models.create(config, types.SimpleNamespace(image_shape=(size, size, channels), num_classes=classes))
    model(tf.zeros([1, size, size, channels]))
    return config, model


def _application(name, include_top, seed=0, size=None):
    """keras.applications.<name> (logits, if with its top) with jittered weights, its batch-norm statistics then
    those of a batch of random images (so that its features depend on the image, as a trained network's do: with
    statistics that do not fit, a deep network's features are the same for every image)."""
    size = size or _size(name)
    top = dict(classifier_activation=None) if include_top else {}
    network = getattr(keras.applications, name)(weights=None, include_top=include_top, input_shape=(size, size, 3),
                                                **top)
    rng = np.random.default_rng(seed)
    for v in network.weights:
        value = v.numpy() * (1 + 0.2 * rng.standard_normal(v.shape)) + 0.02 * rng.standard_normal(v.shape)
        v.assign(np.abs(value) + 0.5 if "variance" in v.path else value)
    for layer in network.layers:
        if isinstance(layer, tf.keras.layers.Normalization):
            layer.finalize_state()  # (Keras' Normalization computes with copies of its weights, taken here.)
    norms = [layer for layer in network._flatten_layers() if isinstance(layer, tf.keras.layers.BatchNormalization)]
    for norm in norms:
        norm.momentum = 0.0  # One pass in training mode: the moving statistics become the batch's.
    network(_keras_input(name, _images(name, count=8, seed=seed + 10, size=size)), training=True)
    for norm in norms:
        norm.momentum = 0.99
    return network


def _saved(network, path):
    network.save_weights(str(path))
    return str(path)


def _images(name, count=3, channels=3, seed=1, size=None):
    size = size or _size(name)
    return np.random.default_rng(seed).uniform(0, 1, (count, size, size, channels)).astype(np.float32)


def _keras_input(name, images):
    """What keras.applications.<name> takes for images in [0, 1]: its module's preprocess_input of [0, 255]."""
    module = getattr(keras.applications, keras_apps.ARCHITECTURE[name].module)
    return module.preprocess_input(np.repeat(images, 3 // images.shape[-1], axis=-1) * 255.0)


def _pooled(network, inputs):
    return tf.reduce_mean(network(inputs), axis=[1, 2]).numpy()


def test_every_keras_classifier_is_a_model_from_the_table():
    """Registered as keras/<its Keras name>, with what its table row says; a Keras that adds one fails here."""
    classifiers = {name for name in dir(keras.applications) if name[0].isupper()}
    assert {name for name in models.names() if name.startswith("keras/")} == {f"keras/{n}" for n in classifiers}
    assert models.families()["keras_apps"] == "keras/MobileNetV3Small"  # The smallest, which the family tests train.
    for name, architecture in keras_apps.ARCHITECTURE.items():
        declared = models.capabilities(f"keras/{name}")
        assert getattr(keras.applications, name).__module__.endswith(f".{architecture.module}")
        assert (declared.batch_norm, bool(declared.stochastic_depth)) == (architecture.batch_norm,
                                                                          architecture.stochastic_depth is not None)
        assert declared.channels == (1, 3) and declared.pretrained and declared.blocks and declared.dropout
    assert set(models.having("stochastic_depth")) >= {"keras/ConvNeXtTiny", "keras/EfficientNetB0",
                                                      "keras/EfficientNetV2S"}


def test_a_weights_file_gives_the_applications_own_features_in_colour_and_grayscale(tmp_path):
    """keras/MobileNetV3Small reading a save_weights file of the application without its top (here, and on
    TensorFlow's ram:// filesystem): on the same images in [0, 1] its pooled features are the application's on its
    own preprocessing of them, for colour images and for grayscale ones (repeated to three channels); the head
    starts at zero, at the chance loss; the record names the file and its SHA-256."""
    network = _application("MobileNetV3Small", include_top=False)
    local = _saved(network, tmp_path / "mnv3.weights.h5")
    remote = f"ram://{tmp_path.name}/mnv3.weights.h5"  # TensorFlow's in-memory filesystem, as gs:// would be.
    tf.io.gfile.makedirs(os.path.dirname(remote))
    tf.io.gfile.copy(local, remote)
    for channels, path in ((3, local), (1, remote)):
        config, model = _model("MobileNetV3Small", channels=channels, pretrained=path)
        line, record = transfer.load_pretrained(model, config)
        images = _images("MobileNetV3Small", channels=channels)
        np.testing.assert_allclose(model.features(tf.constant(images)).numpy(),
                                   _pooled(network, _keras_input("MobileNetV3Small", images)), atol=1e-5)
        assert np.all(model(images).numpy() == 0)
        assert line == (f"Initialised keras/MobileNetV3Small from {path}: its network; the head starts at zero "
                        "(keras.applications.MobileNetV3Small's top is more than a Dense layer on pooled features)")
        assert record == {"source": path, "sha256": hashlib.sha256(open(local, "rb").read()).hexdigest(),
                          "loaded": line}


@pytest.mark.slow
def test_imagenet_offline_names_the_file_to_fetch_then_keras_reads_it_from_its_cache(tmp_path, monkeypatch):
    """keras/MobileNetV2 on 1000 classes takes Keras' ImageNet file with its top. Offline (a proxy that refuses),
    one line names the URL and the place in Keras' cache, at once; a file put there (Keras' own .h5 format; Keras
    pins no hash for MobileNetV2's) is then read, its ImageNet head kept: the application's logits."""
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras_home"))
    os.makedirs(tmp_path / "keras_home")
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")  # The discard port: refused at once.
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    config, model = _model("MobileNetV2", classes=1000, pretrained="imagenet")
    cached = tmp_path / "keras_home" / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
    with pytest.raises(UserError) as error:
        transfer.load_pretrained(model, config)
    assert str(error.value) == (
        f"--pretrained=imagenet needs {cached.name}, which this machine cannot fetch (no answer from https://storage"
        f".googleapis.com/tensorflow/keras-applications/mobilenet_v2/{cached.name}): fetch that URL on a machine with "
        f"internet and put the file at {cached}, where Keras looks for it, or pass its path as --pretrained=PATH")
    network = _application("MobileNetV2", include_top=True, size=224)  # Keras' size for its ImageNet top.
    os.makedirs(cached.parent)
    with h5py.File(cached, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, network)
    line, record = transfer.load_pretrained(model, config)
    assert line.startswith(f"Initialised keras/MobileNetV2 from Keras' ImageNet weights {cached} (sha256 ")
    assert line.endswith("its network and its ImageNet head (1000 classes: ImageNet's, in Keras' order, until "
                         "training relabels them)") and "sha256" not in record  # (A word: the line has the hash.)
    at_32 = keras.applications.MobileNetV2(weights=str(cached), input_shape=(32, 32, 3), classifier_activation=None)
    images = _images("MobileNetV2")
    np.testing.assert_allclose(model(images).numpy(), at_32(_keras_input("MobileNetV2", images)).numpy(), atol=1e-5)
    with h5py.File(str(cached).replace(".h5", "_no_top.h5"), "w") as f:  # What --init_skip=head reads instead.
        legacy_h5_format.save_weights_to_hdf5_group(f, keras.applications.MobileNetV2(weights=None, include_top=False))
    config, model = _model("MobileNetV2", classes=1000, pretrained="imagenet", init_skip="head")
    assert transfer.load_pretrained(model, config)[0].endswith("the head starts at zero (--init_skip=head)")


@pytest.mark.slow
def test_efficientnet_imagenet_weights_compute_as_keras_builds_them_for_imagenet(tmp_path, monkeypatch):
    """Keras builds EfficientNet (v1) for weights="imagenet" with one more rescaling of its input, which the model,
    built without weights, folds into its normalisation: with an ImageNet file in Keras' cache (here a stand-in,
    its pinned hash waived), the model computes what keras.applications.EfficientNetB0(weights="imagenet") itself
    computes: the same stem outputs (to 1e-5; without the fold they differ wholly), and pooled features close
    enough for the load's own check (to rounding, which this random network magnifies thousands of times)."""
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))
    monkeypatch.setattr(file_utils, "validate_file", lambda *args, **kwargs: True)
    os.makedirs(tmp_path / "models")
    network = _application("EfficientNetB0", include_top=False)
    with h5py.File(tmp_path / "models" / "efficientnetb0_notop.h5", "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, network)
    config, model = _model("EfficientNetB0", pretrained="imagenet")
    line, _ = transfer.load_pretrained(model, config)
    assert line.startswith(f"Initialised keras/EfficientNetB0 from Keras' ImageNet weights {tmp_path}/models/")
    imagenet = keras.applications.EfficientNetB0(weights="imagenet", include_top=False, input_shape=(32, 32, 3))
    inputs = _keras_input("EfficientNetB0", _images("EfficientNetB0"))

    def difference(a, b):
        outputs = [keras.Model(n.input, n.get_layer("stem_bn").output)(inputs).numpy() for n in (a, b)]
        return np.linalg.norm(outputs[0] - outputs[1]) / np.linalg.norm(outputs[1])

    assert difference(model.backbone, imagenet) < 1e-5 and difference(network, imagenet) > 0.1


def test_pretrained_mistakes_are_one_line_each(tmp_path):
    """What a new user might pass, each refused in one line before anything changes."""
    other = _saved(_application("MobileNetV2", include_top=False), tmp_path / "mobilenet_v2.weights.h5")
    (tmp_path / "notes.h5").write_text("not weights")
    (tmp_path / "weights.npz").write_bytes(b"PK")
    config, model = _model("MobileNetV3Small")
    before = [v.numpy() for v in model.variables]
    mistakes = {
        str(tmp_path / "missing.weights.h5"): "--pretrained=.*missing.weights.h5: no such file",
        str(tmp_path): "is a directory: give the weights file in it",
        str(tmp_path / "notes.h5"): r"MobileNetV3Small\(include_top=False\) cannot load it: .*file signature",
        str(tmp_path / "weights.npz"): "cannot load it: File format not supported",
        other: r"cannot load it: A total of \d+ objects could not be loaded",
        "resnet": "--pretrained=resnet: keras/MobileNetV3Small takes `imagenet`",
        "nosuch://bucket/x.h5": "--pretrained=nosuch://bucket/x.h5: TensorFlow cannot open it",
    }
    for source, message in mistakes.items():
        with pytest.raises(UserError, match=message) as error:
            transfer.load_pretrained(model, make_config("unused", model="keras/MobileNetV3Small", pretrained=source))
        assert "\n" not in str(error.value), source
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.variables))
    for flags, message in [
            (dict(model="resnet18", pretrained="imagenet"),
             r"--pretrained needs a model that reads pretrained weights "
             r"\(keras/\*, vit_b16, vit_l16, vit_s16, vit_ti16\); --model=resnet18 reads none"),
            (dict(model="keras/ResNet50", pretrained="imagenet", init_checkpoint=str(tmp_path)),
             "--pretrained and --init_checkpoint both say where the weights start"),
            (dict(model="keras/ResNet50", normalize="imagenet"),
             "--model=keras/ResNet50 preprocesses its inputs itself.*use --normalize=none")]:
        with pytest.raises(UserError, match=message):
            make_config("unused", **flags)
    with pytest.raises(UserError, match=r"--model=keras/InceptionV3 does not fit 32x32 images: Input size must be "
                                        r"at least 75x75"):
        models.create(make_config("unused", model="keras/InceptionV3"),
                      types.SimpleNamespace(image_shape=(32, 32, 3), num_classes=10))
    with pytest.raises(UserError, match="--model=keras/ResNet50 takes images of 1 or 3 channels, not 4"):
        models.create(make_config("unused", model="keras/ResNet50"),
                      types.SimpleNamespace(image_shape=(32, 32, 4), num_classes=10))


def test_layer_decay_rates_follow_the_applications_blocks():
    """keras/MobileNetV3Small's eleven inverted-residual blocks: the stem below them at F ** 12, block i at
    F ** (12 - i), the last convolution after them and the head at the full rate, as the optimizer reports them."""
    decay = 0.8
    config, model = _model("MobileNetV3Small", optimizer="sgd", layer_decay=decay)
    optimizer = optim.create_optimizer(config, 10, model)
    optimizer.build(model.trainable_variables)
    blocks = model.blocks
    assert len(blocks) == 11
    for i, block in enumerate(blocks):
        names = {v.path.split("/")[-2] for v in block.variables}
        assert all(n.startswith("expanded_conv_") for n in names), names
        trainable = [v for v in block.variables if v.trainable]
        assert [optimizer.rate_scale(v) for v in trainable] == pytest.approx([decay ** (11 - i)] * len(trainable))
    rates = {v.path.split("/")[-2]: optimizer.rate_scale(v) for v in model.trainable_variables}
    assert rates["conv"] == pytest.approx(decay ** 12) and rates["conv_bn"] == pytest.approx(decay ** 12)
    assert rates["conv_1"] == rates["conv_1_bn"] == 1 and optimizer.rate_scale(model.classifier.kernel) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALLEST)
def test_each_architecture_reads_keras_weights_as_the_application_computes(tmp_path, name):
    """The smallest network of each Keras module, at its minimum size: what it declares is what it has (built with
    dropout and stochastic depth on); a file without a top gives the application's pooled features; with 1000
    classes, a file with the top gives the application's logits where the top is one Dense layer on the pooled
    features, and a head at zero where it is more."""
    config, model = _model(name, dropout="0.1", stochastic_depth="0.1")
    built = list(model._flatten_layers())
    drops = [layer for layer in built if isinstance(layer, tf.keras.layers.Dropout)]
    assert models.has(config, "batch_norm") == any(isinstance(x, tf.keras.layers.BatchNormalization) for x in built)
    assert models.has(config, "stochastic_depth") == any(d.noise_shape is not None and d.rate > 0 for d in drops)
    assert any(d.noise_shape is None for d in drops) and len(model.blocks) > 1
    seeded = {v.path for v in model.variables if "seed_generator_state" in v.path}  # Checkpointed: exact resume.
    assert len(seeded) == len(drops)

    images = _images(name)
    network = _application(name, include_top=False)
    config, model = _model(name, pretrained=_saved(network, tmp_path / f"{name}.weights.h5"))
    assert model.count_params() == network.count_params() + (network.output_shape[-1] + 1) * 10
    transfer.load_pretrained(model, config)
    expected = _pooled(network, _keras_input(name, images))
    assert expected.std(axis=0).mean() > 0.01 * np.abs(expected).mean()  # Features of the image, not constants.
    np.testing.assert_allclose(model.features(tf.constant(images)).numpy(), expected, atol=1e-5, rtol=1e-5)

    network = _application(name, include_top=True, seed=1)
    config, model = _model(name, classes=1000, pretrained=_saved(network, tmp_path / f"{name}_top.weights.h5"))
    line, _ = transfer.load_pretrained(model, config)
    logits = model(images).numpy()
    if keras_apps.ARCHITECTURE[name].head:
        assert line.endswith("and its ImageNet head (1000 classes: ImageNet's, in Keras' order, until training "
                             "relabels them)")
        np.testing.assert_allclose(logits, network(_keras_input(name, images)).numpy(), atol=1e-5, rtol=1e-5)
    else:
        assert line.endswith("top is more than a Dense layer on pooled features)") and np.all(logits == 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", [architecture.names[-1] for architecture in keras_apps.ARCHITECTURES
                                  if len(architecture.names) > 1])
def test_the_largest_of_each_architecture_has_keras_parameter_count(name):
    """The largest member of each architecture with several (ConvNeXtXLarge's 350 M parameters included;
    weights=None, called at its minimum size alone): its network's parameters are keras.applications' own without
    the top, and the head's are (features + 1) x classes. The members between the smallest (the test above) and
    the largest differ from them only in Keras' width and depth arguments; building all 26 took 12 minutes."""
    _, model = _model(name, classes=1000)
    network = getattr(keras.applications, name)(weights=None, include_top=False,
                                                input_shape=(_size(name), _size(name), 3))
    features = network.output_shape[-1]
    assert model.count_params() == network.count_params() + (features + 1) * 1000
    tf.keras.backend.clear_session()


@pytest.mark.slow
def test_a_pretrained_linear_probe_trains_its_head_alone_and_records_the_file(mock_tfds, tmp_path, capsys):
    """A probe on 32 px mock CIFAR-10: the network keeps the file's weights bit for bit, batch-norm statistics
    included (frozen layers run in inference mode); provenance.jsonl records the file's hash; a rerun with another
    --pretrained is refused, and the same one resumes without reading it again."""
    network = _application("MobileNetV3Small", include_top=False)
    path = _saved(network, tmp_path / "mnv3.weights.h5")
    flags = dict(model="keras/MobileNetV3Small", dataset="cifar10", pretrained=path, trainable="head",
                 learning_rate=0.1, train_steps=2, steps_per_loop=1, eval_every=2, checkpoint_every=2)
    results = trainer.train_and_evaluate(make_config(tmp_path / "run", **flags))
    assert results["step"] == 2 and f"Initialised keras/MobileNetV3Small from {path}" in capsys.readouterr().out
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(tmp_path / "run"))
    _, model = _model("MobileNetV3Small")
    values = [reader.get_tensor(f"model_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE") for i in range(len(model.variables))]
    weights = {id(v) for v in model.backbone.weights}
    kept = [value for v, value in zip(model.variables, values) if id(v) in weights]
    assert len(kept) == len(network.weights)
    for value, expected in zip(kept, network.weights):
        np.testing.assert_array_equal(value, expected.numpy(), err_msg=expected.path)
    assert np.any(values[-2] != 0)  # The head learned.
    [record] = [json.loads(line) for line in open(tmp_path / "run" / "provenance.jsonl")]
    assert record["pretrained"]["sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    with pytest.raises(UserError, match=r"holds a run with other settings \(--pretrained: .*mnv3.weights.h5 -> "
                                        r"imagenet\)"):
        trainer.train_and_evaluate(make_config(tmp_path / "run", **{**flags, "pretrained": "imagenet",
                                                                    "train_steps": 4}))
    trainer.train_and_evaluate(make_config(tmp_path / "run", **{**flags, "train_steps": 4}))
    assert "Initialised" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_grayscale_run_evaluates_and_exports_with_its_preprocessing(mock_tfds, tmp_path):
    """keras/MobileNetV2 (its [-1, 1] preprocessing inside) on mock MNIST's gray digits at 32 px: evaluate reads
    the run back, and the export (SavedModel, its session loader, the Keras file and model.tflite) reproduces the
    checkpoint's probabilities, as research/export.py checks for each form before writing it."""
    config = make_config(tmp_path / "run", model="keras/MobileNetV2", image_size=32, train_steps=2, steps_per_loop=1,
                         eval_every=2, checkpoint_every=2)
    trainer.train_and_evaluate(config)
    assert evaluate.evaluate(config.model_dir)["examples"] == 64
    exported = export.export(config.model_dir, str(tmp_path / "export" / "1"))
    assert [name for name, *_ in exported.tflite] == ["model.tflite"]


@pytest.mark.slow
def test_a_keras_application_run_resumes_exactly(mock_tfds, tmp_path):
    """EfficientNetB0 (drop-connect at --stochastic_depth, head dropout), fine-tuned from a file at a learning rate
    per block, with a moving average and accumulated micro-batches: stopped at step 3 and resumed to 6, it ends
    where the run straight to 6 ends, bit for bit."""
    path = _saved(_application("EfficientNetB0", include_top=False), tmp_path / "b0.weights.h5")
    flags = dict(model="keras/EfficientNetB0", dataset="cifar10", pretrained=path, stochastic_depth="0.2",
                 dropout="0.2", layer_decay="0.8", ema_decay="0.9", grad_accum_steps=2, batch_size=8,
                 steps_per_loop=3, eval_every=6, checkpoint_every=3)
    stop_resume_and_compare(tmp_path, 3, 6, **flags)
