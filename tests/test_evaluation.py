"""Evaluation a researcher can publish: several eval sets per run, per-class and calibration metrics checked against
NumPy on the saved per-example predictions, Wilson intervals and McNemar's test against reference values, and
best/ that never ranks evaluations of different splits against each other."""

import csv
import json
import logging
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from conftest import make_config
from research import UserError, compare, data, evaluate, evaluation, fs, metrics, per_example, run_dir, trainer
from test_data_trust import folder_config, write_folder



def mnist_config(model_dir, data_dir, **overrides):
    """A few steps on 1200 real MNIST digits (mocked TFDS data ignores split slices), evaluated on 500."""
    return make_config(model_dir, **{"data_dir": data_dir, "train_split": "train[:2%]", "eval_split": "test[:500]",
                                     **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_data_dir):
    """A finished run evaluating test[:500] and two extra sets (one inside training) at steps 8 and 12."""
    config = mnist_config(tmp_path_factory.mktemp("evaluation") / "run", mnist_data_dir,
                          extra_eval="train[:1%],test[:250]")
    return trainer.train_and_evaluate(config), config.model_dir


def _scalars(directory, tag):
    events = event_accumulator.EventAccumulator(directory, size_guidance={event_accumulator.TENSORS: 0}).Reload()
    return {e.step: tf.make_ndarray(e.tensor_proto).item() for e in events.Tensors(tag)}


def test_a_run_with_two_extra_eval_sets_writes_all_three_everywhere(run):
    results, model_dir = run
    sets = {"test[:500]": ("eval", 500), "train[:1%]": ("eval_train_1pct", 600), "test[:250]": ("eval_test_250", 250)}
    lines = run_dir.read_metrics(model_dir)
    assert [line["step"] for line in lines] == [8, 12]
    for line in lines:
        assert line["split"] == "test[:500]" and line["examples"] == 500
        assert {split: extra["examples"] for split, extra in line["extra_eval"].items()} == {"train[:1%]": 600,
                                                                                           "test[:250]": 250}
    final = {"test[:500]": results["eval"], **results["extra_eval"]}
    for split, (tag, examples) in sets.items():
        assert final[split]["split"] == split and final[split]["examples"] == examples
        accuracy = _scalars(os.path.join(model_dir, tag), "accuracy")
        assert sorted(accuracy) == [8, 12], tag
        latest = lines[-1] if split == "test[:500]" else lines[-1]["extra_eval"][split]
        assert accuracy[12] == pytest.approx(latest["accuracy"]) == pytest.approx(final[split]["accuracy"])
        assert len(per_example.read(run_dir.per_example_path(model_dir, tag))["label"]) == examples
    # test[:250] is the first half of test[:500], evaluated by the same weights: the same rows at the same indices.
    whole, half = (per_example.read(run_dir.per_example_path(model_dir, tag)) for tag in ("eval", "eval_test_250"))
    for key in ("label", "prediction", "confidence"):
        np.testing.assert_array_equal(whole[key][:250], half[key])
    best = run_dir.read_best(model_dir)
    assert best["split"] == "test[:500]" and best["examples"] == 500
    assert best["accuracy"] == max(line["accuracy"] for line in lines)


def test_per_class_metrics_and_ece_match_numpy_on_the_saved_predictions(run):
    results, model_dir = run
    for split, tag in (("test[:500]", "eval"), ("train[:1%]", "eval_train_1pct")):
        record = per_example.read(run_dir.per_example_path(model_dir, tag))
        reported = results["eval"] if split == "test[:500]" else results["extra_eval"][split]
        labels, predicted, confidence = record["label"], record["prediction"], record["confidence"]
        assert record["split"] == split and record["step"] == 12
        assert reported["accuracy"] == pytest.approx(np.mean(labels == predicted))
        for row in reported["per_class"]:
            c, true, chosen = row["class"], labels == row["class"], predicted == row["class"]
            hits = np.sum(true & chosen)
            assert row["examples"] == true.sum() and row["correct"] == hits
            assert row["recall"] == (pytest.approx(hits / true.sum()) if true.sum() else None), c
            assert row["precision"] == (pytest.approx(hits / chosen.sum()) if chosen.sum() else None), c
            assert row["f1"] == (pytest.approx(2 * hits / (true.sum() + chosen.sum()))
                                 if true.sum() + chosen.sum() else None), c
        f1 = [row["f1"] for row in reported["per_class"] if row["f1"] is not None]
        assert reported["macro_f1"] == pytest.approx(np.mean(f1))
        # ECE over 15 equal-width bins, written out in NumPy from each example's confidence.
        edges = np.linspace(0, 1, 16)
        ece = 0.0
        for low, high in zip(edges[:-1], edges[1:]):
            inside = (confidence >= low) & ((confidence < high) | (high == 1.0))
            if inside.any():
                ece += inside.mean() * abs(np.mean(labels[inside] == predicted[inside]) - confidence[inside].mean())
        assert reported["ece"] == pytest.approx(ece, abs=1e-6)
        low, high = reported["accuracy_95"]
        assert low < reported["accuracy"] < high


def test_evaluate_reports_every_set_with_intervals_and_writes_the_figures(run, capsys):
    results, model_dir = run
    assert evaluate.main(["--model_dir", model_dir]) == 0
    printed = capsys.readouterr().out
    report = json.load(open(os.path.join(model_dir, "report.json")))
    assert report["accuracy"] == results["eval"]["accuracy"] and set(report["extra_eval"]) == {"train[:1%]",
                                                                                              "test[:250]"}
    assert report["ece"] == pytest.approx(results["eval"]["ece"], abs=1e-6)
    assert f"on split test[:500]: accuracy {metrics.interval_text(report)} (" in printed
    assert "  also train[:1%]: accuracy " in printed and "macro average" in printed
    for name in ("reliability.png", "mistakes.png", "confusion_matrix.png", "eval.examples.npz"):
        assert os.path.join(model_dir, name) in report["files"]
    assert evaluate.main(["--model_dir", model_dir, "--split", "train[:1%]"]) == 0
    report = json.load(open(os.path.join(model_dir, "report.json")))
    assert report["split"] == "train[:1%]" and report["extra_eval"] == {}
    assert report["accuracy"] == results["extra_eval"]["train[:1%]"]["accuracy"]


# ---------------------------------------------------------------------------------------------- Reference values
@pytest.mark.parametrize("correct, total, low, high", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score interval without correction).
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_the_published_examples(correct, total, low, high):
    assert metrics.wilson_interval(correct, total) == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("only_a, only_b, p", [
    (1, 9, 22 / 1024),  # 2 * (C(10,0) + C(10,1)) / 2^10, worked by hand.
    (2, 8, 112 / 1024),  # 2 * (1 + 10 + 45) / 2^10.
    (0, 5, 2 / 32), (5, 5, 1.0), (0, 0, 1.0)])
def test_mcnemar_exact_p_values(only_a, only_b, p):
    assert metrics.mcnemar_exact(only_a, only_b) == pytest.approx(p, rel=1e-4)


def test_compare_of_two_runs_on_the_same_examples_runs_mcnemar(run, tmp_path, capsys):
    _, model_dir = run
    other = tmp_path / "other"
    fs.copy_tree(model_dir, str(other))
    record = per_example.read(run_dir.per_example_path(str(other), "eval"))
    flipped = record["prediction"].copy()
    flipped[:3] = np.where(record["label"][:3] == flipped[:3], (flipped[:3] + 1) % 10, record["label"][:3])
    np.savez(os.path.join(other, "eval.examples.npz"), **{**record, "prediction": flipped})
    compare.main([model_dir, str(other), "--per_run"])
    printed = capsys.readouterr().out
    changed = np.sum(record["prediction"][:3] == record["label"][:3])
    assert "McNemar's exact test on the same 500 test[:500] examples" in printed
    assert f"p = {metrics.mcnemar_exact(int(changed), 3 - int(changed)):.4g}" in printed
    assert metrics.interval_text(run_dir.read_results(model_dir)["eval"]) in printed

    (other / "eval.examples.npz").write_text("not a record\n")
    with pytest.raises(UserError, match=r"^\S+/other/eval.examples.npz is not a per-example evaluation record "
                                        r"\(damaged, or of another version\): evaluate the run again"):
        compare.main([model_dir, str(other)])


# ---------------------------------------------------------------------------------------------- Resume and splits
def test_changing_eval_sets_on_a_resume_is_recorded_and_best_starts_anew(mnist_data_dir, tmp_path, caplog):
    trainer.train_and_evaluate(mnist_config(tmp_path, mnist_data_dir, train_steps=8, extra_eval="train[:8]"))
    assert run_dir.read_best(str(tmp_path))["split"] == "test[:500]"
    with caplog.at_level(logging.WARNING):
        trainer.train_and_evaluate(mnist_config(tmp_path, mnist_data_dir, train_steps=16, eval_split="test[:32]",
                                                extra_eval="test[:100]"))
    [record] = run_dir.read_flags_history(str(tmp_path))
    assert record["step"] == 8 and record["changes"] == {
        "eval_split": ["test[:500]", "test[:32]"], "extra_eval": ["train[:8]", "test[:100]"],
        "train_steps": ["8", "16"]}
    best = run_dir.read_best(str(tmp_path))
    assert best["split"] == "test[:32]" and best["examples"] == 32 and best["step"] == 16
    assert any("best/ held step 8's accuracy" in r.getMessage() and "starts anew at step 16" in r.getMessage()
               for r in caplog.records)
    lines = run_dir.read_metrics(str(tmp_path))
    assert [(line["step"], line["split"], list(line["extra_eval"])) for line in lines] == [
        (8, "test[:500]", ["train[:8]"]), (16, "test[:32]", ["test[:100]"])]
    assert [line["segment"] for line in lines] == [0, 1]
    rows = compare.make_rows([compare.read_run(str(tmp_path), "r", None)], per_run=True)
    assert rows[0]["wall_time_s"] == pytest.approx(lines[0]["elapsed_s"] + run_dir.read_results(
        str(tmp_path))["wall_time_s"], abs=0.11)
    assert "--eval_split test[:500] -> test[:32] at 8" in rows[0]["changed"]


def test_a_minival_that_overlaps_training_is_refused_on_tfds_and_folders(mnist_data_dir, tmp_path):
    def load(**flags):
        return data.load(make_config(tmp_path, data_dir=mnist_data_dir, train_split="train[:98%]", **flags))
    dataset = load(eval_split="train[98%:]", extra_eval="test,train[:2%]")  # Disjoint; inside training.
    assert [(split, len(source)) for split, source in dataset.extra_eval] == [("test", 10000), ("train[:2%]", 1200)]
    with pytest.raises(UserError, match=r"^--eval_split=train\[97%:\] shares 600 of its 1800 examples with "
                                        r"--train_split=train\[:98%\]: a held-out split must not overlap"):
        load(eval_split="train[97%:]")
    with pytest.raises(UserError, match=r"^--extra_eval=train\[95%:\] shares 1800 of its 3000"):
        load(extra_eval="train[95%:]")

    root = write_folder(tmp_path / "folder", {"ant": 10, "bee": 10}, splits=("train", "val"))
    folder = data.load(folder_config(tmp_path / "f", root, train_split="train[:80%]", eval_split="val",
                                     extra_eval="train[80%:]"))
    assert [(split, len(source)) for split, source in folder.extra_eval] == [("train[80%:]", 4)]
    assert set(folder.file_lists["splits"]) == {"train[:80%]", "val", "train[80%:]"}
    with pytest.raises(UserError, match=r"^--extra_eval=train\[70%:\] shares 2 of its 6 examples"):
        data.load(folder_config(tmp_path / "f", root, train_split="train[:80%]", eval_split="val",
                                extra_eval="train[70%:]"))


@pytest.mark.parametrize("extra, message", [
    ("test", r"--extra_eval names test twice \(--eval_split is evaluated anyway\)"),
    ("train,train", "--extra_eval names train twice"),
    ("a b,a_b", "--extra_eval splits a b, a_b would share one TensorBoard run \\(eval_a_b\\)"),
    ("test[:5],,train", "--extra_eval=test\\[:5\\],,train has an empty split name"),
])
def test_bad_extra_eval_flags_are_one_line(tmp_path, extra, message):
    with pytest.raises(UserError, match=f"^{message}"):
        make_config(tmp_path, extra_eval=extra)


def test_an_unknown_extra_split_is_one_line_and_leaves_no_run(mnist_data_dir, tmp_path):
    with pytest.raises(UserError, match=r"^--extra_eval=nosuch is not a split of mnist"):
        trainer.train_and_evaluate(mnist_config(tmp_path / "run", mnist_data_dir, extra_eval="nosuch"))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ research.evaluate extras
def test_tta_flip_changes_nothing_for_a_flip_invariant_model_and_averages_two_passes_otherwise(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (20, 6, 6, 1), dtype=np.uint8), rng.integers(0, 3, 20)
    dataset = data.in_memory("toy", ["a", "b", "c"], (images, labels), (images, labels))
    config = make_config(tmp_path, batch_size=8)
    strategy = tf.distribute.get_strategy()
    pooled = keras.Sequential([keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])  # Mirror-blind.
    flat = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)])
    for model in (pooled, flat):
        model(tf.zeros([1, 6, 6, 1]))

    def sums(model, tta):
        inputs = strategy.distribute_datasets_from_function(data.eval_input_fn(dataset, config))
        return {k: v.numpy() for k, v in evaluation.make_pass(strategy, model, 3, 20, tta)(inputs).items()}

    plain, flipped = sums(pooled, "none"), sums(pooled, "flip")
    for key in ("per_example", "loss", "bins"):
        np.testing.assert_allclose(flipped[key], plain[key], rtol=1e-5, atol=1e-6)

    inputs, _ = data.eval_examples(dataset, config, range(20))
    expected = (tf.nn.softmax(flat(inputs)) + tf.nn.softmax(flat(inputs[:, :, ::-1]))).numpy() / 2
    plain, flipped = sums(flat, "none"), sums(flat, "flip")
    np.testing.assert_allclose(flipped["per_example"][:, 1], expected.argmax(-1))
    np.testing.assert_allclose(flipped["per_example"][:, 2], expected.max(-1), rtol=1e-5)
    np.testing.assert_allclose(flipped["loss"], -np.log(expected[np.arange(20), labels]).sum(), rtol=1e-5)
    assert not np.allclose(flipped["per_example"][:, 2], plain["per_example"][:, 2], rtol=1e-3)


def test_evaluate_every_checkpoint_and_a_predictions_file(run, tmp_path, capsys):
    _, model_dir = run
    path = tmp_path / "predictions.csv"
    assert evaluate.main(["--model_dir", model_dir, "--checkpoint", "all", "--predictions", str(path)]) == 0
    printed = capsys.readouterr().out
    assert [int(step) for step in re.findall(r"ckpt-\d+ \(step (\d+)\) on split", printed)][:3] == [4, 8, 12]
    rows = list(csv.reader(open(path)))
    record = per_example.read(run_dir.per_example_path(model_dir, "eval"))
    assert rows[0] == ["index", "example", "label", "prediction", "probability"] and len(rows) == 501
    assert record["step"] == 12 and rows[1][1] == "example 0 of mnist test[:500]"
    assert [row[2:4] for row in rows[1:]] == [[str(a), str(b)] for a, b in zip(record["label"], record["prediction"])]
    assert [float(row[4]) for row in rows[1:]] == pytest.approx(record["confidence"], abs=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--tta", "mirror"], "argument --tta: invalid choice: 'mirror'"),
    (["--predictions", ""], "--predictions= is empty"),
    (["--predictions", "/tmp"], "--predictions=/tmp is a directory"),
    (["--predictions", "/nonexistent/dir/p.csv"], "cannot write /nonexistent/dir/p.csv"),
    (["--split", "test[:500]", "--checkpoint", "nowhere"], "--checkpoint=nowhere is neither"),
])
def test_evaluate_mistakes_are_one_line(run, capsys, argv, message):
    assert evaluate.main(["--model_dir", run[1], *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_evaluation_at_another_resolution(mock_tfds, tmp_path, capsys):
    resnet, mlp = str(tmp_path / "resnet"), str(tmp_path / "mlp")
    trainer.train_and_evaluate(make_config(resnet, model="resnet_small", widths="4,8", train_steps=4, eval_every=4))
    trainer.train_and_evaluate(make_config(mlp, train_steps=4, eval_every=4))
    at_28, at_40 = (evaluate.evaluate(resnet, image_size=size) for size in (28, 40))
    assert at_28["image_size"] == [28, 28] and at_40["image_size"] == [40, 40]
    assert at_28["accuracy"] == run_dir.read_results(resnet)["eval"]["accuracy"]
    assert at_40["loss"] != at_28["loss"]
    assert evaluate.main(["--model_dir", mlp, "--image_size", "40"]) == 2
    assert "--image_size=40: --model=mlp's weights depend on the input size" in capsys.readouterr().err
    assert evaluate.main(["--model_dir", resnet, "--image_size", "0"]) == 2
    assert "--image_size must be in [1, 4096], got 0" in capsys.readouterr().err
