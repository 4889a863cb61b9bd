"""The tf.distribute strategy for `--strategy`, and the few facts about it the loop needs."""

import functools

import tensorflow as tf

from research import UserError


def create_strategy(config):
    return _strategy(config.strategy)


@functools.lru_cache(maxsize=None)
def _strategy(name):
    """One strategy object per kind and process: two MirroredStrategy objects in one process reuse collective keys
    and abort each other's all-reduces, which matters wherever train_and_evaluate runs more than once."""
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


def is_chief(strategy):
    """Whether this process writes the run directory (always, except on non-chief multi-worker processes)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in ("chief", None) or (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().jobs)


def worker_id(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver.task_id if resolver is not None and resolver.task_id is not None else 0
