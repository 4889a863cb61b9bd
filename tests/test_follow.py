"""Training without evaluation (--eval_every=never) and the sidecar that evaluates its checkpoints
(`research.evaluate --follow`): it records what the training's own evaluation would have, once per checkpoint, also
when started before the training and killed; and multi-crop test-time augmentation (--tta=five_crop)."""

import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from conftest import make_config
from research import UserError, checkpoint, data, evaluate, evaluation, follow, per_example, run_dir, runs, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAME_RUN = dict(train_steps=8, checkpoint_every=4, keep_checkpoints=10, extra_eval="train", deterministic=True)
TRAIN_MEANS = ("train_loss", "train_accuracy", "train_grad_norm", "train_learning_rate")  # (Not images/s: timing.)


def _scalars(directory, tag):
    events = event_accumulator.EventAccumulator(directory, size_guidance={event_accumulator.TENSORS: 0}).Reload()
    return {e.step: tf.make_ndarray(e.tensor_proto).item() for e in events.Tensors(tag)}


def _evaluations(model_dir):
    """metrics.jsonl's lines without the fields only a training has (its clock, its segment, its images/s)."""
    return [{k: v for k, v in line.items() if k not in ("elapsed_s", "segment", "train_images_per_sec")}
            for line in run_dir.read_metrics(model_dir, every_line=True)]


def test_a_sidecar_records_what_the_trainings_own_evaluation_would(mock_tfds, tmp_path, capsys):
    never, in_loop = str(tmp_path / "never"), str(tmp_path / "in_loop")
    results = trainer.train_and_evaluate(make_config(never, eval_every="never", **SAME_RUN))
    assert results["eval"] is None and results["extra_eval"] is None and results["step"] == 8
    assert "Done: step 8, not evaluated (--eval_every=never)" in capsys.readouterr().out
    assert not {"metrics.jsonl", "best", "eval", "eval_train", "eval.examples.npz"} & set(os.listdir(never))
    trainer.train_and_evaluate(make_config(in_loop, eval_every=4, **SAME_RUN))

    assert follow.follow(never, poll_s=0, timeout_s=0) == [4, 8]
    assert "Followed " in capsys.readouterr().out
    assert _evaluations(never) == _evaluations(in_loop)  # The same numbers, bit for bit, train means included.
    assert [line["step"] for line in _evaluations(never)] == [4, 8]
    assert set(TRAIN_MEANS) <= set(_evaluations(never)[0])
    followed, own = run_dir.read_results(never), run_dir.read_results(in_loop)
    for key in ("eval", "extra_eval", "confusion_matrix"):
        assert followed[key] == own[key], key
    best = run_dir.read_best(never)
    assert best == run_dir.read_best(in_loop)
    assert tf.train.latest_checkpoint(os.path.join(never, "best")) == os.path.join(never, "best",
                                                                                   f"ckpt-{best['step']}")
    for tag in ("eval", "eval_train"):
        assert _scalars(os.path.join(never, tag), "accuracy") == _scalars(os.path.join(in_loop, tag), "accuracy")
        ours, theirs = (per_example.read(run_dir.per_example_path(d, tag)) for d in (never, in_loop))
        np.testing.assert_array_equal(ours["prediction"], theirs["prediction"])

    # Killed after its line for step 8, before it completed results.json: the rerun records nothing twice.
    lines = open(os.path.join(never, "metrics.jsonl")).readlines()
    run_dir.write_results(never, {**followed, **evaluation.results_fields(None)})
    assert follow.follow(never, poll_s=0, timeout_s=0) == []
    assert run_dir.read_results(never)["eval"] == followed["eval"]
    # Killed before its line for step 8: step 8 alone is evaluated again.
    open(os.path.join(never, "metrics.jsonl"), "w").writelines(lines[:1])
    assert follow.follow(never, poll_s=0, timeout_s=0) == [8]
    assert [line["step"] for line in _evaluations(never)] == [4, 8]

    with pytest.raises(UserError, match=r"is evaluated by its training \(--eval_every=4\): --follow is for runs "
                                        r"trained with --eval_every=never"):
        follow.follow(in_loop, poll_s=0, timeout_s=0)
    with pytest.raises(UserError, match=r"^\S+/nowhere: no training has been running there \(no live LOCK\) and no "
                                        r"checkpoint has been left to evaluate for 0 s; it does not exist"):
        follow.follow(str(tmp_path / "nowhere"), poll_s=0, timeout_s=0)
    # 0, the spelling of 'epoch' before 'never' existed, keeps its meaning in every earlier run's flags.txt.
    flags = open(os.path.join(in_loop, "flags.txt")).read().replace("--eval_every=4", "--eval_every=0")
    open(os.path.join(in_loop, "flags.txt"), "w").write(flags)
    changes = checkpoint.check_resume_config(in_loop, make_config(in_loop, **SAME_RUN))  # (conftest's 8)
    assert changes["eval_every"] == ("epoch", "8")
    assert "eval_every" not in checkpoint.check_resume_config(in_loop, make_config(in_loop, **{
        **SAME_RUN, "eval_every": "epoch"}))



def test_five_crop_averages_the_corner_and_centre_crops_of_the_image_resized_larger(mock_tfds, tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8), rng.integers(0, 3, 20)
    dataset = data.in_memory("toy", ["a", "b", "c"], (images, labels), (images, labels))
    config, strategy = make_config(tmp_path, batch_size=8), tf.distribute.get_strategy()
    flat = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)])  # Every pixel of the crop counts.
    flat(tf.zeros([1, 6, 6, 1]))
    inputs = strategy.distribute_datasets_from_function(data.eval_input_fn(dataset, config))
    sums = {k: v.numpy() for k, v in evaluation.make_pass(strategy, flat, 3, 20, "five_crop", (6, 6))(inputs).items()}
    pixels = images / 255.0
    crops = [pixels[:, top:top + 6, left:left + 6] for top, left in ((0, 0), (0, 2), (2, 0), (2, 2), (1, 1))]
    expected = np.mean([tf.nn.softmax(flat(crop)).numpy() for crop in crops], axis=0)
    np.testing.assert_array_equal(sums["per_example"][:, 1], expected.argmax(-1))
    np.testing.assert_allclose(sums["per_example"][:, 2], expected.max(-1), rtol=1e-5)
    np.testing.assert_allclose(sums["loss"], -np.log(expected[np.arange(20), labels]).sum(), rtol=1e-5)

    # Through the tool: MNIST's 28 x 28 model input, crops of 28 from the image resized to 28 / 0.875 = 32.
    run = str(tmp_path / "run")
    trainer.train_and_evaluate(make_config(run, train_steps=4, eval_every=4))
    report = evaluate.evaluate(run, tta="five_crop")
    assert report["tta"] == "five_crop" and report["image_size"] == [28, 28] and report["view_size"] == [32, 32]
    larger = data.load(runs.read_config(run, image_size="32", train_split=None))
    views, _ = data.eval_examples(larger, runs.read_config(run), range(64))
    model = runs.load_model(run).model
    crops = [views[:, top:top + 28, left:left + 28] for top, left in ((0, 0), (0, 4), (4, 0), (4, 4), (2, 2))]
    expected = np.mean([tf.nn.softmax(model(crop)).numpy() for crop in crops], axis=0)
    record = per_example.read(run_dir.per_example_path(run, "eval"))
    np.testing.assert_array_equal(record["prediction"], expected.argmax(-1))
    np.testing.assert_allclose(record["confidence"], expected.max(-1), rtol=1e-5)
    assert report["accuracy"] == np.mean(record["prediction"] == record["label"])


@pytest.mark.slow
def test_a_sidecar_started_before_training_and_killed_once_evaluates_every_checkpoint_once(mock_tfds, tmp_path):
    run = str(tmp_path / "run")
    training_flags = ["--model=mlp", "--hidden_units=16", "--batch_size=8", "--train_steps=24", "--steps_per_loop=1",
                      "--checkpoint_every=4", "--keep_checkpoints=10", "--eval_every=never", "--extra_eval=train",
                      "--optimizer=adam", "--deterministic"]

    def start(program, *flags):
        return subprocess.Popen([sys.executable, f"tests/{program}", f"--model_dir={run}", *flags], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    sidecar = start("mock_evaluate.py", "--follow", "--poll_s=0.1", "--timeout_s=300")
    assert sidecar.stdout.readline().startswith(f"Following {run}")  # Up, before the run directory exists.
    assert not os.path.exists(run)
    training = start("mock_train.py", *training_flags)
    deadline = time.time() + 300
    while not run_dir.read_metrics(run):
        assert sidecar.poll() is None and time.time() < deadline, sidecar.communicate()
        time.sleep(0.02)
    sidecar.send_signal(signal.SIGKILL)
    sidecar.wait(timeout=60)
    killed_after = [line["step"] for line in run_dir.read_metrics(run)]
    restarted = start("mock_evaluate.py", "--follow", "--poll_s=0.1", "--timeout_s=300")
    assert training.wait(timeout=300) == 0, training.communicate()
    out, err = restarted.communicate(timeout=300)
    assert restarted.returncode == 0 and "Traceback" not in err, err
    assert f"Followed {run} to its end at step 24" in out

    lines = run_dir.read_metrics(run, every_line=True)
    assert [line["step"] for line in lines] == list(range(4, 25, 4)), f"killed after steps {killed_after}"
    results = run_dir.read_results(run)
    assert results["eval"]["accuracy"] == lines[-1]["accuracy"] and results["step"] == 24
    assert run_dir.read_best(run)["accuracy"] == max(line["accuracy"] for line in lines)
    for line in lines:  # research.evaluate's numbers of each checkpoint, every set.
        report = evaluate.evaluate(run, os.path.join(run, f"ckpt-{line['step']}"))
        assert (report["accuracy"], report["loss"]) == (line["accuracy"], line["loss"]), line["step"]
        assert report["extra_eval"]["train"]["loss"] == line["extra_eval"]["train"]["loss"], line["step"]
