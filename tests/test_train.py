"""The training system end to end: real loop, mocked and real data, run directory contents, CLI errors."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import FASHION_MNIST_FILES, MNIST_FILES, make_config
from research import UserError, data, models, optim, runs, train_lib, trainer
from research.data import tfds_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shape_only(shape, classes):
    """What model builders read from a research.data.Dataset."""
    return data.Metadata("x", shape, [str(i) for i in range(classes)])


@pytest.mark.parametrize("model, shape, params", [
    ("cnn", (28, 28, 1), 104_202),  # The tutorial's model.summary().
    ("mlp", (28, 28, 1), 784 * 128 + 128 + 128 * 10 + 10),
    ("cnn_rgb", (32, 32, 3), 896 + 18_496 + 2304 * 128 + 128 + 1290),
    # convnet 32c5s2v,64c3s2v,128c3v: 28 -> 12 -> 5 -> 3; convs have no bias and 4 BN variables per channel.
    ("convnet", (28, 28, 1), 25 * 32 + 4 * 32 + 9 * 32 * 64 + 4 * 64 + 9 * 64 * 128 + 4 * 128 + 3 * 3 * 128 * 10 + 10),
])
def test_parameter_counts(model, shape, params):
    net = models.create(make_config("unused", model=model, hidden_units="128"), _shape_only(shape, 10))
    net(tf.zeros([1, *shape]))
    assert net.count_params() == params


def test_flag_values_are_checked_before_any_work():
    with pytest.raises(UserError, match="--model=resnet9000 is unknown; choose from .*cnn"):
        make_config("unused", model="resnet9000")
    with pytest.raises(UserError, match="--augment: unknown op spin"):
        make_config("unused", augment="translate,spin")
    with pytest.raises(UserError, match="unknown flag --learning_rat"):
        make_config("unused", learning_rat=0.1)
    with pytest.raises(UserError, match="--optimizer=adagrad is unknown; choose from adam"):
        make_config("unused", optimizer="adagrad")
    with pytest.raises(UserError, match="--conv_layers: cannot read '32x3'"):
        make_config("unused", model="convnet", conv_layers="32c3,32x3")


def test_a_model_that_does_not_fit_the_images_is_one_error_line(mock_tfds, tmp_path):
    with pytest.raises(UserError, match=r"--model=convnet does not fit mnist's \(28, 28, 1\) images: Computed output"):
        trainer.train_and_evaluate(make_config(tmp_path, model="convnet", conv_layers="32c30v"))


def test_convnet_layer_string():
    """Padding, stride, pooling and dropout as written: 28 -(3x3 valid)-> 26 -(pool)-> 13 -(5x5 stride 2)-> 7."""
    config = make_config("unused", model="convnet", conv_layers="8c3v,p,d,16c5s2", dropout=0.5)
    net = models.create(config, _shape_only((28, 28, 1), 10))
    net(tf.zeros([1, 28, 28, 1]))
    assert [type(layer).__name__ for layer in net.features] == [
        "Conv2D", "BatchNormalization", "ReLU", "MaxPooling2D", "Dropout", "Conv2D", "BatchNormalization", "ReLU"]
    assert net.classifier.kernel.shape == (7 * 7 * 16, 10)


@pytest.mark.parametrize("dataset, model", [("mnist", "mlp"), pytest.param("fashion_mnist", "cnn", marks=pytest.mark.slow),
                                            pytest.param("cifar10", "cnn_rgb", marks=pytest.mark.slow)])
def test_trains_and_writes_the_run_directory(mock_tfds, tmp_path, dataset, model):
    results = trainer.train_and_evaluate(make_config(tmp_path, dataset=dataset, model=model))
    assert results["step"] == 12
    assert results["eval"]["examples"] == 64  # Every mock eval example once, none dropped.
    assert np.sum(results["confusion_matrix"]) == 64
    assert json.load(open(tmp_path / "results.json")) == results
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [e["step"] for e in evals] == [8, 12]
    assert evals[-1]["accuracy"] == results["eval"]["accuracy"]
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.index")) == ["ckpt-12.index", "ckpt-4.index", "ckpt-8.index"]
    assert os.listdir(tmp_path / "train") and os.listdir(tmp_path / "eval")
    flags_txt = (tmp_path / "flags.txt").read_text()
    assert f"--dataset={dataset}\n" in flags_txt and f"--model={model}\n" in flags_txt


@pytest.mark.slow
def test_rerun_resumes_and_a_finished_run_exits(mock_tfds, tmp_path, capsys):
    trainer.train_and_evaluate(make_config(tmp_path, train_steps=8))
    longer = trainer.train_and_evaluate(make_config(tmp_path, train_steps=16))
    out = capsys.readouterr().out
    assert "Resuming from" in out and "at step 8" in out
    assert longer["step"] == 16
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [8, 16]  # Step continued.
    again = trainer.train_and_evaluate(make_config(tmp_path, train_steps=16))
    assert "already finished at step 16" in capsys.readouterr().out
    assert again == longer


def test_the_train_step_is_flat_functions_a_test_calls_alone():
    """loss_fn is the step's loss; train_step, called alone on one replica, applies its gradient and counts the
    batch; the step counter is run_steps' business, not the step's."""
    config = make_config("unused", optimizer="sgd", learning_rate="0.1", label_smoothing="0.1")
    strategy = tf.distribute.get_strategy()
    model, optimizer, step, _ = train_lib.build(config, _shape_only((28, 28, 1), 10), strategy, 10)
    images = tf.random.stateless_uniform([8, 28, 28, 1], [0, 1])
    labels = tf.constant([0, 1, 2, 3, 4, 5, 6, 7], tf.int64)
    logits, loss = train_lib.loss_fn(model, images, labels, config)
    expected = tf.keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)(
        tf.one_hot(labels, 10), logits)
    np.testing.assert_allclose(loss.numpy(), expected.numpy(), rtol=1e-5)
    before = [v.numpy() for v in model.trainable_variables]
    optim.apply_summed_gradients(optimizer)
    gradients = train_lib.make_gradients(model, optimizer, config)
    stats = strategy.run(train_lib.train_step, (gradients, model, optimizer, step, config, images, labels)).numpy()
    assert stats[0] == pytest.approx(loss.numpy()) and stats[2] == 8 and stats[3] > 0
    assert all(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))
    assert int(step.numpy()) == 0


def test_learning_rate_schedules():
    exponential = optim.learning_rate(make_config("x", lr_schedule="exponential", learning_rate=0.01,
                                                  decay_steps=2000, decay_rate=0.9), 10_000)
    assert float(exponential(4000)) == pytest.approx(0.01 * 0.81)
    cosine = optim.learning_rate(make_config("x", lr_schedule="cosine", learning_rate=0.1, warmup_steps=100), 1100)
    assert float(cosine(50)) == pytest.approx(0.05)
    assert float(cosine(100)) == pytest.approx(0.1)
    assert float(cosine(600)) == pytest.approx(0.05)
    assert float(cosine(1100)) == pytest.approx(0.0, abs=1e-7)


def test_label_smoothing_matches_keras():
    labels, logits = tf.constant([1, 0]), tf.constant([[0.5, 2.0, -1.0], [1.0, 0.0, 0.0]])
    expected = tf.keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, reduction=None)(
        tf.one_hot(labels, 3), logits)
    np.testing.assert_allclose(optim.per_example_loss(labels, logits, 0.1), expected, rtol=1e-6)


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "research.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_bad_input_gets_one_line_and_a_nonzero_exit(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--model=nope", "--train_steps=1"], "--model=nope is unknown"),
        (["--batch_size=0", "--train_steps=1"], "--batch_size must be positive"),
        (["--dataset=no_such_dataset", "--train_steps=1"], "--dataset=no_such_dataset is not a TFDS dataset"),
        (["--train_steps=1", f"--tfds_manual_dir={empty}"], "lacks t10k-images-idx3-ubyte.gz"),
        (["--model=cnn"], "set the training length with --train_epochs or --train_steps"),
        (["--train_steps=1"], "cannot be downloaded from here: put t10k-images-idx3-ubyte.gz"),
    ]
    procs = [subprocess.Popen([sys.executable, "-m", "research.train", f"--model_dir={tmp_path}/run{i}",
                               f"--data_dir={tmp_path}/tfds", *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i, (args, _) in enumerate(cases)]
    for proc, (args, message) in zip(procs, cases):
        _, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, (args, err)
        assert len(lines) == 1 and message in lines[0], (args, err)
        assert "Traceback" not in err


def test_decoded_split_cache(tmp_path, mnist_data_dir, monkeypatch):
    """Loads after the first read the decoded arrays cached beside the prepared files, identical to decoding; a
    damaged cache, or one whose source files changed, is decoded again and rewritten (in a copy of the shared
    data_dir, which other tests read meanwhile)."""
    data_dir = str(tmp_path / "tfds")
    shutil.copytree(os.path.join(mnist_data_dir, "mnist"), os.path.join(data_dir, "mnist"))
    config = make_config(tmp_path, data_dir=data_dir, tfds_manual_dir=MNIST_FILES)
    builder = tfds.builder("mnist", data_dir=data_dir)
    decoded = np.stack([e["image"] for e in tfds.data_source("mnist", split="test", data_dir=data_dir)])
    cache, _ = tfds_source._cache_of(builder, "test")
    data.load(config)  # Writes the copy's caches (the copied ones name the shared directory's files).
    decodes = []
    as_numpy = tfds.as_numpy
    monkeypatch.setattr(tfds, "as_numpy", lambda ds: decodes.append(1) or as_numpy(ds))

    cached = data.load(config)
    assert not decodes and os.path.exists(cache)
    np.testing.assert_array_equal(cached.eval.images, decoded)
    assert cached.train.images.shape == (60_000, 28, 28, 1) and cached.train.labels.shape == (60_000,)

    with open(cache, "r+b") as f:
        f.truncate(1000)
    np.testing.assert_array_equal(data.load(config).eval.images, decoded)
    assert len(decodes) == 1
    data.load(config)
    assert len(decodes) == 1  # Rewritten whole.

    test_file = builder.info.splits["test"].file_instructions[0].filename
    os.utime(test_file, ns=(os.stat(test_file).st_atime_ns, os.stat(test_file).st_mtime_ns + 1))
    np.testing.assert_array_equal(data.load(config).eval.images, decoded)
    assert len(decodes) == 2


def test_mocked_data_is_never_cached(mock_tfds):
    assert tfds_source._cache_of(tfds.builder("mnist"), "train") == (None, None)


def test_real_mnist_cnn_learns(tmp_path, mnist_data_dir):
    """A few hundred real steps: a broken loop (wrong labels, no updates, bad scaling) cannot reach 93%."""
    results = trainer.train_and_evaluate(make_config(
        tmp_path, data_dir=mnist_data_dir, tfds_manual_dir=MNIST_FILES, model="cnn", optimizer="rmsprop",
        batch_size=32, train_steps=400, steps_per_loop=100, eval_every=400, checkpoint_every=400))
    assert results["eval"]["examples"] == 10_000
    assert results["eval"]["accuracy"] >= 0.93
    assert results["params"] == 104_202


def test_real_fashion_mnist_prepared_beside_mnist_learns_and_its_first_run_equals_later_ones(tmp_path, mnist_data_dir):
    """The tutorial's Fashion-MNIST MLP (with dropout) on the real files, prepared in this process beside MNIST
    (same file names: each must keep its own images): 300 steps reach 75% (88% takes 10 epochs). Preparing draws
    random numbers: they must not shift the first run's initial weights or dropout masks, so the first run, which
    prepares the dataset, and a second one, which finds it prepared, end bit-identical."""
    if not os.path.exists(os.path.join(FASHION_MNIST_FILES, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"real Fashion-MNIST files not found in {FASHION_MNIST_FILES}")
    data_dir = str(tmp_path / "tfds")  # MNIST as prepared for every test, without its decoded caches.
    for name in ("mnist", os.path.join("downloads", "mnist")):
        shutil.copytree(os.path.join(mnist_data_dir, name), os.path.join(data_dir, name),
                        ignore=shutil.ignore_patterns("arrays-*.npz", ".prepare.lock"))
    weights = []
    for name in ("first", "second"):
        config = make_config(tmp_path / name, dataset="fashion_mnist", data_dir=data_dir,
                             tfds_manual_dir=FASHION_MNIST_FILES, hidden_units="128", dropout="0.2", batch_size=32,
                             train_steps=300, steps_per_loop=100, eval_every=300, checkpoint_every=300,
                             deterministic=True)
        results = trainer.train_and_evaluate(config)
        assert results["eval"]["examples"] == 10_000
        assert 0.75 <= results["eval"]["accuracy"] < 0.9  # MNIST's digits would give more.
        reader = tf.train.load_checkpoint(os.path.join(config.model_dir, "ckpt-300"))
        weights.append({n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()
                        if n.startswith("model_variables")})
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for name in weights[0]:
        np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)
    assert runs.read_dataset_info(str(tmp_path / "first")).class_names[0] == "T-shirt/top"
    mnist = data.load(make_config(tmp_path, data_dir=data_dir, train_split=None))
    assert not np.array_equal(data.load(config).eval.images[:100], mnist.eval.images[:100])