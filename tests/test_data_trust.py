"""Nothing silently wrong in what is read: slices hold every class, the classes are the training split's, skipped
files are said, a resume never relabels, readers never write the run, and bad data is one line (issue 19)."""

import collections
import json
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from PIL import Image

from conftest import make_config
from research import UserError, benchmark, cli, data, evaluate, predict, trainer
from research.data import input_benchmark, preprocess, sources, verify
from test_hardening import _run


def write_folder(root, counts, splits=("train", "test"), size=(8, 8)):
    """Small random PNGs: `counts` {class: files} in each split folder of `splits`."""
    rng = np.random.default_rng(len(str(root)))
    for split in splits:
        for name, count in counts.items():
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(root, split, name, f"{i:03d}.png"))
    return str(root)


def folder_config(model_dir, root, **overrides):
    return make_config(model_dir, **{"dataset": f"folder:{root}", "image_size": 8, "train_steps": 4,
                                     "eval_every": 4, **overrides})


def labels_of(source):
    return collections.Counter(int(label) for label in source.labels)


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """Classes of 40, 20 and 10 files whose sorted order is not their order on disk by size."""
    return write_folder(tmp_path_factory.mktemp("three"), {"ant": 40, "bee": 20, "cat": 10})


# ---------------------------------------------------------------------------------------------- Slices
def test_percent_slices_hold_every_class_in_proportion_are_disjoint_and_do_not_depend_on_the_seed(three_classes,
                                                                                                   tmp_path):
    loaded = [data.load(folder_config(tmp_path, three_classes, train_split="train[:90%]", eval_split="train[90%:]",
                                      seed=seed)) for seed in (0, 7)]
    first = loaded[0]
    assert first.train.paths == loaded[1].train.paths and first.eval.paths == loaded[1].eval.paths
    assert not set(first.train.paths) & set(first.eval.paths) and len(first.train) + len(first.eval) == 70
    # 90% / 10% of each class, to within one file: every class on both sides.
    assert labels_of(first.train) == {0: 36, 1: 18, 2: 9} and labels_of(first.eval) == {0: 4, 1: 2, 2: 1}
    # The order within a class is a hash of the path, not the sorted names.
    assert first.train.paths[:3] != sorted(first.train.paths)[:3]


def test_an_eval_split_that_overlaps_training_is_said(three_classes, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        data.load(folder_config(tmp_path, three_classes, train_split="train+test", eval_split="test[:50%]"))
    assert any("--eval_split=test[:50%] shares 35 of its 35 files with --train_split=train+test" in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow
def test_evaluate_split_slices_the_same_way_and_never_writes_the_file_lists(three_classes, tmp_path):
    trainer.train_and_evaluate(folder_config(tmp_path, three_classes, train_split="train[:90%]",
                                           eval_split="train[90%:]"))
    recorded = (tmp_path / "data_files.json").read_bytes()
    assert set(json.loads(recorded)["splits"]) == {"train[:90%]", "train[90%:]"}
    report = evaluate.evaluate(str(tmp_path), split="train[90%:]")
    assert report["examples"] == 7 and [c["examples"] for c in report["per_class"]] == [4, 2, 1]
    report = evaluate.evaluate(str(tmp_path), split="test[:50%]")  # Not recorded: listed, and not written.
    assert [c["examples"] for c in report["per_class"]] == [20, 10, 5]
    assert (tmp_path / "data_files.json").read_bytes() == recorded


# ---------------------------------------------------------------------------------------------- Classes
def test_the_classes_are_the_training_splits_folders(tmp_path, caplog):
    root = write_folder(tmp_path / "d", {"cat": 4, "dog": 4})
    write_folder(root, {"cow": 2, "cat": 2, "dog": 2}, splits=("val",))
    assert data.load(folder_config(tmp_path / "run", root)).class_names == ["cat", "dog"]  # cow: only in val.
    with pytest.raises(UserError, match=r"--eval_split=val of folder:.* has class folders that training lacks: cow "
                                        r"\(the classes are the training split's folders: cat, dog\)"):
        data.load(folder_config(tmp_path / "run", root, eval_split="val"))
    shutil.rmtree(os.path.join(root, "test", "dog"))
    with caplog.at_level(logging.WARNING):
        dataset = data.load(folder_config(tmp_path / "run", root))
    assert labels_of(dataset.eval) == {0: 4}
    warnings = [r.getMessage() for r in caplog.records if "has no images of" in r.getMessage()]
    assert len(warnings) == 1 and "--eval_split=test" in warnings[0] and "1 of the 2 classes (dog)" in warnings[0]

    one = write_folder(tmp_path / "one", {"cat": 4})
    with pytest.raises(UserError, match=r"has one class \(cat/\): a classifier needs at least two"):
        data.load(folder_config(tmp_path / "run", one))


# ---------------------------------------------------------------------------------------------- Skipped files
def test_every_format_tensorflow_decodes_is_read_and_the_rest_is_counted_in_one_line(tmp_path, caplog):
    root = write_folder(tmp_path / "d", {"cat": 2, "dog": 2})
    train_cat, train_dog = tmp_path / "d" / "train" / "cat", tmp_path / "d" / "train" / "dog"
    (train_cat / "kittens").mkdir()
    Image.new("RGB", (9, 9)).save(train_cat / "kittens" / "small.png")  # A subfolder: still a cat.
    Image.new("RGB", (9, 9)).save(train_cat / "a.bmp")
    Image.new("RGB", (9, 9)).save(train_dog / "b.GIF", format="GIF")
    Image.new("RGB", (9, 9)).save(train_dog / "c.webp")
    (train_cat / "notes.txt").write_text("x")
    (train_cat / "list.csv").write_text("x")
    (train_cat / ".DS_Store").write_text("x")
    (tmp_path / "d" / "train" / "README").write_text("x")
    os.symlink(tmp_path / "gone.png", train_dog / "gone.png")
    Image.new("RGB", (9, 9)).save(os.path.join(os.fsencode(train_dog), b"caf\xe9.png"))  # Latin-1, not UTF-8.
    with caplog.at_level(logging.WARNING):
        dataset = data.load(folder_config(tmp_path / "run", root))
    assert labels_of(dataset.train) == {0: 4, 1: 4}
    assert "train/cat/kittens/small.png" in dataset.train.paths
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1
    assert "skipped 6 files: 2 not of a format TensorFlow decodes (1 .txt, 1 .csv; e.g. train/cat/list.csv)" in lines[0]
    assert "1 named in bytes that are not UTF-8 (rename them) (e.g. train/dog/caf\ufffd.png)" in lines[0]
    assert "1 hidden (e.g. train/cat/.DS_Store)" in lines[0] and "1 dangling link (e.g. train/dog/gone.png)" in lines[0]
    assert "1 outside any class folder (e.g. train/README)" in lines[0]
    assert data.unreadable_eval_example(data.load(folder_config(tmp_path / "run", root, eval_split="train"))) is None


# ---------------------------------------------------------------------------------------------- Resume
@pytest.mark.slow
def test_a_resume_on_other_classes_is_refused_and_only_a_starting_run_writes_the_file_lists(tmp_path):
    root = write_folder(tmp_path / "d", {"cat": 8, "dog": 8, "emu": 8})
    run = tmp_path / "run"
    trainer.train_and_evaluate(folder_config(run, root))
    dataset_json = (run / "dataset.json").read_bytes()
    recorded = (run / "data_files.json").read_bytes()

    refused = folder_config(run, root, batch_size=4, train_steps=8)  # A flag that changes the checkpoint's meaning.
    with pytest.raises(UserError, match="holds a run with other settings"):
        trainer.train_and_evaluate(refused)
    assert (run / "data_files.json").read_bytes() == recorded

    (run / "data_files.json").unlink()
    for split in ("train", "test"):
        os.rename(os.path.join(root, split, "dog"), os.path.join(root, split, "dingo"))
    with pytest.raises(UserError, match=r"has class folders other than the 3 classes .* trained on \(new dingo; gone "
                                        r"dog\): every label would shift"):
        trainer.train_and_evaluate(folder_config(run, root, train_steps=8))
    with pytest.raises(UserError, match="has class folders that training lacks: dingo"):
        evaluate.evaluate(str(run))
    assert not (run / "data_files.json").exists() and (run / "dataset.json").read_bytes() == dataset_json

    for split in ("train", "test"):
        os.rename(os.path.join(root, split, "dingo"), os.path.join(root, split, "dog"))
    results = trainer.train_and_evaluate(folder_config(run, root, train_steps=8))  # Listed again: the same lists.
    assert results["step"] == 8 and (run / "data_files.json").read_bytes() == recorded


@pytest.mark.slow
def test_a_folder_moved_or_thinned_after_training_or_damaged_lists_are_one_line_for_evaluate_and_resume(tmp_path):
    root = write_folder(tmp_path / "d", {"cat": 8, "dog": 8})
    run = tmp_path / "run"
    trainer.train_and_evaluate(folder_config(run, root))
    recorded = (run / "data_files.json").read_text()
    lists = json.loads(recorded)
    lists["splits"]["test"][0][1] = 7  # A label beyond the two classes.
    (run / "data_files.json").write_text(json.dumps(lists))
    with pytest.raises(UserError, match="data_files.json is damaged: it holds no valid file lists"):
        evaluate.evaluate(str(run))
    (run / "data_files.json").write_text(recorded)
    os.remove(os.path.join(root, "test", "cat", "003.png"))
    with pytest.raises(UserError, match=r"lacks 1 of the 16 files .* read as test \(e.g. test/cat/003.png\): put "
                                        "them back"):
        evaluate.evaluate(str(run))
    os.rename(root, tmp_path / "moved")
    for attempt in (lambda: evaluate.evaluate(str(run)),
                    lambda: trainer.train_and_evaluate(folder_config(run, root, train_steps=8))):
        with pytest.raises(UserError, match=rf"folder:{root} no longer exists, and {run} was trained on it"):
            attempt()
    assert (run / "data_files.json").read_text() == recorded


# ---------------------------------------------------------------------------------------------- Pixel budget
@pytest.mark.slow
def test_images_over_the_pixel_budget_are_refused_naming_the_file(tmp_path, monkeypatch, capsys):
    root = write_folder(tmp_path / "d", {"cat": 4, "dog": 4})
    big, big_eval = (os.path.join(root, split, "dog", "big.png") for split in ("train", "test"))
    for path in (big, big_eval):
        Image.new("RGB", (30, 20)).save(path)
    run = tmp_path / "run"
    trainer.train_and_evaluate(folder_config(run, root))
    monkeypatch.setattr(preprocess, "MAX_IMAGE_PIXELS", 400)  # 8x8 files pass, 30x20 does not.
    budget = r"image of 20 x 30 pixels \(height x width\), over the budget of 400 pixels: downscale it"
    with pytest.raises(UserError, match=rf"cannot read eval example {big_eval}: {budget}; `python -m research.data"):
        evaluate.evaluate(str(run))
    with pytest.raises(UserError, match=rf"cannot read training example {big}: {budget}"):
        trainer.train_and_evaluate(folder_config(run, root, train_steps=8))
    assert verify.main([f"--dataset=folder:{root}", "--split=train"]) == 1
    assert f"bad: {big}: image of 20 x 30 pixels" in capsys.readouterr().out
    encoded = tf.io.encode_jpeg(tf.zeros([20, 30, 3], tf.uint8))  # The fused crop-while-decoding path too.
    with pytest.raises(tf.errors.InvalidArgumentError, match="over the budget"):
        preprocess.random_resized_crop(encoded, True, (8, 8), 3, (0.08, 1.0), (0.75, 1.33), tf.constant([1, 2]))
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    with pytest.raises(UserError, match="photo.png: image of 64 x 64 pixels .* over the budget of 400 pixels"):
        predict.read_image(str(tmp_path / "photo.png"), 3)


# ---------------------------------------------------------------------------------------------- One line each
def test_damaged_records_are_one_clean_error_without_reader_tracebacks():
    class Damaged(list):
        def __getitems__(self, keys):
            raise RuntimeError("Corrupted Riegeli/records file: chunk header hash mismatch")

    source = sources.RecordSource(Damaged([b""] * 4), "mnist train", "/data/mnist")
    stream = tf.data.Dataset.range(4).batch(2).map(source.reader())
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        list(stream)
    assert "Traceback" not in raised.value.message and "RuntimeError: Corrupted Riegeli" in raised.value.message
    assert next(data.pipeline.unreadable(source, 1, range(4)))[1] == \
        "RuntimeError: Corrupted Riegeli/records file: chunk header hash mismatch"
    # What tf.data's threads log of such a failure, and of a bad image file, is not shown by our programs.
    for line in (b"W0000 00:00:1796186390.214719    9884 op_kernel.cc:1845] UNKNOWN: RuntimeError: Corrupted\n",
                 b"W0000 00:00:1796186390.215863    9802 local_rendezvous.cc:412] Local rendezvous is aborting\n",
                 b"\t [[while/body/_1/while/IteratorGetNext]]\n"):
        assert cli.TENSORFLOW_NOISE.match(line)
    assert not cli.TENSORFLOW_NOISE.match(b"W0000 00:00:1796186390.215863    9802 checkpoint.py:12] falling back\n")


@pytest.mark.parametrize("overrides, message", [
    (dict(train_split=""), "--train_split is empty"),
    (dict(eval_split=" "), "--eval_split is empty"),
    (dict(data_dir="foo://x"), "--data_dir=foo://x: TensorFlow cannot open it"),
    (dict(dataset="mnist:0.0.1"), "--dataset=mnist:0.0.1: TFDS cannot open it"),
    (dict(dataset="mnist/nope"), "--dataset=mnist/nope: TFDS cannot open it .*BuilderConfig nope not found"),
    (dict(dataset="/photos/x"), "for a folder of images use --dataset=folder:/photos/x"),
    (dict(dataset="folder:gs://bucket/photos"), "image folders are read from local paths"),
], ids=["train_split", "eval_split", "data_dir", "version", "config", "path", "url"])
def test_bad_splits_and_dataset_names_are_one_line(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        data.load(make_config(tmp_path, **{"data_dir": str(tmp_path / "tfds"), **overrides}))


def test_an_image_size_beyond_any_model_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"--image_size must be in \[0, 4096\]"):
        make_config(tmp_path, image_size=100000)


def test_input_benchmark_never_writes_into_a_folder_that_holds_anything(tmp_path, capsys):
    root = write_folder(tmp_path / "d", {"cat": 2, "dog": 2})
    before = sorted(os.walk(root))
    assert input_benchmark.main([root, "--files=4"]) == 2
    assert sorted(os.walk(root)) == before and "already exists and is not an empty folder" in capsys.readouterr().err
    for args, message in (([str(tmp_path / "new"), "--files=0"], "--files must be positive"),
                          ([str(tmp_path / "new"), "--size=0x8"], "--size=0x8: expected positive sizes"),
                          ([str(tmp_path / "new"), "--files=x"], "argument --files: invalid int value"),
                          ([], "the following arguments are required: root")):
        assert input_benchmark.main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}")
    assert not (tmp_path / "new").exists()
    assert input_benchmark.main([str(tmp_path / "new"), "--files=3", "--size=8x8"]) == 0
    assert len(os.listdir(tmp_path / "new" / "train")) == 10


def test_the_input_only_benchmark_refuses_zero_steps_or_rounds(tmp_path, capsys):
    root = write_folder(tmp_path / "d", {"cat": 2, "dog": 2})
    try:
        for zero in ("input_steps", "benchmark_rounds"):
            flags.FLAGS.unparse_flags()
            flags.FLAGS(["benchmark", "--input_only", f"--dataset=folder:{root}", "--image_size=8", f"--{zero}=0"])
            assert benchmark.main(["benchmark"]) == 2
            assert capsys.readouterr().err.strip() == f"error: --{zero} must be positive, got 0"
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.slow
def test_programs_started_from_the_command_line_are_one_line(tmp_path):
    """Subprocesses: a ram:// run directory would vanish at exit; the data tools filter TensorFlow's start-up."""
    done = _run("-m", "research.train", "--model_dir=ram://runs/x", "--train_steps=1")
    assert done.returncode == 2 and done.stderr.splitlines() == [
        "error: --model_dir=ram://runs/x is in memory (ram://) and would be lost when this program exits: give a "
        "path on disk or a lasting filesystem (gs://, s3://, hdfs://)"]
    root = write_folder(tmp_path / "d", {"cat": 2, "dog": 2})
    done = _run("-m", "research.data.verify", f"--dataset=folder:{root}", "--split=val")
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: --split=val: folder:{root} has no split folder val/ (it has test/, train/)"]
    done = _run("-m", "research.data.input_benchmark", root)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"error: {root} already exists and is not an empty folder: give a new one"]
