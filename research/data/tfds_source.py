"""TFDS datasets (`--dataset=NAME`): prepared (offline check, manual files, one preparer at a time), then read either
from memory or streamed by index from the prepared ArrayRecord files (`--tfds_read`).

Why two ways: a small fixed-size dataset decoded into memory is the fastest input there is (MNIST: 47 MB, read in
0.1 s from a decoded-array cache beside the prepared files); anything larger, or with images of varying size
(imagenet2012, tf_flowers, food101), is read example by example from ArrayRecord files, which random access needs
(TFRecord files can only be read in sequence). New preparations are written as ArrayRecord, which serves both.
Both ways give the same pixels, so a run's batches do not depend on which one read them.
"""

import contextlib
import fcntl
import hashlib
import io
import json
import logging as std_logging
import os
import re
import socket
import threading
import urllib.parse
import zipfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags
from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

from research import UserError, cli, fs
from research.config import RUNTIME, declare
from research.data import preprocess, sources
from research.data.dataset import Dataset

declare(RUNTIME, flags.DEFINE_enum(
    "tfds_read", "auto", ["auto", "memory", "array_record"],
    "How a TFDS dataset is read: memory decodes fixed-size splits into RAM (fastest for small datasets; cached "
    "as arrays-*.npz beside the prepared files); array_record streams examples by index from the prepared "
    "ArrayRecord files (any size, any number of examples); auto: memory for fixed-size images whose decoded "
    "training split is under 1 GiB, else array_record. Both give the same batches."),
        only_if=lambda c: not c.dataset.startswith("folder:"), when="for TFDS datasets, not folder:PATH")
IN_MEMORY_LIMIT_BYTES = 2**30  # --tfds_read=auto holds a fixed-size train split in memory below this decoded size.


@sources.register(sources.DEFAULT)
def open_tfds(config, name):
    """Prepares (if needed) and opens TFDS dataset `name`; every problem is one UserError line."""
    builder = _builder(name, config.data_dir)
    features = builder.info.features
    names = set(features.keys()) if hasattr(features, "keys") else set()
    if not ({"image", "label"} <= names and isinstance(features["image"], tfds.features.Image)
            and isinstance(features["label"], tfds.features.ClassLabel)):
        raise UserError(f"--dataset={name} is not image classification: it has no 'image' and class 'label' features")
    stored_shape = tuple(features["image"].shape)
    channels = stored_shape[-1] or 3
    prep = preprocess.preprocessing(config, stored_shape, channels)
    if not _is_prepared(builder):
        builder = _prepare(builder, name, config)
    in_memory = _reads_in_memory(builder, config, stored_shape)

    def open_split(split, flag):
        return _array_source(builder, split, flag, channels) if in_memory else _record_source(builder, split, flag)

    train = open_split(config.train_split, "train_split") if config.train_split else None
    return Dataset(name, (*prep.image_size, channels), list(features["label"].names), train,
                   open_split(config.eval_split, "eval_split"), prep, stored_shape,
                   "in memory" if in_memory else f"streamed by index from ArrayRecord files in {builder.data_dir}",
                   extra_eval=tuple((split, open_split(split, "extra_eval")) for split in config.extra_eval))


def _builder(name, data_dir, **kwargs):
    """tfds.builder, quiet: for a dataset not yet prepared it logs an absl warning ('Variant folder ... has no
    dataset_info.json') that would precede our own message about what to do."""
    if data_dir:
        fs.check_filesystem(data_dir, "--data_dir")
    with _absl_warnings_silenced(), contextlib.redirect_stdout(io.StringIO()):  # (Its banners of missing modules.)
        try:
            return tfds.builder(name, data_dir=data_dir, **kwargs)
        except tfds.core.registered.DatasetNotFoundError:
            raise UserError(f"--dataset={name} is not a TFDS dataset (see `tfds.list_builders()`), "
                            "nor folder:PATH") from None
        except (ValueError, AssertionError, TypeError, ImportError, tf.errors.OpError) as e:  # Bad version, config...
            hint = f"; for a folder of images use --dataset=folder:{name}" if "/" in name or "." in name else ""
            raise UserError(f"--dataset={name}: TFDS cannot open it ({_first_line(e)}){hint}") from None


def _is_prepared(builder):
    with _absl_warnings_silenced():
        return builder.is_prepared()


@contextlib.contextmanager
def _absl_warnings_silenced():
    logger = std_logging.getLogger("absl")
    level = logger.level
    logger.setLevel(std_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _prepare(builder, name, config):
    ensure_downloadable(builder, config.tfds_manual_dir)
    # Several processes (the workers of a multi-worker run, parallel sweep runs) may start on one unprepared
    # data_dir: the first prepares, the others wait for it and then read what it wrote.
    with _exclusive(os.path.join(os.path.dirname(builder.data_dir), ".prepare.lock")) if not \
            fs.is_url(builder.data_dir) else contextlib.nullcontext():  # (flock needs a local filesystem.)
        builder = _builder(name, config.data_dir, file_format="array_record")
        if not _is_prepared(builder):
            try:
                # Downloads and extractions in a folder of this dataset's own: TFDS names extracted files after
                # the source file alone, and mnist and fashion_mnist have the same file names, so in the shared
                # default folder the second dataset prepared silently reads the first one's images.
                builder.download_and_prepare(
                    download_dir=os.path.join(builder.data_dir_root, "downloads", builder.name),
                    download_config=tfds.download.DownloadConfig(manual_dir=config.tfds_manual_dir))
            except NonMatchingChecksumError as e:
                raise UserError(f"{name}: a source file does not match the checksum TFDS registers for it "
                                f"({_first_line(e)}): it is another or a damaged copy; fetch it again into "
                                f"{config.tfds_manual_dir or 'the download folder'} and rerun") from None
    return _builder(name, config.data_dir)


def ensure_downloadable(builder, manual_dir):
    """Fails fast, naming the files to fetch, where TFDS would otherwise retry an unreachable download forever."""
    infos = builder.url_infos or {}
    files = {url: getattr(info, "filename", None) or os.path.basename(urllib.parse.urlparse(url).path)
             for url, info in infos.items()}
    if manual_dir:
        if not os.path.isdir(manual_dir):
            raise UserError(f"--tfds_manual_dir={manual_dir} is not a directory")
        missing = sorted(name for name in files.values() if not os.path.exists(os.path.join(manual_dir, name)))
        if missing or not files and not builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
            raise UserError(f"--tfds_manual_dir={manual_dir} lacks {', '.join(missing) or 'the source files'} "
                            f"needed to prepare {builder.name}")
        for url, name in files.items():  # Checked here, before TFDS prints its preparation and progress bars.
            expected = getattr(infos[url], "checksum", None)
            if expected and _sha256(os.path.join(manual_dir, name)) != expected:
                raise UserError(f"{builder.name}: --tfds_manual_dir={manual_dir} holds another or a damaged {name} "
                                f"(its SHA-256 is not the one TFDS registers for it); fetch it again and rerun")
        return
    hosts = sorted({urllib.parse.urlparse(url).hostname for url in files})
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS or not all(map(_reachable, hosts)):
        raise UserError(
            f"{builder.name} is not prepared in {builder.data_dir} and cannot be downloaded from here: "
            f"put {', '.join(sorted(files.values())) or 'its source files'} in a folder "
            f"and pass --tfds_manual_dir=FOLDER (or --data_dir=DIR where it is already prepared)")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _reads_in_memory(builder, config, stored_shape):
    if config.tfds_read != "auto":
        if config.tfds_read == "memory" and None in stored_shape:
            raise UserError(f"--tfds_read=memory needs fixed-size images; {builder.name}'s vary {stored_shape}")
        return config.tfds_read == "memory"
    if None in stored_shape:
        return False
    try:
        examples = int(builder.info.splits[config.train_split or config.eval_split].num_examples)
    except (KeyError, ValueError, TypeError, AssertionError):
        examples = 0  # A bad split name is reported when the split is opened.
    return examples * int(np.prod(stored_shape)) <= IN_MEMORY_LIMIT_BYTES


def _record_source(builder, split, flag):
    try:
        records = builder.as_data_source(split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except NotImplementedError:
        raise UserError(
            f"{builder.name} is prepared in {builder.data_dir} as TFRecord, which cannot be read by index: convert "
            f"it once with `tfds convert_format --dataset_version_dir={builder.data_dir} "
            "--out_file_format=array_record`, or use --tfds_read=memory if it fits") from None
    except (ValueError, KeyError, AssertionError) as e:
        raise UserError(f"--{flag}={split} is not a split of {builder.name}: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - ArrayRecord reports damaged files as RuntimeError, OSError, ...
        raise _damaged(builder, e, split) from None
    if not len(records):
        raise UserError(f"--{flag}={split} of {builder.name} is empty")
    return sources.RecordSource(records, f"{builder.name} {split}", builder.data_dir, spans=_spans(builder, split))


def _array_source(builder, split, flag, channels):
    """The split decoded into memory, from the decoded-array cache beside the prepared files when it is current.
    ArrayRecord files are decoded through their records (TFDS's as_dataset reads only TFRecord files)."""
    try:
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    except NotImplementedError:
        ds = _decoded(_record_source(builder, split, flag), channels)
    except (ValueError, KeyError, AssertionError) as e:
        raise UserError(f"--{flag}={split} is not a split of {builder.name}: {_first_line(e)}") from None
    cache, fingerprint = _cache_of(builder, split)
    if cache:
        try:
            with np.load(cache) as arrays:
                if str(arrays["fingerprint"]) == fingerprint:
                    return sources.ArraySource(arrays["images"], arrays["labels"], f"{builder.name} {split}",
                                               _spans(builder, split))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # Absent, stale or damaged: decode the split again below and rewrite the cache.
    try:
        chunks = list(tfds.as_numpy(ds.batch(4096)))  # (batch_size=-1 crashes under tfds.testing.mock_data)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        raise _damaged(builder, e, split) from None
    if not chunks:
        raise UserError(f"--{flag}={split} of {builder.name} is empty")
    images, labels = np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
    if cache and len(labels) == builder.info.splits[split].num_examples:
        _write_cache(cache, images=images, labels=labels, fingerprint=fingerprint)
    return sources.ArraySource(images, labels, f"{builder.name} {split}", _spans(builder, split))


def _spans(builder, split):
    """(shard file, first, end) of the stored examples a split reads (sources.shared_examples), or None where TFDS
    does not say (mocked data)."""
    try:
        return [(os.path.basename(i.filename), i.skip, i.skip + i.take)
                for i in builder.info.splits[split].file_instructions]
    except (KeyError, ValueError, TypeError, AttributeError, AssertionError):
        return None


def _decoded(source, channels):
    """(image, label) pairs of every record of `source`, decoded in parallel, in order."""
    return tf.data.Dataset.range(len(source)).batch(1024).map(source.reader()).unbatch().map(
        lambda image, label: (preprocess.decode(source.fetch(image), channels), label),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _damaged(builder, error, split):
    """A truncated or corrupt prepared file: which one (TFRecord errors name it; ArrayRecord's do not, so the
    split's files are named), and how to recover."""
    message = cli.op_error_line(error)
    message = (re.search(r"\w+Error: .*", message) or re.search(".*", message)).group(0)[:160]
    named = re.search(r"(/\S+?(?:tfrecord|array_record)\S*?)(?=[\s:,'\"]|$)", message)
    if not named:
        try:
            files = ", ".join(os.path.basename(i.filename) for i in builder.info.splits[split].file_instructions)
        except (KeyError, ValueError, TypeError):
            files = f"those of {split}"
    return UserError(f"{builder.name}'s prepared files in {builder.data_dir} are damaged "
                     f"({named.group(1) if named else f'{files}: {message}'}): delete {builder.data_dir} and run "
                     "again to prepare it anew")


def _first_line(error):
    text = getattr(error, "message", None) or str(error)
    return (text.strip().splitlines() or [type(error).__name__])[0][:300]


def _write_cache(path, **arrays):
    """Written whole (fs.write: readers never see half a file); a data_dir this process cannot write only
    costs the decoding again next time."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with contextlib.suppress(UserError):
        fs.write(path, buffer.getvalue())


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
