"""Speed properties that hold without a clock: the train loop traces once, and the benchmark runs end to end.

Speed targets themselves are the benchmark's printed figures (`python -m research.benchmark`), never assertions:
timings on shared CI machines would make such tests flaky.
"""

import json
import logging

import pytest
import tensorflow as tf
from absl import flags

from conftest import make_config
from research import benchmark, data

FLAGS = flags.FLAGS


@pytest.fixture(autouse=True)
def fresh_keras_names():
    """Later tests may look weights up by Keras' default layer names (conv2d, not conv2d_12): reset the counters."""
    yield
    tf.keras.backend.clear_session()


def test_train_loop_traces_once_across_step_counts_and_epochs(mock_tfds, tmp_path):
    # A retrace per distinct num_steps, or at an epoch boundary, would cost seconds in every loop of a real run.
    config = make_config(tmp_path, model="cnn", optimizer="rmsprop", batch_size=8)
    dataset = data.load(config)  # 64 mock examples: 8 steps per epoch.
    ours = benchmark.build_train_loop(config, dataset)
    for num_steps in (1, 3, 8, 5, 7):  # 24 steps: three epochs, crossing each boundary mid-call.
        _, steps_run, finite = ours.train_loop(ours.iterator, tf.constant(num_steps))
        assert int(steps_run) == num_steps and bool(finite)
    assert int(ours.step.numpy()) == 24
    assert ours.train_loop.experimental_get_tracing_count() == 1


@pytest.fixture
def parse_flags():
    """Parses argv into the global absl FLAGS as `app.run` would, and resets them afterwards."""
    yield lambda *args: FLAGS(["benchmark", "--dataset=mnist", *args])
    FLAGS.unparse_flags()


@pytest.mark.slow
def test_benchmark_runs_end_to_end(mock_tfds, parse_flags, capsys):
    parse_flags("--model=cnn", "--optimizer=rmsprop", "--batch_size=8", "--steps_per_loop=4", "--benchmark_steps=4",
                "--benchmark_warmup_steps=2", "--benchmark_rounds=1", "--input_steps=8", "--json")
    benchmark.main(["benchmark"])
    results = json.loads(capsys.readouterr().out)
    assert set(results["images_per_sec"]) == {"ours", "fit_spe1", "fit_spe4"}
    assert all(rate > 0 for rate in results["images_per_sec"].values())
    assert set(results["input_images_per_sec"]) == {"distributed", "tf_data"}
    for key in ("ratio_vs_fit_default", "ratio_vs_fit_best", "first_step_s", "peak_rss_bytes"):
        assert results[key] > 0
    # The tutorial CNN's forward pass: 2 x 3,100,032 multiply-adds in its convolutions and dense layer, plus the
    # bias adds, ReLUs and pooling that the profiler also counts.
    assert 6_200_064 <= results["train_flops_per_image"] / 3 < 6_400_000
    assert results["train_loop_traces"] == 1
    table = benchmark.format_table(results)
    assert "ours / fit default" in table and "ours / fit best" in table and "GFLOP/s" in table


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--batch_size=1000"], "--batch_size=1000 exceeds the 64 examples"),
    (["--benchmark_rounds=0"], "--benchmark_rounds must be positive, got 0"),
    (["--model=nope"], "--model=nope is unknown"),
    (["--input_only", "--synthetic_data"], "--input_only measures a dataset's input pipeline"),
])
def test_benchmark_bad_input_is_one_error_line(mock_tfds, parse_flags, capsys, args, message):
    parse_flags(*args)
    assert benchmark.main(["benchmark"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.slow
def test_benchmark_compares_precisions_on_synthetic_data(parse_flags, capsys, caplog):
    parse_flags("--model=mlp", "--hidden_units=16", "--synthetic_data", "--dataset=cifar10", "--image_size=8",
                "--synthetic_classes=4",
                "--optimizer=sgd", "--batch_size=8", "--steps_per_loop=2", "--benchmark_steps=2",
                "--benchmark_warmup_steps=0", "--benchmark_rounds=1", "--compare_precisions", "--json")
    with caplog.at_level(logging.WARNING):
        benchmark.main(["benchmark"])
    assert ["--dataset=cifar10 has no effect and is ignored: --synthetic_data trains on random images"] == [
        r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    results = json.loads(capsys.readouterr().out)
    assert [(r["mixed_precision"], r["jit_compile"]) for r in results] == [
        (p, jit) for p in ("float32", "mixed_bfloat16", "mixed_float16") for jit in (False, True)]
    for r in results:
        assert r["dataset"] == "synthetic" and r["image_shape"] == [8, 8, 3] and r["input_images_per_sec"] is None
        assert all(rate > 0 for rate in r["images_per_sec"].values()) and set(r["images_per_sec"]) == {
            "ours", "fit_spe1", "fit_spe2"}
        assert r["peak_flops_per_sec"] is None and r["model_flop_utilization"]["ours"] is None  # CPU: unknown.
    table = benchmark.format_comparison(results)
    assert "mixed_bfloat16  yes" in table and "n/a" in table
    assert "unknown for this device" in benchmark.format_table(results[0])


def test_the_models_table_measures_each_model_as_it_trains(tmp_path):
    """research.benchmark_models: each row's parameters and multiply-adds are the model's own, its rates positive,
    and the Markdown table has one row per model."""
    from research import benchmark_models, models
    rows = []
    for name in ("mlp", "cnn_rgb"):
        config = make_config(tmp_path, model=name, dataset="cifar10", steps_per_loop=2)
        rows.append(benchmark_models.measure(config, image_size=32, num_classes=10, steps=2, warmup_steps=1,
                                             rounds=1))
        built = models.create(config, benchmark.synthetic_dataset(config, 32, 10))
        built(tf.zeros([1, 32, 32, 3]))
        assert rows[-1]["params"] == built.count_params()
        assert rows[-1]["gmacs"] == pytest.approx(models.forward_flops(built, (32, 32, 3)) / 2e9)
        assert rows[-1]["train_images_per_sec"] > 0 and rows[-1]["infer_images_per_sec"] > 0
    table = benchmark_models.format_table(rows, config, 32, rounds=1, steps=2).splitlines()
    assert [line.split(" | ")[0] for line in table[-2:]] == ["| mlp", "| cnn_rgb"]
