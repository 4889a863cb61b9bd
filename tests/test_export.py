"""Exports that leave the project: the SavedModel served by TensorFlow's own `saved_model_cli run` (the session
loader TF Serving uses) for every model family, the TFLite models (float32 and quantised), and the export's
mistakes. (test_observe.py has the SavedModel's and Keras file's reloads through `tf.saved_model.load`.)"""

import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_config
from mock_train import mocked
from research import UserError, export, models, runs, tflite, trainer
from research.data import tfds_source

SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")  # Ships in TensorFlow's wheel.
# Every family of the registry (its first model), and resnet18 (its padded convolutions, nested Sequentials); on
# 32 px colour images, in bfloat16 where a model has blocks.
FAMILIES = {family: dict(model=name, dataset="cifar10", mixed_precision="mixed_bfloat16" if models.has(
    types.SimpleNamespace(model=name), "blocks") else "float32") for family, name in models.families().items()}
FAMILIES["resnet18"] = dict(model="resnet18", dataset="cifar10", mixed_precision="mixed_bfloat16")
SMALL = ("mlp", "cnn")  # Their TFLite conversion takes a second; resnet18's and vit_ti16's 10 and 25 s.


@pytest.fixture(autouse=True)
def float32_policy():
    """Training sets the global precision policy (bfloat16 here); what runs next must not inherit it."""
    yield
    tf.keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    """A finished mock MNIST run of the MLP (64 random examples per split)."""
    config = make_config(tmp_path_factory.mktemp("export") / "mlp")
    with pytest.MonkeyPatch.context() as patch, mocked():
        patch.setattr(tfds_source, "ensure_downloadable", lambda builder, manual_dir: None)
        trainer.train_and_evaluate(config)
    return config.model_dir


def _probabilities(restored, images):
    prep = restored.dataset.preprocessing
    return tf.nn.softmax(restored.model(prep.eval_images(images), training=False)).numpy()


@pytest.mark.slow
def test_saved_model_cli_serves_an_export_of_every_model_family(mock_tfds, shallow_models, tmp_path):
    """Each family trained two steps on 32 px mock CIFAR-10 (the deep ones made shallow, those of blocks in
    bfloat16), exported in this
    process (where the last training left the global policy at mixed_bfloat16, under which Keras would rebuild a
    reloaded model.keras: export reloads and checks it in float32, as the model was rebuilt), then served by
    `saved_model_cli run` in a subprocess of its own, all running side by side."""
    served = {}
    for family, flags in FAMILIES.items():
        run_dir, output = str(tmp_path / family), str(tmp_path / "exports" / family / "1")
        results = trainer.train_and_evaluate(make_config(run_dir, train_steps=2, steps_per_loop=1, eval_every=2,
                                                       **flags))
        assert results["step"] == 2 and np.isfinite(results["train"]["loss"]) and np.isfinite(results["eval"]["loss"])
        exported = export.export(run_dir, output, write_tflite=family in SMALL)  # Itself checks every loader.
        assert [name for name, *_ in exported.tflite] == (["model.tflite"] if family in SMALL else [])
        restored = runs.load_model(run_dir)
        prep = restored.dataset.preprocessing
        rng = np.random.default_rng(len(family))
        images = rng.integers(0, 256, [3, prep.image_size[0] + 5, prep.image_size[1] + 9, prep.channels], np.uint8)
        np.save(tmp_path / f"{family}.npy", images)
        outdir = tmp_path / f"{family}_served"
        process = subprocess.Popen(
            [SAVED_MODEL_CLI, "run", "--dir", output, "--tag_set", "serve", "--signature_def", "serving_default",
             "--inputs", f"images={tmp_path / f'{family}.npy'}", "--outdir", str(outdir)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        served[family] = (process, outdir, _probabilities(restored, images))

        if family in SMALL:  # model.tflite takes uint8 images at the training size.
            at_size = rng.integers(0, 256, [5, *prep.image_size, prep.channels], np.uint8)
            content = open(os.path.join(output, "model.tflite"), "rb").read()
            np.testing.assert_allclose(tflite.interpreter(content)(at_size), _probabilities(restored, at_size),
                                       atol=1e-5)

    for family, (process, outdir, expected) in served.items():
        log = process.communicate(timeout=300)[0]
        assert process.returncode == 0, f"{family}: {log[-2000:]}"
        probabilities = np.load(outdir / "probabilities.npy")
        np.testing.assert_allclose(probabilities, expected, atol=1e-5, err_msg=family)
        np.testing.assert_array_equal(np.load(outdir / "class_ids.npy"), expected.argmax(-1))


@pytest.mark.slow
def test_the_export_refuses_a_saved_model_that_the_session_loader_cannot_serve(mlp_run, tmp_path, monkeypatch):
    """The bug research/export.py's Serving avoids, put back: with the Keras model tracked in place of the
    variables its functions read, tf.saved_model.load serves the SavedModel and the session loader does not."""
    keeping_the_fix = export.Serving.__init__

    def tracking_the_model(self, model, *args):
        keeping_the_fix(self, model, *args)
        self.model_variables = []
        self.keras_model = model

    monkeypatch.setattr(export.Serving, "__init__", tracking_the_model)
    with pytest.raises(UserError, match=r"the exported SavedModel fails in the session loader \(saved_model_cli, "
                                        r"TF Serving\): Could not find variable .*; nothing was written"):
        export.export(mlp_run, str(tmp_path / "serving" / "1"))
    assert os.listdir(tmp_path / "serving") == []


@pytest.fixture(scope="module")
def mnist_run(mnist_data_dir, tmp_path_factory):
    """An MLP trained 200 steps on real MNIST (a tenth of the training split), evaluated on 2000 test images."""
    config = make_config(tmp_path_factory.mktemp("export") / "mnist", data_dir=mnist_data_dir,
                         train_split="train[:10%]", eval_split="test[:2000]", hidden_units="32", batch_size=32,
                         train_steps=200, steps_per_loop=100, eval_every=200, checkpoint_every=200)
    return config.model_dir, trainer.train_and_evaluate(config)


@pytest.mark.parametrize("quantize, at_most", [("float16", 0.55), ("int8", 0.35)])
def test_quantised_tflite_models_keep_the_eval_accuracy(mnist_run, tmp_path, capsys, quantize, at_most):
    """The quantised model is a fraction of the float32 one and within a point of its accuracy on the eval split,
    and the command prints both."""
    model_dir, results = mnist_run
    output = tmp_path / "serving" / "1"
    capsys.readouterr()
    assert export.main([f"--model_dir={model_dir}", f"--output={output}", f"--tflite_quantize={quantize}"]) == 0
    printed = capsys.readouterr().out.splitlines()
    sizes = {name: os.path.getsize(output / name) for name in ("model.tflite", f"model.{quantize}.tflite")}
    assert sizes[f"model.{quantize}.tflite"] < at_most * sizes["model.tflite"]
    assert printed[-2] == f"{output}/model.tflite: {sizes['model.tflite'] / 1e6:.3f} MB"
    line = re.fullmatch(rf"{output}/model\.{quantize}\.tflite: (\S+) MB, eval accuracy (\S+) \(float32 (\S+), "
                        r"([+-]\d+\.\d\d) points\)", printed[-1])
    size, accuracy, float_accuracy, points = (float(x) for x in line.groups())
    assert size == round(sizes[f"model.{quantize}.tflite"] / 1e6, 3)
    assert float_accuracy == pytest.approx(results["eval"]["accuracy"], abs=1e-4)  # float32 TFLite = checkpoint.
    assert abs(accuracy - float_accuracy) <= 0.01 and accuracy > 0.8
    assert points == pytest.approx(100 * (accuracy - float_accuracy), abs=0.01)


def test_int8_calibrated_on_black_images_is_refused(mnist_run, tmp_path, monkeypatch):
    """The accuracy check bites: activation ranges calibrated on all-black images ruin the int8 model."""
    calibration = tflite.calibration_images
    monkeypatch.setattr(tflite, "calibration_images", lambda *args: np.zeros_like(calibration(*args)))
    with pytest.raises(UserError, match=r"the int8 TFLite model's eval accuracy 0\.\d+ differs from float32's "
                                        r"0\.\d+ by more than 1 points \(20 of 2000 eval examples\); nothing was "
                                        r"written"):
        export.export(mnist_run[0], str(tmp_path / "serving"), tflite_quantize="int8")
    assert not os.path.exists(tmp_path / "serving")


@pytest.mark.slow
def test_int8_on_a_tiny_eval_split_allows_one_example(mlp_run, mock_tfds, tmp_path, capsys):
    """64 eval examples, where one is more than a point: the check allows one example, and says how many."""
    assert export.main([f"--model_dir={mlp_run}", f"--output={tmp_path / 'out'}", "--tflite_quantize=int8"]) == 0
    assert re.search(r"model\.int8\.tflite: \S+ MB, eval accuracy 0\.\d+ \(float32 0\.\d+, [+-]\d\.\d\d points\)$",
                     capsys.readouterr().out)


@pytest.mark.parametrize("args, message", [
    (["--tflite_quantize=int4"], "argument --tflite_quantize: invalid choice: 'int4' (choose from 'none', 'float16', 'int8')"),
    (["--tflite_quantize="], "argument --tflite_quantize: invalid choice: ''"),
    (["--no_tflite", "--tflite_quantize=int8"], "--tflite_quantize=int8 writes a TFLite model, which --no_tflite "
                                                "refuses"),
    (["--model_dir={untrained}", "--tflite_quantize=int8"], "has no latest checkpoint yet"),
])
def test_mistakes_are_one_error_line_and_write_nothing(mlp_run, tmp_path, capsys, args, message):
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    for name in ("flags.txt", "dataset.json"):
        (untrained / name).write_text(open(os.path.join(mlp_run, name)).read())
    argv = [f"--model_dir={mlp_run}", f"--output={tmp_path / 'out'}"] + [a.format(untrained=untrained) for a in args]
    assert export.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert sorted(os.listdir(tmp_path)) == ["untrained"]
