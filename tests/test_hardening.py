"""Bad input on any CPU: one `error:` line on stderr, a non-zero exit, nothing lost; and an exact first run.

Subprocesses where stderr is the point (TensorFlow's C++ runtime writes its own lines there on some CPUs: they must
never reach the user); in-process calls elsewhere, on mock data.
"""

import gc
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import make_config, train_mocked
from research import UserError, checkpoint as checkpoint_lib, cli, evaluate, export, predict, runs, trainer
from research.data import preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What TensorFlow 2.21 writes at start-up on an Intel Xeon with AVX-512 (and on this project's AMD machines too).
TENSORFLOW_START_UP = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1764578231.123456    4113 port.cc:153] oneDNN custom operations are on. You may see slightly "
    b"different numerical results due to floating-point round-off errors from different computation orders.\n"
    b"I0000 00:00:1764578233.654321    4113 cpu_feature_guard.cc:210] This TensorFlow binary is optimized to use "
    b"available CPU instructions in performance-critical operations.\n"
    b"To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 FMA, in other operations, rebuild "
    b"TensorFlow with the appropriate compiler flags.\n")


def _run(*args, env=None, **kwargs):
    """A program of ours as a user starts it, with oneDNN on so that TensorFlow prints its start-up lines here too."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1", **(env or {})}, **kwargs)


def _one_error_line(done, message):
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith("error: "), done.stderr
    assert message in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------- stderr
@pytest.mark.slow
def test_tensorflows_start_up_lines_are_held_back_and_everything_else_passes():
    script = ("import os, sys; from research import cli; cli.start(); "
              f"os.write(2, {TENSORFLOW_START_UP!r}); "
              "os.write(2, b'W0000 00:00:1.2 1 x.cc:1] a real warning\\n'); "
              "print('error: ours', file=sys.stderr)")
    done = _run("-c", script)
    assert done.stderr == "W0000 00:00:1.2 1 x.cc:1] a real warning\nerror: ours\n"


@pytest.mark.slow
def test_the_last_line_gets_through_even_when_the_program_dies_at_once():
    done = _run("-c", "import os; from research import cli; cli.start(); os.write(2, b'F fatal\\n'); os.abort()")
    assert done.stderr == "F fatal\n" and done.returncode == -signal.SIGABRT


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--nosuch"], "Unknown command line flag 'nosuch'"),
    (["--batch_size=abc"], "flag --batch_size=abc: invalid literal for int()"),
    (["--flagfile=no/such.cfg"], "Unable to open flagfile"),
    (["--flagfile={bad_flag}"], "Unknown command line flag 'lerning_rate'. Did you mean: learning_rate"),
    (["--flagfile={garbage}"], "unexpected argument 'garbage line'"),
    (["--train_steps=5", "--profile_steps=xyz"], "--profile_steps: xyz is not 'first', 'last' or a step number"),
    (["--train_steps=5", "--model_dir={a_file}"], "is a file, not a directory"),
    (["--train_steps=5", "--model_dir=/proc/no/such/run"], "cannot be created"),
    (["--train_steps=5", "--model_dir={too_long}"], "cannot be created: File name too long"),
])
def test_training_mistakes_are_one_error_line(tmp_path, args, message):
    (tmp_path / "bad_flag.cfg").write_text("--flagfile=configs/cnn.cfg\n--lerning_rate=0.1\n")
    (tmp_path / "garbage.cfg").write_text("--flagfile=configs/cnn.cfg\ngarbage line\n")
    (tmp_path / "a_file").write_text("")
    names = dict(bad_flag=tmp_path / "bad_flag.cfg", garbage=tmp_path / "garbage.cfg", a_file=tmp_path / "a_file",
                 too_long=tmp_path / ("x" * 300))
    done = _run("-m", "research.train", "--flagfile=configs/cnn.cfg", f"--model_dir={tmp_path}/run",
                f"--data_dir={tmp_path}/tfds", *[a.format(**names) for a in args])
    _one_error_line(done, message)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "bad_flag.cfg", "garbage.cfg"]  # No run directory made.


@pytest.mark.slow
def test_help_exits_0_on_stdout():
    done = _run("-m", "research.train", "--helpfull")
    assert done.returncode == 0 and "--learning_rate" in done.stdout and done.stderr == ""


@pytest.mark.slow
def test_ctrl_c_while_starting_is_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "research.train", "--flagfile=configs/cnn.cfg",
                             f"--model_dir={tmp_path}/run"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # Importing TensorFlow, which takes 3 s or more.
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "interrupted\n"
    assert not os.path.exists(tmp_path / "run")


def test_ctrl_c_in_a_tool_is_one_line(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt
    assert cli.run(interrupted) == 130
    assert capsys.readouterr().err == "interrupted\n"


# ---------------------------------------------------------------------------------------------- Run directories
def test_a_run_that_fails_before_training_leaves_no_directory(mock_tfds, tmp_path):
    with pytest.raises(UserError, match="does not fit"):
        trainer.train_and_evaluate(make_config(tmp_path / "run", model="convnet", conv_layers="32c30v"))
    assert not os.path.exists(tmp_path / "run")
    (tmp_path / "kept").mkdir()  # Not made by the run: it stays.
    with pytest.raises(UserError, match="does not fit"):
        trainer.train_and_evaluate(make_config(tmp_path / "kept", model="convnet", conv_layers="32c30v"))
    assert os.listdir(tmp_path / "kept") == []


def test_an_unwritable_run_directory_is_one_line(mock_tfds, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # Root ignores mode bits: pretend we are not root.
    with pytest.raises(UserError, match="is not writable"):
        trainer.train_and_evaluate(make_config(tmp_path))


# ---------------------------------------------------------------------------------------------- Checkpoints
@pytest.fixture
def finished(mock_tfds, tmp_path):
    """A finished mock run with a moving average of the weights, checkpoints at steps 4, 8, 12."""
    config = make_config(tmp_path / "run", ema_decay=0.9)
    trainer.train_and_evaluate(config)
    return config


@pytest.fixture(scope="module")
def finished_once(tmp_path_factory):
    """`finished` for tests that only read it, trained once."""
    config = make_config(tmp_path_factory.mktemp("hardening") / "run", ema_decay=0.9)
    train_mocked(config)
    return config


def _truncate_latest(model_dir):
    data_file = next(f for f in os.listdir(model_dir) if f.startswith("ckpt-12.data"))
    with open(os.path.join(model_dir, data_file), "r+b") as f:
        f.truncate(100)


@pytest.mark.slow
def test_tools_fall_back_from_a_truncated_latest_checkpoint(finished, tmp_path, caplog):
    Image.new("L", (28, 28)).save(tmp_path / "digit.png")
    _truncate_latest(finished.model_dir)
    assert predict.main([f"--model_dir={finished.model_dir}", str(tmp_path / "digit.png")]) == 0
    assert evaluate.evaluate(finished.model_dir)["checkpoint"].endswith("ckpt-8")
    assert export.export(finished.model_dir, str(tmp_path / "export")).checkpoint.endswith("ckpt-8")
    assert any("ckpt-12 is unreadable" in r.getMessage() for r in caplog.records)


def test_no_readable_checkpoint_is_one_line_with_no_warnings_before_it(finished, tmp_path, caplog):
    for name in os.listdir(finished.model_dir):
        if name.startswith("ckpt-") and ".data" in name:
            with open(os.path.join(finished.model_dir, name), "r+b") as f:
                f.truncate(100)
    for attempt in (lambda: evaluate.evaluate(finished.model_dir), lambda: trainer.train_and_evaluate(finished)):
        caplog.clear()
        with pytest.raises(UserError, match=r"^no checkpoint is readable: checkpoint .*ckpt-12 is unreadable.* \(as "
                                            r"are the 2 older ones\); nothing was changed$"):
            attempt()
        assert not [r for r in caplog.records if "unreadable" in r.getMessage()]


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    (("provenance.jsonl", "{}\nnot json\n"), "provenance.jsonl: line 2 is not JSON"),
    (("metrics.jsonl", '{"step": "two"}\n{"step": 8}\n'), "metrics.jsonl: line 1 is not a JSON object with a "
                                                         "whole-number step"),
    (("best/best.json", "[]"), "best.json is not a best-checkpoint record"),
], ids=["provenance", "metrics", "best"])
def test_a_resume_refused_for_a_damaged_run_file_changes_nothing(finished, damage, message):
    """Every run file the run reads back is read before it writes any: a refusal leaves flags.txt and the rest."""
    name, text = damage
    with open(os.path.join(finished.model_dir, name), "w") as f:
        f.write(text)
    before = {n: open(os.path.join(finished.model_dir, n), "rb").read() for n in os.listdir(finished.model_dir)
              if os.path.isfile(os.path.join(finished.model_dir, n))}
    longer = make_config(finished.model_dir, ema_decay=0.9, train_steps=16, learning_rate=0.01)
    with pytest.raises(UserError, match=message):
        trainer.train_and_evaluate(longer)
    after = {n: open(os.path.join(finished.model_dir, n), "rb").read() for n in os.listdir(finished.model_dir)
             if os.path.isfile(os.path.join(finished.model_dir, n))}
    assert after == before


@pytest.mark.slow
def test_init_checkpoint_on_a_resume_says_it_is_not_used(finished, capsys):
    trainer.train_and_evaluate(make_config(finished.model_dir, ema_decay=0.9, train_steps=16,
                                           init_checkpoint=finished.model_dir))
    assert f"--init_checkpoint={finished.model_dir} is not used (a resume starts from its own weights)" in \
        capsys.readouterr().out


def test_evaluate_refuses_an_empty_split(finished):
    with pytest.raises(UserError, match="--split is empty"):
        evaluate.evaluate(finished.model_dir, split="")


def test_evaluate_names_its_own_split_flag(mnist_data_dir, tmp_path, capsys):
    config = make_config(tmp_path / "run", data_dir=mnist_data_dir, train_steps=2)
    trainer.train_and_evaluate(config)
    capsys.readouterr()
    assert evaluate.main([f"--model_dir={config.model_dir}", "--split=nosuch"]) == 2
    assert "--split=nosuch is not a split of mnist" in capsys.readouterr().err


@pytest.mark.parametrize("init, message", [
    ("{tmp}/nonexistent", "is neither a run directory nor a checkpoint prefix"),
    ("{tmp}/empty", "that directory holds no checkpoint"),
    ("{run}", "does not fit --model=cnn: it holds 4 model weights, the model has 8"),
])
def test_init_checkpoint_mistakes_say_what_is_wrong(finished_once, mock_tfds, tmp_path, caplog, init, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=message):
        trainer.train_and_evaluate(make_config(tmp_path / "new", model="cnn",
                                             init_checkpoint=init.format(tmp=tmp_path, run=finished_once.model_dir)))
    gc.collect()  # TensorFlow warns of unrestored values when a failed restore's status is collected: none here.
    assert not [r for r in caplog.records if "unrestored" in r.getMessage() or "could not be found" in r.getMessage()]
    assert not os.path.exists(tmp_path / "new")


@pytest.mark.slow
def test_init_checkpoint_takes_the_raw_weights_or_their_average(finished, tmp_path):
    reader = tf.train.load_checkpoint(os.path.join(finished.model_dir, "ckpt-12"))
    for average, name in ((False, "model_variables/0"), (True, "ema/0")):
        config = make_config(tmp_path / f"init{average}", train_steps=1, init_checkpoint=finished.model_dir,
                             init_from_average=average, learning_rate=1e-9)
        trainer.train_and_evaluate(config)
        started = tf.train.load_checkpoint(os.path.join(config.model_dir, "ckpt-1"))
        np.testing.assert_allclose(started.get_tensor("model_variables/0/.ATTRIBUTES/VARIABLE_VALUE"),
                                   reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"), atol=1e-6)
    with pytest.raises(UserError, match="holds no moving average"):
        trainer.train_and_evaluate(make_config(tmp_path / "noavg", init_checkpoint=str(tmp_path / "initFalse"),
                                             init_from_average=True))


@pytest.mark.slow
def test_resuming_another_model_without_flags_txt_names_the_misfit(finished):
    os.remove(os.path.join(finished.model_dir, "flags.txt"))
    with pytest.raises(UserError, match=r"ckpt-12 does not fit --model=mlp: .* first misfit"):
        trainer.train_and_evaluate(make_config(finished.model_dir, hidden_units="32", train_steps=20))
    assert checkpoint_lib.candidates(finished.model_dir)[0].endswith("ckpt-12")  # Untouched.


@pytest.mark.slow
def test_after_a_nonfinite_restore_the_learning_rate_is_the_steps(mock_tfds, tmp_path, monkeypatch):
    """--on_nonfinite=restore rolls the optimizer back to the checkpoint, step count included: the schedule (a
    function of the optimizer's iterations) must still give each later step its own rate."""
    trainer.train_and_evaluate(make_config(tmp_path, train_steps=8, optimizer="sgd"))
    rates = {}
    real_train = trainer.reporting.Reporter.train
    monkeypatch.setattr(trainer.reporting.Reporter, "train",
                        lambda self, step, metrics: (rates.setdefault(step, metrics["learning_rate"]),
                                                     real_train(self, step, metrics)))
    with pytest.raises(UserError, match="non-finite"):
        trainer.train_and_evaluate(make_config(tmp_path, train_steps=40, optimizer="sgd", learning_rate=1e30,
                                             steps_per_loop=1, checkpoint_every=100, on_nonfinite="restore",
                                             lr_schedule="exponential", decay_steps=1, decay_rate=0.5))
    assert rates and all(rate == pytest.approx(1e30 * 0.5 ** step, rel=1e-5) for step, rate in rates.items())


# ---------------------------------------------------------------------------------------------- Images
@pytest.mark.slow
def test_an_image_too_large_to_read_is_its_own_line_and_the_others_are_predicted(finished, tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess, "MAX_IMAGE_PIXELS", 1600)  # As training and evaluation refuse it.
    for name, size in (("bomb.png", 50), ("big.png", 40), ("ok.png", 28)):
        Image.new("L", (size, size)).save(tmp_path / name)
    results, errors = predict.predict(runs.load_model(finished.model_dir),
                                      [str(tmp_path / n) for n in ("bomb.png", "big.png", "ok.png")])
    assert [path for path, _ in results] == [str(tmp_path / "big.png"), str(tmp_path / "ok.png")]
    assert errors == [f"{tmp_path / 'bomb.png'}: image of 50 x 50 pixels (height x width), over the budget of 1600 "
                      "pixels: downscale it"]
