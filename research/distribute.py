"""The tf.distribute strategy for `--strategy`, and the few facts about it the loop needs.

Multi-worker runs (`--strategy=multi_worker_mirrored`) start one process per host, each with the same flags; the
cluster comes from TF_CONFIG (launch/local_multiworker.sh writes it) or from the SLURM job step (launch/slurm.sbatch).
All workers run the same loop in lockstep, since every step and evaluation is a collective: a choice that could
differ between processes (stop on a signal one of them got) must be agreed first (`any_worker`). Which checkpoint to
resume from is not agreed: each worker takes the newest readable one in --model_dir, which must be on a filesystem
all hosts share. Only the chief writes the run directory (see research/checkpoint.py and research/reporting.py).

When a worker dies or stops responding, the others learn it from the coordination service that
MultiWorkerMirroredStrategy starts on the chief: each process sends it heartbeats, and a task silent for 10 s
(TensorFlow's default) aborts every pending and future collective with `tf.errors.UnavailableError` naming the
task; a peer whose connection drops mid-collective fails it at once. No collective timeout is set
(`CommunicationOptions(timeout_seconds=...)`): it applies to each all-reduce separately, and must exceed the longest
legitimate wait of one worker for another (two workers preparing MNIST at once took 110 s on a small machine; the
first step's tracing and the chief's writes also stall the others), so any value that catches a live but stuck
worker promptly would also kill healthy runs.
"""

import functools
import json
import os
import re

import tensorflow as tf

from research import UserError


def create_strategy(config):
    """The strategy for `config`; the same object every time for the same settings (see `_strategy`)."""
    if config.num_gpus is not None and config.num_gpus < 0:
        raise UserError(f"--num_gpus must be >= 0, got {config.num_gpus}")
    return _strategy(config.strategy, config.num_gpus, config.cluster)


@functools.lru_cache(maxsize=None)
def _strategy(name, num_gpus, cluster):
    """One strategy object per setting and process: two MirroredStrategy objects in one process reuse collective keys
    and abort each other's all-reduces, which matters wherever train_and_evaluate runs more than once."""
    if name == "multi_worker_mirrored":
        return _multi_worker(num_gpus, cluster)
    _use_first_gpus(num_gpus)
    gpus = tf.config.list_logical_devices("GPU")
    requested = name
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "one_device" if gpus else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if name == "mirrored":
        # With no GPU, mirror over the logical CPUs (tests split the CPU into two to exercise this path).
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    raise UserError(f"--strategy={requested} is unknown")


def _use_first_gpus(num_gpus):
    """Hides every GPU but the first `num_gpus` (all if None) from TensorFlow, so that no strategy, not even the
    default one's placement, runs anything on the others; returns the physical GPUs left. Physical devices: listing
    logical ones would initialise the context, after which visibility can no longer change."""
    gpus = tf.config.list_physical_devices("GPU")
    if num_gpus is None:
        return gpus
    if num_gpus > len(gpus):
        raise UserError(f"--num_gpus={num_gpus} but this host has {len(gpus)} visible GPU(s)")
    if tf.config.get_visible_devices("GPU") != gpus[:num_gpus]:
        try:
            tf.config.set_visible_devices(gpus[:num_gpus], "GPU")
        except RuntimeError:
            raise UserError(f"--num_gpus={num_gpus} must take effect before TensorFlow runs anything in the "
                            "process; run it as its own `python -m research.train` process") from None
    return gpus[:num_gpus]


def _multi_worker(num_gpus, cluster):
    """MultiWorkerMirroredStrategy over this host's GPUs (or its CPU) and the cluster named by --cluster.

    It must be created before TensorFlow runs anything in the process, because it starts the process's gRPC server
    and configures collectives on the eager context; only calls that leave the context uninitialised may precede it
    (seeding, op determinism, listing physical devices, as train_and_evaluate does).
    """
    gpus = _use_first_gpus(num_gpus)
    resolver = _slurm_resolver(len(gpus)) if cluster == "slurm" else _tf_config_resolver()
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    except RuntimeError as e:
        if "program startup" in str(e):
            raise _too_late() from None
        raise


def _too_late():
    return UserError("--strategy=multi_worker_mirrored must be set up before TensorFlow runs anything in the process; "
                     "run each worker as its own `python -m research.train` process (see launch/)")


def _tf_config_resolver():
    """The cluster of the TF_CONFIG environment variable: 'chief' (optional) and 'worker' tasks only."""
    try:
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        jobs = resolver.cluster_spec().as_dict()
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"TF_CONFIG is not valid cluster JSON ({e}): {os.environ.get('TF_CONFIG', '')[:200]}") from None
    if not jobs:
        raise UserError("--strategy=multi_worker_mirrored --cluster=tf_config needs the TF_CONFIG environment "
                        "variable (launch/local_multiworker.sh sets it for workers on this host)")
    others = sorted(set(jobs) - {"chief", "worker"})
    if others or resolver.task_type not in jobs or resolver.task_id is None:
        raise UserError(f"TF_CONFIG must list 'chief' and 'worker' tasks only and name this process's task; "
                        f"got jobs {sorted(jobs)} and task {resolver.task_type!r} {resolver.task_id!r}")
    if resolver.task_id >= len(jobs[resolver.task_type]):
        raise UserError(f"TF_CONFIG task {resolver.task_type} {resolver.task_id} is not in its cluster {json.dumps(jobs)}")
    return resolver


def _slurm_resolver(num_gpus):
    """The cluster of the current SLURM job step, one task (one worker, all its GPUs) per node.

    The port is derived from the job id, the same on every node and unlike other jobs' sharing a node (a fixed port,
    TensorFlow's 8888, is often taken by notebooks). SlurmClusterResolver is given at least one GPU per task because
    it cannot count zero; the strategy gets the true count through a SimpleClusterResolver.
    """
    per_node = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1")  # e.g. '1(x4)'; '2,1' is 2 tasks on the first node.
    if not all(re.fullmatch(r"1(\(x\d+\))?", part) for part in per_node.split(",")):
        raise UserError(f"--cluster=slurm runs one task per node, got {per_node} (SLURM_STEP_TASKS_PER_NODE); "
                        "use srun --ntasks-per-node=1")
    port = 20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000
    try:
        slurm = tf.distribute.cluster_resolver.SlurmClusterResolver(
            port_base=port, gpus_per_node=max(num_gpus, 1), auto_set_gpu=False)
        spec = slurm.cluster_spec()  # Also sets task_type and task_id.
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"--cluster=slurm: cannot read the SLURM job step ({str(e).splitlines()[0]}); "
                        "start one task per node with srun (see launch/slurm.sbatch)") from None
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        spec, task_type=slurm.task_type, task_id=slurm.task_id, num_accelerators={"GPU": num_gpus}, rpc_layer="grpc")


def is_chief(strategy):
    """Whether this process writes the run directory (always, except on non-chief multi-worker processes)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in ("chief", None) or (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs)


def worker_id(strategy):
    """This process's index in the cluster, unique per process: the chief is 0, then the workers in order."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None or not resolver.cluster_spec().as_dict():
        return 0
    if resolver.task_type == "chief":
        return 0
    return resolver.task_id + (1 if "chief" in resolver.cluster_spec().jobs else 0)


def any_worker(strategy, flag):
    """Whether `flag` is true on any process of the run, the same answer on all of them.

    How the workers agree on a decision that only some can see: a stop signal delivered to one host (`any_worker(s,
    bool(stop_signal))`), or a choice only the chief can make because only it reads the run directory (`any_worker(s,
    chief and improved)` is the chief's choice, on every worker). It is a collective, so every worker must call it
    at the same point of the loop; on one process it returns `bool(flag)`.
    """
    return bool(_count_fn(strategy)(tf.constant(float(bool(flag)))) > 0)


@functools.lru_cache(maxsize=None)
def _count_fn(strategy):
    """Sums a 0/1 float over replicas (every local replica adds its process's flag): exact, and any device can."""

    @tf.function
    def count(flag):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(tf.identity, args=(flag,)), axis=None)

    return count


def lost_worker_message(error):
    """One line for a `tf.errors.UnavailableError` that aborted the collectives because a worker died or stopped
    answering (None for any other UnavailableError): which task, and what to do. TensorFlow's own text is a page."""
    text = " ".join(error.message.split())
    if "Collective ops is aborted by:" not in text:
        return None
    cause = re.split(r" (?:The tasks have crashed|The error could be|while calling|\[\[)", text.split(
        "Collective ops is aborted by:", 1)[1], maxsplit=1)[0].strip()
    return (f"lost contact with another worker ({cause}); the run stopped: start every worker again with the same "
            "command to resume from the last checkpoint")
