"""Seeing what a model does: TensorBoard summaries, and evaluate / predict / export from a run directory alone.

Most tests only read one mock run, trained once for the module (mocked as the `mock_tfds` fixture mocks, which a
module fixture cannot use); tests that load the dataset again take `mock_tfds`, whose random examples are the
same. Command lines are called in-process through each module's `main(argv)`, but for one subprocess per tool
kind that checks the real entry point's exit status and stderr.
"""

import json
import os
import re
import subprocess
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from conftest import make_config
from research import UserError, checkpoint as checkpoint_lib, data, evaluate, export, models, optim, plots, predict, \
    run_dir, runs, trainer
from research.data import tfds_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished mock run of the CNN with augmentation, histograms and a moving average of the weights (which
    evaluation, prediction and export must use), its results and its eval split."""
    config = make_config(tmp_path_factory.mktemp("observe") / "run", model="cnn", augment="translate",
                         histogram_every=4, ema_decay=0.9, eval_figures=True)
    with pytest.MonkeyPatch.context() as patch, tfds.testing.mock_data(num_examples=64):
        patch.setattr(tfds_source, "ensure_downloadable", lambda builder, manual_dir: None)
        results = trainer.train_and_evaluate(config)
        dataset = data.load(config)
    return types.SimpleNamespace(dir=config.model_dir, config=config, results=results, dataset=dataset)


def _events(directory):
    accumulator = event_accumulator.EventAccumulator(
        directory, size_guidance={event_accumulator.TENSORS: 0, event_accumulator.IMAGES: 0})
    return accumulator.Reload()


def _values(events, tag):
    """{step: value} of a TF2 scalar (stored as a tensor)."""
    return {e.step: tf.make_ndarray(e.tensor_proto).item() for e in events.Tensors(tag)}


def _image_shapes(events, tag):
    """{step: decoded [H, W, C] shape} of a TF2 image summary ([width, height, png] strings)."""
    return {e.step: tuple(tf.image.decode_png(e.tensor_proto.string_val[2]).shape) for e in events.Tensors(tag)}


def _one_error_line(text):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


# ---------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_has_scalars_inputs_evaluation_images_histograms_and_hparams(run):
    train_events = _events(os.path.join(run.dir, "train"))
    for tag in ("loss", "accuracy", "grad_norm", "learning_rate", "images_per_sec"):
        assert sorted(_values(train_events, tag)) == [4, 8, 12], tag
    assert _image_shapes(train_events, "inputs").keys() == {4}  # Once, at the first loop of steps.
    height, width, channels = _image_shapes(train_events, "inputs")[4]
    assert channels == 3 and height > 100 and width > 100
    weights = [t for t in train_events.Tags()["tensors"] if t.startswith("weights/")]
    # 4 layers x (kernel, bias); Keras numbers layer names per process (conv2d, conv2d_7, ...).
    assert len(weights) == 8 and any(re.fullmatch(r"weights/cnn/conv2d(_\d+)?/kernel", w) for w in weights)
    classifier = next(w for w in weights if re.fullmatch(r"weights/cnn/dense(_\d+)?/kernel", w))
    assert sorted(e.step for e in train_events.Tensors(classifier)) == [4, 8, 12]

    eval_events = _events(os.path.join(run.dir, "eval"))
    records = run_dir.read_metrics(run.dir)
    assert [r["step"] for r in records] == [8, 12]
    assert _values(eval_events, "accuracy") == {r["step"]: np.float32(r["accuracy"]) for r in records}
    assert _values(eval_events, "loss") == {r["step"]: np.float32(r["loss"]) for r in records}
    assert records[-1]["accuracy"] == run.results["eval"]["accuracy"]
    for tag in ("confusion_matrix", "misclassified"):
        shapes = _image_shapes(eval_events, tag)
        assert sorted(shapes) == [8, 12] and all(s[2] == 3 and s[0] > 100 for s in shapes.values()), tag

    root = _events(run.dir)
    experiment = hparams_metadata.parse_experiment_plugin_data(
        root.SummaryMetadata(hparams_metadata.EXPERIMENT_TAG).plugin_data.content)
    assert {(m.name.group, m.name.tag) for m in experiment.metric_infos} >= {("eval", "accuracy"), ("eval", "loss")}
    session = hparams_metadata.parse_session_start_info_plugin_data(
        root.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content)
    hparams = {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
               for name, value in session.hparams.items()}
    assert hparams["model"] == "cnn" and hparams["augment"] == "translate" and hparams["batch_size"] == 8
    assert hparams["learning_rate"] == pytest.approx(0.001) and hparams["label_smoothing"] == 0
    assert "model_dir" not in hparams and "train_epochs" not in hparams  # A location; an unset flag.
    assert not {"deterministic", "steps_per_loop", "checkpoint_every", "cluster"} & set(hparams)  # How, not what.
    assert "momentum" not in hparams  # No effect with adam: left blank.
    names = [info.name for info in experiment.hparam_infos]
    assert names.index("model") < names.index("learning_rate") and "checkpoint_every" not in names


@pytest.mark.slow
def test_tensorboard_script_binds_to_localhost_and_explains_its_usage(tmp_path):
    script = os.path.join(ROOT, "launch", "tensorboard.sh")
    shown = subprocess.run(["bash", script, str(tmp_path)], env={**os.environ, "PYTHON": "echo"}, capture_output=True,
                           text=True)
    assert shown.returncode == 0
    assert shown.stdout.split() == ["-m", "tensorboard.main", "--logdir", str(tmp_path), "--host", "127.0.0.1",
                                    "--port", "6006"]
    assert subprocess.run(["bash", script, str(tmp_path), "7007"], env={**os.environ, "PYTHON": "echo"},
                          capture_output=True, text=True).stdout.split()[-1] == "7007"
    for args in ([], [str(tmp_path / "missing")], [str(tmp_path), "port"], [str(tmp_path), "1", "2"]):
        wrong = subprocess.run(["bash", script, *args], capture_output=True, text=True)
        assert wrong.returncode == 2 and "usage:" in wrong.stderr, args


# ---------------------------------------------------------------------------------------------- Run directory
def test_read_config_gives_back_the_runs_typed_flags(run, tmp_path):
    assert vars(runs.read_config(run.dir)) == vars(run.config)
    assert runs.read_dataset_info(run.dir).class_names == run.dataset.class_names

    old = tmp_path / "old"
    old.mkdir()
    (old / "flags.txt").write_text(open(os.path.join(run.dir, "flags.txt")).read() + "--retired_flag=3\n")
    with pytest.raises(UserError, match=r"flags.txt: unknown flag --retired_flag \(was the run written"):
        runs.read_config(str(old))


# The larger ResNets and ViTs are the classes of resnet18 and vit_ti16 with more blocks: tested through those; the
# Keras applications, one class, through the family's first.
LARGER_SIBLINGS = {"resnet34", "resnet50", "resnet101", "resnet152", "vit_s16", "vit_b16", "vit_l16",
                   *(name for name in models.names() if name.startswith("keras/"))} - {models.families()["keras_apps"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in models.names() if name not in LARGER_SIBLINGS])
def test_every_model_comes_back_whole_from_a_training_style_checkpoint(name, tmp_path):
    config = make_config(tmp_path, model=name)
    size = 32 if name.startswith(("vit_", "keras/")) else 28  # ViT's 16-pixel patches must tile; Keras' minimum.
    info = data.Metadata("mnist", (size, size, 1), [str(i) for i in range(10)])
    trained = runs.build_model(config, info)
    optimizer = optim.create_optimizer(config, 10, trained)
    optimizer.build(trained.trainable_variables)
    floats = [v for v in trained.weights if "float" in str(v.dtype)]
    for v in floats:
        v.assign(tf.random.normal(v.shape, seed=1))  # Unlike any initial value, batch-norm statistics included.
    path = tf.train.Checkpoint(model_variables=checkpoint_lib.model_state(trained), optimizer=optimizer).save(
        str(tmp_path / "ckpt"))
    restored = runs.build_model(config, info)
    checkpoint_lib.restore_weights(restored, path)
    for before, after in zip(floats, [v for v in restored.weights if "float" in str(v.dtype)]):
        np.testing.assert_array_equal(after.numpy(), before.numpy(), err_msg=before.path)


# ---------------------------------------------------------------------------------------------- Evaluate
@pytest.mark.slow
def test_evaluate_reproduces_the_final_training_evaluation(run, mock_tfds, capsys):
    """The run keeps a moving average of its weights, which its evaluations used: so must this one."""
    report = evaluate.evaluate(run.dir)
    assert report["checkpoint"].endswith("ckpt-12") and report["step"] == 12 and report["split"] == "test"
    assert report["examples"] == run.results["eval"]["examples"] == 64
    assert report["accuracy"] == run.results["eval"]["accuracy"]
    assert report["loss"] == pytest.approx(run.results["eval"]["loss"], rel=1e-6)
    assert report["confusion_matrix"] == run.results["confusion_matrix"]
    assert sum(c["examples"] for c in report["per_class"]) == 64
    assert json.load(open(os.path.join(run.dir, "report.json"))) == {k: v for k, v in report.items()
                                                                     if k != "not_written"}
    for name in ("report.json", "confusion_matrix.png", "predictions.png", "curves.png"):
        assert os.path.join(run.dir, name) in report["files"]
    Image.open(os.path.join(run.dir, "predictions.png")).verify()

    assert evaluate.main(["--model_dir", run.dir, "--checkpoint", "best"]) == 0
    best = json.load(open(os.path.join(run.dir, "best", "best.json")))
    printed = capsys.readouterr().out
    assert f"(step {best['step']}) on split test: accuracy {best['accuracy']:.4f}" in printed
    assert "confusion matrix (rows: true class, columns: predicted class)" in printed


def test_real_mnist_evaluation_matches_the_runs_results(mnist_data_dir, tmp_path):
    config = make_config(tmp_path / "mnist", data_dir=mnist_data_dir, train_split="train[:10%]", hidden_units="64",
                         batch_size=32, train_steps=300, steps_per_loop=100, eval_every=300, checkpoint_every=300)
    results = trainer.train_and_evaluate(config)
    report = evaluate.evaluate(config.model_dir)
    assert report["confusion_matrix"] == results["confusion_matrix"]  # Exactly the same predictions.
    assert report["examples"] == results["eval"]["examples"] == 10000
    assert report["accuracy"] == pytest.approx(results["eval"]["accuracy"], abs=1e-7)  # Training's is float32.
    assert report["accuracy"] > 0.8
    assert report["loss"] == pytest.approx(results["eval"]["loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- Predict
def _write_images(run, folder):
    """The first eval image as the dataset has it, the same as a larger RGB JPEG, as RGBA and as 16-bit
    grayscale, plus bad files."""
    digit = run.dataset.eval.images[0][..., 0]
    paths = {name: str(folder / name) for name in ("digit.png", "large.jpg", "alpha.png", "deep.png", "truncated.png",
                                                    "notes.txt", "empty.png", "missing.png")}
    Image.fromarray(digit).save(paths["digit.png"])
    Image.fromarray(digit.astype(np.uint16) * 257).save(paths["deep.png"])
    Image.fromarray(np.repeat(digit[..., None], 3, -1)).resize((70, 90)).save(paths["large.jpg"])
    Image.fromarray(digit).convert("RGBA").save(paths["alpha.png"])
    png = open(paths["digit.png"], "rb").read()
    open(paths["truncated.png"], "wb").write(png[: len(png) // 2])
    open(paths["notes.txt"], "w").write("not a picture\n")
    open(paths["empty.png"], "w").close()
    return paths


def test_predict_reads_any_image_and_names_each_bad_file(run, tmp_path):
    paths = _write_images(run, tmp_path)
    restored = runs.load_model(run.dir)
    results, errors = predict.predict(restored, list(paths.values()), k=3)
    assert [path for path, _ in results] == [paths[n] for n in ("digit.png", "large.jpg", "alpha.png", "deep.png")]
    assert errors == [f"{paths['truncated.png']}: Invalid PNG data, size {len(open(paths['truncated.png'], 'rb').read())}",
                      f"{paths['notes.txt']}: Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, WebP "
                      "required.",
                      f"{paths['empty.png']}: empty file", f"{paths['missing.png']}: no such file"]
    expected = tf.nn.softmax(restored.model(data.to_float(run.dataset.eval.images[:1]))).numpy()[0]
    top = np.argsort(-expected)[:3]
    classes = dict(results)[paths["digit.png"]]
    assert [name for name, _ in classes] == [run.dataset.class_names[i] for i in top]
    assert [p for _, p in classes] == pytest.approx(expected[top], abs=1e-6)
    assert dict(results)[paths["alpha.png"]] == dict(results)[paths["deep.png"]] == classes  # The same picture.
    assert all(len(c) == 3 and c[0][1] >= c[1][1] >= c[2][1] for _, c in results)


@pytest.mark.slow
def test_predict_command_prints_the_good_ones_and_fails_for_the_bad(run, tmp_path):
    paths = _write_images(run, tmp_path)
    jpeg = open(paths["large.jpg"], "rb").read()
    open(tmp_path / "truncated.jpg", "wb").write(jpeg[:100])  # libjpeg writes a note of its own to stderr.
    done = subprocess.run([sys.executable, "-m", "research.predict", f"--model_dir={run.dir}", "--top_k=2",
                           paths["digit.png"], paths["empty.png"], str(tmp_path / "truncated.jpg")], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stdout.startswith(f"{paths['digit.png']}: ") and done.stdout.count(", ") == 1
    assert done.stderr.splitlines() == [f"error: {paths['empty.png']}: empty file",
                                        f"error: {tmp_path / 'truncated.jpg'}: Invalid JPEG data, size 100"]


# ---------------------------------------------------------------------------------------------- Export
@pytest.mark.slow
def test_export_reloads_to_the_checkpoints_predictions(run, tmp_path):
    output = str(tmp_path / "serving" / "1")
    assert export.export(run.dir, output).checkpoint.endswith("ckpt-12")
    assert sorted(os.listdir(tmp_path / "serving")) == ["1"]  # No staging directory left behind.
    images = run.dataset.eval.images[:16]
    expected = tf.nn.softmax(runs.load_model(run.dir).model(data.to_float(images))).numpy()

    loaded = tf.saved_model.load(output)
    served = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(served["class_ids"].numpy(), expected.argmax(-1))
    assert [n.decode() for n in loaded.class_names.numpy()] == run.dataset.class_names

    reloaded = keras.saving.load_model(os.path.join(output, "model.keras"), safe_mode=True)
    np.testing.assert_allclose(tf.nn.softmax(reloaded(data.to_float(images))).numpy(), expected, atol=1e-6)

    with pytest.raises(UserError, match="already exists"):
        export.export(run.dir, output)


# ---------------------------------------------------------------------------------------------- Mistakes
@pytest.mark.parametrize("tool, args, message", [
    (evaluate, ["--model_dir={missing}"], "does not exist"),
    (predict, ["--model_dir={empty}", "x.png"], "is not a run directory: it has no flags.txt"),
    (export, ["--model_dir={untrained}", "--output={tmp}/out"], "has no latest checkpoint yet"),
    (evaluate, ["--model_dir={untrained}", "--checkpoint=best"], "has no best checkpoint yet"),
    (evaluate, ["--model_dir={run}", "--checkpoint={run}/ckpt-5"], "is neither 'latest', 'best', a directory"),
    (predict, ["--model_dir={run}", "--top_k=0", "x.png"], "--top_k must be at least 1"),
    (export, ["--model_dir={run}"], "the following arguments are required: --output"),
    (evaluate, ["--model_dir={run}", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_mistakes_are_one_error_line_and_leave_the_run_alone(run, tmp_path, capsys, tool, args, message):
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    (tmp_path / "empty").mkdir()
    for name in ("flags.txt", "dataset.json"):
        (untrained / name).write_text(open(os.path.join(run.dir, name)).read())
    before = sorted(os.listdir(run.dir))
    names = dict(missing=tmp_path / "missing", empty=tmp_path / "empty", untrained=untrained, run=run.dir,
                 tmp=tmp_path)
    assert tool.main([a.format(**names) for a in args]) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert sorted(os.listdir(run.dir)) == before and sorted(os.listdir(untrained)) == ["dataset.json", "flags.txt"]


@pytest.mark.slow
def test_a_command_on_a_missing_run_exits_2_with_one_line():
    done = subprocess.run([sys.executable, "-m", "research.evaluate", "--model_dir=/nonexistent/run"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert _one_error_line(done.stderr) == "error: --model_dir=/nonexistent/run does not exist"


def test_curves_need_an_evaluation(tmp_path, run):
    with pytest.raises(UserError, match="no evaluations"):
        plots.write_curves(str(tmp_path))
    assert Image.open(plots.write_curves(run.dir)).size[0] > 500


def test_noeval_figures_draws_none_and_leaves_no_stale_curves(mock_tfds, tmp_path):
    """Figures on for the first segment, off on the resume: no image summaries after it, and the first segment's
    curves.png (up to step 8) is not left to pass for the run's."""
    trainer.train_and_evaluate(make_config(tmp_path, train_steps=8, eval_figures=True))
    assert (tmp_path / "curves.png").exists()
    trainer.train_and_evaluate(make_config(tmp_path, train_steps=12))
    assert not (tmp_path / "curves.png").exists()
    images = {}
    for path in (tmp_path / "eval").iterdir():
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "images":
                    images.setdefault(value.tag, []).append(event.step)
    assert images and all(steps == [8] for steps in images.values()), images
