"""Exact, fault-tolerant resume: kill anywhere, rerun, get the same model; and the guards around a run directory."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_config
from research import UserError, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 64 mock examples / batch 8 = 8 steps an epoch: 40 steps cross four epoch boundaries.
SMALL_RUN = ["--dataset=mnist", "--model=mlp", "--hidden_units=16", "--batch_size=8", "--train_steps=40",
             "--steps_per_loop=2", "--checkpoint_every=2", "--eval_every=20", "--optimizer=adam", "--deterministic"]


def _train_process(model_dir, *flags):
    return subprocess.Popen([sys.executable, "tests/mock_train.py", f"--model_dir={model_dir}", *SMALL_RUN, *flags],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(model_dir, step, proc, timeout=180):
    """Until the run's latest checkpoint is `step` or later (by the `checkpoint` index: a fast run may already
    have deleted ckpt-`step` itself, keeping only the last few)."""
    deadline = time.time() + timeout
    while _latest_step(model_dir) < step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"no checkpoint {step} in {timeout}s"
        time.sleep(0.01)


def _latest_step(model_dir):
    try:
        index = open(os.path.join(model_dir, "checkpoint")).read()
        return int(re.search(r'model_checkpoint_path: ".*ckpt-(\d+)"', index).group(1))
    except (OSError, AttributeError):
        return -1


def _weights(model_dir):
    """Every saved variable of the latest checkpoint (model, optimizer slots, step, seed states) by name."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(model_dir))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "save_counter" not in name and "OBJECT_GRAPH" not in name}


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def stop_resume_and_compare(tmp_path, stop, total, **flags):
    """In this process: a run straight to step `total`, and the same run stopped at `stop` and resumed to `total`;
    asserts both end with the same weights and optimizer state (bit for bit) and the same evaluation."""
    straight = trainer.train_and_evaluate(make_config(tmp_path / "straight", train_steps=total, **flags))
    trainer.train_and_evaluate(make_config(tmp_path / "resumed", train_steps=stop, **flags))
    resumed = trainer.train_and_evaluate(make_config(tmp_path / "resumed", train_steps=total, **flags))
    _assert_same_weights(tmp_path / "straight", tmp_path / "resumed")
    assert straight["eval"] == resumed["eval"]


def kill_resume_and_compare(tmp_path, *flags):
    """Trains a run straight through and the same run killed with SIGKILL after a random checkpoint and rerun;
    asserts both end with the same weights (bit for bit) and results. Returns the rerun's stdout."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    reference, victim = _train_process(straight, *flags), _train_process(killed, *flags)
    kill_after = random.Random().randrange(2, 38, 2)  # Any checkpointed step; the kill lands wherever it lands.
    _wait_for_checkpoint(killed, kill_after, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    out, err = _train_process(killed, *flags).communicate(timeout=300)
    assert "Resuming from" in out, err
    _assert_same_weights(straight, killed)
    results = [json.load(open(d / "results.json")) for d in (straight, killed)]
    assert results[0]["eval"] == results[1]["eval"], f"killed after checkpoint {kill_after}"
    return out


@pytest.mark.slow
def test_sigkill_anywhere_then_rerun_equals_uninterrupted(tmp_path):
    """With every source of randomness a step has: dropout and augmentation drawn per example, and per micro-batch
    of four accumulated ones (the plain case is the other SIGKILL tests': folder, streamed, fine-tuning)."""
    kill_resume_and_compare(tmp_path, "--dropout=0.3", "--augment=translate,rotate,cutout", "--grad_accum_steps=4")


@pytest.mark.slow
def test_interrupted_mirrored_run_equals_uninterrupted(mock_tfds, tmp_path):
    """Two replicas, dropout, augmentation and EMA: stop at step 10 (mid-epoch), resume to 24."""
    # (No --deterministic: it switches TF op determinism on for the whole test process, for good.)
    stop_resume_and_compare(tmp_path, 10, 24, strategy="mirrored", dropout=0.3, augment="translate,crop",
                            ema_decay=0.9, steps_per_loop=3)


@pytest.mark.slow
def test_sigterm_saves_and_exits_nonzero_then_resumes(tmp_path):
    proc = _train_process(tmp_path, "--train_steps=100000")
    _wait_for_checkpoint(tmp_path, 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    stopped_at = int(err.split("stopped by SIGTERM at step ")[1].split(",")[0])
    assert os.path.exists(tmp_path / f"ckpt-{stopped_at}.index")
    assert "rerun the same command to resume" in err
    out, err = _train_process(tmp_path, f"--train_steps={stopped_at + 4}").communicate(timeout=300)
    assert f"at step {stopped_at}" in out, err
    assert json.load(open(tmp_path / "results.json"))["step"] == stopped_at + 4


@pytest.mark.slow
def test_unreadable_latest_checkpoint_falls_back_to_the_previous(mock_tfds, tmp_path, capsys):
    trainer.train_and_evaluate(make_config(tmp_path, train_steps=12))
    data_file = tmp_path / "ckpt-12.data-00000-of-00001"
    data_file.write_bytes(data_file.read_bytes()[:100])  # Truncated, as by a full disk.
    (tmp_path / "checkpoint").write_text("garbage that is not a CheckpointState")
    results = trainer.train_and_evaluate(make_config(tmp_path, train_steps=16))
    assert "Resuming from" in capsys.readouterr().out
    assert results["step"] == 16
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")][-1] == 16


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(mock_tfds, tmp_path):
    trainer.train_and_evaluate(make_config(tmp_path, train_steps=8, optimizer="sgd"))
    with pytest.raises(UserError, match=r"non-finite loss or gradient at step (9|1\d); last good checkpoint: "
                                        r".*ckpt-8 \(left intact\)"):
        trainer.train_and_evaluate(make_config(tmp_path, train_steps=40, optimizer="sgd", learning_rate=1e30,
                                             steps_per_loop=1, checkpoint_every=100))
    weights = _weights(tmp_path)
    assert all(np.isfinite(w).all() for w in weights.values() if w.dtype.kind == "f")
    assert tf.train.latest_checkpoint(tmp_path).endswith("ckpt-8")


@pytest.mark.slow
def test_nonfinite_restore_mode_rolls_back_then_gives_up(mock_tfds, tmp_path, caplog):
    trainer.train_and_evaluate(make_config(tmp_path, train_steps=8, optimizer="sgd"))
    with pytest.raises(UserError, match="non-finite loss or gradient at step"):
        trainer.train_and_evaluate(make_config(tmp_path, train_steps=40, optimizer="sgd", learning_rate=1e30,
                                             steps_per_loop=1, checkpoint_every=100, on_nonfinite="restore",
                                             max_nonfinite_restores=2))
    assert sum("restoring" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.slow
def test_resume_with_a_conflicting_flag_is_refused_listing_the_flags(mock_tfds, tmp_path):
    trainer.train_and_evaluate(make_config(tmp_path, train_steps=8))
    with pytest.raises(UserError, match=r"--model: mlp -> cnn; --batch_size: 8 -> 16"):
        trainer.train_and_evaluate(make_config(tmp_path, train_steps=16, model="cnn", batch_size=16))
    # Length and cadence may change.
    assert trainer.train_and_evaluate(make_config(tmp_path, train_steps=16, eval_every=16))["step"] == 16


@pytest.mark.slow
def test_a_live_writer_locks_the_run_dir_and_a_dead_one_does_not(mock_tfds, tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    (tmp_path / "LOCK").write_text(f"{os.uname().nodename} {holder.pid}")
    with pytest.raises(UserError, match=f"is in use by process {holder.pid}"):
        trainer.train_and_evaluate(make_config(tmp_path))
    assert not list(tmp_path.glob("ckpt-*"))  # Nothing written by the refused run.
    holder.kill()
    holder.wait()
    assert trainer.train_and_evaluate(make_config(tmp_path))["step"] == 12
    assert not (tmp_path / "LOCK").exists()


@pytest.mark.slow
def test_best_checkpoint_tracks_the_highest_eval_accuracy(mock_tfds, tmp_path):
    trainer.train_and_evaluate(make_config(tmp_path, train_steps=24, eval_every=4))
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    best = json.load(open(tmp_path / "best" / "best.json"))
    assert best["accuracy"] == max(e["accuracy"] for e in evals)
    assert best["step"] == next(e["step"] for e in evals if e["accuracy"] == best["accuracy"])
    assert tf.train.latest_checkpoint(tmp_path / "best").endswith(f"ckpt-{best['step']}")


@pytest.mark.slow
def test_init_checkpoint_starts_a_new_run_from_another_runs_weights(mock_tfds, tmp_path):
    trainer.train_and_evaluate(make_config(tmp_path / "first", train_steps=8))
    trainer.train_and_evaluate(make_config(tmp_path / "second", train_steps=1, optimizer="sgd", learning_rate=1e-30,
                                         init_checkpoint=str(tmp_path / "first")))
    first, second = _weights(tmp_path / "first"), _weights(tmp_path / "second")
    kernels = [n for n in first if n.startswith("model_variables/")]
    assert len(kernels) == 4  # mlp(16): hidden kernel and bias, classifier kernel and bias.
    for name in kernels:
        np.testing.assert_allclose(first[name], second[name], atol=1e-6)
    assert second["step/.ATTRIBUTES/VARIABLE_VALUE"] == 1
