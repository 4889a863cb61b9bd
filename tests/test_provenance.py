"""The provenance of a run: a record per start and resume (versions, code, machine, command, time), the warning of
a resume under other versions, git states (clean, dirty, none), and research.compare's columns of differences."""

import datetime
import json
import logging
import os
import subprocess
import sys

import keras
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import make_config
from research import cli, compare, provenance, run_dir, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(model_dir):
    return [json.loads(line) for line in open(os.path.join(model_dir, "provenance.jsonl"))]


def _git(directory, *args):
    return subprocess.run(["git", "-C", str(directory), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_every_start_and_resume_is_recorded_and_a_resume_under_other_versions_warns(mock_tfds, tmp_path, caplog):
    model_dir = str(tmp_path / "run")
    trainer.train_and_evaluate(make_config(model_dir, train_steps=4))
    [first] = _records(model_dir)
    assert {k: first[k] for k in ("step", "command", "python", "tensorflow", "keras", "tfds", "host")} == {
        "step": 0, "command": sys.argv, "python": ".".join(map(str, sys.version_info[:3])),
        "tensorflow": tf.__version__, "keras": keras.__version__, "tfds": tfds.__version__,
        "host": os.uname().nodename}
    assert len(first["gpus"]) == len(tf.config.list_physical_devices("GPU"))
    assert first["git"]["commit"] == _git(ROOT, "rev-parse", "HEAD").strip()
    assert first["git"]["dirty"] == bool(_git(ROOT, "status", "--porcelain").strip())
    assert first["cpu"] and first["cpu"] != "unknown"
    started = datetime.datetime.fromisoformat(first["time"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()) < 3600

    with caplog.at_level(logging.WARNING):
        provenance.record(model_dir, 4)  # A start under the same versions: no warning.
    assert [r["step"] for r in _records(model_dir)] == [0, 4] and "other versions" not in caplog.text

    records = _records(model_dir)
    records[-1].update(tensorflow="2.0.0", git={"commit": "0" * 40, "dirty": False, "diff_sha256": None})
    (tmp_path / "run" / "provenance.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with caplog.at_level(logging.WARNING):
        trainer.train_and_evaluate(make_config(model_dir, train_steps=8))
    warnings = [r.getMessage() for r in caplog.records if "other versions" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert f"tensorflow 2.0.0 -> {tf.__version__}" in warnings[0]
    assert f"code 000000000000 -> {provenance.code_version(first)}" in warnings[0]
    assert [r["step"] for r in _records(model_dir)] == [0, 4, 4]  # The resume starts at the checkpoint of step 4.


def test_outside_a_git_checkout_or_without_git_the_commit_is_unknown(tmp_path, monkeypatch):
    unknown = {"commit": "unknown", "dirty": None, "diff_sha256": None}
    assert provenance.git_state(str(tmp_path)) == unknown  # /tmp is in no checkout.
    monkeypatch.setattr(provenance, "CODE_DIR", str(tmp_path))
    assert provenance.collect()["git"] == unknown
    monkeypatch.setattr(provenance, "CODE_DIR", ROOT)
    monkeypatch.setenv("PATH", str(tmp_path))  # No git to run.
    record = provenance.record(str(tmp_path), 0)
    assert record["git"] == unknown and run_dir.read_provenance(str(tmp_path)) == [record]
    assert provenance.code_version(record) == "unknown"


@pytest.mark.slow
def test_a_dirty_tree_is_named_by_a_hash_of_its_changes(tmp_path):
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "commit", "-q", "-m", "one")
    clean = provenance.git_state(str(tmp_path))
    assert clean["commit"] == _git(tmp_path, "rev-parse", "HEAD").strip() and clean["dirty"] is False
    assert clean["diff_sha256"] is None
    hashes = []
    for text in ("x = 2\n", "x = 3\n", "x = 2\n"):
        (tmp_path / "code.py").write_text(text)
        state = provenance.git_state(str(tmp_path))
        assert state["dirty"] is True and state["commit"] == clean["commit"]
        hashes.append(state["diff_sha256"])
    assert hashes[0] == hashes[2] != hashes[1]
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "new.py").write_text("y = 1\n")  # An untracked file is a change too.
    untracked = provenance.git_state(str(tmp_path))
    assert untracked["dirty"] is True and untracked["diff_sha256"] not in hashes
    assert provenance.code_version({"git": untracked}) == f"{clean['commit'][:12]}+dirty:{untracked['diff_sha256'][:8]}"


def _finished_run(path, seed, records):
    """A finished run directory as research.train leaves it, with these provenance records (None: a run older
    than provenance.jsonl)."""
    os.makedirs(path)
    (path / "flags.txt").write_text(f"--model_dir={path}\n--seed={seed}\n--optimizer=adam\n")
    (path / "results.json").write_text(json.dumps({"step": 10, "eval": {"accuracy": 0.5 + seed / 10, "loss": 1.0},
                                                   "train": {}, "wall_time_s": 1.0, "params": 7}))
    if records is not None:
        (path / "provenance.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_compare_shows_where_the_runs_provenance_differs(tmp_path, capsys):
    base = {"python": "3.11.2", "tensorflow": "2.21.0", "keras": "3.15.1", "tfds": "4.9.10", "host": "h1",
            "cpu": "CPU A", "gpus": [], "git": {"commit": "a" * 40, "dirty": False, "diff_sha256": None}}
    _finished_run(tmp_path / "s0", 0, [base])
    _finished_run(tmp_path / "s1", 1, [{**base, "host": "h2"}])  # Another node: still averaged with s0.
    _finished_run(tmp_path / "s2", 2, [{**base, "tensorflow": "2.20.0"}, base])  # Resumed after an upgrade.
    assert cli.run(compare.main, [str(tmp_path), "--no_plot"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["seeds", "status", "steps", "eval_accuracy", "eval_loss", "wall_time_s", "params",
                                "tensorflow", "host"]
    assert lines[1].split() == ["2", "finished", "10", "0.7000", "1.0000", "1.0", "7", "2.20.0", "->", "2.21.0", "h1"]
    assert lines[2].split() == ["0,1", "finished", "10", "0.5500", "±", "0.0707", "1.0000", "±", "0.0000", "1.0", "7",
                                "2.21.0", "h1", "|", "h2"]

    _finished_run(tmp_path / "old", 3, None)  # Older than provenance.jsonl.
    assert cli.run(compare.main, [str(tmp_path / "s0"), str(tmp_path / "old"), "--per_run", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["provenance"] for row in rows] == [{name: "-" for name in provenance.SUMMARY_FIELDS}, {
        "python": "3.11.2", "tensorflow": "2.21.0", "keras": "3.15.1", "tfds": "4.9.10", "code": "a" * 12,
        "host": "h1", "cpu": "CPU A", "gpus": "none"}]
