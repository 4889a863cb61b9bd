"""Input pipelines: any TFDS image-classification dataset small enough to hold in memory, fed through tf.distribute.

Why the training pipeline looks the way it does: a distributed iterator cannot be checkpointed, so the stream of
batches is a pure function of (seed, step). The split is held in memory as uint8 (MNIST: 47 MB, CIFAR-10: 150 MB);
epoch `e` visits it in a stateless random order drawn from (seed, e); a run resuming at step s rebuilds epoch
s // steps_per_epoch and starts from the right place in its order, a slice that costs the same at any epoch.
Batches are gathered from memory, so no decoding or caching stands between the model and its data. Augmentation
draws its randomness from (seed, epoch, position in epoch), never from hidden state.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import threading
import urllib.parse
import zipfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from research import UserError, augment

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A loaded dataset: image shape, class names, and each split as numpy (uint8 images [N, H, W, C], labels [N])."""
    name: str
    image_shape: tuple
    class_names: list
    train_images: np.ndarray
    train_labels: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def num_train(self):
        return len(self.train_labels)


def load(config):
    """Prepares (if needed) and opens --dataset; every problem is one UserError line."""
    try:
        builder = tfds.builder(config.dataset, data_dir=config.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"--dataset={config.dataset} is not a TFDS dataset (see `tfds.list_builders()`)") from None
    features = builder.info.features
    if not {"image", "label"} <= set(features.keys()):
        raise UserError(f"--dataset={config.dataset} is not image classification: it has no 'image' and 'label'")
    image_shape = tuple(features["image"].shape)
    if None in image_shape:
        raise UserError(f"--dataset={config.dataset} has images of varying size {image_shape}; pick a fixed-size one")
    if not builder.is_prepared():
        ensure_downloadable(builder, config.tfds_manual_dir)
        # Several processes (the workers of a multi-worker run, parallel sweep runs) may start on one unprepared
        # data_dir: the first prepares, the others wait for it and then read what it wrote.
        with _exclusive(os.path.join(os.path.dirname(builder.data_dir), ".prepare.lock")):
            builder = tfds.builder(config.dataset, data_dir=config.data_dir)
            if not builder.is_prepared():
                builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(manual_dir=config.tfds_manual_dir))
    return Dataset(config.dataset, image_shape, list(features["label"].names),
                   *_read_split(builder, config.train_split, "train_split"),
                   *_read_split(builder, config.eval_split, "eval_split"))


def ensure_downloadable(builder, manual_dir):
    """Fails fast, naming the files to fetch, where TFDS would otherwise retry an unreachable download forever."""
    files = {url: getattr(info, "filename", None) or os.path.basename(urllib.parse.urlparse(url).path)
             for url, info in (builder.url_infos or {}).items()}
    if manual_dir:
        if not os.path.isdir(manual_dir):
            raise UserError(f"--tfds_manual_dir={manual_dir} is not a directory")
        missing = sorted(name for name in files.values() if not os.path.exists(os.path.join(manual_dir, name)))
        if missing or not files:
            raise UserError(f"--tfds_manual_dir={manual_dir} lacks {', '.join(missing) or 'the source files'} "
                            f"needed to prepare {builder.name}")
        return
    hosts = sorted({urllib.parse.urlparse(url).hostname for url in files})
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS or not all(map(_reachable, hosts)):
        raise UserError(
            f"{builder.name} is not prepared in {builder.data_dir} and cannot be downloaded from here: "
            f"put {', '.join(sorted(files.values())) or 'its source files'} in a folder "
            f"and pass --tfds_manual_dir=FOLDER (or --data_dir=DIR where it is already prepared)")


@contextlib.contextmanager
def _exclusive(lock_path):
    """Holds an exclusive lock on `lock_path` (flock: released by the kernel if the process dies)."""
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _reachable(host, timeout=5.0):
    """Whether `host` accepts a TCP connection; DNS lookups run in a thread because they have no timeout."""
    result = []

    def connect():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result)


def _read_split(builder, split, flag):
    """(images, labels) of one split, from the decoded-array cache beside the prepared files when it is current."""
    try:
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    except (ValueError, KeyError, AssertionError) as e:
        raise UserError(f"--{flag}={split} is not a split of {builder.name}: {str(e).splitlines()[0]}") from None
    cache, fingerprint = _cache_of(builder, split)
    if cache:
        try:
            with np.load(cache) as arrays:
                if str(arrays["fingerprint"]) == fingerprint:
                    return arrays["images"], arrays["labels"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # Absent, stale or damaged: decode the split again below and rewrite the cache.
    chunks = list(tfds.as_numpy(ds.batch(4096)))  # (batch_size=-1 crashes under tfds.testing.mock_data)
    if not chunks:
        raise UserError(f"--{flag}={split} of {builder.name} is empty")
    images, labels = np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
    if cache and len(labels) == builder.info.splits[split].num_examples:
        _write_cache(cache, images=images, labels=labels, fingerprint=fingerprint)
    return images, labels


def _write_cache(path, **arrays):
    """Written whole under a temporary name, then renamed (as checkpoint.py writes its files), so that readers never
    see half a file; a data_dir this process cannot write only costs the decoding again next time."""
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(temporary)


def _cache_of(builder, split):
    """Where the split's decoded arrays are cached, and the fingerprint (files, sizes, mtimes, slices) that must
    match for the cache to be used. Decoding MNIST's PNGs takes ~4 s of every run's start; loading the arrays
    ~0.1 s. (None, None) when the split's files are not on disk, as under `tfds.testing.mock_data`."""
    try:
        files = []
        for instruction in builder.info.splits[split].file_instructions:
            stat = os.stat(instruction.filename)
            files.append([os.fspath(instruction.filename), instruction.skip, instruction.take, stat.st_size,
                          stat.st_mtime_ns])
    except (OSError, KeyError, ValueError, TypeError):
        return None, None
    if not files:
        return None, None
    name = hashlib.sha1(split.encode()).hexdigest()[:12]
    return os.path.join(builder.data_dir, f"arrays-{name}.npz"), json.dumps([split, files])


def to_float(images):
    """uint8 [0, 255] -> float32 [0, 1], as the tutorials scale."""
    return tf.cast(images, tf.float32) / 255.0


def train_input_fn(dataset, config, start_step):
    """For `strategy.distribute_datasets_from_function`: this pipeline's endless batches from `start_step` on."""
    global_batch = config.batch_size
    steps_per_epoch = dataset.num_train // global_batch
    start_epoch, steps_done = divmod(start_step, steps_per_epoch)
    ops = augment.parse(config.augment, dataset.image_shape)

    def input_fn(ctx):
        per_replica = ctx.get_per_replica_batch_size(global_batch)
        images, labels = tf.constant(dataset.train_images), tf.constant(dataset.train_labels)

        def epoch(e):
            # The epoch's order; the remainder that does not fill a global batch is dropped, as every step
            # must see exactly one global batch. Position i of the order goes to pipeline i % num_pipelines.
            order = tf.argsort(tf.random.stateless_uniform([dataset.num_train], [config.seed, e]))
            order = order[: steps_per_epoch * global_batch]
            positions = tf.range(steps_per_epoch * global_batch, dtype=tf.int64)
            first = tf.where(e == start_epoch, steps_done * global_batch, 0)
            ds = tf.data.Dataset.from_tensor_slices((positions[first:], order[first:]))
            ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
            if ops:
                ds = ds.map(lambda i, k: (augment.apply(ops, to_float(tf.gather(images, k)), [config.seed, e, i]),
                                          tf.gather(labels, k)), num_parallel_calls=AUTOTUNE)
                return ds.batch(per_replica, drop_remainder=True)
            return ds.batch(per_replica, drop_remainder=True).map(
                lambda i, k: (to_float(tf.gather(images, k)), tf.gather(labels, k)), num_parallel_calls=AUTOTUNE)

        ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch)
        return ds.prefetch(AUTOTUNE).with_options(_options())

    return input_fn


def eval_input_fn(dataset, config):
    """Every eval example exactly once across all pipelines; the last batch may be partial (or empty on a replica)."""

    def input_fn(ctx):
        per_replica = ctx.get_per_replica_batch_size(config.batch_size)
        ds = tf.data.Dataset.from_tensor_slices((dataset.eval_images, dataset.eval_labels))
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        ds = ds.batch(per_replica).map(lambda x, y: (to_float(x), y), num_parallel_calls=AUTOTUNE)
        return ds.prefetch(AUTOTUNE).with_options(_options())

    return input_fn


def _options():
    options = tf.data.Options()
    options.deterministic = True
    # We shard by hand (above): AUTO sharding by file fails on single-file datasets such as MNIST.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options
