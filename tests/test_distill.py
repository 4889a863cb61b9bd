"""Knowledge distillation (--teacher): the loss, a teacher that stays as it was and outside every gradient, the
student alone in the checkpoint, agreement at evaluation, exact resume, replicas and accumulation, and one line
for every teacher that cannot be one."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from conftest import make_config
from research import UserError, data, distill, distribute, export, runs, teacher as teacher_lib, train_lib, trainer
from test_resume import kill_resume_and_compare

STUDENT = dict(hidden_units="8", train_steps=8, eval_every=8, checkpoint_every=4)


@pytest.fixture(autouse=True)
def float32_policy():
    yield
    tf.keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def teacher_run(mock_tfds, tmp_path):
    """A finished mlp(32) run on mock MNIST: the teacher."""
    run = tmp_path / "teacher"
    trainer.train_and_evaluate(make_config(run, hidden_units="32", train_steps=16, eval_every=16))
    return str(run)


def _files(directory):
    return {os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(directory) for f in files}


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_the_step_loss_is_the_numpy_distillation_loss_on_one_batch(teacher_run, tmp_path):
    """(1 - alpha) CE + alpha T^2 KL(teacher_T || student_T), from logits computed apart, on the first batch."""
    alpha, temperature = 0.7, 3.0
    config = make_config(tmp_path / "student", teacher=teacher_run, distill_alpha=str(alpha),
                         distill_temperature=str(temperature), **{**STUDENT, "train_steps": 1})
    dataset = data.load(config)
    strategy = tf.distribute.get_strategy()
    model, optimizer, step, _ = train_lib.build(config, dataset, strategy, 1)
    teacher = teacher_lib.load(config, dataset, strategy)
    images, labels = next(iter(data.train_input_fn(dataset, config, 0)(tf.distribute.InputContext())))
    student_logits = model(images, training=True).numpy().astype(np.float64)
    teacher_logits = runs.load_model(teacher_run).model(images, training=False).numpy().astype(np.float64)
    cross_entropy = -_np_log_softmax(student_logits)[np.arange(len(labels)), labels.numpy()]
    p = np.exp(_np_log_softmax(teacher_logits / temperature))
    kl = (p * (np.log(p) - _np_log_softmax(student_logits / temperature))).sum(-1) * temperature ** 2
    expected = ((1 - alpha) * cross_entropy + alpha * kl).mean()

    train_loop = train_lib.make_train_loop(strategy, model, optimizer, step, config, None, teacher)
    iterator = iter(strategy.distribute_datasets_from_function(data.train_input_fn(dataset, config, 0)))
    totals, _, _ = train_loop(iterator, tf.constant(1))
    assert kl.mean() > 0.01  # The two networks disagree: the test could fail.
    assert float(totals[0]) == pytest.approx(expected, rel=1e-5)
    assert config.teacher_sha256 == distill.weights_sha256(teacher.variables)


def test_distillation_loss_ignores_classes_the_teacher_rules_out_and_is_zero_on_agreement():
    teacher = tf.constant([[0.0, -np.inf, 1.0]])
    assert np.isfinite(distill.loss(teacher, tf.constant([[0.0, 5.0, 1.0]]), 2.0).numpy()).all()
    same = tf.constant([[0.3, -1.0, 2.0]])
    assert float(distill.loss(same, same, 4.0)[0]) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_the_students_gradients_do_not_reach_the_teacher(teacher_run, tmp_path):
    config = make_config(tmp_path / "student", teacher=teacher_run, **STUDENT)
    dataset = data.load(config)
    strategy = tf.distribute.get_strategy()
    model, *_ = train_lib.build(config, dataset, strategy, 8)
    teacher = teacher_lib.load(config, dataset, strategy)
    assert not any(v.trainable for v in teacher.variables)
    images, labels = next(iter(data.train_input_fn(dataset, config, 0)(tf.distribute.InputContext())))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([v.value for v in teacher.variables])  # Watched on purpose: only stop_gradient can block them.
        logits = model(images, training=True)
        loss = tf.reduce_mean(teacher.mixed_loss(teacher.logits(images), logits, tf.zeros_like(logits[:, 0])))
    assert all(g is not None for g in tape.gradient(loss, model.trainable_variables))
    assert all(g is None for g in tape.gradient(loss, teacher.variables))


def test_teacher_stays_bit_identical_student_alone_is_checkpointed_agreement_is_reported(teacher_run, tmp_path):
    before = _files(teacher_run)
    student = tmp_path / "student"
    results = trainer.train_and_evaluate(make_config(student, teacher=teacher_run, **STUDENT))
    assert _files(teacher_run) == before  # Checkpoints, flags, events: nothing of the teacher was written.
    reader = tf.train.load_checkpoint(str(student))
    held = [n for n in reader.get_variable_to_shape_map() if n.startswith("model_variables/")]
    assert sorted(reader.get_variable_to_shape_map()[n] for n in held) == [[8], [8, 10], [10], [784, 8]]  # mlp(8).
    flags_txt = (student / "flags.txt").read_text()
    digest = distill.weights_sha256(runs.load_model(teacher_run).model.variables)
    assert f"--teacher={teacher_run}\n" in flags_txt and f"--teacher_sha256={digest}\n" in flags_txt
    [start] = [json.loads(line) for line in open(student / "provenance.jsonl")]
    assert start["teacher"] == {"path": str(teacher_run), "sha256": digest}
    [record] = [json.loads(line) for line in open(student / "metrics.jsonl")]
    assert 0 <= record["teacher_agreement"] <= 1 and record["teacher_kl"] >= 0
    assert results["eval"]["teacher_agreement"] == record["teacher_agreement"]
    events = event_accumulator.EventAccumulator(str(student / "eval"), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    assert [e.step for e in events.Tensors("teacher_agreement")] == [8]


@pytest.mark.slow
def test_sigkill_resume_with_a_teacher_and_accumulation_is_exact(teacher_run, tmp_path):
    kill_resume_and_compare(tmp_path / "runs", f"--teacher={teacher_run}", "--distill_temperature=2",
                            "--grad_accum_steps=2", "--augment=translate")


@pytest.mark.slow
def test_two_replicas_with_a_teacher_train_as_one_device(teacher_run, tmp_path):
    flags = dict(teacher=teacher_run, distill_alpha="0.8", **STUDENT)
    single = trainer.train_and_evaluate(make_config(tmp_path / "one", strategy="default", **flags))
    config = make_config(tmp_path / "two", strategy="mirrored", grad_accum_steps=2, **flags)
    mirrored = trainer.train_and_evaluate(config)
    assert distribute.create_strategy(config).num_replicas_in_sync == 2
    one, two = (tf.train.load_checkpoint(str(tmp_path / d)) for d in ("one", "two"))
    for name in one.get_variable_to_shape_map():
        if name.startswith("model_variables/"):
            np.testing.assert_allclose(two.get_tensor(name), one.get_tensor(name), rtol=1e-5, atol=1e-6)
    assert mirrored["eval"]["teacher_kl"] == pytest.approx(single["eval"]["teacher_kl"], rel=1e-4)
    pinned = [line for d in ("one", "two") for line in open(tmp_path / d / "flags.txt") if "teacher_sha256" in line]
    assert pinned[0] == pinned[1]  # The teacher's hash does not depend on the replicas holding it.


@pytest.mark.slow
def test_resume_refuses_another_teacher_and_follows_a_moved_one(teacher_run, tmp_path):
    student = tmp_path / "student"
    trainer.train_and_evaluate(make_config(student, teacher=teacher_run, **STUDENT))
    other = tmp_path / "other"
    trainer.train_and_evaluate(make_config(other, hidden_units="32", train_steps=16, eval_every=16, seed="1"))
    with pytest.raises(UserError, match=r"other settings \(--teacher_sha256: [0-9a-f]{64} -> [0-9a-f]{64}\)"):
        trainer.train_and_evaluate(make_config(student, teacher=str(other), **{**STUDENT, "train_steps": 12}))
    with pytest.raises(UserError, match=r"other settings \(--teacher_sha256: [0-9a-f]{64} -> \)"):
        trainer.train_and_evaluate(make_config(student, **{**STUDENT, "train_steps": 12}))  # The teacher dropped.
    moved = tmp_path / "moved"
    shutil.move(teacher_run, moved)
    with pytest.raises(UserError, match=r"--teacher=.*teacher does not exist \(a teacher that moved"):
        trainer.train_and_evaluate(make_config(student, teacher=teacher_run, **{**STUDENT, "train_steps": 12}))
    assert trainer.train_and_evaluate(make_config(student, teacher=str(moved), **{**STUDENT, "train_steps": 12}))[
        "step"] == 12
    [history] = [json.loads(line) for line in open(student / "flags_history.jsonl")]
    assert history["changes"]["teacher"] == [teacher_run, str(moved)]


@pytest.mark.slow
def test_a_plain_run_does_not_take_a_teacher_on_resume(teacher_run, tmp_path):
    student = tmp_path / "student"
    trainer.train_and_evaluate(make_config(student, **STUDENT))
    with pytest.raises(UserError, match=r"other settings \(--teacher_sha256:  -> [0-9a-f]{64}\)"):
        trainer.train_and_evaluate(make_config(student, teacher=teacher_run, **{**STUDENT, "train_steps": 12}))


@pytest.mark.slow
def test_every_teacher_that_cannot_be_one_is_one_line(teacher_run, tmp_path):
    def refused(match, **flags):
        run = tmp_path / "refused"
        with pytest.raises(UserError, match=match):
            trainer.train_and_evaluate(make_config(run, **{**STUDENT, **flags}))
        assert not run.exists()  # A run that fails before it trains leaves nothing.

    unfinished = tmp_path / "unfinished"
    trainer.train_and_evaluate(make_config(unfinished, hidden_units="32", train_steps=8, eval_every=8))
    os.remove(unfinished / "results.json")  # As while it trains.
    refused(r"has not finished training \(no results.json\); name one of its checkpoints", teacher=str(unfinished))
    assert trainer.train_and_evaluate(make_config(tmp_path / "from_ckpt", teacher=str(unfinished / "ckpt-8"),
                                                  **STUDENT))["step"] == 8
    refused("does not exist", teacher=str(tmp_path / "nowhere"))
    refused("is this run itself", teacher=str(tmp_path / "refused"))
    with pytest.raises(UserError, match="is this run itself"):  # A finished run resumed with itself as teacher.
        trainer.train_and_evaluate(make_config(unfinished, teacher=str(unfinished / "ckpt-8"), **STUDENT))
    refused(r"hash to [0-9a-f]{64}, not to --teacher_sha256=0{64}", teacher=teacher_run, teacher_sha256="0" * 64)
    fashion = tmp_path / "fashion"
    trainer.train_and_evaluate(make_config(fashion, dataset="fashion_mnist", train_steps=4, eval_every=4))
    refused(r"classifies 10 classes \(T-shirt/top, .*\), mnist has 10 \(0, 1, 2, 3, 4, \.\.\.\): a teacher must know",
            teacher=str(fashion))
    with pytest.raises(UserError, match=r"--distill_alpha must be in \[0, 1\], got 1.5"):
        make_config(tmp_path, teacher=teacher_run, distill_alpha="1.5")
    with pytest.raises(UserError, match="--distill_temperature must be positive"):
        make_config(tmp_path, teacher=teacher_run, distill_temperature="0")
    with pytest.raises(UserError, match="--teacher_sha256=abc is not a SHA-256"):
        make_config(tmp_path, teacher=teacher_run, teacher_sha256="abc")


def test_under_mixed_precision_the_teacher_and_the_loss_are_float32(teacher_run, tmp_path):
    config = make_config(tmp_path / "student", teacher=teacher_run, mixed_precision="mixed_bfloat16", **STUDENT)
    dataset = data.load(config)
    strategy = tf.distribute.get_strategy()
    model, *_ = train_lib.build(config, dataset, strategy, 8)
    teacher = teacher_lib.load(config, dataset, strategy)
    images, labels = next(iter(data.train_input_fn(dataset, config, 0)(tf.distribute.InputContext())))
    logits = tf.cast(model(images, training=True), tf.bfloat16)  # As a model without a float32 head gives them.
    assert tf.keras.mixed_precision.global_policy().name == "mixed_bfloat16"
    assert all(v.dtype == tf.float32 for v in teacher.variables) and teacher.logits(images).dtype == tf.float32
    mixed = teacher.mixed_loss(teacher.logits(images), logits, tf.cast(tf.ones_like(labels), tf.bfloat16))
    assert mixed.dtype == tf.float32
    expected = 0.5 + 0.5 * distill.loss(teacher.logits(images), tf.cast(logits, tf.float32), 1.0)
    np.testing.assert_allclose(mixed.numpy(), expected.numpy(), rtol=1e-6)


@pytest.mark.slow
def test_a_teacher_of_another_input_size_sees_the_students_view_resized(mock_tfds, tmp_path):
    run = tmp_path / "teacher32"
    trainer.train_and_evaluate(make_config(run, image_size="32", train_steps=4, eval_every=4))
    config = make_config(tmp_path / "student", teacher=str(run), **STUDENT)
    dataset = data.load(config)
    teacher = teacher_lib.load(config, dataset, tf.distribute.get_strategy())
    images, _ = next(iter(data.train_input_fn(dataset, config, 0)(tf.distribute.InputContext())))
    expected = runs.load_model(str(run)).model(tf.image.resize(images, (32, 32)), training=False)
    np.testing.assert_allclose(teacher.logits(images).numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert trainer.train_and_evaluate(config)["step"] == 8


@pytest.mark.slow
def test_an_export_teaches_as_its_run_does_on_two_replicas_too(teacher_run, tmp_path):
    """Its serving signature gets the student's view as uint8 pixels (mock images are uint8: exact here)."""
    exported = str(tmp_path / "export")
    export.export(teacher_run, exported, write_tflite=False)
    config = make_config(tmp_path / "student", teacher=exported, **STUDENT)
    dataset = data.load(config)
    teacher = teacher_lib.load(config, dataset, tf.distribute.get_strategy())
    images, _ = next(iter(data.train_input_fn(dataset, config, 0)(tf.distribute.InputContext())))
    expected = tf.nn.softmax(runs.load_model(teacher_run).model(images, training=False)).numpy()
    np.testing.assert_allclose(tf.nn.softmax(teacher.logits(images)).numpy(), expected, atol=1e-6)
    results = trainer.train_and_evaluate(make_config(tmp_path / "two", strategy="mirrored", teacher=exported,
                                                     **STUDENT))
    assert results["step"] == 8 and 0 <= results["eval"]["teacher_agreement"] <= 1
