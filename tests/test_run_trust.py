"""A run directory is one experiment, and its records say what really ran: reruns of dead runs, resumes with
changed flags, fine-tuning, and tools meeting another run's files."""

import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_config
from research import UserError, checkpoint, evaluate, lock, runs, trainer


def _lines(path):
    return [json.loads(line) for line in open(path).read().splitlines() if line.strip()]


def _died_before_its_first_checkpoint(model_dir):
    """What a run killed after an evaluation but before its first checkpoint leaves: flags.txt, dataset.json,
    metrics.jsonl, best/, TensorBoard events; no ckpt-*."""
    for name in os.listdir(model_dir):
        if name.startswith("ckpt-") or name in ("checkpoint", "results.json"):
            os.remove(os.path.join(model_dir, name))


@pytest.fixture
def dead_run(mock_tfds, tmp_path):
    model_dir = tmp_path / "run"
    trainer.train_and_evaluate(make_config(model_dir, checkpoint_every=100, learning_rate=0.01))
    _died_before_its_first_checkpoint(model_dir)
    assert (model_dir / "best" / "best.json").exists() and (model_dir / "metrics.jsonl").exists()
    return model_dir


@pytest.mark.slow
@pytest.mark.parametrize("flag", [dict(optimizer="sgd"), dict(seed=1), dict(label_smoothing=0.1)])
def test_a_dead_run_rerun_with_other_settings_is_refused_and_keeps_its_files(dead_run, flag):
    before = {name: open(dead_run / name, "rb").read() for name in ("flags.txt", "metrics.jsonl")}
    with pytest.raises(UserError, match=f"holds a run with other settings \\(--{next(iter(flag))}:"):
        trainer.train_and_evaluate(make_config(dead_run, checkpoint_every=100, learning_rate=0.01, **flag))
    assert before == {name: open(dead_run / name, "rb").read() for name in before}


@pytest.mark.slow
def test_a_dead_run_rerun_starts_again_with_none_of_the_earlier_attempts_records(dead_run, capsys):
    first_best = json.load(open(dead_run / "best" / "best.json"))
    results = trainer.train_and_evaluate(make_config(dead_run, checkpoint_every=100, learning_rate=0.001,
                                                     train_steps=8))
    assert "Removed the records of steps after 0" in capsys.readouterr().out
    metrics = _lines(dead_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [8]  # Not the first attempt's step 12.
    assert metrics[0]["accuracy"] == results["eval"]["accuracy"]
    best = json.load(open(dead_run / "best" / "best.json"))
    assert best["step"] == 8 and best != first_best
    history = _lines(dead_run / "flags_history.jsonl")
    assert history[-1]["step"] == 0 and history[-1]["changes"]["learning_rate"] == ["0.01", "0.001"]


@pytest.mark.slow
def test_a_resume_drops_the_evaluations_of_steps_it_never_checkpointed(mock_tfds, tmp_path):
    model_dir = tmp_path / "run"
    trainer.train_and_evaluate(make_config(model_dir))  # Evaluates at 8 and 12, checkpoints every 4.
    for name in os.listdir(model_dir):  # Killed after its step-12 evaluation, before the step-12 checkpoint.
        if name.startswith("ckpt-12") or name == "results.json":
            os.remove(model_dir / name)
    with open(model_dir / "checkpoint", "w") as f:
        f.write('model_checkpoint_path: "ckpt-8"\nall_model_checkpoint_paths: "ckpt-8"\n')
    trainer.train_and_evaluate(make_config(model_dir, train_steps=16, eval_every=16))
    assert [m["step"] for m in _lines(model_dir / "metrics.jsonl")] == [8, 16]  # Not the dead attempt's 12.


def test_the_resume_guard_judges_flags_by_their_effect(mock_tfds, tmp_path):
    model_dir = tmp_path / "run"
    trainer.train_and_evaluate(make_config(model_dir, train_steps=None, train_epochs=1))
    # --momentum has no effect with adam, --widths none on an mlp, --image_size=28 is MNIST's own 28: allowed.
    trainer.train_and_evaluate(make_config(model_dir, train_steps=16, train_epochs=1, momentum=0.9, widths="8,16",
                                           image_size=28))
    changes = _lines(model_dir / "flags_history.jsonl")[-1]["changes"]
    assert changes["train_steps"] == [None, "16"]  # Unset at the start, set at the resume: recorded.
    assert changes["momentum"] == ["0.0", "0.9"] and changes["widths"] == ["32,64,128", "8,16"]
    with pytest.raises(UserError, match="--momentum: 0.9 -> 0.5"):  # With sgd it has an effect.
        trainer.train_and_evaluate(make_config(model_dir, train_steps=24, optimizer="sgd", momentum=0.5))


@pytest.mark.slow
def test_an_unused_init_checkpoint_is_not_written_into_flags_txt(mock_tfds, tmp_path, capsys):
    source, model_dir = tmp_path / "source", tmp_path / "run"
    trainer.train_and_evaluate(make_config(source, train_steps=4))
    trainer.train_and_evaluate(make_config(model_dir, train_steps=8))
    trainer.train_and_evaluate(make_config(model_dir, train_steps=12, init_checkpoint=str(source)))
    assert "is not used" in capsys.readouterr().out
    assert "--init_checkpoint=" not in open(model_dir / "flags.txt").read()
    assert "init_checkpoint" not in "".join(map(str, _lines(model_dir / "flags_history.jsonl")))


def _checkpoint_values(prefix, collection):
    reader = tf.train.load_checkpoint(prefix)
    names = sorted((n for n in reader.get_variable_to_shape_map() if n.startswith(f"{collection}/")
                    and n.endswith("VARIABLE_VALUE")), key=lambda n: int(n.split("/")[1]))
    return [reader.get_tensor(n) for n in names]


@pytest.mark.slow
def test_a_fine_tunes_weight_average_starts_from_the_loaded_weights(mock_tfds, tmp_path):
    source, model_dir = tmp_path / "source", tmp_path / "run"
    trainer.train_and_evaluate(make_config(source, train_steps=8))
    trainer.train_and_evaluate(make_config(model_dir, train_steps=1, checkpoint_every=1, eval_every=1,
                                           ema_decay=0.99, learning_rate=1e-7, init_checkpoint=str(source),
                                           optimizer="sgd"))
    loaded = _checkpoint_values(tf.train.latest_checkpoint(str(source)), "model_variables")
    average = _checkpoint_values(str(model_dir / "ckpt-1"), "ema")
    assert len(average) == len(loaded)
    for a, w in zip(average, loaded):
        np.testing.assert_allclose(a, w, atol=1e-5)  # Not 2/11 of a random initialisation.


@pytest.mark.slow
@pytest.mark.parametrize("added", [dict(dropout=0.2), dict(model="resnet_small", widths="4,8",
                                                            stochastic_depth=0.1)])
def test_fine_tuning_may_add_dropout_or_stochastic_depth(mock_tfds, tmp_path, capsys, added):
    source, model_dir = tmp_path / "source", tmp_path / "run"
    family = {k: v for k, v in added.items() if k in ("model", "widths")}
    trainer.train_and_evaluate(make_config(source, train_steps=4, **family))
    trainer.train_and_evaluate(make_config(model_dir, train_steps=4, init_checkpoint=str(source), **added))
    assert "Initialised weights from" in capsys.readouterr().out  # Not "does not fit ... seed_generator_state".
    assert json.load(open(model_dir / "results.json"))["step"] == 4


@pytest.fixture
def two_runs(mock_tfds, tmp_path):
    """Two finished runs: "digits" on MNIST and "letters" on the same images whose classes were renamed."""
    digits, letters = tmp_path / "digits", tmp_path / "letters"
    trainer.train_and_evaluate(make_config(digits, train_steps=4))
    shutil.copytree(digits, letters)
    info = json.load(open(letters / "dataset.json"))
    info["class_names"] = [f"letter_{c}" for c in "abcdefghij"]
    json.dump(info, open(letters / "dataset.json", "w"))
    return digits, letters


def test_a_tool_refuses_a_checkpoint_of_a_run_trained_on_other_classes(two_runs):
    digits, letters = two_runs
    report = json.load(open(digits / "report.json")) if (digits / "report.json").exists() else None
    with pytest.raises(UserError, match="trained on other classes"):
        evaluate.evaluate(str(digits), checkpoint=str(letters / "ckpt-4"))
    with pytest.raises(UserError, match="trained on other classes"):
        runs.load_model(str(digits), str(letters))
    assert (json.load(open(digits / "report.json")) if (digits / "report.json").exists() else None) == report


@pytest.mark.slow
def test_fine_tuning_onto_renamed_classes_says_the_head_is_kept(two_runs, tmp_path, capsys):
    _, letters = two_runs
    trainer.train_and_evaluate(make_config(tmp_path / "tuned", train_steps=4, init_checkpoint=str(letters)))
    out = capsys.readouterr().out
    assert "kept its head although its 10 classes are named otherwise (letter_a -> 0" in out
    assert "--init_skip=head makes it fresh" in out


def test_the_owner_of_a_checkpoint_is_its_run(two_runs):
    digits, _ = two_runs
    assert checkpoint.owner_run(str(digits / "ckpt-4")) == str(digits)
    assert checkpoint.owner_run(str(digits / "best" / "ckpt-4")) == str(digits)
    assert checkpoint.owner_run("/nonexistent/ckpt-4") is None


def test_predict_gives_the_served_models_probabilities_for_a_jpeg(two_runs, tmp_path):
    digits, _ = two_runs
    from PIL import Image
    from research import predict
    from research.data import preprocess
    pixels = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "digit.jpg", quality=75)
    restored = runs.load_model(str(digits))
    (path, classes), = predict.predict(restored, [str(tmp_path / "digit.jpg")], k=10)[0]
    prep = restored.dataset.preprocessing
    decoded = preprocess.decode(tf.io.read_file(str(tmp_path / "digit.jpg")), 1)  # As the export's serving_encoded.
    served = tf.nn.softmax(restored.model(prep.eval_images(decoded[None]), training=False)).numpy()[0]
    for name, probability in classes:
        assert probability == pytest.approx(served[restored.dataset.class_names.index(name)], abs=1e-6)


def test_path_flags_on_an_unknown_filesystem_are_one_line(two_runs, tmp_path):
    digits, _ = two_runs
    with pytest.raises(UserError, match="^--init_checkpoint=foo://bucket/run: TensorFlow cannot open it"):
        trainer.train_and_evaluate(make_config(tmp_path / "new", init_checkpoint="foo://bucket/run"))
    assert not (tmp_path / "new").exists()
    with pytest.raises(UserError, match="^--checkpoint=foo://bucket/ckpt-4: TensorFlow cannot open it"):
        runs.load_model(str(digits), "foo://bucket/ckpt-4")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MB tmpfs at tmp_path/disk, unmounted after the test (needs root, as CI and the developers' machines
    have; skips elsewhere)."""
    import subprocess
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(disk, leave):
    """Fills the filesystem of `disk` but for about `leave` bytes; returns the filler file."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    return filler


@pytest.mark.slow
def test_a_full_disk_is_one_line_loses_nothing_and_the_rerun_resumes_exactly(mock_tfds, tmp_path, tiny_disk):
    run = dict(train_steps=8, checkpoint_every=4, eval_every=8, deterministic=True)
    trainer.train_and_evaluate(make_config(tmp_path / "straight", **run))
    model_dir = tiny_disk / "run"
    trainer.train_and_evaluate(make_config(model_dir, **{**run, "train_steps": 4}))
    filler = _fill(tiny_disk, leave=64 * 1024)  # Room for the small run files, not for a checkpoint.
    with pytest.raises(UserError, match="cannot (save checkpoint|write) .*: .*No space left on device") as failure:
        trainer.train_and_evaluate(make_config(model_dir, **run))
    assert "\n" not in str(failure.value)
    assert not [name for name in os.listdir(model_dir) if name.startswith("ckpt-8") or ".tmp" in name]
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-4")
    os.remove(filler)
    trainer.train_and_evaluate(make_config(model_dir, **run))
    for a, b in zip(_checkpoint_values(str(model_dir / "ckpt-8"), "model_variables"),
                    _checkpoint_values(str(tmp_path / "straight" / "ckpt-8"), "model_variables")):
        np.testing.assert_array_equal(a, b)
    assert [m["step"] for m in _lines(model_dir / "metrics.jsonl")] == [4, 8]


@pytest.mark.slow
def test_export_never_removes_what_it_did_not_create(two_runs, tmp_path, monkeypatch):
    from research import export
    digits, _ = two_runs
    monkeypatch.chdir(tmp_path)
    for empty in ("", " "):
        with pytest.raises(UserError, match="--output is empty"):
            export.export(str(digits), empty, write_tflite=False)
    assert (tmp_path / "digits").is_dir()
    (tmp_path / "target").mkdir()
    os.symlink(tmp_path / "target", tmp_path / "link")
    export.export(str(digits), str(tmp_path / "link"), write_tflite=False)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "saved_model.pb").exists()


@pytest.mark.slow
def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(two_runs, tiny_disk):
    from research import export
    digits, _ = two_runs
    _fill(tiny_disk, leave=16 * 1024)
    with pytest.raises(UserError, match=f"cannot write the export to {tiny_disk / 'model'}: .*No space left"):
        export.export(str(digits), str(tiny_disk / "model"), write_tflite=False)
    assert os.listdir(tiny_disk) == ["filler"]


@pytest.mark.slow
def test_evaluating_a_read_only_run_prints_its_numbers_then_one_error_line(mock_tfds, tiny_disk, capsys):
    import subprocess
    model_dir = tiny_disk / "run"
    trainer.train_and_evaluate(make_config(model_dir, train_steps=4))
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    capsys.readouterr()
    assert evaluate.main([f"--model_dir={model_dir}"]) == 2
    out, err = capsys.readouterr()
    assert "(step 4) on split test: accuracy " in out and "confusion matrix" in out
    assert err.count("\n") == 1 and err.startswith("error: cannot write ") and "Read-only file system" in err
    assert err.endswith("(the report above is not saved)\n")


@pytest.mark.parametrize("value", ["1e300", "inf", "nan"])
def test_a_float_flag_beyond_float32_is_one_line_before_any_work(value):
    from research import config as config_lib
    with pytest.raises(UserError, match="--learning_rate=.* is not a finite float32 number"):
        config_lib.make_config(model_dir="unused", train_steps=1, learning_rate=value)


@pytest.mark.slow
def test_a_moved_folder_dataset_is_resumed_and_evaluated_where_it_is_now(tmp_path, capsys):
    from test_finetune import write_colour_folder
    old, new, model_dir = tmp_path / "photos", tmp_path / "moved" / "photos", tmp_path / "run"
    folder = dict(model="mlp", hidden_units="16", image_size=8, eval_split="test")
    trainer.train_and_evaluate(make_config(model_dir, dataset=write_colour_folder(old), train_steps=4, **folder))
    before = evaluate.evaluate(str(model_dir))
    os.makedirs(new.parent)
    os.rename(old, new)
    with pytest.raises(UserError, match="no longer exists.*--dataset=folder:NEW_PLACE"):
        evaluate.evaluate(str(model_dir))
    moved = evaluate.evaluate(str(model_dir), dataset=f"folder:{new}")
    assert moved["accuracy"] == before["accuracy"] and moved["loss"] == before["loss"]
    with pytest.raises(UserError, match="only says where a folder dataset moved"):
        evaluate.evaluate(str(model_dir), dataset="mnist")
    capsys.readouterr()
    trainer.train_and_evaluate(make_config(model_dir, dataset=f"folder:{new}", train_steps=8, **folder))
    assert "which moved here" in capsys.readouterr().out
    change = _lines(model_dir / "flags_history.jsonl")[-1]["changes"]["dataset"]
    assert change == [f"folder:{old}", f"folder:{new}"]
    assert json.load(open(model_dir / "data_files.json"))["root"] == str(new)


@pytest.mark.parametrize("content", [b"", b"\xff\xfe", b"[]", b"null", b'{"host": "me", "pid": 99999999999999999999, '
                                     b'"heartbeat": 1}', b'{"host": "me", "pid": -5, "heartbeat": 1}', b"host 12abc"])
def test_any_lock_content_is_one_line(tmp_path, content):
    (tmp_path / "LOCK").write_bytes(content)
    with pytest.raises(UserError, match="LOCK is not a lock record of this code .*: if no run is using"):
        with lock.Lock(str(tmp_path)):
            pass
    assert (tmp_path / "LOCK").read_bytes() == content


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from mock_train import mocked
    model_dir = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as patch, mocked():
        from research.data import tfds_source
        patch.setattr(tfds_source, "ensure_downloadable", lambda builder, manual_dir: None)
        trainer.train_and_evaluate(make_config(model_dir, train_steps=8))
    return model_dir


@pytest.mark.slow
@pytest.mark.parametrize("name, content, message", [
    ("results.json", b"[]", "results.json is not a results record"),
    ("results.json", b'{"step": "a"}', "results.json is not a results record"),
    ("dataset.json", b"[]", "dataset.json is unreadable: it lists no class_names"),
    ("dataset.json", b'"x"', "dataset.json is unreadable: it lists no class_names"),
    ("checkpoint", b"\xff\xfe", None),  # The index is derived data: rewritten from the checkpoint files.
    ("checkpoint", b"", None),
])
def test_a_damaged_run_file_is_one_line_or_repaired(mock_tfds, finished_run, tmp_path, name, content, message):
    model_dir = tmp_path / "run"
    shutil.copytree(finished_run, model_dir)
    (model_dir / name).write_bytes(content)
    config = make_config(model_dir, train_steps=12)
    if message:
        with pytest.raises(UserError, match=message):
            trainer.train_and_evaluate(config)
    else:
        assert trainer.train_and_evaluate(config)["step"] == 12
        assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-12")
