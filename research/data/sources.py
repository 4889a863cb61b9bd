"""Random-access sources: example index -> (stored image, label), the one interface every dataset is read through.

Why random access: the batch stream is a pure function of (seed, step) (research/data/pipeline.py), so a pipeline
must fetch any example by its index, cheaply, in any order, and read only the examples of its own share of a step.
Three kinds of storage do that:
  - `ArraySource`: decoded uint8 images held in memory (small fixed-size TFDS datasets; fastest);
  - `FileSource`: one encoded image file per example, read with `tf.io.read_file` (`--dataset=folder:PATH`);
  - `RecordSource`: serialized `tf.train.Example`s from a random-access reader such as `tfds.data_source` over
    ArrayRecord files (there is no TF-native ArrayRecord op: one Python call fetches a whole step's records).
`reader()`, called where a pipeline is built, returns `read(indices)`: a TF function of an int64 index vector for
tf.data maps (the in-memory tensors it needs are made once, outside the map, and captured); `fetch(stored)` then
completes one example inside the per-example map (a file source reads its file there, in parallel with decoding,
where a loop over the batch's files would run them one by one).

Where datasets come from is a registry of openers by `--dataset` prefix (`folder:PATH`; no prefix is TFDS), so
adding a kind of dataset is one new module in this package with an `@register("prefix")` opener.
"""

import collections

import numpy as np
import tensorflow as tf

from research import UserError

_OPENERS = {}
DEFAULT = "tfds"


def register(prefix):
    """`@register("folder")` makes `--dataset=folder:ARG` call the decorated `opener(config, ARG)` -> Dataset."""
    def decorate(opener):
        _OPENERS[prefix] = opener
        return opener
    return decorate


def opener_of(dataset_flag):
    """(opener, its argument) for a --dataset value: a registered `prefix:ARG`, else the TFDS name."""
    prefix, colon, argument = dataset_flag.partition(":")
    if colon and prefix in _OPENERS and prefix != DEFAULT:
        if not argument:
            raise UserError(f"--dataset={dataset_flag}: give a path after '{prefix}:'")
        return _OPENERS[prefix], argument
    return _OPENERS[DEFAULT], dataset_flag


def shared_examples(a, b):
    """How many examples sources `a` and `b` have in common, from their `spans` ((where, start, stop) ranges of
    stored examples); None where either does not know where its examples come from (arrays made in memory)."""
    if a.spans is None or b.spans is None:
        return None
    ranges = collections.defaultdict(list)
    for where, start, stop in a.spans:
        ranges[where].append((start, stop))
    return sum(max(0, min(stop, b_stop) - max(start, b_start))
               for where, b_start, b_stop in b.spans for start, stop in ranges.get(where, ()))


def _as_read(stored):
    return stored


class ArraySource:
    """Decoded images [N, H, W, C] uint8 and labels [N] in memory."""
    encoded = False
    fetch = staticmethod(_as_read)
    advice = "the decoded arrays are in memory"

    def __init__(self, images, labels, description, spans=None):
        self.images, self.labels = images, np.asarray(labels, np.int64)
        self.description, self.spans = description, spans

    def __len__(self):
        return len(self.labels)

    def reader(self):
        images, labels = tf.constant(self.images), tf.constant(self.labels)
        return lambda indices: (tf.gather(images, indices), tf.gather(labels, indices))

    def name_of(self, index):
        return f"example {index} of {self.description}"


class FileSource:
    """One encoded image file per example (paths relative to `root`), read by index: `read` gives the paths,
    `fetch` the file's bytes."""
    encoded = True
    fetch = staticmethod(tf.io.read_file)
    advice = "`python -m research.data.verify` lists every bad file"

    def __init__(self, root, paths, labels, description):
        self.root, self.paths, self.labels = root, list(paths), np.asarray(labels, np.int64)
        self.description = description

    def __len__(self):
        return len(self.labels)

    @property
    def spans(self):
        return [(path, 0, 1) for path in self.paths]

    def reader(self):
        paths = tf.constant([f"{self.root}/{p}" for p in self.paths], tf.string)
        labels = tf.constant(self.labels)

        def read(indices):
            return tf.gather(paths, indices), tf.gather(labels, indices)

        return read

    def name_of(self, index):
        return f"{self.root}/{self.paths[index]}"


class RecordSource:
    """Serialized tf.train.Examples by index from `records` (a Sequence, with `__getitems__` for whole batches as
    `tfds.data_source` has), parsed in TF: `image` (encoded bytes) and `label` (int64) features."""
    encoded = True
    fetch = staticmethod(_as_read)

    def __init__(self, records, description, prepared_dir, image_key="image", label_key="label", spans=None):
        self.records, self.description, self.spans = records, description, spans
        self.advice = f"if the prepared files are damaged, delete {prepared_dir} and run again to prepare it anew"
        self.features = {image_key: tf.io.FixedLenFeature([], tf.string),
                         label_key: tf.io.FixedLenFeature([], tf.int64)}
        self.image_key, self.label_key = image_key, label_key

    def __len__(self):
        return len(self.records)

    def _fetch(self, indices):
        """(the records, '') or (empty records, 'WHY') where the reader fails: an exception raised here would be
        logged with its Python traceback by every reader thread it reaches (thousands of lines over one error)."""
        keys = [int(i) for i in indices.numpy()]
        getitems = getattr(self.records, "__getitems__", None)
        try:
            records = getitems(keys) if getitems else [self.records[k] for k in keys]
        except Exception as e:  # noqa: BLE001 - ArrayRecord reports damaged files as RuntimeError, OSError, ...
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            return np.full(len(keys), b"", dtype=object), f"{type(e).__name__}: {reason}"
        return np.array(records, dtype=object), ""

    def reader(self):
        def read(indices):
            serialized, error = tf.py_function(self._fetch, [indices], [tf.string, tf.string])
            with tf.control_dependencies([tf.debugging.Assert(tf.equal(error, ""), [error], name="record_read")]):
                serialized = tf.identity(serialized)
            serialized.set_shape(indices.shape)
            parsed = tf.io.parse_example(serialized, self.features)
            return parsed[self.image_key], parsed[self.label_key]

        return read

    def name_of(self, index):
        return f"record {index} of {self.description}"
