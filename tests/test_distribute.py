"""tf.distribute: mirrored equals one device, multi-worker runs end to end, cluster resolution, the launchers.

Multi-worker runs are real worker processes on 127.0.0.1 running tests/mock_train.py (mocked MNIST; TFDS mocks
only patch the process that enters them). Every subprocess has a timeout, so a hang fails the test instead of CI.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import tensorflow as tf

from conftest import make_config
from research import UserError, config as config_lib, distribute, per_example, run_dir, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCK_TRAIN = [sys.executable, os.path.join(REPO, "tests", "mock_train.py")]
SMALL = dict(model="mlp", hidden_units="16", batch_size=8, train_steps=12, steps_per_loop=4, eval_every=8,
             checkpoint_every=4, optimizer="adam")  # conftest.make_config's defaults, as command-line flags.


def _flags(**values):
    return [f"--{name}={value}" for name, value in values.items()]


def _checkpoint_tensors(model_dir):
    reader = tf.train.load_checkpoint(model_dir)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "CHECKPOINTABLE_OBJECT_GRAPH" not in name}


@pytest.mark.slow
def test_mirrored_matches_one_device_and_evaluates_every_example_once(mock_tfds, tmp_path):
    # 64 eval examples in batches of 10 (5 per replica): 12 full batches, a remainder of 4, and a last step on
    # which one replica has no data at all.
    flags = dict(batch_size=10, train_steps=12, eval_every=12, checkpoint_every=12)
    single = trainer.train_and_evaluate(make_config(tmp_path / "default", strategy="default", **flags))
    mirrored_config = make_config(tmp_path / "mirrored", strategy="mirrored", **flags)
    mirrored = trainer.train_and_evaluate(mirrored_config)
    assert distribute.create_strategy(mirrored_config).num_replicas_in_sync == 2

    for run, results in (("default", single), ("mirrored", mirrored)):
        evals = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
        assert [e["examples"] for e in evals] == [64] and results["eval"]["examples"] == 64
        assert int(np.sum(results["confusion_matrix"])) == 64
    expected, actual = _checkpoint_tensors(tmp_path / "default"), _checkpoint_tensors(tmp_path / "mirrored")
    assert sorted(expected) == sorted(actual) and any(t.shape == (784, 16) for t in expected.values())  # Weights.
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert mirrored["eval"]["loss"] == pytest.approx(single["eval"]["loss"], rel=1e-5)
    # Each example's prediction is filed at its own index whichever replica computed it.
    records = [per_example.read(run_dir.per_example_path(str(tmp_path / run), "eval"))
               for run in ("default", "mirrored")]
    np.testing.assert_array_equal(records[0]["label"], records[1]["label"])
    np.testing.assert_array_equal(records[0]["prediction"], records[1]["prediction"])
    np.testing.assert_allclose(records[0]["confidence"], records[1]["confidence"], rtol=1e-5)
    assert mirrored["eval"]["ece"] == pytest.approx(single["eval"]["ece"], abs=1e-6)


@pytest.mark.parametrize("jobs, task_type, task_id, chief, worker_id", [
    ({}, None, None, True, 0),
    ({"worker": 3}, "worker", 0, True, 0),
    ({"worker": 3}, "worker", 2, False, 2),
    ({"chief": 1, "worker": 2}, "chief", 0, True, 0),
    ({"chief": 1, "worker": 2}, "worker", 0, False, 1),
    ({"chief": 1, "worker": 2}, "worker", 1, False, 2),
])
def test_chief_and_worker_id_for_cluster_layouts(jobs, task_type, task_id, chief, worker_id):
    spec = tf.train.ClusterSpec({job: [f"host{job}{i}:2222" for i in range(n)] for job, n in jobs.items()})
    strategy = types.SimpleNamespace(cluster_resolver=tf.distribute.cluster_resolver.SimpleClusterResolver(
        spec, task_type=task_type, task_id=task_id))
    assert (distribute.is_chief(strategy), distribute.worker_id(strategy)) == (chief, worker_id)


@pytest.mark.parametrize("tf_config, message", [
    (None, "needs the TF_CONFIG environment variable"),
    ("{not json", "TF_CONFIG is not valid cluster JSON"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "worker", "index": 0}}', r"\['ps', 'worker'\]"),
    ('{"cluster": {"worker": ["a:1"]}}', "name this process's task"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "worker 1 is not in its cluster"),
])
def test_bad_tf_config_is_one_clear_error(monkeypatch, tf_config, message):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(UserError, match=message):
        distribute._tf_config_resolver()


def test_slurm_cluster_is_one_task_per_node_on_a_port_from_the_job_id(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "3")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[07-08],cpu1")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "1(x3)")
    resolver = distribute._slurm_resolver(num_gpus=4)
    assert resolver.cluster_spec().as_dict() == {"worker": ["cpu1:24242", "gpu07:24242", "gpu08:24242"]}
    assert (resolver.task_type, resolver.task_id, resolver.num_accelerators()) == ("worker", 1, {"GPU": 4})
    assert distribute._slurm_resolver(num_gpus=0).num_accelerators() == {"GPU": 0}  # CPU-only nodes.

    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "2,1")
    with pytest.raises(UserError, match="one task per node"):
        distribute._slurm_resolver(num_gpus=0)
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "1(x3)")
    monkeypatch.delenv("SLURM_PROCID")
    with pytest.raises(UserError, match="SLURM_PROCID not found.*srun"):
        distribute._slurm_resolver(num_gpus=0)


def test_num_gpus_hides_the_other_gpus_on_every_strategy(monkeypatch):
    gpus = ["GPU:0", "GPU:1", "GPU:2"]
    visible = list(gpus)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind=None: list(visible))
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind=None: visible.__setitem__(
        slice(None), devices))
    assert distribute._use_first_gpus(2) == ["GPU:0", "GPU:1"] and visible == ["GPU:0", "GPU:1"]
    assert distribute._use_first_gpus(0) == [] and visible == []
    with pytest.raises(UserError, match="--num_gpus=4 but this host has 3 visible GPU"):
        distribute._use_first_gpus(4)


@pytest.mark.parametrize("strategy", ["default", "auto", "one_device", "mirrored"])
def test_num_gpus_is_checked_on_every_strategy(strategy):
    with pytest.raises(UserError, match="--num_gpus=1 but this host has 0 visible GPU"):
        distribute.create_strategy(config_lib.make_config(model_dir="x", train_steps=1, strategy=strategy,
                                                          num_gpus="1"))


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_any_worker_on_one_process_is_the_flag(strategy):
    s = distribute.create_strategy(make_config("unused", strategy=strategy))
    assert distribute.any_worker(s, True) is True and distribute.any_worker(s, False) is False


def test_a_lost_worker_is_one_line_naming_it():
    heartbeats = ("Graph execution error:\n\nDetected at node CollectiveReduceV2 defined at (most recent call last):\n"
                  "Collective ops is aborted by: Error reported from /job:worker/task:0: The following tasks are "
                  "unhealthy (stopped sending heartbeats):\n/job:worker/replica:0/task:1\nThe tasks have crashed. "
                  "Check the task logs for an earlier error.\nThe error could be from a previous operation.\n"
                  "\t [[{{node CollectiveReduceV2}}]]")
    reset = ("Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error information from "
             "remote target /job:worker/replica:0/task:1 while calling /tensorflow.WorkerService/RecvBuf:\n:UNKNOWN")
    for text, cause in ((heartbeats, "(stopped sending heartbeats): /job:worker/replica:0/task:1)"),
                        (reset, "Connection reset by peer Additional GRPC error information from remote target "
                                "/job:worker/replica:0/task:1)")):
        message = distribute.lost_worker_message(tf.errors.UnavailableError(None, None, text))
        assert message.startswith("lost contact with another worker (") and cause in message
        assert "\n" not in message and "start every worker again" in message
    assert distribute.lost_worker_message(tf.errors.UnavailableError(None, None, "GCS unreachable")) is None


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _launch(num_workers, *args, env=None, timeout=240):
    return subprocess.run(["bash", "launch/local_multiworker.sh", str(num_workers), *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


@pytest.mark.slow
def test_two_workers_train_only_the_chief_writes_and_the_run_resumes(mock_tfds, tmp_path, capsys):
    model_dir = tmp_path / "run"
    run = _launch(2, *_flags(model_dir=model_dir, **SMALL), env={"TRAIN_COMMAND": " ".join(MOCK_TRAIN)})
    assert run.returncode == 0, run.stderr[-3000:]
    for i in range(2):
        assert "Done: step 12" in (model_dir / "logs" / f"worker{i}.log").read_text()
    results = json.loads((model_dir / "results.json").read_text())
    assert results["step"] == 12 and results["eval"]["examples"] == 64
    assert os.path.exists(model_dir / "ckpt-12.index") and not os.path.exists(model_dir / "LOCK")
    assert not [d for d, _, _ in os.walk(model_dir) if ".worker" in d]

    resumed = trainer.train_and_evaluate(make_config(model_dir, strategy="default", train_steps=16))
    assert "Resuming from" in capsys.readouterr().out and resumed["step"] == 16


def _wait_for(path, text, procs, timeout):
    """Polls the file `path` until it holds `text`, failing if a process in `procs` ends or `timeout` passes."""
    deadline = time.time() + timeout
    while not (os.path.exists(path) and text in open(path).read()):
        ended = {name: p.returncode for name, p in procs.items() if p.poll() is not None}
        assert not ended and time.time() < deadline, f"waiting for {text!r} in {path}: ended {ended}"
        time.sleep(0.5)


@pytest.mark.slow
def test_killing_a_worker_ends_the_chief_promptly_with_a_clear_message(tmp_path):
    ports = _free_ports(2)
    cluster = {"chief": [f"127.0.0.1:{ports[0]}"], "worker": [f"127.0.0.1:{ports[1]}"]}
    flags = _flags(model_dir=tmp_path / "run", strategy="multi_worker_mirrored", **{**SMALL, "train_steps": 10**6})
    procs = {}
    try:
        for task in ("chief", "worker"):
            env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task, "index": 0}})}
            with open(tmp_path / f"{task}.log", "w") as log:
                procs[task] = subprocess.Popen(MOCK_TRAIN + flags, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                               stdout=log, stderr=subprocess.STDOUT)
        _wait_for(tmp_path / "chief.log", "\nstep ", procs, timeout=180)  # A loop of steps trained together.
        # Only the chief, not the "worker" task 0, took the run directory.
        holder = json.load(open(tmp_path / "run" / "LOCK"))
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), procs["chief"].pid)

        procs["worker"].kill()
        killed_at = time.time()
        procs["chief"].wait(timeout=120)
        print(f"chief ended {time.time() - killed_at:.1f}s after the worker was killed")
        output = open(tmp_path / "chief.log").read()
        assert procs["chief"].returncode != 0
        assert re.search(r"UnavailableError|error: lost contact with another worker", output), output[-3000:]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


FAKE_WORKER = """#!/usr/bin/env bash
# A stand-in for research.train: worker 1 fails after a moment, the others wait to be stopped.
echo "TF_CONFIG=$TF_CONFIG ARGS=$*"
case $TF_CONFIG in *'"index": 1}'*) sleep 1; exit 7 ;; esac
trap 'kill $!; echo "stopped by SIGTERM"; exit 143' TERM
sleep 120 & wait
"""


@pytest.mark.slow
def test_launcher_stops_every_worker_when_one_fails_and_exits_with_its_status(tmp_path):
    fake = tmp_path / "fake_worker.sh"
    fake.write_text(FAKE_WORKER)
    fake.chmod(0o755)
    run = _launch(3, "--model_dir", str(tmp_path / "run"), "--seed=1", env={"TRAIN_COMMAND": str(fake)}, timeout=60)
    assert run.returncode == 7, run.stderr
    assert "worker 1 exited with status 7" in run.stderr
    logs = [(tmp_path / "run" / "logs" / f"worker{i}.log").read_text() for i in range(3)]
    assert "stopped by SIGTERM" in logs[0] and "stopped by SIGTERM" in logs[2]
    configs = [json.loads(log.split("TF_CONFIG=")[1].split(" ARGS=")[0]) for log in logs]
    assert [c["task"] for c in configs] == [{"type": "worker", "index": i} for i in range(3)]
    addresses = configs[0]["cluster"]["worker"]
    assert len(set(addresses)) == 3 and all(a.startswith("127.0.0.1:") for a in addresses)
    assert logs[0].rstrip().split("\n")[1].endswith("ARGS=--model_dir " + str(tmp_path / "run")
                                                   + " --seed=1 --strategy=multi_worker_mirrored")


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["bash", "launch/local_multiworker.sh"],
    ["bash", "launch/local_multiworker.sh", "two", "--model_dir=x"],
    ["bash", "launch/local_multiworker.sh", "2", "--train_steps=5"],  # No --model_dir for the logs.
    ["bash", "launch/multi_gpu.sh"],
    ["bash", "launch/multi_gpu.sh", "--help"],
    ["bash", "launch/slurm.sbatch"],
])
def test_launchers_explain_their_usage(command):
    run = subprocess.run(command, cwd=REPO, text=True, capture_output=True, timeout=30)
    assert run.returncode == 2 and run.stderr.startswith("usage:"), run.stderr


@pytest.mark.slow
def test_multi_gpu_and_slurm_launchers_run_the_trainer_with_their_strategy(tmp_path):
    env = {**os.environ, "PYTHON": "echo"}
    run = subprocess.run(["bash", "launch/multi_gpu.sh", "--num_gpus=2", "--model_dir=m"], cwd=REPO, env=env,
                         text=True, capture_output=True, timeout=30)
    assert run.stdout.split() == ["-m", "research.train", "--num_gpus=2", "--model_dir=m", "--strategy=mirrored"]

    (tmp_path / "srun").write_text('#!/usr/bin/env bash\necho "srun $*"\n')
    (tmp_path / "srun").chmod(0o755)
    env.update(PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_ID="99")
    run = subprocess.run(["bash", "launch/slurm.sbatch", f"--model_dir={tmp_path}/m"], cwd=REPO, env=env, text=True,
                         capture_output=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--open-mode=append",
                                  f"--output={tmp_path}/m/logs/worker%t.log", "echo", "-m", "research.train",
                                  f"--model_dir={tmp_path}/m", "--strategy=multi_worker_mirrored", "--cluster=slurm"]


@pytest.mark.slow
def test_a_signal_to_one_worker_stops_every_worker_at_the_same_step_with_a_checkpoint(tmp_path):
    model_dir = tmp_path / "run"
    flags = _flags(model_dir=model_dir, **{**SMALL, "train_steps": 10**6, "checkpoint_every": 10**6})
    with open(tmp_path / "launcher.log", "w") as log:
        launcher = subprocess.Popen(["bash", "launch/local_multiworker.sh", "2", *flags], cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, "PYTHON": sys.executable,
                                                                   "TRAIN_COMMAND": " ".join(MOCK_TRAIN)})
    try:
        _wait_for(model_dir / "logs" / "worker1.log", "\nstep ", {"launcher": launcher}, timeout=180)
        worker1 = int(re.search(r"worker 1: pid (\d+)", open(tmp_path / "launcher.log").read()).group(1))
        os.kill(worker1, signal.SIGTERM)  # As when a scheduler preempts one host.
        assert launcher.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)
            launcher.wait(timeout=120)
    stops = {re.search(r"stopped by SIGTERM at step (\d+), checkpoint saved", (model_dir / "logs" / f"worker{i}.log")
                       .read_text()).group(1) for i in range(2)}
    assert len(stops) == 1 and tf.train.latest_checkpoint(model_dir).endswith(f"ckpt-{stops.pop()}")
