"""Streaming data: folders of images and TFDS datasets read by index, through the real training loop; exact resume
on the streaming path; replicas; bad data as one error line."""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import MNIST_FILES, make_config
from research import UserError, data, runs, trainer
from research.data import verify
from test_resume import kill_resume_and_compare, _weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Folder names whose sorted order (eight, five, four, nine, one, ...) is not the digits' order.
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def mnist_digits(split, count):
    """The first `count` real MNIST digits of `split` ('train' or 't10k') and their labels."""
    if not os.path.exists(os.path.join(MNIST_FILES, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"real MNIST files not found in {MNIST_FILES}")
    with gzip.open(os.path.join(MNIST_FILES, f"{split}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    with gzip.open(os.path.join(MNIST_FILES, f"{split}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:count]
    return images, labels


def write_digit_folder(root, counts=(("train", "train", 200), ("test", "t10k", 100)), seed=0):
    """MNIST digits as colour JPEGs (quality 90) and PNGs of sizes from 20 to 48 pixels, in root/<split>/<name>/."""
    rng = np.random.default_rng(seed)
    for split, source, count in counts:
        images, labels = mnist_digits(source, count)
        for i, (digit, label) in enumerate(zip(images, labels)):
            colour = rng.uniform(0.4, 1.0, 3)
            background = rng.uniform(0.0, 0.3, 3) * 255
            pixels = digit[..., None] / 255.0 * colour * 255 + (1 - digit[..., None] / 255.0) * background
            image = Image.fromarray(pixels.astype(np.uint8)).resize(tuple(rng.integers(20, 49, 2)))
            folder = os.path.join(root, split, NAMES[label])
            os.makedirs(folder, exist_ok=True)
            if i % 2:
                image.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
            else:
                image.save(os.path.join(folder, f"{i:05d}.png"))
    return str(root)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """200 training and 100 test digits (100 = 12 batches of 8 and 4: an uneven last batch)."""
    return write_digit_folder(tmp_path_factory.mktemp("digits"))


def folder_config(model_dir, root, **overrides):
    return make_config(model_dir, **{"dataset": f"folder:{root}", "image_size": 16, **overrides})


def test_folder_trains_with_sorted_class_names_and_keeps_its_file_list(digits, tmp_path):
    results = trainer.train_and_evaluate(folder_config(tmp_path, digits))
    assert results["eval"]["examples"] == 100 and np.sum(results["confusion_matrix"]) == 100
    assert "top5_accuracy" in results["eval"]  # 10 classes.
    info = runs.read_dataset_info(str(tmp_path))
    assert info.class_names == sorted(NAMES) and info.image_shape == (16, 16, 3)
    assert info.preprocessing.image_size == (16, 16) and info.preprocessing.eval_crop_fraction is None
    lists = json.load(open(tmp_path / "data_files.json"))
    assert lists["class_names"] == sorted(NAMES) and len(lists["splits"]["train"]) == 200
    path, label = lists["splits"]["test"][0]
    assert path.startswith(f"test/{sorted(NAMES)[label]}/")
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]["top5_accuracy"] >= \
        results["eval"]["accuracy"]


@pytest.mark.slow
def test_a_resume_reads_the_files_it_trained_on_even_if_the_folder_changed(digits, tmp_path, capsys):
    root = tmp_path / "copy"
    write_digit_folder(root, counts=(("train", "train", 40), ("test", "t10k", 20)))
    first = folder_config(tmp_path / "run", root, train_steps=4)
    trainer.train_and_evaluate(first)
    Image.new("RGB", (30, 30)).save(root / "train" / "one" / "new.png")
    dataset = data.load(first)
    assert "1 files added, 0 left out" in capsys.readouterr().out and dataset.num_train == 40


def test_folder_slices_and_split_folders(digits, tmp_path):
    train_part = data.load(folder_config(tmp_path, digits, train_split="train[:75%]", eval_split="train[75%:]"))
    assert (train_part.num_train, len(train_part.eval)) == (150, 50)
    assert not set(train_part.train.paths) & set(train_part.eval.paths)


@pytest.mark.slow
def test_sigkill_on_a_folder_then_rerun_equals_uninterrupted(digits, tmp_path):
    """Augmented (random resized crops of JPEGs and PNGs, flips), killed at a random checkpoint, resumed."""
    kill_resume_and_compare(tmp_path, f"--dataset=folder:{digits}", "--image_size=16",
                            "--augment=random_resized_crop,flip", "--normalize=imagenet")


@pytest.mark.slow
def test_sigkill_on_a_streamed_tfds_dataset_then_rerun_equals_uninterrupted(tmp_path):
    """tf_flowers (JPEGs of varying size) read by index from its (mocked) ArrayRecord files."""
    out = kill_resume_and_compare(tmp_path, "--dataset=tf_flowers", "--eval_split=train", "--image_size=16",
                                  "--model=cnn_rgb", "--augment=random_resized_crop")
    assert "streamed by index" in out


@pytest.mark.slow
def test_two_replicas_equal_one_on_the_streaming_path_and_count_each_eval_example_once(digits, tmp_path):
    one = trainer.train_and_evaluate(folder_config(tmp_path / "one", digits, strategy="default"))
    two = trainer.train_and_evaluate(folder_config(tmp_path / "two", digits, strategy="mirrored"))
    assert one["eval"]["examples"] == two["eval"]["examples"] == 100
    assert one["confusion_matrix"] == two["confusion_matrix"]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("dataset, overrides", [
    ("tf_flowers", dict(image_size="24", model="cnn_rgb", augment="random_resized_crop,flip", normalize="imagenet",
                        eval_split="train[:20]")),
    ("mnist", dict(tfds_read="array_record")),
], ids=["variable-size", "fixed-size"])
def test_streamed_tfds_datasets_train(mock_tfds, tmp_path, dataset, overrides):
    results = trainer.train_and_evaluate(make_config(tmp_path, dataset=dataset, **overrides))
    assert results["step"] == 12 and results["eval"]["examples"] == 64
    info = runs.read_dataset_info(str(tmp_path))
    if dataset == "tf_flowers":
        assert info.image_shape == (24, 24, 3) and info.preprocessing.eval_crop_fraction == 0.875
        assert info.preprocessing.normalize == "imagenet"


def test_memory_and_array_record_reading_give_the_same_batches(mnist_data_dir, tmp_path):
    batches = {}
    for how in ("memory", "array_record"):
        config = make_config(tmp_path, data_dir=mnist_data_dir, tfds_read=how, train_split="train[:200]",
                             augment="translate")
        dataset = data.load(config)
        assert ("in memory" in dataset.reading) == (how == "memory")
        stream = data.train_input_fn(dataset, config, 20)(tf.distribute.InputContext())
        batches[how] = [(x.numpy(), y.numpy()) for x, y in stream.take(8)]  # Across an epoch boundary (25 steps).
    for (x, y), (rx, ry) in zip(batches["memory"], batches["array_record"]):
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)


# ---------------------------------------------------------------------------------------------- Bad data
def test_bad_folders_are_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "hollow" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "hollow" / "train" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "hollow" / "train" / "dog" / "a.png")
    cases = [
        (tmp_path / "missing", {}, "no such directory"),
        (tmp_path / "empty", {}, "has no images: expected"),
        (tmp_path / "hollow", {}, "hollow/train/cat has no images (files of a format"),
        (tmp_path / "hollow", dict(train_split="val"), "has no split folder val/ (it has train/)"),
        (tmp_path / "hollow", dict(train_split="train[:x]"), "--train_split=train[:x]: Error parsing split"),
    ]
    for root, overrides, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            data.load(folder_config(tmp_path / "run", root, **overrides))
    with pytest.raises(UserError, match="has images of varying size: set the model's input size with --image_size"):
        data.load(make_config(tmp_path, dataset=f"folder:{tmp_path / 'hollow'}", eval_split="train"))


def test_not_image_classification_and_unprepared_datasets_are_one_line(tmp_path, capfd):
    with pytest.raises(UserError, match="--dataset=imdb_reviews is not image classification"):
        data.load(make_config(tmp_path, dataset="imdb_reviews", data_dir=str(tmp_path / "tfds")))
    with pytest.raises(UserError, match="cannot be downloaded from here"):
        data.load(make_config(tmp_path, data_dir=str(tmp_path / "tfds")))
    assert "has no dataset_info.json" not in capfd.readouterr().err  # TFDS's warning before our message.


def test_manual_files_failing_the_checksum_say_so_before_tfds_prints_anything(tmp_path, capfd):
    manual = tmp_path / "manual"
    manual.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (manual / name).write_bytes(b"not the real file")
    capfd.readouterr()
    with pytest.raises(UserError, match=r"holds another or a damaged t10k-images-idx3-ubyte.gz .*fetch it again"):
        data.load(make_config(tmp_path, data_dir=str(tmp_path / "tfds"), tfds_manual_dir=str(manual)))
    out, err = capfd.readouterr()
    assert "Downloading and preparing" not in out and "Dl Completed" not in err


def test_damaged_prepared_files_name_the_file_and_the_way_out(mnist_data_dir, tmp_path):
    shutil.copytree(os.path.join(mnist_data_dir, "mnist"), tmp_path / "tfds" / "mnist")  # Not fashion_mnist's.
    version_dir = next(p for p in (tmp_path / "tfds" / "mnist").iterdir() if p.is_dir())
    for cache in version_dir.glob("arrays-*.npz"):
        cache.unlink()
    damaged = next(version_dir.glob("mnist-test.array_record-*"))
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"mnist's prepared files in {version_dir} are damaged \({damaged.name}: "
                                        rf".*\): delete {version_dir} and run again to prepare it anew"):
        data.load(make_config(tmp_path, data_dir=str(tmp_path / "tfds"), tfds_read="memory"))


@pytest.mark.slow
def test_a_corrupt_image_met_in_training_names_the_file_and_keeps_the_checkpoint(tmp_path):
    root = tmp_path / "digits"
    write_digit_folder(root, counts=(("train", "train", 40), ("test", "t10k", 10)))
    trainer.train_and_evaluate(folder_config(tmp_path / "run", root, train_steps=4))
    bad = sorted((root / "train").glob("*/*.jpg"))[3]
    original = bad.read_bytes()
    bad.write_bytes(original[:40])  # Truncated, as by a failed copy.
    with pytest.raises(UserError, match=rf"cannot read training example {bad}: .*last checkpoint .*ckpt-\d+ left "
                                        r"intact; `python -m research.data.verify`"):
        trainer.train_and_evaluate(folder_config(tmp_path / "run", root, train_steps=40, checkpoint_every=1000))
    assert tf.train.latest_checkpoint(tmp_path / "run").endswith("ckpt-4") and _weights(tmp_path / "run")

    assert verify.main([f"--dataset=folder:{root}"]) == 1  # Every bad file, in one pass.
    done = subprocess.run([sys.executable, "-m", "research.data.verify", f"--dataset=folder:{root}", "--split=train"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout.count("bad: ") == 1 and f"bad: {bad}: " in done.stdout

    bad.write_bytes(original)
    bad_eval = sorted((root / "test").glob("*/*.png"))[0]
    bad_eval.write_bytes(b"not a png")
    with pytest.raises(UserError, match=rf"cannot read eval example {bad_eval}: Unknown image file format.* "
                                        r"\(evaluating step 4\); training saved as .*ckpt-4;"):
        trainer.train_and_evaluate(folder_config(tmp_path / "second", root, train_steps=4))


@pytest.mark.slow
def test_input_only_benchmark_measures_pipeline_and_bare_loop(digits, tmp_path):
    from research import benchmark
    from research.data import input_benchmark
    config = folder_config(tmp_path, digits, image_size=24, augment="random_resized_crop,flip", batch_size=8)
    results = input_benchmark.measure(config, data.load(config), batches=2, rounds=1)
    for rates in results["threads"].values():
        assert rates["pipeline"] > 0 and rates["bare"] > 0 and rates["ratio_per_cpu_s"] > 0
    assert results["peak_rss_bytes"] > 0 and results["first_batch_s"] > 0
    table = input_benchmark.format_results(results)
    assert "pipeline img/s" in table and "bare img/s" in table and "peak memory" in table
    assert benchmark.FLAGS["input_only"].help.startswith("Measure only the training input pipeline")
