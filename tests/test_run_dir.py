"""The run directory on any TensorFlow filesystem: a whole run on ram:// (TensorFlow's in-memory filesystem, a
stand-in for gs://: it lives in this process, so every tool is called in-process), and the one-writer lock."""

import json
import os
import socket
import subprocess
import time

import pytest
import tensorflow as tf
from PIL import Image

from conftest import make_config
from research import UserError, compare, evaluate, export, fs, lock, predict, run_dir, trainer


@pytest.mark.slow
def test_a_whole_run_on_ram_filesystem(mock_tfds, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # A URL is never a local path: nothing may appear here.
    model_dir = "ram://runs/whole"
    trainer.train_and_evaluate(make_config(model_dir, train_steps=8, ema_decay=0.9, eval_figures=True))
    results = trainer.train_and_evaluate(make_config(model_dir, train_steps=12, ema_decay=0.9, eval_figures=True))
    assert "Resuming from ram://runs/whole/ckpt-8" in capsys.readouterr().out and results["step"] == 12
    assert run_dir.read_results(model_dir)["step"] == 12
    assert [r["step"] for r in run_dir.read_metrics(model_dir)] == [8, 12]
    for name in ("flags.txt", "provenance.jsonl", "dataset.json", "curves.png", "best/best.json", "train", "eval"):
        assert fs.exists(fs.join(model_dir, name)), name
    assert not fs.exists(fs.join(model_dir, "LOCK"))  # Released.

    assert evaluate.main([f"--model_dir={model_dir}"]) == 0
    assert fs.read_json(fs.join(model_dir, "report.json"))["accuracy"] == results["eval"]["accuracy"]
    assert fs.exists(fs.join(model_dir, "confusion_matrix.png"))
    image = str(tmp_path / "digit.png")
    Image.new("L", (28, 28), 200).save(image)
    assert predict.main([f"--model_dir={model_dir}", image]) == 0
    assert export.main([f"--model_dir={model_dir}", "--output=ram://exports/whole/1"]) == 0
    served = tf.saved_model.load("ram://exports/whole/1").signatures["serving_default"]
    assert served(images=tf.zeros([2, 28, 28, 1], tf.uint8))["probabilities"].shape == (2, 10)
    capsys.readouterr()
    compare.main(["ram://runs", "--per_run"])
    assert "whole" in capsys.readouterr().out and fs.exists("ram://runs/compare.png")
    assert os.listdir(tmp_path) == ["digit.png"]


def test_a_filesystem_tensorflow_cannot_open_is_one_line_before_any_work(mock_tfds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"--model_dir=nosuch://bucket/run: TensorFlow cannot open it \(File system "
                                        r"scheme 'nosuch' not implemented"):
        trainer.train_and_evaluate(make_config("nosuch://bucket/run"))
    assert os.listdir(tmp_path) == []


def test_files_are_written_whole_and_lines_appended(tmp_path):
    for directory in (str(tmp_path), "ram://files"):
        path = fs.join(directory, "x.json")
        fs.makedirs(directory)
        fs.write_json(path, {"a": 1})
        fs.write_json(path, {"a": 2})
        assert fs.read_json(path) == {"a": 2}
        assert fs.listdir(directory) == ["x.json"]  # No temporary file left.
        fs.append_line(fs.join(directory, "m.jsonl"), "1")
        fs.append_line(fs.join(directory, "m.jsonl"), "2")
        assert fs.read_text(fs.join(directory, "m.jsonl")) == "1\n2\n"


# ---------------------------------------------------------------------------------------------- The lock
def _lock_file(directory, host, pid, heartbeat):
    fs.write_json(fs.join(str(directory), "LOCK"), {"host": host, "pid": pid, "heartbeat": heartbeat})


@pytest.mark.slow
def test_a_live_writer_on_this_host_keeps_its_lock(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        _lock_file(tmp_path, socket.gethostname(), holder.pid, 0.0)  # Its heartbeat does not matter: it is alive.
        with pytest.raises(UserError, match=f"is in use by process {holder.pid} on {socket.gethostname()}"):
            lock.Lock(str(tmp_path)).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with lock.Lock(str(tmp_path)):  # Now a dead process's lock: taken over.
        assert json.load(open(tmp_path / "LOCK"))["pid"] == os.getpid()
    assert not os.path.exists(tmp_path / "LOCK")


def test_another_hosts_lock_is_taken_over_only_when_its_heartbeat_stopped(tmp_path, caplog):
    _lock_file(tmp_path, "node-17", 4242, time.time() - 10)
    with pytest.raises(UserError, match="is in use by process 4242 on node-17"):
        lock.Lock(str(tmp_path), stale_after_s=60).__enter__()
    _lock_file(tmp_path, "node-17", 4242, time.time() - 120)
    with lock.Lock(str(tmp_path), stale_after_s=60):
        assert json.load(open(tmp_path / "LOCK"))["host"] == socket.gethostname()
    assert [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()] == [
        f"taking over {tmp_path}/LOCK from process 4242 on node-17, whose heartbeat stopped 120 s ago"]


def test_a_live_run_refreshes_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(lock.Lock, "HEARTBEAT_S", 0.05)
    with lock.Lock(str(tmp_path)):
        first = json.load(open(tmp_path / "LOCK"))["heartbeat"]
        time.sleep(0.3)
        assert json.load(open(tmp_path / "LOCK"))["heartbeat"] > first
