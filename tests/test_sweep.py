"""launch.sweep and research.compare: a real sweep of subprocess runs on mock data, and their command-line errors.

Sweep runs are subprocesses, where the `mock_tfds` fixture cannot reach, so they train through tests/mock_train.py.
Each costs seconds of TensorFlow start-up, so one sweep (module fixture) serves every end-to-end test.
"""

import json
import os
import shlex
import shutil
import subprocess
import socket
import sys
import types

import pytest

from launch import sweep
from research import cli, compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_TRAIN = shlex.join([sys.executable, os.path.join(REPO, "tests", "mock_train.py")])
TINY = ["--model=mlp", "--hidden_units=8", "--train_steps=4", "--steps_per_loop=2",
        "--eval_every=2", "--checkpoint_every=4"]
GRID = ["--grid=learning_rate=1e-2,1e-3", "--grid=batch_size=8,16", "--seeds=2"]
SWEPT_GRID = ["--grid=learning_rate=1e-2,1e-3", "--seeds=2"]  # Run for real: 4 runs (GRID's 8 are dry-run).
LOCKED = "lr=0.001_s=1"  # Held by a live process during the first pass, so that this run fails.
RESUMED = "lr=0.01_s=0"  # Loses its results.json between the passes, so that the second pass resumes it.


def _python(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True)


def _record(root):
    return {run["name"]: run for run in json.load(open(os.path.join(root, "sweep.json")))["runs"]}


def _log(root, name):
    return open(os.path.join(root, name, "train.log")).read()


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A 2-value grid x 2 seeds sweep run twice: first with one run locked by another process, then again."""
    root = str(tmp_path_factory.mktemp("sweep") / "lr")
    command = [f"--root={root}", *SWEPT_GRID, "--parallel=2", f"--train_command={MOCK_TRAIN}", *TINY]
    os.makedirs(os.path.join(root, LOCKED))
    with open(os.path.join(root, LOCKED, "LOCK"), "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}")  # This test process: alive, so the lock holds.
    first = _python("launch.sweep", *command)
    first_record = _record(root)
    logs = {name: _log(root, name) for name in first_record}
    os.remove(os.path.join(root, LOCKED, "LOCK"))
    os.remove(os.path.join(root, RESUMED, "results.json"))
    second = _python("launch.sweep", *command)
    return types.SimpleNamespace(root=root, first=first, first_record=first_record, logs=logs, second=second,
                                 second_record=_record(root))


@pytest.mark.slow
def test_sweep_runs_every_combination_and_reports_the_failed_one(swept):
    assert swept.first.returncode == 1, swept.first.stderr
    assert sorted(swept.first_record) == sorted(f"lr={lr}_s={s}" for lr in ("0.01", "0.001") for s in (0, 1))
    statuses = {name: run["status"] for name, run in swept.first_record.items()}
    assert statuses == {name: "failed" if name == LOCKED else "finished" for name in statuses}
    failed = swept.first_record[LOCKED]
    assert failed["exit_code"] == 2 and failed["log"] == os.path.join(swept.root, LOCKED, "train.log")
    assert "is in use by process" in swept.logs[LOCKED]
    assert f"failed {LOCKED}" in swept.first.stdout and failed["log"] in swept.first.stdout
    for name, run in swept.first_record.items():
        assert run["flags"]["seed"] == name[-1]
        if name != LOCKED:
            flags = open(os.path.join(swept.root, name, "flags.txt")).read().splitlines()
            assert f"--seed={name[-1]}" in flags and "--hidden_units=8" in flags
            assert f"--learning_rate={float(run['flags']['learning_rate'])}" in flags
            assert json.load(open(os.path.join(swept.root, name, "results.json")))["step"] == 4


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_continues_the_others(swept):
    assert swept.second.returncode == 0, swept.second.stdout + swept.second.stderr
    statuses = {name: run["status"] for name, run in swept.second_record.items()}
    assert statuses == {name: "finished" if name in (LOCKED, RESUMED) else "skipped" for name in statuses}
    for name in statuses:
        if name not in (LOCKED, RESUMED):
            assert _log(swept.root, name) == swept.logs[name]  # Not started again.
    assert "Resuming from" in _log(swept.root, RESUMED).split("$ ")[-1]
    assert os.path.exists(os.path.join(swept.root, LOCKED, "results.json"))


@pytest.mark.slow
def test_rerun_with_other_shared_flags_refuses_the_finished_runs_and_trains_nothing(swept, tmp_path):
    root = str(tmp_path / "lr")
    shutil.copytree(swept.root, root)
    command = [f"--root={root}", *SWEPT_GRID, f"--train_command={MOCK_TRAIN}", *TINY]
    other = _python("launch.sweep", *[arg.replace("--model=mlp", "--model=cnn") for arg in command])
    assert other.returncode == 1
    record = _record(root)
    assert {run["status"] for run in record.values()} == {"refused"}
    assert all(run["reason"] == "--model: mlp -> cnn" for run in record.values())
    assert f"refused {RESUMED}: it finished with other settings (--model: mlp -> cnn)" in other.stdout
    assert all(_log(root, name) == _log(swept.root, name) for name in record)  # Nothing started.
    same = _python("launch.sweep", *command)  # The same flags: skipped, recording the command that produced each.
    assert same.returncode == 0 and {run["status"] for run in _record(root).values()} == {"skipped"}
    assert _record(root)[RESUMED]["command"] == swept.second_record[RESUMED]["command"]
    longer = _python("launch.sweep", "--dry_run", *[a.replace("--train_steps=4", "--train_steps=6") for a in command])
    assert longer.returncode == 0 and longer.stdout.count("--train_steps=6") == 4  # A longer run goes on.


@pytest.mark.slow
def test_compare_averages_seeds_and_matches_results(swept):
    result = _python("research.compare", swept.root, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [sorted(row["flags"]) for row in rows] == [["learning_rate"]] * 2
    accuracies = [row["eval_accuracy"] for row in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    for row in rows:
        assert row["status"] == "finished" and sorted(row["seeds"]) == ["0", "1"]
        results = [json.load(open(os.path.join(run["dir"], "results.json"))) for run in row["runs"]]
        assert [run["eval_accuracy"] for run in row["runs"]] == [r["eval"]["accuracy"] for r in results]
        assert row["eval_accuracy"] == pytest.approx(sum(r["eval"]["accuracy"] for r in results) / 2)
        assert row["eval_loss"] == pytest.approx(sum(r["eval"]["loss"] for r in results) / 2)
        a, b = (r["eval"]["accuracy"] for r in results)
        assert row["eval_accuracy_std"] == pytest.approx(abs(a - b) / 2 ** 0.5)
        assert row["params"] == results[0]["params"] and row["steps"] == 4
    assert os.path.getsize(os.path.join(swept.root, "compare.png")) > 0


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path, capsys):
    root = tmp_path / "sweep"
    assert cli.run(sweep.main, [f"--root={root}", *GRID, "--dry_run", "--train_steps=4"]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 8 and not root.exists()
    assert commands[0][1:] == ["-m", "research.train", "--train_steps=4", "--learning_rate=1e-2", "--batch_size=8",
                               "--seed=0", f"--model_dir={root / 'lr=0.01_bs=8_s=0'}"]
    assert commands[-1][-1] == f"--model_dir={root / 'lr=0.001_bs=16_s=1'}"


def test_grid_gives_seeds_and_semicolons_separate_list_values(tmp_path, capsys):
    argv = [f"--root={tmp_path}", "--grid=hidden_units=16;16,16", "--grid=seed=3,7", "--dry_run"]
    assert cli.run(sweep.main, argv) == 0
    names = [shlex.split(line)[-1].rpartition("/")[2] for line in capsys.readouterr().out.splitlines()]
    assert names == ["hu=16_s=3", "hu=16_s=7", "hu=16-16_s=3", "hu=16-16_s=7"]


@pytest.mark.parametrize("argv, message", [
    (["--grid=learning_rate"], "expected NAME=VALUE1,VALUE2"),
    (["--grid=learning_rate="], "empty value"),
    (["--grid=learning_rate=1e-3,,3e-3"], "empty value"),
    (["--grid==1,2"], "expected NAME=VALUE1,VALUE2"),
    (["--grid=learning_rat=1e-3,3e-3"], "--learning_rat is not a research.train flag"),
    (["--grid=batch_size=32,big"], "--batch_size=big"),
    (["--grid=learning_rate=1e-3,0.001"], "name the same value twice"),
    (["--grid=batch_size=8", "--grid=batch_size=16"], "given twice"),
    (["--grid=model_dir=a,b"], "--model_dir"),
    (["--grid=seed=1,2", "--seeds=2"], "not both"),
    (["--grid=batch_size=8,16", "--batch_size=32"], "both in --grid and given for every run"),
    (["--seed=3"], "the sweep sets --seed"),
    (["--bogus=1"], "unknown flag --bogus"),
    (["--seeds=0"], "--seeds must be at least 1"),
    (["--parallel=0"], "--parallel must be at least 1"),
    (["--root=ram://sweep"], "--root=ram://sweep is in memory (ram://) and would be lost"),
    (["--root=foo://bucket/sweep"], "--root=foo://bucket/sweep: TensorFlow cannot open it"),
])
def test_bad_command_lines_fail_with_one_line(tmp_path, capsys, argv, message):
    assert cli.run(sweep.main, [f"--root={tmp_path / 'sweep'}", "--dry_run", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_bad_grid_from_the_command_line(tmp_path):
    result = _python("launch.sweep", f"--root={tmp_path}", "--grid=learning_rate=")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: --grid=learning_rate=: empty value; expected NAME=VALUE1,VALUE2,...\n"


def _fake_run(path, flags, results=None, evals=()):
    """A run directory as research.train leaves it, finished (`results`: step and accuracy) or not."""
    os.makedirs(path)
    lines = [f"--{k}={v}" for k, v in {"model_dir": path, "seed": 0, **flags}.items()] + ["--nojit_compile"]
    with open(os.path.join(path, "flags.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": step, "accuracy": acc, "loss": 1 - acc}) + "\n" for step, acc in evals)
    if results:
        with open(os.path.join(path, "results.json"), "w") as f:
            json.dump({"step": results[0], "eval": {"accuracy": results[1], "loss": 1 - results[1]},
                       "train": {"accuracy": 0.5, "loss": 0.5}, "wall_time_s": 2.0, "params": 100}, f)


def test_a_run_named_twice_is_one_run(tmp_path, capsys):
    _fake_run(str(tmp_path / "r"), {}, (20, 0.8), [(20, 0.8)])
    assert cli.run(compare.main, [str(tmp_path / "r"), f"{tmp_path / 'r'}/", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["seeds"] == ["0"]


def test_compare_shows_unfinished_runs_and_sorts_by_loss(tmp_path, capsys):
    _fake_run(str(tmp_path / "a0"), {"optimizer": "adam", "seed": 0}, (20, 0.8), [(10, 0.6), (20, 0.8)])
    _fake_run(str(tmp_path / "a1"), {"optimizer": "adam", "seed": 1}, (20, 0.6), [(20, 0.6)])
    _fake_run(str(tmp_path / "s0"), {"optimizer": "sgd"}, None, [(10, 0.5), (20, 0.9)])
    _fake_run(str(tmp_path / "s1"), {"optimizer": "sgd", "seed": 1}, None, [(10, 0.95)])
    with open(tmp_path / "s1" / "metrics.jsonl", "a") as f:
        f.write('{"step": 30, "accur')  # Being written right now.
    assert cli.run(compare.main, [str(tmp_path), "--sort=eval_loss", "--no_plot"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["optimizer", "seeds", "status", "steps", "eval_accuracy", "eval_loss", "wall_time_s",
                                "params"]
    assert lines[1].split() == ["sgd", "0,1", "unfinished", "15", "0.9250", "±", "0.0354", "0.0750", "±", "0.0354",
                                "-", "-"]
    assert lines[2].split() == ["adam", "0,1", "finished", "20", "0.7000", "±", "0.1414", "0.3000", "±", "0.1414",
                                "2.0", "100"]
    assert cli.run(compare.main, [str(tmp_path / "s0"), str(tmp_path / "a0"), "--per_run", "--csv",
                                  f"--plot={tmp_path / 'curves.png'}"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("runs,optimizer,seeds,status,eval_accuracy,eval_accuracy_std,eval_loss")
    assert rows[1].startswith(f"{tmp_path / 's0'},sgd,0,unfinished,0.9,,")
    assert rows[2].startswith(f"{tmp_path / 'a0'},adam,0,finished,0.8,,")
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no such directory"),
    (lambda d: d.write_text("x"), "not a directory"),
    (lambda d: d.mkdir(), "is not a run directory (no flags.txt) and has no run directories beneath it"),
    (lambda d: (_fake_run(str(d), {}), (d / "results.json").write_text("{")), "results.json is not valid JSON"),
    (lambda d: (_fake_run(str(d), {}), (d / "results.json").write_text("{}")), "results.json is not a results record"),
    (lambda d: (_fake_run(str(d), {}), (d / "metrics.jsonl").write_text("x\n{}\n")), "line 1 is not JSON"),
    (lambda d: (_fake_run(str(d / "r"), {}), (d / "sweep.json").write_text("[]")), "is not a launch.sweep record"),
    (lambda d: (_fake_run(str(d), {}, (4, 0.5)), (d / "results.json").write_text(
        (d / "results.json").read_text().replace("0.5", '"0.5"', 1))), "results.json: eval_accuracy is '0.5', not a number"),
    (lambda d: (_fake_run(str(d), {}), (d / "metrics.jsonl").write_text('{"step": 2, "accuracy": "high"}\n')),
     "metrics.jsonl: eval_accuracy is 'high', not a number"),
])
def test_compare_errors_are_one_line(tmp_path, capsys, make, message):
    make(tmp_path / "run")
    assert cli.run(compare.main, [str(tmp_path / "run")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
